#!/usr/bin/env python
"""Time one training step of CoCoRD, KD and supervised training against the network passes CoCoRD
cannot avoid, over a sweep of batch sizes, split CoCoRD's bookkeeping into its parts, and compare the
memory of CoCoRD's queue with CRD's memory banks on ImageNet.

Every step is forward + backward + SGD step on random images (no data loading). "Unavoidable passes"
of a method are the networks it must run anyway, timed alone (see `unavoidable_passes`): for CoCoRD
teacher forward on x_t, student forward + backward on x_s and x_s', slow-student forwards on x_s and
x_s'. CoCoRD's bookkeeping is step - passes; its parts are timed on their own, on tensors of the
step's shapes, in the same interleaved rounds:
  heads      proj_s forward + backward on both views, proj_t and slow_proj forwards (no grad)
  predictor  forward + backward on both views
  EMA        the momentum update of the slow student (+ its head) and proj_t
  queue      q @ queue^T forward + backward, and the FIFO write of B keys
  losses     normalisation, InfoNCE (without the queue product), prediction losses, CE, backward
  optimizer  zero_grad + SGD step over every trained parameter (student, proj_s, predictor)
  unattributed  step - passes - parts: per-step Python, autograd glue, dict building
Goal: bookkeeping <= 5% of the passes at batch >= 32. Ratios are printed, nothing is asserted.
Example (the default sweep, a few minutes on a 2-core CPU):

    python tools/benchmark_distill.py --arch resnet18 --teacher-arch resnet34 -b 8 32 64 --image-size 64

`--methods all` (or a list of METHODS names) instead times one training step of every method side by
side in the same interleaved rounds and prints ms/step and the ratio to the supervised step; ab and ft
get two rows, their main-stage step and their initialisation-stage step. The pair is ResNet-34 ->
ResNet-18 at --image-size (ImageNet), or with --cifar resnet32x4 -> resnet8x4 at 32x32 (100 classes,
CoCoRD's CIFAR queue). CRD's memory banks have --num-samples rows (default: the training set's size,
since its negative sampling depends on it; the sweep has no bank and refuses --num-samples):

    python tools/benchmark_distill.py --methods all -b 32
    python tools/benchmark_distill.py --methods all --cifar -b 64
"""
import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from distill.cifar_data import IMAGE_SIZE as CIFAR_IMAGE_SIZE
from distill.engine import autocast, build_scaler
from distill.methods import METHODS, add_method_args, build_method
from distill.methods.cocord import prediction_loss
from distill.methods.feature_method import TwoStageMethod
from distill.models import ALL_ARCHS, ARCHS, build_model, build_resnet, forward_features
from distill.train_cifar import CIFAR_DEFAULTS

IMAGENET_TRAIN = 1281167
CIFAR_TRAIN = 50000
# the pairs of --methods mode (flag defaults); --cifar picks the second. --num-samples (CRD's bank
# rows: the training set's size) is --methods mode's alone, so its default is filled in after parsing
IMAGENET_PAIR = {"arch": "resnet18", "teacher_arch": "resnet34", "image_size": 64, "num_classes": 1000}
CIFAR_PAIR = {"arch": CIFAR_DEFAULTS["arch"], "teacher_arch": "resnet32x4", "image_size": CIFAR_IMAGE_SIZE,
              "num_classes": 100, "queue_size": CIFAR_DEFAULTS["queue_size"]}
REFERENCE = "supervised"
PARTS = ("heads", "predictor", "EMA", "queue", "losses", "optimizer")


