"""The one distillation run both trainers share (distill/train_imagenet.py, distill/train_cifar.py).

A trainer is a thin CLI that describes its dataset with a `DatasetSpec` (its own flags and defaults,
how to read the data, the default learning rate, the architectures it accepts) and calls
`main(spec, argv)`. Everything else lives here, once: flags common to both, --config files, teacher
loading, output folder rules, resume, the epoch loop with its checkpoints / metrics / TensorBoard, and
the initialisation stage of the two-stage methods (ab, ft).

Two-stage methods (protocol: distill/methods/feature_method.py). The initialisation epochs run before
the --epochs of the main stage and are not counted in them. While in that stage the optimizer is SGD
over the stage's trainable parameters at `method.init_stage_lr(lr)` with a constant schedule; after each
initialisation epoch `method.finish_init_epoch()`, and when it reports the switch, a fresh SGD at --lr
with the run's schedule is built and DDP wrapped again. Every initialisation epoch writes a checkpoint
(`epoch` 0, `init_epoch` k, file checkpoint_0000_init_KKKK.pth) and a metrics line carrying `init_epoch`,
so an interruption inside the stage resumes exactly. Initialisation epoch k shuffles and augments as
data epoch INIT_DATA_EPOCH + k - 1, a stream no main epoch uses.
"""
import argparse
import difflib
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import yaml

from cocord_common import dist
from cocord_common.checkpoint import (POINTER, last_checkpoint, load_checkpoint, remove_orphan_temp_files,
                                      save_atomic, save_checkpoint, write_text_atomic)
from cocord_common.errors import UserError, input_checks
from cocord_common.log import close_logging, setup_logging
from cocord_common.metrics import append_jsonl, reconcile_jsonl, DISTILL_METRICS_FILE as METRICS_FILE
from cocord_common.rng import rng_state, seed_all, set_rng_state
from cocord_common.weights import KIND_DISTILL, WeightsError, read_state_dict
from cocord_common.yaml_config import flag_value_from_yaml, read_yaml_mapping
from distill import engine
from distill.data import build_train_loader, build_val_loader
from distill.methods import METHODS, add_method_args, build_method, get_method
from distill.models import ARCHS, build_model, classifier_name

LOGGER_NAME = "distill"
INIT_DATA_EPOCH = 1_000_000  # data epoch of the first initialisation epoch (shuffle and augmentation seeds)


@dataclass(frozen=True)
class DatasetSpec:
    """What one trainer CLI adds to the shared run.

    prog                the script's name in messages and the logged command
    description         the --help headline
    archs               names accepted by -a / --teacher-arch
    defaults            flag dest -> default, over the common flags' ImageNet-style defaults
    add_args(parser)    the dataset's own flags, listed after --output-dir
    add_input_args(parser)  its input flags (sizes, --no-val), listed after --channels-last
    default_lr(args)    --lr when not given (called once the flags are final); lr_help says it
    load_data(args, info, log) -> (train set, val set or None); the train set has .classes, .targets,
                        .root, .num_views and set_epoch(); items ([views], target, index)
    image_size(args)    side of the square training images (sizes the feature methods' modules)
    data_help           what DATA must hold (the missing-DATA error and --help)
    teacher_weights_help  --help of --teacher-weights
    check_args(args)    checks of the dataset's flags (UserError), if it has any to check
    """
    prog: str
    description: str
    archs: tuple
    defaults: dict
    add_args: Callable
    add_input_args: Callable
    default_lr: Callable
    lr_help: str
    load_data: Callable
    image_size: Callable
    data_help: str
    teacher_weights_help: str
    check_args: Optional[Callable] = None


