"""The detectron2 engine: a thin detectron2 project, as MoCo's detection/train_net.py.

Imported only when the detectron2 engine is chosen (importing it without detectron2 raises
ImportError, which `transfer/train_net.py` turns into its engine choice).

What it adds to detectron2 0.6:
  * one config format: the same YAML files as the torchvision engine, merged into detectron2's
    `get_cfg()` extended with our `DATASETS.REGISTER` node (every detectron2 key is accepted, unknown
    keys are rejected); trailing KEY VALUE opts as in transfer.config;
  * datasets: every name in DATASETS.TRAIN/TEST is (re-)registered into `DatasetCatalog` /
    `MetadataCatalog` from `transfer.data` (builtin names under $DETECTRON2_DATASETS and
    DATASETS.REGISTER ones), so both engines read the same dicts; missing files are reported before
    the model is built;
  * `Res5ROIHeadsExtraNorm` (MoCo): `Res5ROIHeads` with one extra norm layer (MODEL.RESNETS.NORM)
    appended to res5, registered in ROI_HEADS_REGISTRY;
  * evaluation per dataset by `transfer.evaluation` (dispatching on the metadata's evaluator_type),
    the very code the torchvision engine uses. It reproduces detectron2's PascalVOCDetectionEvaluator
    and COCOEvaluator(use_fast_impl=False) number for number (tests/test_evaluation.py) while also
    accepting VOC XML without <pose>/<truncated> (detectron2's parser crashes on those), any VOC
    year, and needing no compiled op;
  * checkpoints written atomically (temp file + rename, then `last_checkpoint`); `.pkl` weights read
    with the restricted unpickler of `transfer.d2_format`; a fresh run whose MODEL.WEIGHTS leaves any
    backbone tensor unfilled is an error (MODEL.WEIGHTS "" is the only way to train from scratch);
  * `--eval-only` appends its eval line to metrics.json, like a training run's final eval;
  * config.yaml in OUTPUT_DIR is detectron2's full resolved config (reloadable by this engine).

Outputs are detectron2's: log.txt, metrics.json (JSON lines; the eval line has bbox/AP, bbox/AP50,
bbox/AP75 and iteration), TensorBoard events, model_XXXXXXX.pth, model_final.pth, last_checkpoint.
"""
import functools
import json
import logging
import os
import re

import torch
import yaml

import detectron2  # noqa: F401  (ImportError here means: no detectron2 engine)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode as D2CfgNode
from detectron2.config import get_cfg as d2_get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultTrainer, launch
from detectron2.evaluation import DatasetEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from cocord_common.checkpoint import save_atomic, write_text_atomic
from transfer import config as tconfig
from transfer import data as tdata
from transfer.d2_format import load_d2_file
from transfer.evaluation import evaluate

logger = logging.getLogger("transfer.d2_engine")


# ----------------------------------------------------------------------------------------------------
# model: MoCo's C4 head
# ----------------------------------------------------------------------------------------------------
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads whose res5 ends with one more norm layer (MoCo: "an extra BN layer following
    the res5 stage"), of type MODEL.RESNETS.NORM, over res5's output channels."""

    def __init__(self, cfg, input_shape):
        super().__init__(cfg, input_shape)
        self.res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, self.res5[-1].out_channels))


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