def timed_rounds(fns, iters, warmup, sync):
    """Median wall and process-CPU seconds of each fn, run round-robin so that load changes on a shared
    machine hit every measurement alike. CPU time is the steadier figure on a busy CPU machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            sync()
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    med = statistics.median
    return {k: med(v) for k, v in wall.items()}, {k: med(v) for k, v in cpu.items()}


def method_step(method, views, target, index, amp="off"):
    """One training step as distill/engine.py takes it (autocast, GradScaler for fp16, SGD)."""
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    device = views[0].device
    scaler = build_scaler(device, amp)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            _, losses = method(views, target, index)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(opt)
        scaler.update()
    return step


def unavoidable_passes(name, student, teacher, views, amp="off"):
    """The network passes method `name` cannot avoid, as one function: the student's forward + backward
    on each view it trains on, the teacher's forward (no grad) where it has one, and for CoCoRD the slow
    student's two forwards. Copies of the networks, so the method's own are untouched."""
    device = views[0].device
    s = copy.deepcopy(student).train()
    t = copy.deepcopy(teacher).eval() if METHODS[name].needs_teacher else None
    cocord = METHODS[name].cls.__name__ == "CoCoRD"
    slow = None
    if cocord:
        slow = copy.deepcopy(student).train()
        slow.fc = torch.nn.Identity()

    def passes():
        with autocast(device, amp):
            with torch.no_grad():
                if t is not None:
                    forward_features(t, views[2] if cocord else views[0])
                if slow is not None:
                    forward_features(slow, views[0])
                    forward_features(slow, views[1])
            s.zero_grad(set_to_none=True)
            loss = forward_features(s, views[0])[1].float().sum()
            if cocord:
                loss = loss + forward_features(s, views[1])[0].float().sum()
        loss.backward()
    return passes


def bookkeeping_parts(cocord, batch, num_classes):
    """{part: fn} timing each part of CoCoRD's bookkeeping alone, on tensors of the step's shapes."""
    dev = cocord.queue.device
    d_s, d_t = cocord.student.fc.in_features, (cocord.teacher.fc.in_features if cocord.teacher else 0)
    P = cocord.queue.shape[1]
    feats = [torch.randn(batch, d_s, device=dev, requires_grad=True) for _ in range(2)]
    feat_t = torch.randn(batch, d_t, device=dev)
    z_in = [torch.randn(batch, P, device=dev, requires_grad=True) for _ in range(2)]
    q_in = torch.randn(batch, P, device=dev, requires_grad=True)
    l_neg = torch.randn(batch, cocord.queue.shape[0], device=dev, requires_grad=True)
    k, slow_s, slow_s2 = (torch.randn(batch, P, device=dev) for _ in range(3))
    logits = torch.randn(batch, num_classes, device=dev, requires_grad=True)
    target = torch.randint(0, num_classes, (batch,), device=dev)
    params = [p for p in cocord.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    for p in params:  # the optimizer steps on gradients as large as a real step's
        p.grad = torch.zeros_like(p)

    def heads():
        (cocord.proj_s(feats[0]).sum() + cocord.proj_s(feats[1]).sum()).backward()
        with torch.no_grad():
            cocord.proj_t(feat_t)
            cocord.slow_proj(feats[0])
            cocord.slow_proj(feats[1])

    def predictor():
        (cocord.predictor(z_in[0]).sum() + cocord.predictor(z_in[1]).sum()).backward()

    def queue():
        (F.normalize(q_in, dim=1) @ cocord.queue.t()).sum().backward()
        cocord._dequeue_and_enqueue(k)

    def losses():
        q = F.normalize(z_in[0], dim=1)
        kn = F.normalize(k, dim=1)
        logits_con = torch.cat([(q * kn).sum(dim=1, keepdim=True), l_neg], dim=1) / cocord.tau
        loss = F.cross_entropy(logits_con, torch.zeros(batch, dtype=torch.long, device=dev))
        loss = loss + prediction_loss(z_in[0], slow_s2) + prediction_loss(z_in[1], slow_s)
        (loss + F.cross_entropy(logits, target)).backward()

    def optimizer():
        opt.zero_grad(set_to_none=False)
        opt.step()

    return {"heads": heads, "predictor": predictor, "EMA": cocord._momentum_update, "queue": queue,
            "losses": losses, "optimizer": optimizer}


def measure_batch(args, batch, dev, sync):
    """Timings of one batch size: {"wall": {...}, "cpu": {...}} of the steps, passes and parts."""
    torch.manual_seed(0)
    S, C = args.image_size, args.num_classes
    views = [torch.randn(batch, 3, S, S, device=dev) for _ in range(3)]
    target = torch.randint(0, C, (batch,), device=dev)
    index = torch.arange(batch, device=dev)
    student = build_resnet(args.arch, C).to(dev)
    teacher = build_resnet(args.teacher_arch, C).to(dev)
    labels = torch.arange(max(batch, 2)) % 2

    def make(name):
        return build_method(name, args, copy.deepcopy(student),
                            copy.deepcopy(teacher) if METHODS[name].needs_teacher else None,
                            len(labels), labels).to(dev).train()

    cocord = make("cocord")
    fns = {"supervised step (1 view)": method_step(make("supervised"), views[:1], target, index),
           "KD step (1 view)": method_step(make("kd"), views[:1], target, index),
           "CoCoRD step (3 views)": method_step(cocord, views, target, index),
           "unavoidable passes alone (CoCoRD)": unavoidable_passes("cocord", student, teacher, views)}
    parts_of = make("cocord")  # its own copy: the parts' updates must not touch the timed step's method
    fns.update({f"part: {k}": fn for k, fn in bookkeeping_parts(parts_of, batch, C).items()})
    wall, cpu = timed_rounds(fns, args.iters, args.warmup, sync)
    return {"wall": wall, "cpu": cpu}, cocord


def split(times):
    """Bookkeeping and its parts as % of the passes, from one clock's timings."""
    ref = times["unavoidable passes alone (CoCoRD)"]
    book = times["CoCoRD step (3 views)"] - ref
    parts = {k: 100 * times[f"part: {k}"] / ref for k in PARTS}
    parts["unattributed"] = 100 * book / ref - sum(parts.values())
    return {"bookkeeping_pct": 100 * book / ref, "parts_pct": parts}


