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
"""
import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

from distill.engine import autocast, build_scaler
from distill.methods import METHODS, add_method_args, build_method
from distill.methods.cocord import prediction_loss
from distill.models import ARCHS, build_resnet, forward_features

IMAGENET_TRAIN = 1281167
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-a", "--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--teacher-arch", default="resnet34", choices=ARCHS)
    p.add_argument("-b", "--batch-sizes", type=int, nargs="+", default=None,
                   help="batch sizes to sweep (default: 8 32 64 on CPU, 8 32 64 128 256 on GPU)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steady ratios on a shared machine; 0: torch's default)")
    p.add_argument("--json", default="", metavar="FILE", help="also write every timing and ratio to FILE")
    add_method_args(p)
    args = p.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = [8, 32, 64] + ([128, 256] if args.device.startswith("cuda") else [])
    bad = [b for b in args.batch_sizes if b < 2]
    if bad or args.iters < 1 or args.warmup < 0 or args.image_size < 32:
        p.error(f"need batch sizes >= 2 (BatchNorm; got {args.batch_sizes}), --iters >= 1, --warmup >= 0 "
                f"and --image-size >= 32")
    return args


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"device {dev}, threads {torch.get_num_threads()}, student {args.arch}, teacher {args.teacher_arch}, "
          f"batches {args.batch_sizes}, {args.image_size}x{args.image_size} px, {args.num_classes} classes, "
          f"queue {args.queue_size}, median of {args.iters} interleaved rounds", flush=True)
    results = {}
    for batch in args.batch_sizes:
        results[batch], cocord = measure_batch(args, batch, dev, sync)
        print_batch(batch, results[batch])
    print_summary(results)
    memory = print_memory(cocord, args)
    report = {"device": str(dev), "threads": torch.get_num_threads(), "arch": args.arch,
              "teacher_arch": args.teacher_arch, "image_size": args.image_size, "iters": args.iters,
              "batches": {str(b): dict(r, split={c: split(r[c]) for c in ("wall", "cpu")})
                          for b, r in results.items()},
              "memory": memory}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