# ----------------------------------------------------------------------------------------------------
# config and datasets
# ----------------------------------------------------------------------------------------------------
def load_d2_config(cfg_path, opts=()):
    """detectron2's get_cfg() + our DATASETS.REGISTER node <- the YAML (detectron2's `_BASE_` merge;
    any detectron2 key allowed, unknown keys rejected) <- trailing KEY VALUE opts (transfer.config's
    merge, which may create DATASETS.REGISTER.<name>.<KEY> entries)."""
    cfg = d2_get_cfg()
    cfg.DATASETS.REGISTER = D2CfgNode(new_allowed=True)
    if cfg_path:
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"config file {cfg_path} does not exist")
        try:
            cfg.merge_from_file(cfg_path)
        except KeyError as e:
            raise KeyError(f"{cfg_path}: {e.args[0] if e.args else e}; the key is neither a detectron2 config "
                           "key nor our DATASETS.REGISTER (check its spelling)") from None
        except (ValueError, AssertionError, yaml.YAMLError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
    tconfig.merge_opts(cfg, list(opts))
    for name, entry in cfg.DATASETS.REGISTER.items():
        if not isinstance(entry, dict):
            raise ValueError(f"config DATASETS.REGISTER.{name} must be a mapping, got {entry!r}")
        bad = sorted(set(entry) - tconfig.REGISTER_KEYS)
        if bad:
            raise KeyError(f"config DATASETS.REGISTER.{name} has unknown key(s) {bad}; allowed: "
                           f"{sorted(tconfig.REGISTER_KEYS)}")
    return cfg


def check_runtime(cfg):
    """Settings that are valid config but cannot run on this machine."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config MODEL.DEVICE = {cfg.MODEL.DEVICE!r} but CUDA is not available; "
                           "add `MODEL.DEVICE cpu` to the command line")
    if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise RuntimeError("config SOLVER.AMP.ENABLED = True needs a CUDA device (detectron2's AMPTrainer); "
                           "add `SOLVER.AMP.ENABLED False` for CPU runs")
    if cfg.SOLVER.MAX_ITER in cfg.SOLVER.STEPS:
        raise ValueError(f"config SOLVER.STEPS {list(cfg.SOLVER.STEPS)} contains SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}; "
                         "detectron2's scheduler needs every step < MAX_ITER (a step at MAX_ITER has no effect)")
    if not cfg.DATASETS.TRAIN and not cfg.DATASETS.TEST:
        raise ValueError("config DATASETS.TRAIN and DATASETS.TEST are both empty; nothing to do")


def dataset_names(cfg):
    return list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))


def register_datasets(cfg):
    """(Re-)register every dataset the config uses from transfer.data; returns their metadata.
    Checks that their files exist first (FileNotFoundError naming the expected path)."""
    metas = {}
    for name in dataset_names(cfg):
        meta = dict(tdata.check_dataset_files(name, cfg))
        meta.pop("name", None)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(tdata.get_dataset_dicts, name, cfg))
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        MetadataCatalog.get(name).set(**meta)
        metas[name] = meta
    return metas


# ----------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------
_TRUNK_KEY = re.compile(r"^(backbone\.(bottom_up\.)?(stem|res[2-5])\.|roi_heads\.res5\.\d+\.)")


class Checkpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic writes, safe `.pkl` reading and a refusal to start from
    partially loaded backbone weights."""

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        save_atomic(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        write_text_atomic(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            return {"model": load_d2_file(filename), "__author__": "cocord-transfer", "matching_heuristics": True}
        return super()._load_file(filename)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if checkpoint.get("matching_heuristics", False):
            missing = [k for k in incompatible.missing_keys
                       if _TRUNK_KEY.match(k) and not k.endswith("num_batches_tracked")]
            if missing:
                raise ValueError(
                    f"MODEL.WEIGHTS did not provide {len(missing)} backbone tensor(s) of this model, e.g. "
                    f"{missing[:8]}; the weights do not fit the config (MODEL.RESNETS.DEPTH, C4 vs FPN). "
                    "Convert matching weights with tools/convert_to_d2.py, or set MODEL.WEIGHTS \"\" to "
                    "train from scratch on purpose")
        return incompatible


# ----------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------
class TransferEvaluator(DatasetEvaluator):
    """detectron2 DatasetEvaluator around transfer.evaluation (the code the torchvision engine uses):
    collects each image's detections, gathers them on rank 0 in rank order (= dataset order, as
    detectron2's InferenceSampler shards contiguously), then scores them per metadata
    evaluator_type. Returns {"bbox": {"AP", "AP50", "AP75", ...}} like detectron2's evaluators."""

    def __init__(self, dataset_name, distributed=True):
        self._name = dataset_name
        self._meta = MetadataCatalog.get(dataset_name).as_dict()
        self._distributed = distributed
        self.reset()

    def reset(self):
        self._predictions = {}

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self._predictions[inp["image_id"]] = {"boxes": inst.pred_boxes.tensor.numpy(),
                                                  "scores": inst.scores.numpy(),
                                                  "classes": inst.pred_classes.numpy()}

    def evaluate(self):
        predictions = self._predictions
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            parts = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = {}
            for part in parts:
                predictions.update(part)
        res = evaluate(self._meta, predictions)
        bbox = {k: float(v) for k, v in res.items() if not isinstance(v, dict)}
        for cls, ap in res.get("per_class_AP50", {}).items():
            bbox[f"AP50-{cls}"] = float(ap)
        return {"bbox": bbox}


class TrainStream:
    """detectron2-format training batches from transfer.data's deterministic stream: the batch of
    iteration i is a pure function of (seed, i), so a resumed run sees exactly the batches of an
    uninterrupted one (detectron2's own TrainingSampler restarts its stream on resume). Images are
    resized/flipped as detectron2's ResizeShortestEdge + RandomFlip would (same config keys).
    `seed` is a callable so the trainer can restore it from a checkpoint before iterating."""

    def __init__(self, cfg, seed, start_iter, num_iters):
        self.cfg, self.seed, self.start_iter, self.num_iters = cfg, seed, start_iter, num_iters
        self._dicts = None

    def _dataset_dicts(self):
        if self._dicts is None:
            dicts = []
            for name in self.cfg.DATASETS.TRAIN:
                dicts += DatasetCatalog.get(name)
            if self.cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
                dicts = tdata.filter_empty(dicts)
            if not dicts:
                raise ValueError(f"DATASETS.TRAIN {list(self.cfg.DATASETS.TRAIN)} holds no image with annotations")
            self._dicts = dicts
        return self._dicts

    def __iter__(self):
        loader = tdata.build_train_loader(self.cfg, self._dataset_dicts(), self.seed(), self.start_iter,
                                          self.num_iters, comm.get_rank(), comm.get_world_size())
        for batch in loader:
            yield [_to_d2_input(d) for d in batch]


def _to_d2_input(d):
    h, w = d["image"].shape[1:]
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(d["instances"]["boxes"])
    inst.gt_classes = d["instances"]["classes"]
    return {"image": d["image"], "height": d["height"], "width": d["width"], "image_id": d["image_id"],
            "file_name": d.get("file_name", ""), "instances": inst}


class Trainer(DefaultTrainer):
    """DefaultTrainer + our evaluator, checkpointer and deterministic training stream. The trainer state
    in checkpoints also holds the optimizer (momentum; detectron2 0.6 does not save it), the AMP
    scaler, the stream seed and the torch RNG states, so --resume continues exactly (single process;
    with several processes only rank 0's RNG state is saved). `train()` returns the last eval results."""

    def __init__(self, cfg):
        self.loader_seed = cfg.SEED if cfg.SEED >= 0 else int.from_bytes(os.urandom(3), "little")
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return TransferEvaluator(dataset_name)

    def build_train_loader(self, cfg):
        # an instance method here (DefaultTrainer calls it on self): the stream needs the trainer's seed
        if getattr(self, "_building_hooks", False):
            # PreciseBN's loader: its own stream, long enough for every evaluation's NUM_ITER batches
            n = cfg.TEST.PRECISE_BN.NUM_ITER * (cfg.SOLVER.MAX_ITER // max(cfg.TEST.EVAL_PERIOD, 1) + 1)
            return TrainStream(cfg, lambda: self.loader_seed + 7919, 0, n)
        return TrainStream(cfg, lambda: self.loader_seed, 0, cfg.SOLVER.MAX_ITER)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if self.start_iter:  # restart the stream at the resumed iteration
            self._trainer.data_loader = TrainStream(self.cfg, lambda: self.loader_seed, self.start_iter,
                                                    self.cfg.SOLVER.MAX_ITER)
            self._trainer._data_loader_iter = iter(self._trainer.data_loader)

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()  # optimizer (+ AMP scaler): detectron2 0.6 omits it
        ret["loader_seed"] = int(self.loader_seed)
        ret["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            ret["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        return ret

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "_trainer" in state:
            self._trainer.load_state_dict(state["_trainer"])
        if "loader_seed" in state:
            self.loader_seed = int(state["loader_seed"])
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def build_hooks(self):
        # swap in our checkpointer before the PeriodicCheckpointer hook captures it
        old = self.checkpointer
        self.checkpointer = Checkpointer(old.model, self.cfg.OUTPUT_DIR, **old.checkpointables)
        self._building_hooks = True
        try:
            return super().build_hooks()
        finally:
            self._building_hooks = False

    def train(self):
        super().train()
        return getattr(self, "_last_eval_results", None)


def flatten_results(results, iteration):
    """{"bbox": {"AP": ..}} (or {dataset: {"bbox": ..}}) -> {"bbox/AP": .., "iteration": it}."""
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}/", v)
            else:
                out[prefix + k] = float(v)
    walk("", results or {})
    out["iteration"] = int(iteration)
    return out


def _append_metrics_line(output_dir, line):
    with open(os.path.join(output_dir, "metrics.json"), "a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")


def _last_eval_line(output_dir):
    path = os.path.join(output_dir, "metrics.json")
    last = None
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if any(k.endswith("bbox/AP") for k in d):
                    last = d
    return last


def _reset_loggers():
    for name in ("detectron2", "fvcore", "transfer"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
            h.close()
    if hasattr(setup_logger, "cache_clear"):
        setup_logger.cache_clear()


def setup(cfg_path, opts, args):
    """Frozen detectron2 config, plus what detectron2's default_setup does (logger with log.txt,
    environment info, seed SEED + rank, config.yaml) and dataset registration."""
    cfg = load_d2_config(cfg_path, opts)
    check_runtime(cfg)
    cfg.freeze()
    out, rank = cfg.OUTPUT_DIR, comm.get_rank()
    if comm.is_main_process():
        os.makedirs(out, exist_ok=True)
    _reset_loggers()  # a second run in this process (--trials) must not duplicate every log line
    setup_logger(out, distributed_rank=rank, name="fvcore")
    setup_logger(out, distributed_rank=rank, name="transfer", abbrev_name="transfer")
    log = setup_logger(out, distributed_rank=rank)
    log.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    try:
        log.info("Environment info:\n" + collect_env_info())
    except Exception as e:  # the CPU test build of detectron2 has no compiled ops to describe
        log.info(f"Environment info unavailable ({e}); torch {torch.__version__}")
    log.info(f"Command line arguments: {args}")
    log.info(f"Running with full config:\n{cfg.dump()}")
    if comm.is_main_process():
        write_text_atomic(os.path.join(out, "config.yaml"), cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    register_datasets(cfg)
    return cfg


def _main(cfg_path, opts, args):
    cfg = setup(cfg_path, opts, args)
    if getattr(args, "eval_only", False):
        model = Trainer.build_model(cfg)
        ckpt = Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=getattr(args, "resume", False))
        iteration = ckpt.get("iteration", -1) if isinstance(ckpt, dict) else -1
        res = Trainer.test(cfg, model)
        line = flatten_results(res, iteration + 1 if iteration >= 0 else -1)  # -1: weights without an iteration
        if comm.is_main_process():
            _append_metrics_line(cfg.OUTPUT_DIR, line)
        return line
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=getattr(args, "resume", False))
    res = trainer.train()
    return flatten_results(res, trainer.iter) if res else {"iteration": int(trainer.iter)}


def run(cfg_path, opts, args):
    """Train (or evaluate with args.eval_only) with detectron2; returns the final metrics as written to
    metrics.json: {"bbox/AP", "bbox/AP50", "bbox/AP75", ..., "iteration"}.

    `args` carries resume / eval_only and detectron2's launcher flags (num_gpus, num_machines,
    machine_rank, dist_url). When the caller already started the processes (transfer/train_net.py's
    launcher initialises torch.distributed), this runs in the current process; otherwise several GPUs
    are started with detectron2's `launch`. The config is loaded and the datasets checked first, so bad
    inputs are reported before any worker starts or any model is built."""
    cfg = load_d2_config(cfg_path, opts)
    check_runtime(cfg)
    for name in dataset_names(cfg):
        tdata.check_dataset_files(name, cfg)
    num_gpus = int(getattr(args, "num_gpus", 1) or 1)
    num_machines = int(getattr(args, "num_machines", 1) or 1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _ensure_local_group(num_gpus, num_machines, int(getattr(args, "machine_rank", 0)))
        return _main(cfg_path, opts, args)
    if num_gpus * num_machines == 1:
        return _main(cfg_path, opts, args)
    launch(_main, num_gpus, num_machines=num_machines, machine_rank=int(getattr(args, "machine_rank", 0)),
           dist_url=getattr(args, "dist_url", "auto"), args=(cfg_path, list(opts), args))
    # worker return values do not cross process boundaries: read the eval line back
    return _last_eval_line(cfg.OUTPUT_DIR) or {}


def _ensure_local_group(num_gpus, num_machines, machine_rank):
    """detectron2's comm needs the per-machine process group its own launcher creates."""
    if comm._LOCAL_PROCESS_GROUP is not None:
        return
    for i in range(num_machines):
        group = torch.distributed.new_group(list(range(i * num_gpus, (i + 1) * num_gpus)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
