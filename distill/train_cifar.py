#!/usr/bin/env python
"""Distill a CIFAR-100 student (the zoo of distill/cifar_models.py) from a frozen teacher.

    python distill/train_cifar.py DATA --method cocord -a resnet8x4 --teacher-arch resnet32x4 \
        --teacher-weights resnet32x4_vanilla/ckpt_epoch_240.pth
    python distill/train_cifar.py DATA --method supervised -a resnet32x4      # a teacher, or the "Student" row
    torchrun --nproc_per_node 2 distill/train_cifar.py DATA --method crd ...

`DATA` holds torchvision's CIFAR-100 folder DATA/cifar-100-python/{train,test,meta} (--download fetches
and verifies the official archive). Same flags, outputs, checkpoints, --resume auto, torchrun, AMP and
metrics as distill/train_imagenet.py: both call the one run of distill/trainer.py. This file adds the
CIFAR data and RepDistiller's recipe as defaults: 240 epochs, batch 64, SGD momentum 0.9, weight decay
5e-4, lr 0.05 (0.01 for MobileNetV2 / ShuffleV1 / ShuffleV2 students unless --lr is given), x0.1 at
epochs 150, 180, 210, and CoCoRD's CIFAR queue K = 2048 (configs/distill/cifar_pairs.yaml states the
same values; tests/test_train_cifar.py keeps the two in step). Validation is on the test split.
See docs/cifar.md.
"""
from cocord_common import dist
from cocord_common.errors import run_main
from distill import trainer
from distill.cifar_data import IMAGE_SIZE, CifarTestSet, CifarTrainSet, download_cifar100
from distill.models import ALL_ARCHS

# RepDistiller's recipe (train_student.py / train_teacher.py) and the authors' CIFAR CoCoRD queue
CIFAR_DEFAULTS = {"arch": "resnet8x4", "epochs": 240, "batch_size": 64, "schedule": [150, 180, 210],
                  "momentum": 0.9, "wd": 5e-4, "queue_size": 2048, "output_dir": "./output/distill_cifar"}
BASE_LR = 0.05
SMALL_STUDENT_LR = 0.01
SMALL_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def default_lr(args):
    """RepDistiller's: 0.01 for the small students, else 0.05 (whatever the batch size)."""
    return SMALL_STUDENT_LR if args.arch in SMALL_STUDENTS else BASE_LR


def add_args(p):
    p.add_argument("--download", action="store_true",
                   help="fetch the official CIFAR-100 archive into DATA and check its md5 when "
                        "DATA/cifar-100-python is missing")


def add_input_args(p):
    p.add_argument("--no-val", action="store_true", help="train without evaluating on the test split")


def load_data(args, info, log):
    """(train set, test set or None) of DATA/cifar-100-python, fetched first with --download (rank 0
    downloads, the others wait and read)."""
    if args.download:
        if info.is_main:
            download_cifar100(args.data)
        dist.barrier()
    train_set = CifarTrainSet(args.data, seed=args.seed)
    val_set = None if args.no_val else CifarTestSet(args.data)
    log(f"train: {len(train_set)} images, {len(train_set.classes)} classes in {train_set.root}"
        + (f"; test: {len(val_set)} images" if val_set is not None else "; no validation"))
    return train_set, val_set


SPEC = trainer.DatasetSpec(
    prog="train_cifar.py",
    description="CoCoRD / KD / CRD / feature-based distillation on CIFAR-100",
    archs=ALL_ARCHS,
    defaults=CIFAR_DEFAULTS,
    add_args=add_args,
    add_input_args=add_input_args,
    default_lr=default_lr,
    lr_help=f"initial learning rate; default {BASE_LR} ({SMALL_STUDENT_LR} for {', '.join(SMALL_STUDENTS)} students)",
    load_data=load_data,
    image_size=lambda args: IMAGE_SIZE,
    data_help="dataset root holding cifar-100-python/{train,test,meta} (torchvision's CIFAR-100 folder)",
    teacher_weights_help="teacher weights: a local file: a published CIFAR teacher checkpoint "
                         "({'model': state_dict, ...}), a checkpoint of this script, student_backbone.pth "
                         "or a plain / DDP state dict",
)


def build_parser():
    return trainer.build_parser(SPEC)


def parse_args(argv=None):
    return trainer.parse_args(SPEC, argv)


def main(argv=None):
    """Run the whole training; returns the last epoch's metrics dict."""
    return trainer.main(SPEC, argv)


def cli():
    """Entry point: user errors print `train_cifar.py: error: ...` and exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
