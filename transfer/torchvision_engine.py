"""The torchvision engine: detectron2's DefaultTrainer protocol around transfer/modeling.py.

Per iteration `it` (0-based): lr = BASE_LR * warmup(it) * GAMMA^(#STEPS <= it) (detectron2's
WarmupMultiStepLR), forward -> weighted losses -> a non-finite total raises naming `it` and every
term -> SGD step (momentum, weight decay none on norms, optional clipping, AMP on CUDA).
Hooks after a step: metrics (every 20 iterations: metrics.json line, log.txt, TensorBoard), PreciseBN
(before an eval), `model_final.pth` at the end, eval (every TEST.EVAL_PERIOD and at the end), then the
periodic checkpoint `model_{it:07d}.pth` when (it+1) % CHECKPOINT_PERIOD == 0 (last, so that it carries
every metrics line written up to it; checkpoints are written atomically with `last_checkpoint` via
cocord_common/checkpoint.py). On resume metrics.json is reconciled with the checkpoint
(cocord_common.metrics.reconcile_transfer_metrics).

Exact resume: a checkpoint holds model, optimizer (with each group's base lr), AMP scaler, the seed and
every RNG state (cocord_common.rng: torch, CUDA, numpy, Python); the data stream is a pure function of
(seed, iteration) (transfer/data.py) and the loaders use private generators, so a resumed run replays
the uninterrupted run's iterations.
"""
import bisect
import json
import logging
import math
import os
import sys
import time
from collections import OrderedDict, defaultdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cocord_common import log as common_log
from cocord_common.checkpoint import (last_checkpoint, load_checkpoint, remove_orphan_temp_files, save_checkpoint,
                                      write_text_atomic)
from cocord_common.errors import UserError
from cocord_common.dist import gather_object, get_rank, get_world_size
from cocord_common.metrics import (append_jsonl, reconcile_transfer_metrics, transfer_lines_for_checkpoint,
                                   TRANSFER_METRICS_FILE as METRICS_FILE)
from cocord_common.rng import rng_state, seed_all, set_rng_state
from transfer import data as tdata
from transfer.d2_format import load_d2_file
from transfer.masks import encode_rles, require_mask_datasets, require_polygons
from transfer.modeling import build_model

logger = logging.getLogger("transfer")
WRITE_PERIOD = 20  # detectron2's default writer period
LOG_FORMAT = "[%(asctime)s %(name)s]: %(message)s"


# ----------------------------------------------------------------------------------------------
# process helpers


def setup_logging(output_dir):
    """`transfer` logger -> stdout (rank 0) and OUTPUT_DIR/log.txt (log.txt.rank{r} for others)."""
    log = common_log.setup_logging("transfer", output_dir, get_rank(), fmt=LOG_FORMAT)
    for name in ("transfer.data", "transfer.backbone", "transfer.evaluation", "transfer.d2_format"):
        logging.getLogger(name).setLevel(logging.INFO)
    return log


def resolve_device(cfg):
    dev = cfg.MODEL.DEVICE
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"config MODEL.DEVICE is '{dev}' but CUDA is not available; pass MODEL.DEVICE cpu")
        if get_world_size() > 1:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device(dev)


# ----------------------------------------------------------------------------------------------
# datasets


