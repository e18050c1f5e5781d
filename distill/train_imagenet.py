#!/usr/bin/env python
"""Distill a torchvision ResNet student from a frozen teacher on an ImageFolder tree.

    python distill/train_imagenet.py DATA -a resnet18 --teacher-arch resnet34 \
        --teacher-weights teacher.pth --method cocord -b 256
    torchrun --nproc_per_node 8 distill/train_imagenet.py DATA --config configs/distill/r34_r18_cocord.yaml

Close to pytorch/examples' imagenet/main.py. `DATA` holds `train/<class>/*` and `val/<class>/*`.
Outputs (in --output-dir): config.yaml, log.txt, metrics.jsonl, tb/, checkpoint_XXXX.pth +
last_checkpoint, student_backbone.pth (the converter's input). See README.md, "Stage 1: distillation".
"""
import argparse
import difflib
import json
import logging
import os
import re
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script: make `distill` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import yaml

from cocord_common import dist
from distill import engine
from cocord_common.checkpoint import load_checkpoint, last_checkpoint, save_atomic, save_checkpoint
from distill.data import EvalImageFolder, MultiViewImageFolder, build_train_loader, build_val_loader
from distill.methods import METHODS, add_method_args, build_method
from distill.models import ARCHS, build_resnet
from cocord_common.rng import rng_state, seed_all, set_rng_state
from cocord_common.yaml_config import read_yaml_mapping

LOGGER_NAME = "distill"


# ================================================================================ arguments
def build_parser():
    p = argparse.ArgumentParser(description="CoCoRD / KD / CRD distillation on ImageFolder data",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DATA", nargs="?", default=None,
                   help="dataset root holding train/ and val/ (ImageFolder layout)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file whose keys are flag names; it sets defaults, the command line wins")
    p.add_argument("-a", "--arch", default="resnet18", help=f"student architecture: {', '.join(ARCHS)}")
    p.add_argument("--teacher-arch", default=None, help=f"teacher architecture: {', '.join(ARCHS)}")
    p.add_argument("--teacher-weights", default=None,
                   help="teacher weights: a local file (student_backbone.pth, a checkpoint of this script, "
                        "a torchvision / DDP state dict) or a torchvision weights name such as IMAGENET1K_V1")
    p.add_argument("--method", default="cocord", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--epochs", default=100, type=int, help="number of total epochs")
    p.add_argument("-b", "--batch-size", default=256, type=int,
                   help="global batch size over all processes (each gets batch/world_size)")
    p.add_argument("--lr", "--learning-rate", default=None, type=float, dest="lr",
                   help="initial learning rate; default 0.1 * batch / 256")
    p.add_argument("--schedule", default=[30, 60, 90], type=int, nargs="*",
                   help="epochs at which the LR drops x0.1 (ignored with --cos)")
    p.add_argument("--cos", action="store_true", help="cosine LR schedule (per epoch) instead of steps")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    p.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="wd", help="weight decay")
    p.add_argument("-j", "--workers", default=8, type=int, help="data loading workers per process")
    p.add_argument("--seed", default=0, type=int, help="seed of every RNG (model init, order, augmentation)")
    p.add_argument("--resume", default="", metavar="PATH|auto",
                   help="checkpoint to continue from; 'auto' = the output dir's last_checkpoint if any")
    p.add_argument("--output-dir", default="./output/distill", help="where every output goes")
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                   help="mixed precision: bf16 autocast, fp16 autocast + GradScaler, or off")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the networks")
    p.add_argument("--crop-size", default=224, type=int, help="training crop and validation center crop")
    p.add_argument("--val-resize", default=256, type=int, help="validation: shorter side resized to this")
    p.add_argument("--no-val", action="store_true", help="train without a val/ folder (no top-1/top-5)")
    p.add_argument("--max-steps-per-epoch", default=0, type=int,
                   help="stop each epoch after this many steps (0 = full epoch); for smoke tests")
    p.add_argument("--keep-checkpoints", default=2, type=int,
                   help="keep only the newest N checkpoint_XXXX.pth files (0 = keep all)")
    p.add_argument("--print-freq", "-p", default=10, type=int, help="progress line every N steps")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dist-url", default="env://", help="process-group init URL (torchrun sets env://)")
    p.add_argument("--dist-backend", default=None, help="default: nccl on GPU, gloo on CPU")
    add_method_args(p)
    return p


