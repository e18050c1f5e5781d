#!/usr/bin/env python
"""Run every GPU-only path of the three stages once and print one JSON of figures.

    python tools/gpu_check.py --json gpu_check.json          # one GPU machine, under 8 minutes
    python tools/gpu_check.py --smoke --json smoke.json      # the same code on CPU, tiny sizes (~1-2 min)

Sections (each independent: a failing one records its error and the others still run):
  distill   ResNet-101 -> ResNet-50 and ResNet-34 -> ResNet-18 at 224 px on random images: supervised,
            KD, CRD and CoCoRD training steps under fp32 / bf16 / fp16 (GradScaler), with and without
            channels-last: images/s, the step's ratio to the method's unavoidable network passes (as
            tools/benchmark_distill.py defines them) and peak GPU memory.
  ddp       torchrun --nproc_per_node N (N = visible GPUs; NCCL): a few CoCoRD steps of build_method's
            CoCoRD under DDP, then the queue of every rank compared; and distill/train_imagenet.py run
            2 epochs straight vs 1 epoch + --resume auto, the final checkpoints compared (bit-exact, or
            the largest difference where cuDNN's non-deterministic kernels make it differ).
  loader    the 3-view decode-once training loader alone on real JPEGs (--images): images/s per
            worker count, and the workers one GPU's CoCoRD step needs at the throughput measured above.
  transfer  R50-C4 on a VOC folder (generated shapes, or --voc): tools/benchmark_transfer.py for 20
            iterations fp32 and AMP plus evaluation images/s, and transfer/train_net.py under DDP with
            SyncBN and naiveSyncBN, both engines when detectron2 imports ("unsupported" where an engine's
            config rejects a norm).
`--smoke` runs every section on CPU with tiny sizes (ResNet-18, 32 px, 2 steps, gloo with 2
processes, R18-FPN for transfer); tests/test_gpu_check.py runs it, so this script cannot rot.
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from cocord_common.errors import UserError, run_main

REPO = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
SECTIONS = ("distill", "ddp", "loader", "transfer")
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "imagenet_sample100"

# Sizes of each profile. "gpu" fits one H200-class GPU in < 8 minutes; "smoke" runs on 2 CPU cores.
PROFILES = {
    "gpu": dict(
        pairs=[("resnet101", "resnet50"), ("resnet34", "resnet18")], image_size=224, batch=64, warmup=3,
        steps=10, num_classes=1000, crd_samples=50000,
        cases=[(amp, cl) for cl in (False, True) for amp in ("fp32", "bf16", "fp16")],
        method_flags={}, ddp_arch=("resnet34", "resnet18"), ddp_crop=64, ddp_batch_per_rank=8, ddp_steps=3,
        loader_batch=64, loader_batches=20, loader_workers=(1, 2, 4, 8, 16), loader_crop=224,
        transfer_config="configs/voc_r50.yaml", transfer_iters=20, transfer_eval_images=20,
        transfer_opts=["SOLVER.IMS_PER_BATCH", "8", "MODEL.DEVICE", "cuda", "MODEL.WEIGHTS", ""], timeout_s=420),
    "smoke": dict(
        pairs=[("resnet18", "resnet18")], image_size=32, batch=4, warmup=1, steps=2, num_classes=10,
        # CPU autocast is slow in the NCHW layout here (seconds per tiny step): AMP only with channels-last
        crd_samples=64, cases=[("fp32", False), ("fp32", True), ("bf16", True), ("fp16", True)],
        method_flags=dict(queue_size=64, proj_dim=32, proj_hidden_dim=32, pred_dim=16, crd_nce_k=16,
                          crd_feat_dim=16),
        ddp_arch=("resnet18", "resnet18"), ddp_crop=32, ddp_batch_per_rank=2, ddp_steps=2,
        loader_batch=4, loader_batches=4, loader_workers=(0, 1), loader_crop=32,
        transfer_config="configs/cpu/voc_bccd_r18_fpn.yaml", transfer_iters=2, transfer_eval_images=2,
        transfer_opts=["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
                       "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"],
        timeout_s=300),
}
SMOKE_DDP_PROCESSES = 2
DISTILL_METHODS = ("supervised", "kd", "crd", "cocord")


def load_tool(name):
    """A sibling script of tools/ as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_subprocess(cmd, timeout_s, cwd=REPO):
    """Run cmd; return (seconds, stdout tail). A non-zero exit raises with the output's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    out = (r.stdout + r.stderr)[-4000:]
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {' '.join(str(c) for c in cmd[:6])} ...\n{out}")
    return time.perf_counter() - t0, out


def torchrun_cmd(nproc, script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]


# ================================================================================ distill
def distill_section(ctx):
    """{pair: {method: {precision/layout: figures}}} for every pair, method, precision and memory layout."""
    bench = load_tool("benchmark_distill")
    prof = ctx.prof
    results = {}
    for teacher_arch, arch in prof["pairs"]:
        pair = results.setdefault(f"{teacher_arch}->{arch}", {})
        for precision, channels_last in prof["cases"]:
            layout = f"{precision}{'+channels_last' if channels_last else ''}"
            try:
                figures = distill_case(bench, ctx, arch, teacher_arch, precision, channels_last)
            except Exception as e:  # one case failing (e.g. fp16 on an old GPU) keeps the others
                figures = {m: {"error": f"{type(e).__name__}: {e}"} for m in DISTILL_METHODS}
            for method, fig in figures.items():
                pair.setdefault(method, {})[layout] = fig
            ctx.log(f"distill {teacher_arch}->{arch} {layout}: " + ", ".join(
                f"{m} {f.get('images_per_s', float('nan')):.1f} img/s" for m, f in figures.items()))
    return results


def distill_case(bench, ctx, arch, teacher_arch, precision, channels_last):
    """Figures of the four methods at one precision (fp32 / bf16 / fp16) and memory layout."""
    from distill.methods import build_method, default_method_args
    from distill.models import build_resnet

    prof, dev = ctx.prof, ctx.device
    B, S, C = prof["batch"], prof["image_size"], prof["num_classes"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    views = [torch.randn(B, 3, S, S, device=dev).contiguous(memory_format=fmt) for _ in range(3)]
    target = torch.randint(0, C, (B,), device=dev)
    index = torch.arange(B, device=dev)
    student = build_resnet(arch, C).to(dev, memory_format=fmt)
    teacher = build_resnet(teacher_arch, C).to(dev, memory_format=fmt)
    labels = torch.arange(prof["crd_samples"]) % C
    args = default_method_args(**prof["method_flags"])
    amp = "off" if precision == "fp32" else precision  # distill/engine.py's --amp values
    figures = {}
    for name in DISTILL_METHODS:
        method = build_method(name, args, copy.deepcopy(student), copy.deepcopy(teacher) if name != "supervised"
                              else None, len(labels), labels).to(dev, memory_format=fmt).train()
        n_views = method.num_views
        step = bench.method_step(method, views[:n_views], target, index, amp)
        passes = bench.unavoidable_passes(name, student, teacher, views, amp)
        figures[name] = time_step_and_passes(ctx, step, passes, B)
        del method, step, passes
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return figures


def time_step_and_passes(ctx, step, passes, batch):
    """Seconds per step and per passes (mean over the profile's steps after warm-up), peak memory."""
    prof, dev = ctx.prof, ctx.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    seconds = {}
    for key, fn in (("step", step), ("passes", passes)):
        for _ in range(prof["warmup"]):
            fn()
        sync()
        if dev.type == "cuda" and key == "step":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(prof["steps"]):
            fn()
        sync()
        seconds[key] = (time.perf_counter() - t0) / prof["steps"]
        if dev.type == "cuda" and key == "step":
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
    return {"images_per_s": batch / seconds["step"], "step_s": seconds["step"], "passes_s": seconds["passes"],
            "ratio_to_passes": seconds["step"] / seconds["passes"],
            "peak_memory_mib": peak if dev.type == "cuda" else None}


# ================================================================================ ddp
def write_image_folder(root, classes, per_class, size=48, seed=0):
    """A tiny ImageFolder root/train/class_k/*.JPEG of noise images (the trainer's input layout)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = Path(root) / "train" / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size + 4 * (i % 3), size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"img_{i}.JPEG", quality=90)
    return Path(root)


def ddp_world(ctx):
    return max(torch.cuda.device_count(), 1) if ctx.device.type == "cuda" else SMOKE_DDP_PROCESSES


def ddp_section(ctx):
    """Queues across ranks after CoCoRD steps under DDP, then interrupted + resumed trainer runs."""
    world = ddp_world(ctx)
    work = Path(ctx.workdir) / "ddp"
    work.mkdir(parents=True, exist_ok=True)
    out = {"world_size": world, "backend": "nccl" if ctx.device.type == "cuda" else "gloo"}
    worker_json = work / "queues.json"
    secs, _ = run_subprocess(torchrun_cmd(world, Path(__file__), "--ddp-worker", worker_json,
                                          *(["--smoke"] if ctx.smoke else [])), ctx.prof["timeout_s"])
    out["queues"] = dict(json.loads(worker_json.read_text()), seconds=secs)
    out["resume"] = resume_check(ctx, world, work)
    return out


def ddp_worker(path, smoke):
    """One torchrun process: CoCoRD under DDP for a few steps on per-rank random batches; rank 0 writes
    how far every rank's queue and pointer are from rank 0's."""
    from cocord_common import dist
    from distill import engine
    from distill.methods import build_method, default_method_args
    from distill.models import build_resnet

    prof = PROFILES["smoke" if smoke else "gpu"]
    info = dist.init_distributed("env://", None, "cuda" if torch.cuda.is_available() and not smoke else "cpu")
    teacher_arch, arch = prof["ddp_arch"]
    B, S, C = prof["ddp_batch_per_rank"], prof["ddp_crop"], 10
    torch.manual_seed(0)  # the same networks on every rank
    method = build_method("cocord", default_method_args(**prof["method_flags"]), build_resnet(arch, C),
                          build_resnet(teacher_arch, C), 4 * B, torch.arange(4 * B) % C, gather=dist.gather)
    method.to(info.device)
    model = dist.wrap_ddp(method, info.device)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scaler = engine.build_scaler(info.device, "off")
    torch.manual_seed(1 + info.rank)  # different data on every rank
    for step in range(prof["ddp_steps"]):
        views = [torch.randn(B, 3, S, S, device=info.device) for _ in range(3)]
        target = torch.randint(0, C, (B,), device=info.device)
        engine.train_step(model, opt, scaler, views, target, torch.arange(B, device=info.device), info.device,
                          "off", where=f"gpu_check step {step}")
    method.flush_queue()
    queues = dist.all_gather_object((method.queue.cpu(), int(method.queue_ptr)))
    if info.is_main:
        diffs = [float((q - queues[0][0]).abs().max()) for q, _ in queues]
        Path(path).write_text(json.dumps({
            "steps": prof["ddp_steps"], "queue_shape": list(queues[0][0].shape), "queue_ptr": [p for _, p in queues],
            "max_abs_diff_to_rank0": diffs, "identical": all(d == 0 for d in diffs)
            and len({p for _, p in queues}) == 1}))
    dist.barrier()
    dist.cleanup()


def resume_check(ctx, world, work):
    """train_imagenet.py for 2 epochs straight vs epoch 1 + --resume auto (a fresh torchrun), compared."""
    from cocord_common.checkpoint import load_checkpoint
    from distill.models import build_resnet

    prof = ctx.prof
    teacher_arch, arch = prof["ddp_arch"]
    per_rank, classes = prof["ddp_batch_per_rank"], 3
    data = write_image_folder(work / "data", classes, per_class=max(4, 2 * per_rank * world // classes + 1))
    torch.manual_seed(0)
    teacher = work / "teacher.pth"
    torch.save(build_resnet(teacher_arch, classes).state_dict(), teacher)
    flags = [data, "-a", arch, "--teacher-arch", teacher_arch, "--teacher-weights", teacher, "--method", "cocord",
             "--device", "cuda" if ctx.device.type == "cuda" else "cpu", "-b", per_rank * world, "--epochs", 2,
             "--max-steps-per-epoch", 2, "--crop-size", prof["ddp_crop"], "--no-val", "-j", 0, "--seed", 5, "--cos"]
    flags += [f"--{k.replace('_', '-')}={v}" for k, v in prof["method_flags"].items() if not k.startswith("crd")]
    script = REPO / "distill" / "train_imagenet.py"
    full, part = work / "full", work / "part"
    secs_full, _ = run_subprocess(torchrun_cmd(world, script, *flags, "--output-dir", full), prof["timeout_s"])
    part.mkdir()
    shutil.copy(full / "checkpoint_0001.pth", part / "checkpoint_0001.pth")
    (part / "last_checkpoint").write_text("checkpoint_0001.pth")
    secs_part, _ = run_subprocess(torchrun_cmd(world, script, *flags, "--output-dir", part, "--resume", "auto"),
                                  prof["timeout_s"])
    a, b = (load_checkpoint(str(d / "checkpoint_0002.pth")) for d in (full, part))
    diffs = {key: max_abs_diff(a[key], b[key]) for key in ("student", "slow_student", "method_state", "optimizer",
                                                           "rng")}
    return {"steps": a["step"], "seconds_full": secs_full, "seconds_resumed": secs_part,
            "bit_exact": all(d == 0 for d in diffs.values()), "max_abs_diff": diffs,
            "tolerance_note": "bit-exact expected on CPU; on GPU cuDNN's non-deterministic kernels may leave "
                              "differences of the order of 1e-6 relative per step (see docs/performance.md)"}


def max_abs_diff(a, b):
    """Largest absolute difference between two nested checkpoint values (0.0 when identical; inf when
    their structure or a non-tensor value differs)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return math.inf
        if not (a.is_floating_point() and b.is_floating_point()):  # RNG states, counters: exact or nothing
            return 0.0 if torch.equal(a, b) else math.inf
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return math.inf
        return max([max_abs_diff(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return math.inf
        return max([max_abs_diff(x, y) for x, y in zip(a, b)], default=0.0)
    return 0.0 if a == b else math.inf


# ================================================================================ loader
def loader_section(ctx):
    """3-view decode-once loader images/s per worker count on real JPEGs, and the workers one GPU needs."""
    from distill.data import MultiViewImageFolder, seed_worker_fn

    prof = ctx.prof
    root = Path(ctx.images)
    train = root / "train" if (root / "train").is_dir() else root
    ds = MultiViewImageFolder(str(train), prof["loader_crop"], seed=0)
    ds.num_views = 3
    batch = max(2, min(prof["loader_batch"], len(ds) // 2))
    workers = [w for w in prof["loader_workers"] if w <= max(os.cpu_count() or 1, 1)]
    per_workers = {}
    ds.set_epoch(0)
    for w in workers:
        # the training loader's dataset, collation, workers and pinning, but sampling with replacement, so a
        # small folder does not restart the workers every few batches (the real loader keeps them an epoch)
        sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=(prof["loader_batches"] + 1) * batch)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=w,
                                             pin_memory=ctx.device.type == "cuda", drop_last=True,
                                             worker_init_fn=seed_worker_fn(0, 0, 0))
        it = iter(loader)
        next(it)  # the first batch pays for the workers' start
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        ips = n * batch / (time.perf_counter() - t0)
        per_workers[str(w)] = {"images_per_s": ips, "images_per_s_per_worker": ips / max(w, 1)}
        ctx.log(f"loader {w} workers: {ips:.1f} img/s")
    return {"images": str(train), "num_images": len(ds), "batch": batch, "crop": prof["loader_crop"],
            "views": 3, "per_workers": per_workers}


def workers_needed(report):
    """Workers one GPU needs to feed CoCoRD at the best measured step rate of each pair (ceil of
    step images/s over the best per-worker loader rate); added to the loader section when both ran."""
    loader, distill = report["sections"]["loader"], report["sections"]["distill"]
    if loader["status"] != "ok" or distill["status"] != "ok":
        return None
    rate = max(v["images_per_s_per_worker"] for k, v in loader["results"]["per_workers"].items() if k != "0") \
        if any(k != "0" for k in loader["results"]["per_workers"]) else None
    if not rate:
        return None
    need = {}
    for pair, methods in distill["results"].items():
        best = max((f["images_per_s"] for f in methods["cocord"].values() if "images_per_s" in f), default=None)
        if best:
            need[pair] = {"cocord_images_per_s": best, "workers": math.ceil(best / rate)}
    return need


# ================================================================================ transfer
def transfer_section(ctx):
    """benchmark_transfer.py fp32 / AMP per engine, then train_net.py under DDP with each SyncBN kind."""
    prof = ctx.prof
    try:
        import detectron2  # noqa: F401
        engines = ["torchvision", "detectron2"]
    except ImportError:
        engines = ["torchvision"]
    work = Path(ctx.workdir) / "transfer"
    data_opts = voc_opts(ctx, work)
    results = {"config": prof["transfer_config"], "engines": engines, "bench": {}, "ddp": {}}
    for precision in ("fp32", "amp"):
        for engine in engines:
            results["bench"].setdefault(engine, {})[precision] = guarded(
                lambda: transfer_bench(ctx, work, engine, precision, data_opts))
    for norm in ("SyncBN", "naiveSyncBN"):
        for engine in engines:
            results["ddp"].setdefault(engine, {})[norm] = guarded(
                lambda: transfer_ddp(ctx, work, engine, norm, data_opts))
    return results


def guarded(fn):
    """fn()'s figures, or {"error": ...} / {"unsupported": ...} so one case does not end the section."""
    try:
        return fn()
    except Exception as e:
        text = str(e)
        if "MODEL.RESNETS.NORM" in text and ("naiveSyncBN" in text or "use BN" in text):
            return {"unsupported": text.strip().splitlines()[-1][:500]}
        return {"error": f"{type(e).__name__}: {text[-1500:]}"}


def voc_opts(ctx, work):
    """Config overrides registering the train / test VOC sets: --voc DIR, else generated shapes."""
    from cocord_pipeline.synthetic_shapes import SHAPES, register_opts, write_shapes
    if ctx.voc:
        classes = [c for c in ctx.voc_classes.split(",") if c]
        train, test = "trainval", "test"
        root = Path(ctx.voc)
    else:
        root, classes, train, test = work / "shapes", list(SHAPES), "train", "test"
        write_shapes(root, n_train=16, n_test=ctx.prof["transfer_eval_images"] + 1, size=320)
    return (register_opts("gc_train", root, train, classes) + register_opts("gc_test", root, test, classes)
            + ["DATASETS.TRAIN", "('gc_train',)", "DATASETS.TEST", "('gc_test',)",
               "MODEL.ROI_HEADS.NUM_CLASSES", str(len(classes))])


def transfer_bench(ctx, work, engine, precision, data_opts):
    if precision == "amp" and ctx.device.type != "cuda":
        return {"skipped": "AMP in the transfer engines needs CUDA"}
    prof = ctx.prof
    out = work / f"bench_{engine}_{precision}"
    result = out / "bench.json"
    out.mkdir(parents=True, exist_ok=True)
    amp = ["SOLVER.AMP.ENABLED", str(precision == "amp")]
    secs, _ = run_subprocess(
        [sys.executable, TOOLS / "benchmark_transfer.py", "--config", prof["transfer_config"], "--iters",
         prof["transfer_iters"], "--eval-images", prof["transfer_eval_images"], "--engines", engine,
         "--output-dir", out, "--json", result, *data_opts, *prof["transfer_opts"], *amp], prof["timeout_s"])
    med = json.loads(result.read_text())["median"][engine]
    return {"train_s_per_iter": med["train_s_per_iter"], "eval_images_per_s": 1 / med["eval_s_per_image"],
            "seconds": secs}


def transfer_ddp(ctx, work, engine, norm, data_opts):
    """transfer/train_net.py with --num-gpus N, MODEL.RESNETS.NORM `norm`, a few training iterations."""
    bench = load_tool("benchmark_transfer")
    prof, world = ctx.prof, ddp_world(ctx)
    if engine == "detectron2" and ctx.device.type != "cuda":
        return {"skipped": "detectron2's launcher runs several processes on GPUs only"}
    out = work / f"ddp_{engine}_{norm}"
    iters = max(prof["transfer_iters"] // 2, 2)
    secs, _ = run_subprocess(
        [sys.executable, REPO / "transfer" / "train_net.py", "--config-file", prof["transfer_config"], "--engine",
         engine, "--num-gpus", world, *data_opts, *prof["transfer_opts"], *bench.train_opts(iters, out),
         "MODEL.RESNETS.NORM", norm], prof["timeout_s"])
    return {"world_size": world, "iters": iters, "train_s_per_iter": bench.median_step_time(out), "seconds": secs}


# ================================================================================ main
class Context:
    def __init__(self, a, workdir):
        self.smoke, self.prof, self.workdir = a.smoke, PROFILES["smoke" if a.smoke else "gpu"], workdir
        self.device = torch.device("cpu" if a.smoke else "cuda")
        self.images, self.voc, self.voc_classes = a.images, a.voc, a.voc_classes
        if self.images is None:  # the shared ImageNet sample, else generated JPEGs
            self.images = DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else write_image_folder(
                Path(workdir) / "loader_images", classes=4, per_class=8, size=96)

    def log(self, msg):
        print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, every section (about a minute or two)")
    p.add_argument("--json", default="", metavar="FILE", help="also write the JSON to FILE")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--images", default=None, metavar="DIR",
                   help=f"JPEG folder for the loader (ImageFolder, or its parent with train/); default "
                        f"{DEFAULT_IMAGES} when present, else generated noise JPEGs")
    p.add_argument("--voc", default=None, metavar="DIR", help="VOC folder (trainval/test splits) for transfer; "
                   "default: generated shapes")
    p.add_argument("--voc-classes", default="", help="comma-separated class names of --voc (e.g. RBC,WBC,Platelets)")
    p.add_argument("--workdir", default="", help="where runs write (default: a temporary directory, removed)")
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)  # internal: one torchrun process
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if sorted(set(a.sections) - set(SECTIONS)):
        raise UserError(f"--sections: unknown {sorted(set(a.sections) - set(SECTIONS))}; choose from {SECTIONS}")
    if a.voc and not a.voc_classes:
        raise UserError(f"--voc {a.voc} needs --voc-classes NAME,NAME,... (its object class names)")
    for flag, path in (("--images", a.images), ("--voc", a.voc)):
        if path is not None and not Path(path).is_dir():
            raise UserError(f"{flag} {path}: no such directory")
    if not a.smoke and a.ddp_worker is None and not torch.cuda.is_available():
        raise UserError("no CUDA device is visible: run this on a GPU machine, or pass --smoke for the CPU run")
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.ddp_worker:
        return ddp_worker(a.ddp_worker, a.smoke)
    if a.smoke:
        torch.set_num_threads(1)
    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="gpu_check_")
    workdir = a.workdir or tmp.name
    ctx = Context(a, workdir)
    report = {"profile": "smoke" if a.smoke else "gpu", "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "cpu",
              "gpus": torch.cuda.device_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sections": {}}
    fns = {"distill": distill_section, "ddp": ddp_section, "loader": loader_section, "transfer": transfer_section}
    t_all = time.perf_counter()
    for name in SECTIONS:
        if name not in a.sections:
            report["sections"][name] = {"status": "not requested"}
            continue
        t0 = time.perf_counter()
        try:
            report["sections"][name] = {"status": "ok", "results": fns[name](ctx)}
        except Exception as e:
            report["sections"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]}
        report["sections"][name]["seconds"] = time.perf_counter() - t0
        ctx.log(f"{name}: {report['sections'][name]['status']} in {report['sections'][name]['seconds']:.0f} s")
    if "loader" in a.sections and "distill" in a.sections:
        report["workers_needed_per_gpu"] = workers_needed(report)
    report["seconds"] = time.perf_counter() - t_all
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    run_main(main)