def prepare_datasets(cfg):
    """Metadata of every train/test dataset; any missing file raises here, before the model is built.
    Checks that all datasets share classes and that ROI_HEADS.NUM_CLASSES matches them."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not names:
        raise ValueError("config DATASETS.TRAIN and DATASETS.TEST are both empty")
    metas = OrderedDict((n, tdata.check_dataset_files(n, cfg)) for n in names)
    for n in cfg.DATASETS.TEST:  # read only after training: a bad file must be found before it
        tdata.check_images(n, cfg)
    ref_name = names[0]
    ref = metas[ref_name]["thing_classes"]
    for n, m in metas.items():
        if m["thing_classes"] != ref:
            raise ValueError(f"datasets '{ref_name}' and '{n}' have different classes: {ref} vs {m['thing_classes']}")
    require_mask_datasets(cfg, metas)
    if cfg.MODEL.MASK_ON:  # an object without polygons would otherwise fail in a loader worker
        for n in cfg.DATASETS.TRAIN:
            require_polygons(tdata.get_dataset_dicts(n, cfg), metas[n]["json_file"])
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if k != len(ref):
        raise ValueError(f"config MODEL.ROI_HEADS.NUM_CLASSES = {k}, but dataset '{ref_name}' has {len(ref)} "
                         f"classes {ref}; set MODEL.ROI_HEADS.NUM_CLASSES {len(ref)}")
    return metas


def load_train_dicts(cfg):
    dicts = []
    for n in cfg.DATASETS.TRAIN:
        dicts += tdata.get_dataset_dicts(n, cfg)
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        dicts = tdata.filter_empty(dicts)
    if not dicts:
        raise ValueError(f"no training images with annotations in DATASETS.TRAIN {list(cfg.DATASETS.TRAIN)}")
    return dicts


# ----------------------------------------------------------------------------------------------
# optimisation


NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def build_optimizer(cfg, model):
    """SGD with detectron2's get_default_optimizer_params: WEIGHT_DECAY_NORM on norm layers,
    BIAS_LR_FACTOR / WEIGHT_DECAY_BIAS on biases."""
    s = cfg.SOLVER
    groups, seen = [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or p in seen:
                continue
            seen.add(p)
            lr, wd = s.BASE_LR, s.WEIGHT_DECAY
            if isinstance(module, NORM_TYPES):
                wd = s.WEIGHT_DECAY_NORM
            elif name == "bias":
                lr = s.BASE_LR * s.BIAS_LR_FACTOR
                if s.WEIGHT_DECAY_BIAS is not None:
                    wd = s.WEIGHT_DECAY_BIAS
            groups.append({"params": [p], "lr": lr, "weight_decay": wd, "base_lr": lr})
    return torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)


def lr_factor(cfg, it):
    """detectron2's WarmupMultiStepLR multiplier at iteration `it`."""
    s = cfg.SOLVER
    f = s.GAMMA ** bisect.bisect_right(list(s.STEPS), it)
    if it < s.WARMUP_ITERS:
        if s.WARMUP_METHOD == "constant":
            f *= s.WARMUP_FACTOR
        else:
            alpha = it / s.WARMUP_ITERS
            f *= s.WARMUP_FACTOR * (1 - alpha) + alpha
    return f


def _clip(cfg, params):
    c = cfg.SOLVER.CLIP_GRADIENTS
    if not c.ENABLED:
        return
    if c.CLIP_TYPE == "value":
        torch.nn.utils.clip_grad_value_(params, c.CLIP_VALUE)
    else:
        torch.nn.utils.clip_grad_norm_(params, c.CLIP_VALUE, c.NORM_TYPE)


def amp_dtype(cfg, device):
    """None when AMP is off; bf16 where the GPU supports it, else fp16 (with a GradScaler)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    if device.type != "cuda":
        raise ValueError(f"config SOLVER.AMP.ENABLED is True but MODEL.DEVICE is '{device}'; AMP needs CUDA "
                         f"(set SOLVER.AMP.ENABLED False on CPU)")
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------------------------
# inference


@torch.no_grad()
def inference(model, loader, device):
    """{image_id: {boxes, scores, classes} numpy (+ masks: COCO RLEs with MASK_ON)} over this rank's shard,
    gathered on rank 0 (the only one that evaluates; the others keep their own shard)."""
    was_training = model.training
    model.eval()
    preds = OrderedDict()
    n, t0 = 0, time.perf_counter()
    for batch in loader:
        for x, out in zip(batch, model(batch)):
            masks = out.pop("masks", None)  # MASK_ON: full-image bool masks -> COCO RLEs right away (memory)
            preds[x["image_id"]] = {k: v.cpu().numpy() for k, v in out.items()}
            if masks is not None:
                preds[x["image_id"]]["masks"] = encode_rles(masks)
            n += 1
    model.train(was_training)
    if get_world_size() > 1:
        parts = gather_object(preds)
        if parts is not None:
            preds = OrderedDict()
            for p in parts:
                preds.update(p)
    elapsed = time.perf_counter() - t0
    return preds, elapsed / max(n, 1)


def evaluate_all(cfg, model, metas, device):
    """Run every DATASETS.TEST; detectron2's result layout: {"bbox/AP": ..} (and "segm/AP" .. with
    MODEL.MASK_ON) for one dataset, else {"<name>/bbox/AP": ..}."""
    from transfer.evaluation import eval_tasks, evaluate
    flat = OrderedDict()
    for name in cfg.DATASETS.TEST:
        dicts = tdata.get_dataset_dicts(name, cfg)
        loader = tdata.build_test_loader(cfg, dicts, get_rank(), get_world_size())
        inner = model.module if hasattr(model, "module") else model
        preds, sec = inference(inner, loader, device)
        logger.info(f"inference on {name}: {len(preds)} images, {sec:.4f} s / image")
        prefix = "" if len(cfg.DATASETS.TEST) == 1 else f"{name}/"
        for task in eval_tasks(cfg.MODEL.MASK_ON):
            res = evaluate(metas[name], preds, task) if get_rank() == 0 else {}
            if get_rank() == 0:
                what = f"{name} ({task})" if cfg.MODEL.MASK_ON else name
                logger.info(f"evaluation of {what}: " + json.dumps(dict(res), default=float))
            for k, v in res.items():
                if isinstance(v, (int, float)):
                    flat[f"{prefix}{task}/{k}"] = float(v)
                elif k == "excluded_classes":  # names, not a number: metrics.json only, never TensorBoard
                    flat[f"{prefix}{task}/{k}"] = list(v)
    if get_world_size() > 1:
        box = [flat]
        dist.broadcast_object_list(box, src=0)
        flat = box[0]
    return flat


def verify_results(cfg, results):
    """TEST.EXPECTED_RESULTS: [[task, metric, value, tolerance], ...], as detectron2's verify_results."""
    bad = []
    for task, metric, expected, tol in cfg.TEST.EXPECTED_RESULTS:
        got = results.get(f"{task}/{metric}")
        if got is None or not math.isfinite(got) or abs(got - expected) > tol:
            bad.append(f"{task}/{metric}: expected {expected} ± {tol}, got {got}")
    if bad:
        raise AssertionError("TEST.EXPECTED_RESULTS not met: " + "; ".join(bad))