def _option_actions(parser):
    """dest -> action for every option a config file may set."""
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def load_config_defaults(parser, path):
    """Read a YAML of flag names -> values and install them as parser defaults (CLI still wins)."""
    cfg = read_yaml_mapping(path, "--config")
    actions = _option_actions(parser)
    defaults = {}
    for key, value in cfg.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--config {path}: unknown key '{key}'{hint} "
                             f"(keys are the command-line flag names, e.g. teacher-arch)")
        action = actions[dest]
        if isinstance(value, str) and action.type is not None:
            value = action.type(value)
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"--config {path}: {key}={value!r} is not one of {list(action.choices)}")
        defaults[dest] = value
    parser.set_defaults(**defaults)
    return cfg


def parse_args(argv=None):
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        load_config_defaults(parser, known.config)
    args = parser.parse_args(argv)
    return args


def check_args(args):
    """Validate values argparse cannot (they may come from a config file)."""
    if args.data is None:
        raise ValueError("DATA is required: the dataset root holding train/ (and val/)")
    if args.arch not in ARCHS:
        raise ValueError(f"unknown --arch '{args.arch}'; choose one of {', '.join(ARCHS)}")
    if args.method not in METHODS:
        raise ValueError(f"unknown --method '{args.method}'; choose one of {', '.join(METHODS)}")
    if args.method == "supervised":
        if args.teacher_weights:
            raise ValueError("--method supervised trains without a teacher; drop --teacher-weights")
    else:
        if args.teacher_arch is None or args.teacher_weights is None:
            raise ValueError(f"--method {args.method} needs a teacher: pass --teacher-arch ({', '.join(ARCHS)}) "
                             f"and --teacher-weights (a local .pth file or a torchvision weights name)")
        if args.teacher_arch not in ARCHS:
            raise ValueError(f"unknown --teacher-arch '{args.teacher_arch}'; choose one of {', '.join(ARCHS)}")
    for name in ("epochs", "batch_size", "crop_size", "val_resize", "print_freq"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("workers", "max_steps_per_epoch", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")


# ================================================================================ teacher
def _strip_module_prefix(sd):
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_teacher_state(spec, arch, log):
    """(state_dict, description) of --teacher-weights: a local file or a torchvision weights name."""
    if os.path.exists(spec):
        obj = load_checkpoint(spec)
        if isinstance(obj, dict) and isinstance(obj.get("student"), dict):  # a checkpoint of this script
            if obj.get("arch") not in (None, arch):
                raise ValueError(f"--teacher-weights {spec} is a checkpoint of a {obj['arch']} student, "
                                 f"but --teacher-arch is {arch}")
            obj = obj["student"]
        elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # pytorch/examples style
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"--teacher-weights {spec} is not a state dict of tensors (nor a checkpoint "
                             f"holding 'student' or 'state_dict')")
        return _strip_module_prefix(obj), spec
    import torchvision
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        enum = None
    name = spec.split(".")[-1]
    if enum is None or name not in enum.__members__:
        choices = ", ".join(enum.__members__) if enum is not None else "none"
        raise FileNotFoundError(f"--teacher-weights {spec}: no such file, and not a torchvision weights name "
                                f"for {arch} (names: {choices})")
    weights = enum[name]
    log(f"teacher weights: torchvision {weights} from {weights.url}")
    try:
        sd = weights.get_state_dict(progress=dist.get_rank() == 0, check_hash=True)
    except Exception as e:
        raise RuntimeError(
            f"--teacher-weights {spec}: downloading {weights.url} failed ({type(e).__name__}: {e}). "
            f"Offline? Download that file elsewhere and pass its local path to --teacher-weights") from e
    return sd, f"torchvision {weights}"


def check_state_matches(model, sd, source, what):
    """Raise naming `source` and the first mismatches unless `sd` fits `model` exactly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return
    fc = [s for s in shapes if s.startswith("fc.")]
    parts = []
    if fc and len(fc) == len(shapes) and not missing and not unexpected:
        parts.append(f"its classifier has {tuple(sd['fc.weight'].shape)[0]} classes but the data has "
                     f"{expected['fc.weight'].shape[0]} (train the teacher on these classes)")
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{label} ({len(items)}): {'; '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    raise ValueError(f"{source} does not fit {what}: " + " | ".join(parts))


def build_teacher(args, num_classes, log):
    teacher = build_resnet(args.teacher_arch, num_classes)
    # rank 0 first: a torchvision download then happens once and the others read the cache
    if dist.get_rank() != 0:
        dist.barrier()
    sd, source = read_teacher_state(args.teacher_weights, args.teacher_arch, log)
    if dist.get_rank() == 0:
        dist.barrier()
    check_state_matches(teacher, sd, f"--teacher-weights {source}",
                        f"a torchvision {args.teacher_arch} with {num_classes} classes (--teacher-arch)")
    teacher.load_state_dict(sd, strict=True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ================================================================================ outputs
def setup_logging(output_dir, is_main):
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if is_main:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", "%m/%d %H:%M:%S")
        for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(output_dir, "log.txt"))):
            h.setFormatter(fmt)
            logger.addHandler(h)
    return logger


def close_logging(logger):
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()


def resolved_config(args):
    """Every flag's final value (lr resolved); loadable again with --config (the file given with
    --config is already merged in, so it is left out)."""
    return {k: v for k, v in vars(args).items() if k != "config"}


def truncate_metrics(path, epoch):
    """Drop metrics lines of epochs after `epoch` (written by a run that died before its checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] <= epoch]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def prune_checkpoints(output_dir, keep):
    if keep <= 0:
        return
    names = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint_") and n.endswith(".pth"))
    for name in names[:-keep]:
        os.remove(os.path.join(output_dir, name))