# ================================================================================ arguments
def build_parser(spec):
    p = argparse.ArgumentParser(description=spec.description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Errors in what you pass print 'error: ...' and exit with status 2; "
                                       "--debug (or COCORD_DEBUG=1) shows their traceback.")
    p.add_argument("data", metavar="DATA", nargs="?", default=None, help=spec.data_help)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML file whose keys are flag names; it sets defaults, the command line wins")
    p.add_argument("-a", "--arch", default="resnet18", help=f"student architecture: {', '.join(spec.archs)}")
    p.add_argument("--teacher-arch", default=None, help=f"teacher architecture: {', '.join(spec.archs)}")
    p.add_argument("--teacher-weights", default=None, help=spec.teacher_weights_help)
    p.add_argument("--method", default="cocord", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--epochs", default=100, type=int,
                   help="number of total epochs (of the main stage: ab / ft run --init-epochs before them)")
    p.add_argument("-b", "--batch-size", default=256, type=int,
                   help="global batch size over all processes (each gets batch/world_size)")
    p.add_argument("--lr", "--learning-rate", default=None, type=float, dest="lr",
                   help=spec.lr_help)
    p.add_argument("--schedule", default=[30, 60, 90], type=int, nargs="*",
                   help="epochs at which the LR drops x0.1 (ignored with --cos)")
    p.add_argument("--cos", action="store_true", help="cosine LR schedule (per epoch) instead of steps")
    p.add_argument("--momentum", default=0.9, type=float, help="SGD momentum")
    p.add_argument("--wd", "--weight-decay", default=1e-4, type=float, dest="wd", help="weight decay")
    p.add_argument("-j", "--workers", default=8, type=int, help="data loading workers per process")
    p.add_argument("--seed", default=0, type=int, help="seed of every RNG (model init, order, augmentation)")
    p.add_argument("--resume", default="", metavar="PATH|auto",
                   help="checkpoint to continue from; 'auto' = the output dir's last_checkpoint if any")
    p.add_argument("--output-dir", default="./output/distill",
                   help="where every output goes; a folder holding another run is refused unless --resume")
    spec.add_args(p)
    p.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"),
                   help="mixed precision: bf16 autocast, fp16 autocast + GradScaler, or off")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the networks")
    spec.add_input_args(p)
    p.add_argument("--max-steps-per-epoch", default=0, type=int,
                   help="stop each epoch after this many steps (0 = full epoch); for smoke tests")
    p.add_argument("--keep-checkpoints", default=2, type=int,
                   help="keep only the newest N checkpoint_XXXX.pth files (0 = keep all)")
    p.add_argument("--print-freq", "-p", default=10, type=int, help="progress line every N steps")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dist-url", default="env://", help="process-group init URL (torchrun sets env://)")
    p.add_argument("--dist-backend", default=None, help="default: nccl on GPU, gloo on CPU")
    add_method_args(p)
    p.set_defaults(**spec.defaults)
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
            raise UserError(f"--config {path}: unknown key '{key}'{hint} "
                            f"(keys are the command-line flag names, e.g. teacher-arch)")
        defaults[dest] = flag_value_from_yaml(actions[dest], value, path, key)
    parser.set_defaults(**defaults)
    return cfg


def parse_args(spec, argv=None):
    parser = build_parser(spec)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        load_config_defaults(parser, known.config)
    return parser.parse_args(argv)


