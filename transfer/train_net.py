#!/usr/bin/env python
"""Fine-tune Faster R-CNN from a converted backbone and report AP / AP50 / AP75 (detectron2's CLI).

    python transfer/train_net.py --config configs/voc_r50.yaml --num-gpus 8 MODEL.WEIGHTS out.pkl
    python transfer/train_net.py --config ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python transfer/train_net.py --config ... --trials 5          # MoCo's protocol: mean of 5 seeds

Engines: `--engine auto` (default) uses detectron2 when it can be imported, else our torchvision
engine (transfer/engine.py); both read the same YAML and write the same outputs.
"""
import argparse
import json
import math
import os
import socket
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run as a script: import the `transfer` package, not this folder's modules as top-level ones
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = _REPO
elif _REPO not in sys.path:
    sys.path.insert(0, _REPO)

METRICS = ("AP", "AP50", "AP75")


def argument_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", "--config", dest="config_file", default="", metavar="FILE",
                   help="path to the config YAML")
    p.add_argument("--engine", choices=("auto", "detectron2", "torchvision"), default="auto",
                   help="auto: detectron2 when importable, else torchvision (default: auto)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint when it exists (else start from MODEL.WEIGHTS)")
    p.add_argument("--eval-only", action="store_true", help="only evaluate MODEL.WEIGHTS (or the last checkpoint "
                   "with --resume)")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (default: 1)")
    p.add_argument("--num-machines", type=int, default=1, help="total number of machines (default: 1)")
    p.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (default: 0)")
    p.add_argument("--dist-url", default="auto",
                   help="init URL of the process group, e.g. tcp://host:port (default: a free local port)")
    p.add_argument("--trials", type=int, default=1,
                   help="run N seeds (SEED + k into OUTPUT_DIR/trial{k}) and report mean ± std (default: 1)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                   help="config overrides, e.g. SOLVER.MAX_ITER 100 MODEL.WEIGHTS out.pkl")
    return p


def detectron2_available():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(requested):
    if requested == "auto":
        return "detectron2" if detectron2_available() else "torchvision"
    if requested == "detectron2" and not detectron2_available():
        raise SystemExit("--engine detectron2: detectron2 cannot be imported; install it or use --engine torchvision")
    return requested


# ----------------------------------------------------------------------------------------------
# processes (detectron2's launch)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank, fn, world, num_gpus, machine_rank, dist_url, fn_args, use_cuda):
    import torch
    import torch.distributed as dist
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:  # CPU processes share the cores instead of each spinning up one thread per core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_gpus))
    dist.init_process_group(backend, init_method=dist_url, world_size=world,
                            rank=machine_rank * num_gpus + local_rank)
    try:
        fn(*fn_args)
    finally:
        dist.destroy_process_group()


def launch(fn, args, fn_args, use_cuda):
    """Run fn(*fn_args) in num_gpus x num_machines processes (or this one); torchrun's env also works.
    NCCL when the config's MODEL.DEVICE is CUDA, else gloo (CPU processes)."""
    import torch
    import torch.distributed as dist
    world = args.num_gpus * args.num_machines
    if world > 1:
        url = args.dist_url
        if url == "auto":
            if args.num_machines > 1:
                raise SystemExit("--dist-url is required with --num-machines > 1 (e.g. tcp://host:port)")
            url = f"tcp://127.0.0.1:{_free_port()}"
        torch.multiprocessing.spawn(_worker, nprocs=args.num_gpus,
                                    args=(fn, world, args.num_gpus, args.machine_rank, url, fn_args, use_cuda))
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        try:
            return fn(*fn_args)
        finally:
            dist.destroy_process_group()
    return fn(*fn_args)


def _torchvision_main(config_file, opts, args):
    from transfer.config import load_config
    from transfer.engine import run
    return run(load_config(config_file, opts), args)


def _d2_main(config_file, opts, args):
    from transfer import d2_engine  # EVAL's module; imported only for this engine
    return d2_engine.run(config_file, opts, args)


# ----------------------------------------------------------------------------------------------
# trials


def final_metrics(output_dir):
    """The last metrics.json line of `output_dir` that holds bbox/AP (either engine writes it)."""
    path = os.path.join(output_dir, "metrics.json")
    found = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    if "bbox/AP" in rec:
                        found = rec
    if found is None:
        raise RuntimeError(f"{path} holds no evaluation line (bbox/AP); did the run finish?")
    return {m: float(found[f"bbox/{m}"]) for m in METRICS}


def summarize(rows):
    """Mean and sample std (ddof 1; 0 for one trial) of AP/AP50/AP75 over trial rows."""
    mean, std = {}, {}
    for m in METRICS:
        vals = [r[m] for r in rows]
        mu = sum(vals) / len(vals)
        mean[m] = mu
        std[m] = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std


def main(argv=None):
    args = argument_parser().parse_args(argv)
    if args.trials < 1:
        raise SystemExit(f"--trials must be >= 1, got {args.trials}")
    engine = choose_engine(args.engine)
    print(f"[train_net] engine: {engine}" + (" (auto: detectron2 importable)" if args.engine == "auto" and
                                             engine == "detectron2" else
                                             " (auto: detectron2 not importable)" if args.engine == "auto" else ""),
          flush=True)
    entry = _d2_main if engine == "detectron2" else _torchvision_main
    opts = list(args.opts)

    from transfer.config import load_config
    # resolve OUTPUT_DIR/SEED (and, for our engine, reject bad configs before spawning anything)
    base = load_config(args.config_file, opts, validate_cfg=engine == "torchvision")
    use_cuda = base.MODEL.DEVICE.startswith("cuda")
    if args.trials == 1:
        return launch(entry, args, (args.config_file, opts, args), use_cuda)

    seed0 = base.SEED if base.SEED >= 0 else 0
    rows = []
    for k in range(args.trials):
        out = os.path.join(base.OUTPUT_DIR, f"trial{k}")
        trial_opts = opts + ["OUTPUT_DIR", out, "SEED", str(seed0 + k)]
        print(f"[train_net] trial {k}: SEED {seed0 + k}, OUTPUT_DIR {out}", flush=True)
        launch(entry, args, (args.config_file, trial_opts, args), use_cuda)
        rows.append({"trial": k, "seed": seed0 + k, "output_dir": out, **final_metrics(out)})
    mean, std = summarize(rows)
    summary = {"engine": engine, "trials": rows, "mean": mean, "std": std}
    from cocord_common.checkpoint import write_text_atomic
    write_text_atomic(os.path.join(base.OUTPUT_DIR, "trials_summary.json"), json.dumps(summary, indent=2))
    for m in METRICS:
        print(f"[train_net] {m}: {mean[m]:.2f} ± {std[m]:.2f} over {args.trials} trials", flush=True)
    return summary


if __name__ == "__main__":
    main()