# ----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, cfg, resume=False):
        self.cfg = cfg
        self.out = cfg.OUTPUT_DIR
        self.device = resolve_device(cfg)
        torch.backends.cudnn.benchmark = bool(cfg.CUDNN_BENCHMARK)
        self.metas = prepare_datasets(cfg)  # missing files raise before anything is built
        self.resume_path = last_checkpoint(self.out) if resume else None
        self.seed = cfg.SEED if cfg.SEED >= 0 else int.from_bytes(os.urandom(3), "little")
        ckpt = load_checkpoint(self.resume_path) if self.resume_path else None
        if ckpt is not None:
            self.seed = int(ckpt["seed"])
        seed_all(self.seed + get_rank())

        if ckpt is None:
            self.model, _ = build_detector(cfg, cfg.MODEL.WEIGHTS)
        else:  # the checkpoint's weights replace these below
            self.model = build_model(cfg, None, logger)
        self.model.to(self.device)
        if get_world_size() > 1 and cfg.MODEL.RESNETS.NORM == "SyncBN" and self.device.type != "cuda":
            raise ValueError("MODEL.RESNETS.NORM SyncBN across processes needs CUDA; use BN on CPU")
        self.optimizer = build_optimizer(cfg, self.model)
        self.amp = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.start_iter = 0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.start_iter = int(ckpt["iteration"]) + 1
            restore_rng(ckpt["rng"])
            logger.info(f"resumed from {self.resume_path} at iteration {self.start_iter}")
            if get_rank() == 0:  # metrics.json as of the checkpoint: lines after it dropped, lost ones restored
                reconcile_transfer_metrics(self.out, ckpt.get("metrics_lines"), self.start_iter - 1, logger.info)
        self.ddp = self.model
        if get_world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.tb = None
        self.history = defaultdict(list)

    # -- io
    def _write_metrics(self, record):
        if get_rank() != 0:
            return
        append_jsonl(os.path.join(self.out, METRICS_FILE), record)
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(self.out)
        for k, v in record.items():
            if k != "iteration" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, record["iteration"])
        self.tb.flush()

    def save(self, name, it):
        if get_rank() != 0:
            return
        obj = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scaler": self.scaler.state_dict(), "iteration": it, "seed": self.seed, "rng": rng_state(),
               "metrics_lines": transfer_lines_for_checkpoint(self.out, it)}  # a resume restores lost lines
        save_checkpoint(obj, self.out, name)
        logger.info(f"saved {os.path.join(self.out, name)}")

    # -- hooks
    def precise_bn(self, it):
        p = self.cfg.TEST.PRECISE_BN
        if not p.ENABLED:
            return
        from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats
        if not get_bn_modules(self.model):
            return
        # its own deterministic stream, so it neither shifts the training stream nor depends on workers
        loader = tdata.build_train_loader(self.cfg, self.train_dicts, self.seed + 7919 * (it + 1), 0, p.NUM_ITER,
                                          get_rank(), get_world_size(), num_workers=0)
        logger.info(f"PreciseBN: recomputing BN statistics over {p.NUM_ITER} batches")
        update_bn_stats(self.ddp, iter(loader), p.NUM_ITER)

    def test(self, it):
        t0 = time.perf_counter()
        res = evaluate_all(self.cfg, self.ddp, self.metas, self.device)
        if res:
            self._write_metrics({"iteration": it, **res})
        logger.info(f"evaluation at iteration {it} took {time.perf_counter() - t0:.1f}s: {dict(res)}")
        return res

    # -- loop
    def train(self):
        cfg, s = self.cfg, self.cfg.SOLVER
        self.train_dicts = load_train_dicts(cfg)
        max_iter = s.MAX_ITER
        if self.start_iter >= max_iter:
            logger.info(f"nothing to train: checkpoint iteration {self.start_iter - 1} >= MAX_ITER {max_iter}")
            return self.test(max_iter - 1)
        loader = tdata.build_train_loader(cfg, self.train_dicts, self.seed, self.start_iter, max_iter,
                                          get_rank(), get_world_size())
        logger.info(f"training iterations {self.start_iter}..{max_iter - 1}, {len(self.train_dicts)} images, "
                    f"{s.IMS_PER_BATCH} per batch over {get_world_size()} process(es)")
        self.ddp.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        results, window = {}, defaultdict(list)
        t_data = time.perf_counter()
        t_start = t_data
        for it, batch in zip(range(self.start_iter, max_iter), loader):
            data_time = time.perf_counter() - t_data
            f = lr_factor(cfg, it)
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * f
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                losses = self.ddp(batch)
            total = sum(losses.values())
            if not torch.isfinite(total):
                terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                raise FloatingPointError(f"non-finite loss at iteration {it}: total={float(total.detach())}; {terms}. "
                                         f"Lower SOLVER.BASE_LR or check the data")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
                self.scaler.unscale_(self.optimizer)
                _clip(cfg, params)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            step_time = time.perf_counter() - t_data
            window["total_loss"].append(float(total.detach()))
            for k, v in losses.items():
                window[k].append(float(v.detach()))
            window["time"].append(step_time)
            window["data_time"].append(data_time)

            nxt = it + 1
            last = nxt == max_iter
            do_eval = last or (cfg.TEST.EVAL_PERIOD > 0 and nxt % cfg.TEST.EVAL_PERIOD == 0)
            if nxt % WRITE_PERIOD == 0 or last:
                rec = {"iteration": it, "lr": self.optimizer.param_groups[0]["lr"]}
                rec.update({k: float(np.median(v[-WRITE_PERIOD:])) for k, v in window.items()})
                self._write_metrics(rec)
                eta = (max_iter - nxt) * rec["time"]
                logger.info(f"iter: {it}  total_loss: {rec['total_loss']:.4f}  "
                            + "  ".join(f"{k}: {rec[k]:.4f}" for k in losses)
                            + f"  time: {rec['time']:.3f}  data_time: {rec['data_time']:.3f}  lr: {rec['lr']:.6g}"
                            + f"  eta: {eta:.0f}s")
                window = defaultdict(lambda: [], {k: v[-WRITE_PERIOD:] for k, v in window.items()})
            if do_eval:
                self.precise_bn(it)
            if last:  # before the final eval, which a resume of a finished run evaluates again
                self.save("model_final.pth", it)
            if do_eval:
                results = self.test(it)
                self.ddp.train()
            if not last and nxt % s.CHECKPOINT_PERIOD == 0:  # after the eval, so it carries the eval line
                self.save(f"model_{it:07d}.pth", it)
            t_data = time.perf_counter()
        logger.info(f"training took {time.perf_counter() - t_start:.1f}s")
        if self.tb is not None:
            self.tb.close()
        if results and get_rank() == 0:
            verify_results(cfg, results)
        return results


