#!/usr/bin/env python
"""Time one training step of CoCoRD, KD and supervised training against the network passes CoCoRD
cannot avoid, and compare the memory of CoCoRD's queue with CRD's memory banks on ImageNet.

Every step is forward + backward + SGD step on random images (no data loading). "Unavoidable passes"
are the networks CoCoRD must run anyway, timed alone: teacher forward on x_t, student forward +
backward on x_s and x_s', slow-student forwards on x_s and x_s'. CoCoRD's bookkeeping (heads,
predictor, EMA, queue, losses, and the optimizer step) is the difference; the goal is <= 10% of the
passes. Example (the default, about a minute on a 2-core CPU):

    python tools/benchmark_distill.py --arch resnet18 --teacher-arch resnet34 -b 16 --image-size 64
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distill.methods import add_method_args, build_method  # noqa: E402
from distill.models import ARCHS, build_resnet, forward_features  # noqa: E402

IMAGENET_TRAIN = 1281167


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


def method_step(method, views, target, index):
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        _, losses = method(views, target, index)
        sum(losses.values()).backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-a", "--arch", default="resnet18", choices=ARCHS)
    p.add_argument("--teacher-arch", default="resnet34", choices=ARCHS)
    p.add_argument("-b", "--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: steady ratios on a shared machine; 0: torch's default)")
    add_method_args(p)
    args = p.parse_args(argv)

    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, S, C = args.batch_size, args.image_size, args.num_classes
    views = [torch.randn(B, 3, S, S, device=dev) for _ in range(3)]
    target = torch.randint(0, C, (B,), device=dev)
    index = torch.arange(B, device=dev)
    student = build_resnet(args.arch, C).to(dev)
    teacher = build_resnet(args.teacher_arch, C).to(dev)
    labels = torch.arange(max(B, 2)) % 2

    def make(name):
        return build_method(name, args, copy.deepcopy(student), None if name == "supervised" else
                            copy.deepcopy(teacher), len(labels), labels).to(dev).train()

    cocord = make("cocord")
    # the passes CoCoRD cannot avoid, alone
    s, t = copy.deepcopy(student).train(), copy.deepcopy(teacher).eval()
    slow = copy.deepcopy(student).train()
    slow.fc = torch.nn.Identity()

    def passes():
        with torch.no_grad():
            forward_features(t, views[2])
            forward_features(slow, views[0])
            forward_features(slow, views[1])
        s.zero_grad(set_to_none=True)
        (forward_features(s, views[0])[1].sum() + forward_features(s, views[1])[0].sum()).backward()
    opt = torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    fns = {"supervised step (1 view)": method_step(make("supervised"), views[:1], target, index),
           "KD step (1 view)": method_step(make("kd"), views[:1], target, index),
           "CoCoRD step (3 views)": method_step(cocord, views, target, index),
           "unavoidable passes alone (CoCoRD)": passes,
           "student SGD step alone (not in passes)": opt.step}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    wall, cpu = timed_rounds(fns, args.iters, args.warmup, sync)

    print(f"device {dev}, threads {torch.get_num_threads()}, student {args.arch}, teacher {args.teacher_arch}, "
          f"batch {B}, {S}x{S} px, {C} classes, queue {args.queue_size}, median of {args.iters} interleaved rounds")
    print(f"{'':<42}{'wall s':>9}{'x passes':>10}{'cpu s':>9}{'x passes':>10}")
    ref_w, ref_c = wall["unavoidable passes alone (CoCoRD)"], cpu["unavoidable passes alone (CoCoRD)"]
    for k in fns:
        print(f"{k:<42}{wall[k]:>9.4f}{wall[k] / ref_w:>10.3f}{cpu[k]:>9.4f}{cpu[k] / ref_c:>10.3f}")
    for clock, d, ref in (("wall", wall, ref_w), ("cpu", cpu, ref_c)):
        book = d["CoCoRD step (3 views)"] - ref
        own = book - d["student SGD step alone (not in passes)"]
        print(f"CoCoRD bookkeeping ({clock}): step - passes = {book:.4f} s = {100 * book / ref:.1f}% of the passes "
              f"({100 * own / ref:.1f}% without the student's own SGD step); goal <= 10%")

    # memory: real buffers at the flags given (defaults: K = 16384 x 2048 fp32; CRD 2 x N x 128 fp32)
    queue_bytes = sum(b.numel() * b.element_size() for n, b in cocord.named_buffers() if n.startswith("queue"))
    crd = make("crd")
    per_sample = sum(b[0].numel() * b.element_size() for n, b in crd.named_buffers() if n.startswith("memory_"))
    idx_per_sample = sum(b.element_size() for n, b in crd.named_buffers() if n in ("labels", "order"))
    crd_bytes = per_sample * IMAGENET_TRAIN
    print(f"memory for ImageNet ({IMAGENET_TRAIN:,} images): CoCoRD queue {queue_bytes / 2**20:.1f} MiB "
          f"({tuple(cocord.queue.shape)} {cocord.queue.dtype}) vs CRD banks {crd_bytes / 2**20:.1f} MiB "
          f"(2 x ({IMAGENET_TRAIN}, {crd.memory_s.shape[1]}) {crd.memory_s.dtype}; plus "
          f"{idx_per_sample * IMAGENET_TRAIN / 2**20:.1f} MiB of class index lists) = "
          f"{crd_bytes / queue_bytes:.1f}x")


if __name__ == "__main__":
    main()