def print_batch(batch, res):
    wall, cpu = res["wall"], res["cpu"]
    ref_w, ref_c = wall["unavoidable passes alone (CoCoRD)"], cpu["unavoidable passes alone (CoCoRD)"]
    print(f"\nbatch {batch}")
    print(f"{'':<42}{'wall s':>9}{'x passes':>10}{'cpu s':>9}{'x passes':>10}")
    for k in wall:
        print(f"{k:<42}{wall[k]:>9.4f}{wall[k] / ref_w:>10.3f}{cpu[k]:>9.4f}{cpu[k] / ref_c:>10.3f}")
    for clock in ("wall", "cpu"):
        s = split(res[clock])
        parts = ", ".join(f"{k} {v:.1f}%" for k, v in s["parts_pct"].items())
        print(f"CoCoRD bookkeeping ({clock}): step - passes = {s['bookkeeping_pct']:.1f}% of the passes "
              f"(goal <= 5% at batch >= 32): {parts}")


def print_summary(results):
    cols = PARTS + ("unattributed",)
    print(f"\nsummary, CPU clock, % of CoCoRD's unavoidable passes")
    print(f"{'batch':>6}{'passes s':>10}{'step/passes':>12}{'bookkeeping':>12}" + "".join(f"{c:>13}" for c in cols))
    for batch, res in results.items():
        cpu = res["cpu"]
        s = split(cpu)
        ref = cpu["unavoidable passes alone (CoCoRD)"]
        print(f"{batch:>6}{ref:>10.3f}{cpu['CoCoRD step (3 views)'] / ref:>12.3f}{s['bookkeeping_pct']:>11.1f}%"
              + "".join(f"{s['parts_pct'][c]:>12.1f}%" for c in cols))


def print_memory(cocord, args):
    """Real buffers at the flags given (defaults: K = 16384 x 2048 fp32; CRD 2 x N x 128 fp32)."""
    queue_bytes = sum(b.numel() * b.element_size() for n, b in cocord.named_buffers() if n.startswith("queue"))
    labels = torch.arange(2) % 2
    crd = build_method("crd", args, build_resnet(args.arch, 2), build_resnet(args.teacher_arch, 2), 2, labels)
    per_sample = sum(b[0].numel() * b.element_size() for n, b in crd.named_buffers() if n.startswith("memory_"))
    idx_per_sample = sum(b.element_size() for n, b in crd.named_buffers() if n in ("labels", "order"))
    crd_bytes = per_sample * IMAGENET_TRAIN
    print(f"memory for ImageNet ({IMAGENET_TRAIN:,} images): CoCoRD queue {queue_bytes / 2**20:.1f} MiB "
          f"({tuple(cocord.queue.shape)} {cocord.queue.dtype}) vs CRD banks {crd_bytes / 2**20:.1f} MiB "
          f"(2 x ({IMAGENET_TRAIN}, {crd.memory_s.shape[1]}) {crd.memory_s.dtype}; plus "
          f"{idx_per_sample * IMAGENET_TRAIN / 2**20:.1f} MiB of class index lists) = "
          f"{crd_bytes / queue_bytes:.1f}x")
    return {"queue_mib": queue_bytes / 2**20, "crd_banks_mib": crd_bytes / 2**20}


