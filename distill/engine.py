"""The distillation loop's pieces: one training step, one epoch, validation, LR schedule and progress
output. No argparse and no file layout here (distill/trainer.py owns those).
"""
import contextlib
import math
import time

import torch

from cocord_common import dist


# ---------------------------------------------------------------- LR schedule (stepped per epoch)
def lr_factor(epoch, epochs, schedule, cos):
    """Multiplier of the base LR during `epoch` (0-based): cosine from 1 to 0 over `epochs`, or
    x0.1 at each milestone in `schedule` (the CRD / pytorch-examples ImageNet recipe)."""
    if cos:
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return 0.1 ** sum(1 for m in schedule if epoch >= m)


def build_scheduler(optimizer, epochs, schedule, cos):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_factor(e, epochs, schedule, cos))


# ---------------------------------------------------------------- AMP
def autocast(device, amp):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_scaler(device, amp):
    """GradScaler for fp16 (loss scaling); disabled (a pass-through) for bf16 and off."""
    return torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))


# ---------------------------------------------------------------- progress bar
def format_eta(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Plain-text progress: step, running-average loss terms, images/s and ETA (no tqdm)."""

    def __init__(self, total, header, images_per_step, print_freq, log):
        self.total, self.header, self.images_per_step = total, header, images_per_step
        self.print_freq, self.log = max(int(print_freq), 1), log
        self.start = time.perf_counter()
        self.done = 0

    def update(self, step, averages, lr):
        self.done = step + 1
        if self.done % self.print_freq and self.done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        ips = self.done * self.images_per_step / max(elapsed, 1e-9)
        eta = elapsed / self.done * (self.total - self.done)
        width = len(str(self.total))
        terms = " ".join(f"{k} {v:.4f}" for k, v in averages.items())
        self.log(f"{self.header} [{self.done:>{width}}/{self.total}] {terms} lr {lr:.4g} "
                 f"{ips:.1f} img/s eta {format_eta(eta)}")


# ---------------------------------------------------------------- train / validate
def move_views(views, device, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [v.to(device, non_blocking=True).contiguous(memory_format=fmt) for v in views]


def train_step(model, optimizer, scaler, views, target, index, device, amp, where):
    """One update of `model` (the Method, possibly DDP-wrapped) on one (per-rank) batch.

    Returns the rank-averaged values {"loss": total, term: value, ...} as floats. A non-finite
    total on any rank raises RuntimeError on every rank (the values are all-reduced first, so no
    rank is left waiting in a collective), before any weight is touched.
    """
    with autocast(device, amp):
        _, losses = model(views, target, index)
    loss = sum(losses.values())
    names = ["loss"] + list(losses)
    values = torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()])
    values = (dist.all_reduce_sum(values) / dist.get_world_size()).tolist()
    result = dict(zip(names, values))
    if not all(math.isfinite(v) for v in values):
        terms = ", ".join(f"{k}={v}" for k, v in result.items())
        raise RuntimeError(f"non-finite loss at {where}: {terms} (mean over ranks). Lower --lr, "
                           f"use --amp off, or check the teacher weights and the data")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return result


def train_one_epoch(model, optimizer, scaler, loader, epoch, args, device, log, tb, global_step,
                    global_batch, header=None, position=None):
    """Train one epoch; returns (averages {"loss": .., term: ..}, steps, seconds, global_step).
    `header` (progress lines) and `position` (error messages) name the epoch; by default main epoch
    `epoch` (0-based) of args.epochs."""
    model.train()
    total = len(loader)
    if args.max_steps_per_epoch:
        total = min(total, args.max_steps_per_epoch)
    lr = optimizer.param_groups[0]["lr"]
    header = header or f"Epoch: [{epoch + 1}/{args.epochs}]"
    position = position or f"epoch {epoch + 1}"
    progress = Progress(total, header, global_batch, args.print_freq, log)
    sums, steps = {}, 0
    start = time.perf_counter()
    for i, (views, target, index) in enumerate(loader):
        if i >= total:
            break
        views = move_views(views, device, args.channels_last)
        target = target.to(device, non_blocking=True)
        index = index.to(device, non_blocking=True)
        result = train_step(model, optimizer, scaler, views, target, index, device, args.amp,
                            where=f"{position} step {i + 1}/{total} (global step {global_step + 1})")
        global_step += 1
        steps += 1
        for k, v in result.items():
            sums[k] = sums.get(k, 0.0) + v
        averages = {k: v / steps for k, v in sums.items()}
        if tb is not None and (global_step % args.print_freq == 0):
            for k, v in result.items():
                tb.add_scalar(f"train_step/{k}", v, global_step)
        progress.update(i, averages, lr)
    seconds = time.perf_counter() - start
    return {k: v / max(steps, 1) for k, v in sums.items()}, steps, seconds, global_step


@torch.no_grad()
def validate(student, loader, device, amp, channels_last):
    """Top-1 / top-5 accuracy (%) of `student` over the whole val set (summed over ranks)."""
    was_training = student.training
    student.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, n
    for images, target in loader:
        images = move_views([images], device, channels_last)[0]
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = student(images)
        k = min(5, logits.shape[1])
        top = logits.float().topk(k, dim=1).indices
        hit = top.eq(target[:, None])
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=1).sum()
        counts[2] += target.numel()
    student.train(was_training)
    counts = dist.all_reduce_sum(counts)
    n = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n}
