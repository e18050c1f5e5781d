#!/usr/bin/env python
"""Fine-tune Faster R-CNN from a converted backbone and report AP / AP50 / AP75 (detectron2's CLI).

    python transfer/train_net.py --config configs/voc_r50.yaml --num-gpus 8 MODEL.WEIGHTS out.pkl
    python transfer/train_net.py --config ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python transfer/train_net.py --config ... --trials 5          # MoCo's protocol: mean of 5 seeds
    python transfer/train_net.py --config configs/cpu/voc_bccd_r18_fpn.yaml \
        DATASETS.REGISTER.mine.TYPE voc DATASETS.REGISTER.mine.ROOT data/mine \
        DATASETS.REGISTER.mine.ANNOTATION_DIR annotations DATASETS.REGISTER.mine.IMAGE_DIR images \
        DATASETS.TRAIN mine_train DATASETS.TEST mine_test OUTPUT_DIR output/mine   # your own data

Engines: `--engine auto` (default) uses detectron2 when it can be imported, else our torchvision
engine (transfer/torchvision_engine.py); both read the same YAML and write the same outputs. The
config is loaded once, by the chosen engine's loader, and handed to it; several processes are
started by `launch` below for the torchvision engine, by detectron2's own launcher for detectron2.
"""
import argparse
import json
import os
import socket
import sys

from cocord_common.checkpoint import POINTER, write_text_atomic
from cocord_common.errors import UserError, input_checks, run_main
from cocord_common.metrics import TRANSFER_METRICS_FILE as METRICS_FILE
from cocord_common.metrics import drop_cut_last_line, eval_lines, final_eval_line, mean_std, read_jsonl_torn_tail

METRICS = ("AP", "AP50", "AP75")


def argument_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", "--config", dest="config_file", default="", metavar="FILE",
                   help="path to the config YAML")
    p.add_argument("--engine", choices=("auto", "detectron2", "torchvision"), default="auto",
                   help="auto: detectron2 when importable, else torchvision (default: auto)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/last_checkpoint when it exists (else start from MODEL.WEIGHTS)")
    p.add_argument("--allow-existing-output", action="store_true",
                   help="start a fresh run even though OUTPUT_DIR holds another run (its metrics.json lines "
                        "stay and the new run's follow them); without it such a folder is refused")
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
        raise UserError("--engine detectron2: detectron2 cannot be imported; install it or use --engine torchvision")
    return requested


# ----------------------------------------------------------------------------------------------
# processes of the torchvision engine (detectron2's launch protocol, also on CPU with gloo)


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
                raise UserError("--dist-url is required with --num-machines > 1 (e.g. tcp://host:port)")
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


def load_engine_config(engine, config_file, opts):
    """The config of `engine` (torchvision: transfer.config's node, validated; detectron2: its own
    get_cfg() extended with DATASETS.REGISTER), loaded once here and handed to the engine."""
    if engine == "detectron2":
        from transfer.detectron2_engine import load_d2_config
        return load_d2_config(config_file, opts)
    from transfer.config import load_config
    return load_config(config_file, opts)


def run_engine(engine, cfg, args):
    """Run `engine` on `cfg` in the processes args asks for; returns its final metrics (None from a
    torchvision launch of several processes)."""
    if engine == "detectron2":
        from transfer import detectron2_engine  # imported only for this engine
        return detectron2_engine.run(cfg, args)  # detectron2's own launcher
    from transfer import torchvision_engine
    return launch(torchvision_engine.run, args, (cfg, args), cfg.MODEL.DEVICE.startswith("cuda"))