def method_rows(names, init_epochs):
    """(row label, METHODS name, --init-epochs to build it with or None) of every timed step: ab and ft
    (the two-stage methods) twice, built in their main stage and in their initialisation stage."""
    rows = []
    for name in names:
        if issubclass(METHODS[name].cls, TwoStageMethod):
            rows += [(f"{name} (main stage)", name, 0), (f"{name} (init stage)", name, max(init_epochs, 1))]
        else:
            rows.append((name, name, None))
    return rows


def measure_methods(args, batch, dev, sync):
    """{"wall": {row: s}, "cpu": {row: s}, "views": {row: n}}: one training step of every method of
    args.methods, timed side by side. One frozen teacher is shared (no method trains it); every method
    gets its own copy of the same initial student, and a batch of indices / classes of the training set
    of args.num_samples samples (CRD samples its negatives there)."""
    torch.manual_seed(0)
    S, C, N = args.image_size, args.num_classes, args.num_samples
    labels = torch.arange(N) % C
    index = torch.randperm(N)[:batch]
    target = labels[index].to(dev)
    index = index.to(dev)
    views = [torch.randn(batch, 3, S, S, device=dev) for _ in range(3)]
    student = build_model(args.arch, C).to(dev)
    teacher = build_model(args.teacher_arch, C).to(dev).eval()
    fns, num_views = {}, {}
    for row, name, init_epochs in method_rows(args.methods, args.init_epochs):
        method_args = copy.copy(args)
        if init_epochs is not None:
            method_args.init_epochs = init_epochs
        method = build_method(name, method_args, copy.deepcopy(student),
                              teacher if METHODS[name].needs_teacher else None, N, labels,
                              drives_init_stage=True).to(dev).train()
        num_views[row] = method.num_views
        fns[row] = method_step(method, views[:method.num_views], target, index)
    wall, cpu = timed_rounds(fns, args.iters, args.warmup, sync)
    return {"wall": wall, "cpu": cpu, "views": num_views}


def print_methods(batch, res):
    """ms/step of each method and its ratio to the supervised step, on both clocks."""
    wall, cpu = res["wall"], res["cpu"]
    print(f"\nbatch {batch}: one training step (forward + backward + SGD), ratio to the {REFERENCE} step")
    print(f"{'method':<22}{'views':>6}{'wall ms':>10}{'x sup':>8}{'cpu ms':>10}{'x sup':>8}")
    for row in wall:
        print(f"{row:<22}{res['views'][row]:>6}{1e3 * wall[row]:>10.1f}{wall[row] / wall[REFERENCE]:>8.2f}"
              f"{1e3 * cpu[row]:>10.1f}{cpu[row] / cpu[REFERENCE]:>8.2f}")


def run_methods(args, dev, sync):
    """--methods mode: per batch size, the table of print_methods; the report of every timing and ratio."""
    print(f"device {dev}, threads {torch.get_num_threads()}, {args.teacher_arch} -> {args.arch}, "
          f"batches {args.batch_sizes}, {args.image_size}x{args.image_size} px, {args.num_classes} classes, "
          f"{args.num_samples} training samples (CRD banks), queue {args.queue_size}, "
          f"median of {args.iters} interleaved rounds", flush=True)
    batches = {}
    for batch in args.batch_sizes:
        res = measure_methods(args, batch, dev, sync)
        print_methods(batch, res)
        batches[str(batch)] = {"views": res["views"],
                               **{f"{clock}_ms": {k: 1e3 * v for k, v in res[clock].items()} for clock in ("wall", "cpu")},
                               **{f"ratio_{clock}": {k: v / res[clock][REFERENCE] for k, v in res[clock].items()}
                                  for clock in ("wall", "cpu")}}
    return {"mode": "methods", "device": str(dev), "threads": torch.get_num_threads(), "arch": args.arch,
            "teacher_arch": args.teacher_arch, "image_size": args.image_size, "num_classes": args.num_classes,
            "num_samples": args.num_samples, "iters": args.iters, "batches": batches}