def restore_rng(state):
    """Restore a checkpoint's "rng" entry: cocord_common.rng's states, or the torch (+ CUDA) states
    that checkpoints written before it hold."""
    if "numpy" in state:
        set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------
# weights


def load_weights(path):
    """(backbone, checkpoint) of a weights file: a detectron2-format dict for a backbone `.pkl`
    (tools/convert_to_d2.py), or the dict of a `.pth` this engine wrote (holding 'model');
    (None, None) for '' (random initialisation)."""
    if not path:
        return None, None
    if not path.endswith((".pkl", ".pth")):
        raise UserError(f"config MODEL.WEIGHTS = {path!r}: expected a detectron2 '.pkl' backbone "
                        f"(tools/convert_to_d2.py) or a '.pth' written by this engine, or '' for random init")
    if not os.path.isfile(path):
        raise UserError(f"config MODEL.WEIGHTS = {path!r} " + ("is a folder; give the weights file inside it"
                        if os.path.isdir(path) else "does not exist; give a .pkl written by tools/convert_to_d2.py, "
                        "a model_*.pth of this engine, or \"\" for random init"))
    if path.endswith(".pkl"):
        return load_d2_file(path), None
    state = load_checkpoint(path)
    if not isinstance(state, dict) or "model" not in state:
        keys = list(state)[:3] if isinstance(state, dict) else []
        raise UserError(f"config MODEL.WEIGHTS = {path!r} is not a checkpoint of this engine (no 'model' entry"
                        + (f"; keys {keys}" if keys else "") + "). A backbone (e.g. a torchvision or distillation "
                        ".pth) must be converted first: tools/convert_to_d2.py INPUT OUTPUT.pkl, then set "
                        "MODEL.WEIGHTS to the .pkl")
    return None, state