def trial_config(cfg, output_dir, seed):
    """`cfg` with OUTPUT_DIR and SEED of one trial."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR, cfg.SEED = output_dir, seed
    cfg.freeze()
    return cfg


# ----------------------------------------------------------------------------------------------
# the output folder: one run per folder


def holds_run(output_dir):
    """Whether `output_dir` holds (part of) a training run: a checkpoint pointer or metrics lines."""
    metrics = os.path.join(output_dir, METRICS_FILE)
    return os.path.isfile(os.path.join(output_dir, POINTER)) or (
        os.path.isfile(metrics) and os.path.getsize(metrics) > 0)


def finished_eval_line(output_dir, max_iter):
    """The final evaluation line of a run in `output_dir` finished at `max_iter` (last_checkpoint names
    model_final.pth and metrics.json's last evaluation is at iteration max_iter - 1), else None (a
    larger SOLVER.MAX_ITER continues it)."""
    pointer = os.path.join(output_dir, POINTER)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        if f.read().strip() != "model_final.pth":
            return None
    rows, _ = read_jsonl_torn_tail(os.path.join(output_dir, METRICS_FILE))
    evals = eval_lines(rows)
    return evals[-1] if evals and evals[-1].get("iteration") == max_iter - 1 else None


def prepare_output_dir(output_dir, max_iter, args):
    """Refuse a fresh run into a folder holding another run; on --resume without a checkpoint (a run
    killed before its first one), drop a cut last line of metrics.json so that the new lines follow
    whole ones (with a checkpoint the engine reconciles the file with it,
    cocord_common.metrics.reconcile_transfer_metrics). Returns the final evaluation line when --resume
    finds the run finished (nothing left to do), else None."""
    if args.eval_only:
        return None  # --eval-only only appends its evaluation line
    if not args.resume:
        if holds_run(output_dir) and not args.allow_existing_output:
            raise UserError(
                f"OUTPUT_DIR {output_dir} already holds a run (last_checkpoint or metrics.json); a new run "
                "there would mix both histories. Pass --resume to continue it, choose another OUTPUT_DIR, or "
                "pass --allow-existing-output to start afresh there anyway")
        return None
    if not os.path.isfile(os.path.join(output_dir, POINTER)):
        drop_cut_last_line(os.path.join(output_dir, METRICS_FILE), lambda m: print(f"[train_net] {m}", flush=True))
    return finished_eval_line(output_dir, max_iter)


def run_in_folder(engine, cfg, args):
    """run_engine, unless the folder's state says not to start (see prepare_output_dir). The engines
    report bad input (data, weights, config values) with ValueError: user errors here."""
    finished = prepare_output_dir(cfg.OUTPUT_DIR, cfg.SOLVER.MAX_ITER, args)
    if finished is not None:
        print(f"[train_net] {cfg.OUTPUT_DIR} holds a finished run (model_final.pth, evaluation at iteration "
              f"{finished.get('iteration')}); nothing to do, nothing appended", flush=True)
        return finished if engine == "detectron2" else {k: v for k, v in finished.items() if k != "iteration"}
    with input_checks():
        return run_engine(engine, resolve_config_datasets(cfg, args), args)


def resolve_config_datasets(cfg, args):
    """`cfg` with its datasets resolved by transfer.data.resolve_datasets (splits made under
    OUTPUT_DIR/splits, classes read from the annotations, MODEL.ROI_HEADS.NUM_CLASSES from the
    classes unless the command line sets it); what it derived is printed."""
    from transfer.data import resolve_datasets
    num_classes_given = "MODEL.ROI_HEADS.NUM_CLASSES" in list(args.opts)[0::2]
    cfg, notes = resolve_datasets(cfg, num_classes_given, reuse_splits=args.resume or args.eval_only)
    for note in notes:
        print(f"[train_net] {note}", flush=True)
    return cfg


# ----------------------------------------------------------------------------------------------
# trials


def final_metrics(output_dir):
    """AP/AP50/AP75 of the final evaluation line of `output_dir`/metrics.json (either engine)."""
    path = os.path.join(output_dir, METRICS_FILE)
    found = final_eval_line(path)
    if found is None:
        raise RuntimeError(f"{path} holds no evaluation line (bbox/AP); did the run finish?")
    missing = [f"bbox/{m}" for m in METRICS if f"bbox/{m}" not in found]
    if missing:
        raise RuntimeError(f"{path}: the final evaluation line lacks {missing} (keys: {sorted(found)}); "
                           "--trials summarises runs with one DATASETS.TEST dataset")
    return {m: float(found[f"bbox/{m}"]) for m in METRICS}


def summarize(rows):
    """Mean and sample std (ddof 1; 0 for one trial) of AP/AP50/AP75 over trial rows."""
    mean, std = {}, {}
    for m in METRICS:
        mean[m], std[m] = mean_std(r[m] for r in rows)
    return mean, std


def main(argv=None):
    args = argument_parser().parse_args(argv)
    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    engine = choose_engine(args.engine)
    print(f"[train_net] engine: {engine}" + (" (auto: detectron2 importable)" if args.engine == "auto" and
                                             engine == "detectron2" else
                                             " (auto: detectron2 not importable)" if args.engine == "auto" else ""),
          flush=True)
    # loaded (and checked) once, before any process starts; its refusals (ValueError, KeyError for an
    # unknown key) are the user's to fix
    with input_checks():
        try:
            base = load_engine_config(engine, args.config_file, list(args.opts))
        except KeyError as e:
            raise UserError(e.args[0] if e.args else str(e)) from e
    if args.trials == 1:
        return run_in_folder(engine, base, args)

    seed0 = base.SEED if base.SEED >= 0 else 0
    rows = []
    for k in range(args.trials):
        out = os.path.join(base.OUTPUT_DIR, f"trial{k}")
        print(f"[train_net] trial {k}: SEED {seed0 + k}, OUTPUT_DIR {out}", flush=True)
        run_in_folder(engine, trial_config(base, out, seed0 + k), args)
        rows.append({"trial": k, "seed": seed0 + k, "output_dir": out, **final_metrics(out)})
    mean, std = summarize(rows)
    summary = {"engine": engine, "trials": rows, "mean": mean, "std": std}
    write_text_atomic(os.path.join(base.OUTPUT_DIR, "trials_summary.json"), json.dumps(summary, indent=2))
    for m in METRICS:
        print(f"[train_net] {m}: {mean[m]:.2f} ± {std[m]:.2f} over {args.trials} trials", flush=True)
    return summary


def cli(argv=None):
    """Console entry (cocord-transfer): exit status 0 once main has finished (main itself returns the
    metrics, for callers in Python; a dict handed to sys.exit would be printed and exit 1). User errors
    print `train_net.py: error: ...` and exit 2 (cocord_common.errors.run_main; --debug shows the
    traceback)."""
    run_main(main, argv, prog="train_net.py")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