def resolve_methods(p, names):
    """--methods as a list of METHODS names, the supervised reference first; unknown names are an error."""
    names = list(METHODS) if names == ["all"] else names
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"--methods: unknown method(s) {', '.join(unknown)}; choose 'all' or from {', '.join(METHODS)}")
    return [REFERENCE] + [n for n in dict.fromkeys(names) if n != REFERENCE]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-a", "--arch", choices=ALL_ARCHS)
    p.add_argument("--teacher-arch", choices=ALL_ARCHS)
    p.add_argument("-b", "--batch-sizes", type=int, nargs="+", default=None,
                   help="batch sizes to sweep (default: 8 32 64 on CPU, 8 32 64 128 256 on GPU)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--iters", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steady ratios on a shared machine; 0: torch's default)")
    p.add_argument("--json", default="", metavar="FILE", help="also write every timing and ratio to FILE")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="time one step of each of these methods ('all': every --method) instead of the sweep")
    p.add_argument("--cifar", action="store_true",
                   help=f"with --methods: the CIFAR pair {CIFAR_PAIR['teacher_arch']} -> {CIFAR_PAIR['arch']} at "
                        f"{CIFAR_IMAGE_SIZE} px, {CIFAR_PAIR['num_classes']} classes, queue {CIFAR_PAIR['queue_size']}")
    p.add_argument("--num-samples", type=int,
                   help=f"--methods only (an error without): training-set size, the rows of CRD's banks "
                        f"(default: {IMAGENET_TRAIN}, --cifar {CIFAR_TRAIN})")
    add_method_args(p)
    pre = argparse.ArgumentParser(add_help=False)  # --cifar decides the other flags' defaults
    pre.add_argument("--cifar", action="store_true")
    p.set_defaults(**(CIFAR_PAIR if pre.parse_known_args(argv)[0].cifar else IMAGENET_PAIR))
    args = p.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = [8, 32, 64] + ([128, 256] if args.device.startswith("cuda") else [])
    bad = [b for b in args.batch_sizes if b < 2]
    if bad or args.iters < 1 or args.warmup < 0 or args.image_size < 32:
        p.error(f"need batch sizes >= 2 (BatchNorm; got {args.batch_sizes}), --iters >= 1, --warmup >= 0 "
                f"and --image-size >= 32")
    if args.methods:
        args.methods = resolve_methods(p, args.methods)
        if args.num_samples is None:
            args.num_samples = CIFAR_TRAIN if args.cifar else IMAGENET_TRAIN
        if args.num_samples < max(args.batch_sizes):
            p.error(f"--num-samples {args.num_samples} must be >= the largest batch size {max(args.batch_sizes)}")
    elif args.num_samples is not None:
        p.error("--num-samples sizes CRD's memory banks in --methods mode; the CoCoRD sweep has none "
                "(add --methods, or drop --num-samples)")
    elif args.cifar or args.arch not in ARCHS or args.teacher_arch not in ARCHS:
        p.error("the CoCoRD sweep runs torchvision ResNets (--arch / --teacher-arch from "
                f"{', '.join(ARCHS)}); CIFAR models and --cifar need --methods")
    return args


def run_sweep(args, dev, sync):
    """The default mode: CoCoRD's step, passes and bookkeeping parts over the batch sweep."""
    print(f"device {dev}, threads {torch.get_num_threads()}, student {args.arch}, teacher {args.teacher_arch}, "
          f"batches {args.batch_sizes}, {args.image_size}x{args.image_size} px, {args.num_classes} classes, "
          f"queue {args.queue_size}, median of {args.iters} interleaved rounds", flush=True)
    results = {}
    for batch in args.batch_sizes:
        results[batch], cocord = measure_batch(args, batch, dev, sync)
        print_batch(batch, results[batch])
    print_summary(results)
    memory = print_memory(cocord, args)
    return {"device": str(dev), "threads": torch.get_num_threads(), "arch": args.arch,
            "teacher_arch": args.teacher_arch, "image_size": args.image_size, "iters": args.iters,
            "batches": {str(b): dict(r, split={c: split(r[c]) for c in ("wall", "cpu")})
                        for b, r in results.items()},
            "memory": memory}


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    report = (run_methods if args.methods else run_sweep)(args, dev, sync)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