def check_args(spec, args):
    """Validate values argparse cannot (they may come from a config file)."""
    if args.data is None:
        raise UserError(f"DATA is required: {spec.data_help}")
    archs = ", ".join(spec.archs)
    if args.arch not in spec.archs:
        raise UserError(f"unknown --arch '{args.arch}'; choose one of {archs}")
    with input_checks():
        entry = get_method(args.method)
    if not entry.needs_teacher:
        if args.teacher_weights:
            raise UserError(f"--method {args.method} trains without a teacher; drop --teacher-weights")
    else:
        if args.teacher_arch is None or args.teacher_weights is None:
            raise UserError(f"--method {args.method} needs a teacher: pass --teacher-arch ({archs}) "
                            f"and --teacher-weights (a local .pth file or a torchvision weights name)")
        if args.teacher_arch not in spec.archs:
            raise UserError(f"unknown --teacher-arch '{args.teacher_arch}'; choose one of {archs}")
    for name in ("epochs", "batch_size", "print_freq"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("workers", "max_steps_per_epoch", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if spec.check_args is not None:
        spec.check_args(args)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output-dir {args.output_dir} is a file; give a folder (a new one, or an "
                        f"earlier run's folder with --resume auto)")


# ================================================================================ teacher
def read_teacher_state(spec_text, arch, log):
    """(state_dict, description) of --teacher-weights: a local file or a torchvision weights name."""
    if os.path.exists(spec_text):
        try:
            found = read_state_dict(spec_text)
        except WeightsError as e:
            raise WeightsError(f"--teacher-weights: {e}") from None
        if found.kind == KIND_DISTILL and found.arch not in (None, arch):
            raise UserError(f"--teacher-weights {spec_text} is a checkpoint of a {found.arch} student, "
                            f"but --teacher-arch is {arch}")
        return found.state_dict, spec_text
    import torchvision
    try:
        enum = torchvision.models.get_model_weights(arch)
    except ValueError:
        enum = None
    name = spec_text.split(".")[-1]
    if enum is None or name not in enum.__members__:
        choices = ", ".join(enum.__members__) if enum is not None else "none"
        raise FileNotFoundError(f"--teacher-weights {spec_text}: no such file, and not a torchvision weights name "
                                f"for {arch} (names: {choices})")
    weights = enum[name]
    log(f"teacher weights: torchvision {weights} from {weights.url}")
    try:
        sd = weights.get_state_dict(progress=dist.get_rank() == 0, check_hash=True)
    except Exception as e:
        raise UserError(
            f"--teacher-weights {spec_text}: downloading {weights.url} failed ({type(e).__name__}: {e}). "
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
    head = classifier_name(model) + "."
    in_head = [s for s in shapes if s.startswith(head)]
    parts = []
    if in_head and len(in_head) == len(shapes) and not missing and not unexpected:
        weight = next(k for k in expected if k.startswith(head) and k.endswith("weight"))
        parts.append(f"its classifier has {tuple(sd[weight].shape)[0]} classes but the data has "
                     f"{expected[weight].shape[0]} (train the teacher on these classes)")
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            parts.append(f"{label} ({len(items)}): {'; '.join(items[:5])}{' ...' if len(items) > 5 else ''}")
    raise UserError(f"{source} does not fit {what}: " + " | ".join(parts))


def build_teacher(args, num_classes, log):
    teacher = build_model(args.teacher_arch, num_classes)
    # rank 0 first: a torchvision download then happens once and the others read the cache
    if dist.get_rank() != 0:
        dist.barrier()
    sd, source = read_teacher_state(args.teacher_weights, args.teacher_arch, log)
    if dist.get_rank() == 0:
        dist.barrier()
    family = "torchvision" if args.teacher_arch in ARCHS else "CIFAR zoo"
    check_state_matches(teacher, sd, f"--teacher-weights {source}",
                        f"a {family} {args.teacher_arch} with {num_classes} classes (--teacher-arch)")
    teacher.load_state_dict(sd, strict=True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ================================================================================ outputs
def resolved_config(args):
    """Every flag's final value (lr resolved); loadable again with --config (the file given with
    --config is already merged in, so it is left out)."""
    return {k: v for k, v in vars(args).items() if k != "config"}


def position(record):
    """Where a metrics line or checkpoint lies in a run: (main epochs done, initialisation epochs done
    within epoch 0). Main-stage records carry no init_epoch; initialisation ones have epoch 0."""
    return record["epoch"], record.get("init_epoch", 0)


def describe_position(record):
    epoch, init = position(record)
    return f"initialisation epoch {init}" if epoch == 0 and init else f"epoch {epoch}"


def reconcile_metrics(path, ckpt, log):
    """Make metrics.jsonl agree with the checkpoint a run resumes from (cocord_common.metrics.reconcile_jsonl:
    a cut last line and lines after the checkpoint dropped); the checkpoint's own line, lost when a kill
    came between the checkpoint and the append, is restored from the record the checkpoint holds.
    Initialisation-stage lines (epoch 0, init_epoch k) come before every main-stage line."""
    saved = [ckpt["metrics"]] if ckpt.get("metrics") else []
    where = position(ckpt)
    rows = reconcile_jsonl(path, saved, line_position, where, log, describe_position(ckpt), key=line_position)
    if not saved and not any(line_position(r) == where for r in rows):
        log(f"warning: {path} has no line for {describe_position(ckpt)}, and the checkpoint is older than "
            f"the metrics record checkpoints now hold, so that line cannot be restored")


def line_position(record):
    """position() of a metrics line with integer epoch keys, else None (not a line of this run)."""
    if isinstance(record.get("epoch"), int) and isinstance(record.get("init_epoch", 0), int):
        return position(record)
    return None


def files_of_a_run(folder):
    """The names in `folder` that show a run trained there (a checkpoint, its pointer, metrics lines)."""
    if not os.path.isdir(folder):
        return []
    names = sorted(os.listdir(folder))
    found = [n for n in names if n == POINTER or (n.startswith("checkpoint_") and n.endswith(".pth"))]
    metrics = os.path.join(folder, METRICS_FILE)
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append(METRICS_FILE)
    return found


def check_output_dir_is_free(args):
    """Refuse a fresh run in a folder holding another run's files (histories would mix). Nothing is
    deleted or moved: the user resumes that run, or picks another folder."""
    found = files_of_a_run(args.output_dir)
    if found and not args.resume:
        raise UserError(f"--output-dir {args.output_dir} holds another run ({', '.join(found[:4])}"
                        f"{', ...' if len(found) > 4 else ''}); pass --resume auto to continue it, or give a "
                        f"new --output-dir (nothing is deleted or overwritten)")


def resume_path(args):
    """The checkpoint --resume names ('auto': the output dir's last_checkpoint), or None for a fresh start."""
    if args.resume != "auto":
        return args.resume or None
    path = last_checkpoint(args.output_dir)
    if path is None:
        found = files_of_a_run(args.output_dir)
        if found:
            raise UserError(f"--resume auto: {args.output_dir} has no {POINTER} but holds "
                            f"{', '.join(found[:4])}; pass --resume <one of its checkpoint files>, or give a "
                            f"new --output-dir")
    return path


def checkpoint_name(record):
    """checkpoint_EEEE.pth after main epoch E; checkpoint_0000_init_KKKK.pth after initialisation epoch K
    (sorts before every main-stage one, so pruning keeps the newest)."""
    epoch, init = position(record)
    return f"checkpoint_{epoch:04d}_init_{init:04d}.pth" if epoch == 0 and init else f"checkpoint_{epoch:04d}.pth"


def prune_checkpoints(output_dir, keep):
    if keep <= 0:
        return
    names = sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint_") and n.endswith(".pth"))
    for name in names[:-keep]:
        os.remove(os.path.join(output_dir, name))


# ================================================================================ main
def main(spec, argv=None):
    """Run the whole training; returns the last epoch's metrics dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(spec, argv)
    command = " ".join([spec.prog] + argv)
    check_args(spec, args)
    check_output_dir_is_free(args)
    with input_checks():  # the launcher's environment variables
        info = dist.init_distributed(args.dist_url, args.dist_backend, args.device)
    try:
        return _run(spec, args, info, command)
    finally:
        if info.distributed:
            dist.cleanup()


def _run(spec, args, info, command):
    # fp16: GradScaler skips the optimizer step after inf/nan gradients, which torch then misreads
    # as "scheduler.step() before optimizer.step()"; our scheduler is stepped per epoch on purpose
    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
    with input_checks():
        per_rank = dist.per_rank_batch(args.batch_size, info.world_size)
    if args.lr is None:
        args.lr = spec.default_lr(args)
    resume = resume_path(args)
    ckpt = load_resume_checkpoint(resume, args) if resume else None
    if ckpt is not None and ckpt["epoch"] >= args.epochs:
        return report_finished(args, info, ckpt)
    os.makedirs(args.output_dir, exist_ok=True)
    log = setup_logging(LOGGER_NAME, args.output_dir, info.rank, rank_files=False).info  # rank 0 only
    tb = None
    try:
        if info.is_main:
            remove_orphan_temp_files(args.output_dir, log)
        train_set, val_set = spec.load_data(args, info, log)
        training = build_training(spec, args, info, train_set, ckpt, log)
        start_epoch, global_step = resume_training(args, info, training, resume, ckpt, log)
        del ckpt  # its tensors are in the models now
        if info.is_main:  # written only now that every input has been checked
            write_text_atomic(os.path.join(args.output_dir, "config.yaml"),
                              yaml.safe_dump(resolved_config(args), sort_keys=False))
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(args.output_dir, "tb"), purge_step=global_step or None)
        log(f"command: {command}")
        log(f"method {args.method}: student {args.arch}"
            + (f", teacher {args.teacher_arch} ({args.teacher_weights})"
               if get_method(args.method).needs_teacher else "")
            + f"; {info.world_size} process(es) on {info.device}, batch {args.batch_size} ({per_rank}/process), "
              f"lr {args.lr:g}, amp {args.amp}")
        return train_epochs(args, info, training, train_set, val_set, start_epoch, global_step, tb, log)
    finally:
        if tb is not None:
            tb.close()
        close_logging(LOGGER_NAME)


@dataclass
class Training:
    """What a run trains and steps: the Method (student + extras), the module the loop calls (the Method,
    DDP-wrapped when distributed), the optimizer, the per-epoch LR scheduler and the GradScaler."""
    method: torch.nn.Module
    model: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: object = None
    scaler: object = None


def in_init_stage(method):
    """True while a two-stage method (ab, ft) is in its initialisation stage; never for the others."""
    return bool(getattr(method, "in_init_stage", False))


def build_stage_optimizer(args, info, training):
    """SGD over the current stage's trainable parameters and its schedule, then the DDP wrapper (after
    the stage's requires_grad flags are set, so DDP sees exactly the trained parameters). Initialisation
    stage: method.init_stage_lr(--lr), constant; main stage: --lr with --schedule / --cos."""
    method = training.method
    params = [p for p in method.parameters() if p.requires_grad]
    if in_init_stage(method):
        lr = method.init_stage_lr(args.lr)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.wd)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
        scheduler = engine.build_scheduler(optimizer, args.epochs, args.schedule, args.cos)
    training.optimizer, training.scheduler = optimizer, scheduler
    training.model = dist.wrap_ddp(method, info.device)


def build_training(spec, args, info, train_set, ckpt, log):
    """The Training of this run; `ckpt` (None: fresh start) gives the method's state, loaded before the
    optimizer is built for the stage it is in. The models are identical on every rank (same seed); the
    per-rank RNG streams start afterwards."""
    num_classes = len(train_set.classes)
    seed_all(args.seed)
    student = build_model(args.arch, num_classes)
    teacher = build_teacher(args, num_classes, log) if get_method(args.method).needs_teacher else None
    labels = torch.tensor(train_set.targets, dtype=torch.long)
    with input_checks():  # hyper-parameter values, and what they need of the data and networks
        method = build_method(args.method, args, student, teacher, len(train_set), labels,
                              gather=dist.gather if info.distributed else None, image_size=spec.image_size(args),
                              drives_init_stage=True)
    train_set.num_views = method.num_views
    method.to(info.device)
    if args.channels_last:
        method.to(memory_format=torch.channels_last)
    if ckpt is not None:
        with input_checks():  # e.g. another --init-epochs than the checkpoint's
            method.load_state_dict(ckpt["method_state"], strict=True)
    training = Training(method, method)
    build_stage_optimizer(args, info, training)
    training.scaler = engine.build_scaler(info.device, args.amp)
    seed_all(args.seed + info.rank)
    return training


def load_resume_checkpoint(path, args):
    """The checkpoint to resume from, checked to belong to this run's student and method."""
    ckpt = load_checkpoint(path)
    for key in ("arch", "method"):
        if ckpt.get(key) != getattr(args, key):
            raise UserError(f"--resume {path} was trained with {key}={ckpt.get(key)!r}, "
                            f"but this run has --{key} {getattr(args, key)}")
    return ckpt


def report_finished(args, info, ckpt):
    """A resumed run that has nothing left to train: say so and add no line anywhere (metrics.jsonl is
    only reconciled with the checkpoint, as on every resume); its last metrics."""
    if info.is_main:
        reconcile_metrics(os.path.join(args.output_dir, METRICS_FILE), ckpt, print)
        print(f"already finished: {ckpt['epoch']} epochs (--epochs {args.epochs}) in {args.output_dir}; "
              f"nothing to do (raise --epochs to train longer)")
    return dict(ckpt.get("metrics") or {})


def resume_training(args, info, training, resume, ckpt, log):
    """Load the optimizer, scheduler, scaler and RNG states of `ckpt` (read from `resume`; None = fresh
    start; the method state is already in, see build_training); returns (start_epoch, global_step),
    (0, 0) for a fresh start."""
    if ckpt is None:
        if args.resume == "auto":
            log(f"--resume auto: no last_checkpoint in {args.output_dir}, starting from scratch")
        return 0, 0
    training.optimizer.load_state_dict(ckpt["optimizer"])
    training.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        training.scaler.load_state_dict(ckpt["scaler"])
    start_epoch, global_step = ckpt["epoch"], ckpt["step"]
    rngs = ckpt["rng"]
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    else:
        log(f"warning: {resume} holds RNG states of {len(rngs)} processes, this run has "
            f"{info.world_size}; RNGs are reseeded, so the run will not replay exactly")
        seed_all(args.seed + 1000 * start_epoch + info.rank)
    log(f"resumed from {resume} at {describe_position(ckpt)} (step {global_step})")
    if info.is_main:
        reconcile_metrics(os.path.join(args.output_dir, METRICS_FILE), ckpt, log)
    return start_epoch, global_step


def train_epochs(args, info, training, train_set, val_set, start_epoch, global_step, tb, log):
    """The initialisation epochs still to run (two-stage methods), then main epochs start_epoch ..
    args.epochs - 1, each followed by its outputs; returns the last metrics."""
    per_rank = dist.per_rank_batch(args.batch_size, info.world_size)
    val_loader = (build_val_loader(val_set, per_rank, args.workers, info.rank, info.world_size,
                                   info.device.type == "cuda") if val_set is not None else None)
    last = {}
    method = training.method
    while in_init_stage(method):
        k = method.init_epochs_done + 1
        metrics, global_step = run_epoch(args, info, training, train_set, val_loader, INIT_DATA_EPOCH + k - 1,
                                         (f"Init epoch: [{k}/{method.init_epochs}]", f"initialisation epoch {k}"),
                                         global_step, tb, log)
        if method.finish_init_epoch():  # the main stage starts: fresh optimizer and schedule, DDP anew
            build_stage_optimizer(args, info, training)
            log(f"initialisation stage done after {k} epoch(s); main stage: SGD lr {args.lr:g}")
        last = finish_epoch(args, info, training, dict({"epoch": 0, "init_epoch": k}, **metrics), tb, log)
    for epoch in range(start_epoch, args.epochs):
        metrics, global_step = run_epoch(args, info, training, train_set, val_loader, epoch, (None, None),
                                         global_step, tb, log)
        last = finish_epoch(args, info, training, dict({"epoch": epoch + 1}, **metrics), tb, log)
    return last


def run_epoch(args, info, training, train_set, val_loader, data_epoch, names, global_step, tb, log):
    """Train one epoch (shuffle / augmentation of `data_epoch`; `names` = (progress header, position in
    errors), None: engine's main-epoch names), step the schedule, average BN buffers over ranks and
    validate; returns (metrics without the epoch keys, global_step)."""
    epoch_start = time.perf_counter()
    per_rank = dist.per_rank_batch(args.batch_size, info.world_size)
    loader = build_train_loader(train_set, per_rank, args.workers, info.rank, info.world_size,
                                args.seed, data_epoch, info.device.type == "cuda")
    lr = training.optimizer.param_groups[0]["lr"]
    averages, steps, seconds, global_step = engine.train_one_epoch(
        training.model, training.optimizer, training.scaler, loader, data_epoch, args, info.device, log, tb,
        global_step, args.batch_size, header=names[0], position=names[1])
    training.scheduler.step()
    dist.average_batchnorm_buffers(training.method)  # one set of BN statistics for val and checkpoint
    metrics = {"step": global_step, "lr": lr}
    metrics.update({f"train/{k}": v for k, v in averages.items()})
    if val_loader is not None:
        acc = engine.validate(training.method.student, val_loader, info.device, args.amp, args.channels_last)
        metrics.update({"val/top1": acc["top1"], "val/top5": acc["top5"]})
    metrics["images_per_sec"] = steps * args.batch_size / max(seconds, 1e-9)
    metrics["time"] = time.perf_counter() - epoch_start
    return metrics, global_step


def finish_epoch(args, info, training, metrics, tb, log):
    """Checkpoint and record an epoch (rank 0 writes), log it, and wait for every rank; returns metrics."""
    rngs = dist.all_gather_object(rng_state())  # every rank's RNG, for exact resume
    if info.is_main:
        save_epoch(args, info, training, metrics, rngs, tb)
    log(describe_position(metrics) + ": "
        + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                   if k not in ("epoch", "init_epoch")))
    dist.barrier()
    return metrics


def save_epoch(args, info, training, metrics, rngs, tb):
    """Rank 0's outputs after an epoch: student_backbone.pth, the checkpoint (then last_checkpoint),
    pruning, the metrics.jsonl line and TensorBoard scalars (initialisation epochs under init/)."""
    method = training.method
    ckpt = {
        "arch": args.arch, "method": args.method, "epoch": metrics["epoch"], "step": metrics["step"],
        "config": dict(resolved_config(args), world_size=info.world_size),
        "student": method.student.state_dict(),
        "slow_student": method.slow_student_state_dict(),
        "method_state": method.state_dict(),
        "optimizer": training.optimizer.state_dict(), "scheduler": training.scheduler.state_dict(),
        "scaler": training.scaler.state_dict() if training.scaler.is_enabled() else None,
        "rng": rngs,
        "metrics": dict(metrics),  # restores metrics.jsonl's line if a kill comes before the append
    }
    if "init_epoch" in metrics:
        ckpt["init_epoch"] = metrics["init_epoch"]
    save_atomic(method.student.state_dict(), os.path.join(args.output_dir, "student_backbone.pth"))
    save_checkpoint(ckpt, args.output_dir, checkpoint_name(metrics))
    prune_checkpoints(args.output_dir, args.keep_checkpoints)
    append_jsonl(os.path.join(args.output_dir, METRICS_FILE), metrics)
    init = "init_epoch" in metrics
    for k, v in metrics.items():
        if k not in ("epoch", "step", "init_epoch"):
            tb.add_scalar(f"init/{k}" if init else k, v, metrics["init_epoch"] if init else metrics["epoch"])
    tb.flush()