# ================================================================================ main
def main(argv=None):
    """Run the whole training; returns the last epoch's metrics dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = " ".join([os.path.basename(__file__)] + argv)
    check_args(args)
    info = dist.init_distributed(args.dist_url, args.dist_backend, args.device)
    try:
        return _run(args, info, command)
    finally:
        if info.distributed:
            dist.cleanup()


def _run(args, info, command):
    device = info.device
    # fp16: GradScaler skips the optimizer step after inf/nan gradients, which torch then misreads
    # as "scheduler.step() before optimizer.step()"; our scheduler is stepped per epoch on purpose
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
    per_rank = dist.per_rank_batch(args.batch_size, info.world_size)
    if args.lr is None:
        args.lr = 0.1 * args.batch_size / 256
    os.makedirs(args.output_dir, exist_ok=True)
    logger = setup_logging(args.output_dir, info.is_main)
    log = logger.info
    tb = None
    try:
        # ---- data (scanned before the models: the method needs the dataset size and labels)
        train_set = MultiViewImageFolder(os.path.join(args.data, "train"), args.crop_size, seed=args.seed)
        num_classes = len(train_set.classes)
        val_set = None
        if not args.no_val:
            val_dir = os.path.join(args.data, "val")
            if not os.path.isdir(val_dir):
                raise FileNotFoundError(f"validation folder {val_dir} does not exist; add it "
                                        f"(ImageFolder layout, same classes as train/) or pass --no-val")
            val_set = EvalImageFolder(val_dir, args.crop_size, args.val_resize, train_set.class_to_idx)
        log(f"train: {len(train_set)} images, {num_classes} classes in {train_set.root}"
            + (f"; val: {len(val_set)} images" if val_set is not None else "; no validation"))

        # ---- models: identical on every rank (same seed); per-rank RNG streams start after
        seed_all(args.seed)
        student = build_resnet(args.arch, num_classes)
        teacher = build_teacher(args, num_classes, log) if args.method != "supervised" else None
        labels = torch.tensor(train_set.targets, dtype=torch.long)
        method = build_method(args.method, args, student, teacher, len(train_set), labels,
                              gather=dist.gather if info.distributed else None)
        train_set.num_views = method.num_views
        method.to(device)
        if args.channels_last:
            method.to(memory_format=torch.channels_last)
        model = dist.wrap_ddp(method, device)

        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        scheduler = engine.build_scheduler(optimizer, args.epochs, args.schedule, args.cos)
        scaler = engine.build_scaler(device, args.amp)
        seed_all(args.seed + info.rank)

        # ---- resume
        start_epoch, global_step = 0, 0
        resume = args.resume
        if resume == "auto":
            resume = last_checkpoint(args.output_dir)
            if resume is None:
                log(f"--resume auto: no last_checkpoint in {args.output_dir}, starting from scratch")
        if resume:
            ckpt = load_checkpoint(resume)
            for key in ("arch", "method"):
                if ckpt.get(key) != getattr(args, key):
                    raise ValueError(f"--resume {resume} was trained with {key}={ckpt.get(key)!r}, "
                                     f"but this run has --{key} {getattr(args, key)}")
            method.load_state_dict(ckpt["method_state"], strict=True)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, global_step = ckpt["epoch"], ckpt["step"]
            rngs = ckpt["rng"]
            if len(rngs) == info.world_size:
                set_rng_state(rngs[info.rank])
            else:
                log(f"warning: {resume} holds RNG states of {len(rngs)} processes, this run has "
                    f"{info.world_size}; RNGs are reseeded, so the run will not replay exactly")
                seed_all(args.seed + 1000 * start_epoch + info.rank)
            log(f"resumed from {resume} at epoch {start_epoch} (step {global_step})")
            if info.is_main:
                truncate_metrics(os.path.join(args.output_dir, "metrics.jsonl"), start_epoch)

        # ---- outputs
        if info.is_main:
            with open(os.path.join(args.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(resolved_config(args), f, sort_keys=False)
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(args.output_dir, "tb"), purge_step=global_step or None)
        log(f"command: {command}")
        log(f"method {args.method}: student {args.arch}"
            + (f", teacher {args.teacher_arch} ({args.teacher_weights})" if teacher is not None else "")
            + f"; {info.world_size} process(es) on {device}, batch {args.batch_size} ({per_rank}/process), "
              f"lr {args.lr:g}, amp {args.amp}")

        pin = device.type == "cuda"
        val_loader = (build_val_loader(val_set, per_rank, args.workers, info.rank, info.world_size, pin)
                      if val_set is not None else None)
        last = {}
        if start_epoch >= args.epochs:
            log(f"already trained {start_epoch} of --epochs {args.epochs}: nothing to do")
        for epoch in range(start_epoch, args.epochs):
            epoch_start = time.perf_counter()
            loader = build_train_loader(train_set, per_rank, args.workers, info.rank, info.world_size,
                                        args.seed, epoch, pin)
            lr = optimizer.param_groups[0]["lr"]
            averages, steps, seconds, global_step = engine.train_one_epoch(
                model, optimizer, scaler, loader, epoch, args, device, log, tb, global_step, args.batch_size)
            scheduler.step()
            dist.average_batchnorm_buffers(method)  # one set of BN statistics for val and checkpoint
            metrics = {"epoch": epoch + 1, "step": global_step, "lr": lr}
            metrics.update({f"train/{k}": v for k, v in averages.items()})
            if val_loader is not None:
                acc = engine.validate(method.student, val_loader, device, args.amp, args.channels_last)
                metrics.update({"val/top1": acc["top1"], "val/top5": acc["top5"]})
            metrics["images_per_sec"] = steps * args.batch_size / max(seconds, 1e-9)
            metrics["time"] = time.perf_counter() - epoch_start

            rngs = dist.all_gather_object(rng_state())  # every rank's RNG, for exact resume
            if info.is_main:
                ckpt = {
                    "arch": args.arch, "method": args.method, "epoch": epoch + 1, "step": global_step,
                    "config": dict(resolved_config(args), world_size=info.world_size),
                    "student": method.student.state_dict(),
                    "slow_student": method.slow_student_state_dict(),
                    "method_state": method.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "rng": rngs,
                }
                save_atomic(method.student.state_dict(), os.path.join(args.output_dir, "student_backbone.pth"))
                save_checkpoint(ckpt, args.output_dir, f"checkpoint_{epoch + 1:04d}.pth")
                prune_checkpoints(args.output_dir, args.keep_checkpoints)
                with open(os.path.join(args.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                for k, v in metrics.items():
                    if k not in ("epoch", "step"):
                        tb.add_scalar(k, v, epoch + 1)
                tb.flush()
            log("epoch {epoch}: ".format(epoch=epoch + 1)
                + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                           if k != "epoch"))
            dist.barrier()
            last = metrics
        return last
    finally:
        if tb is not None:
            tb.close()
        close_logging(logger)


def cli():
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