def build_detector(cfg, path, eval_only=False):
    """(detector of `cfg` initialised from the weights file `path`, the file's checkpoint dict or
    None). Training logs what it starts from; --eval-only warns about random heads."""
    backbone, state = load_weights(path)
    if backbone is not None:
        if eval_only:
            logger.warning(f"--eval-only with backbone-only weights {path}: the detector heads are random")
        else:
            logger.info(f"initialising the ResNet from {path}")
    elif state is None:
        logger.info("MODEL.WEIGHTS is empty: training from random initialisation")
    try:
        model = build_model(cfg, backbone, logger)
    except ValueError as e:  # weights that leave backbone tensors unfilled, or of the wrong shape
        if backbone is None:
            raise
        raise UserError(f"config MODEL.WEIGHTS = {path!r}: {e}. Training would start those tensors from random "
                        "init; convert weights that match the config (MODEL.RESNETS.DEPTH) with "
                        "tools/convert_to_d2.py, or set MODEL.WEIGHTS \"\" to train from scratch on purpose") from e
    if state is not None:
        model.load_state_dict(state["model"])
        if not eval_only:
            logger.info(f"loaded the full detector from {path}")
    return model, state


# ----------------------------------------------------------------------------------------------
# entry points used by train_net.py


def write_config(cfg):
    if get_rank() == 0:
        write_text_atomic(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())


def run(cfg, args):
    """Train (or evaluate with --eval-only) per `cfg` in this process; returns the final metrics."""
    setup_logging(cfg.OUTPUT_DIR)
    logger.info(f"engine: torchvision; process {get_rank()}/{get_world_size()}; command line: {' '.join(sys.argv)}")
    if get_rank() == 0:  # what a run killed mid-write left
        remove_orphan_temp_files(cfg.OUTPUT_DIR, logger.info)
    if args.eval_only:
        return eval_only(cfg, args.resume)
    trainer = Trainer(cfg, resume=args.resume)
    write_config(cfg)  # only now: data and weights are loaded, so this folder's config describes its model
    return trainer.train()


def eval_only(cfg, resume):
    device = resolve_device(cfg)
    metas = prepare_datasets(cfg)
    path = last_checkpoint(cfg.OUTPUT_DIR) if resume else None
    path = path or cfg.MODEL.WEIGHTS
    if not path:
        raise ValueError("--eval-only needs MODEL.WEIGHTS (a model_*.pth of this engine) or --resume with a "
                         f"checkpoint in {cfg.OUTPUT_DIR}")
    model, state = build_detector(cfg, path, eval_only=True)
    write_config(cfg)
    logger.info(f"evaluating {path}")
    model.to(device)
    res = evaluate_all(cfg, model, metas, device)
    if res and get_rank() == 0:
        iteration = int(state.get("iteration", -1)) if state is not None else -1
        append_jsonl(os.path.join(cfg.OUTPUT_DIR, METRICS_FILE), {"iteration": iteration, **res})
        verify_results(cfg, res)
    return res
