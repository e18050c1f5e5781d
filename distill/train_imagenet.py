#!/usr/bin/env python
"""Distill a torchvision ResNet student from a frozen teacher on an ImageFolder tree.

    python distill/train_imagenet.py DATA -a resnet18 --teacher-arch resnet34 \
        --teacher-weights teacher.pth --method cocord -b 256
    torchrun --nproc_per_node 8 distill/train_imagenet.py DATA --config configs/distill/r34_r18_cocord.yaml

Close to pytorch/examples' imagenet/main.py. `DATA` holds `train/<class>/*` and `val/<class>/*`.
Outputs (in --output-dir): config.yaml, log.txt, metrics.jsonl, tb/, checkpoint_XXXX.pth +
last_checkpoint, student_backbone.pth (the converter's input). The run itself (flags common to every
trainer, resume, the epoch loop, checkpoints) is distill/trainer.py, shared with distill/train_cifar.py;
this file adds the ImageFolder data. See docs/distill.md; errors follow docs/errors.md
(`train_imagenet.py: error: ...`, exit status 2).
"""
import os
import time

from cocord_common import dist
from cocord_common.errors import UserError, run_main
from distill import trainer
from distill.data import (FILE_CHECKS, EvalImageFolder, ImageError, MultiViewImageFolder, check_image_files,
                          describe_skipped)
from distill.models import ARCHS

MAX_LISTED_BAD_FILES = 20  # an unreadable-files error lists this many, then the count
read_teacher_state = trainer.read_teacher_state  # the shared run's teacher reader, for callers of this module


def add_args(p):
    p.add_argument("--file-check", default="header", choices=FILE_CHECKS,
                   help="before training, open every train/val image: header (open + verify, ~0.3-0.7 ms "
                        "a file), full (decode, ~3-5 ms a file) or off")


def add_input_args(p):
    p.add_argument("--crop-size", default=224, type=int, help="training crop and validation center crop")
    p.add_argument("--val-resize", default=256, type=int, help="validation: shorter side resized to this")
    p.add_argument("--no-val", action="store_true", help="train without a val/ folder (no top-1/top-5)")


def check_imagenet_args(args):
    for name in ("crop_size", "val_resize"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def load_data(args, info, log):
    """(train set, val set or None), every file checked (--file-check). Scanned before the models: the
    method needs the dataset size and labels."""
    train_set = MultiViewImageFolder(os.path.join(args.data, "train"), args.crop_size, seed=args.seed)
    val_set = None
    if not args.no_val:
        val_dir = os.path.join(args.data, "val")
        if not os.path.isdir(val_dir):
            raise FileNotFoundError(f"validation folder {val_dir} does not exist; add it "
                                    f"(ImageFolder layout, same classes as train/) or pass --no-val")
        val_set = EvalImageFolder(val_dir, args.crop_size, args.val_resize, train_set.class_to_idx)
    log(f"train: {len(train_set)} images, {len(train_set.classes)} classes in {train_set.root}"
        + (f"; val: {len(val_set)} images" if val_set is not None else "; no validation"))
    for split in (train_set, val_set):
        if split is not None and split.skipped_files:
            log(f"warning: {split.root}: skipped files without an image extension: "
                f"{describe_skipped(split.skipped_files)}")
    check_files(args, info, [train_set, val_set], log)
    return train_set, val_set


def check_files(args, info, splits, log):
    """Open every image of every split before training (each process checks its share); one error
    lists the unreadable ones."""
    paths = [path for split in splits if split is not None for path, _ in split.samples]
    if args.file_check == "off":
        log(f"--file-check off: the {len(paths)} image files are not checked before training")
        return
    start = time.perf_counter()
    mine = check_image_files(paths[info.rank::info.world_size], args.file_check, max(1, args.workers))
    bad = sorted((index * info.world_size + rank, path, reason)
                 for rank, found in enumerate(dist.all_gather_object(mine)) for index, path, reason in found)
    seconds = time.perf_counter() - start
    log(f"checked {len(paths)} image files (--file-check {args.file_check}) in {seconds:.1f} s")
    if bad:
        listed = "\n".join(f"  {path}: {reason}" for _, path, reason in bad[:MAX_LISTED_BAD_FILES])
        more = f"\n  ... and {len(bad) - MAX_LISTED_BAD_FILES} more" if len(bad) > MAX_LISTED_BAD_FILES else ""
        raise ImageError(f"{len(bad)} of {len(paths)} image files cannot be read (--file-check {args.file_check}):\n"
                         f"{listed}{more}\nDelete or replace them, then run again")


SPEC = trainer.DatasetSpec(
    prog="train_imagenet.py",
    description="CoCoRD / KD / CRD distillation on ImageFolder data",
    archs=ARCHS,
    defaults={},  # the shared flags' defaults are this trainer's (pytorch/examples' ImageNet recipe)
    add_args=add_args,
    add_input_args=add_input_args,
    check_args=check_imagenet_args,
    default_lr=lambda args: 0.1 * args.batch_size / 256,
    lr_help="initial learning rate; default 0.1 * batch / 256",
    load_data=load_data,
    image_size=lambda args: args.crop_size,
    data_help="dataset root holding train/ and val/ (ImageFolder layout)",
    teacher_weights_help="teacher weights: a local file (student_backbone.pth, a checkpoint of this script, "
                         "a torchvision / DDP state dict) or a torchvision weights name such as IMAGENET1K_V1",
)


def build_parser():
    return trainer.build_parser(SPEC)


def parse_args(argv=None):
    return trainer.parse_args(SPEC, argv)


def check_args(args):
    trainer.check_args(SPEC, args)


def main(argv=None):
    """Run the whole training; returns the last epoch's metrics dict."""
    return trainer.main(SPEC, argv)


def cli():
    """Entry point: user errors print `train_imagenet.py: error: ...` and exit 2 (docs/errors.md)."""
    run_main(main)


if __name__ == "__main__":
    cli()
