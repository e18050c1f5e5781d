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
  * several processes are started by detectron2's own `launch` (GPUs, NCCL), which also creates the
    per-machine process group detectron2's DDP wrapper needs; torchrun and several CPU processes are
    refused with a message (use the torchvision engine for those).

Outputs are detectron2's: log.txt, metrics.json (JSON lines; the eval line has bbox/AP, bbox/AP50,
bbox/AP75 and iteration), TensorBoard events, model_XXXXXXX.pth, model_final.pth, last_checkpoint.
"""
import functools
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
from detectron2.engine import DefaultTrainer, hooks, launch
from detectron2.evaluation import DatasetEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from cocord_common.checkpoint import (last_checkpoint, load_checkpoint, remove_orphan_temp_files, save_atomic,
                                      write_text_atomic)
from cocord_common.errors import UserError
from cocord_common.log import close_logging
from cocord_common.metrics import (append_jsonl, final_eval_line, reconcile_transfer_metrics,
                                   transfer_lines_for_checkpoint, TRANSFER_METRICS_FILE as METRICS_FILE)
from cocord_common.rng import rng_state, set_rng_state
from transfer import config as tconfig
from transfer import data as tdata
from transfer.d2_format import load_d2_file
from transfer.evaluation import eval_tasks, evaluate
from transfer.masks import encode_rles, require_mask_datasets, require_polygons



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
    tconfig.merge_opts(cfg, list(opts))  # refuses bad DATASETS.REGISTER keys on the command line
    tconfig.check_register(cfg.DATASETS.REGISTER, cfg_path or "config")  # ... and in the file
    return cfg


def check_runtime(cfg):
    """Settings that are valid config but cannot run on this machine."""
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config MODEL.DEVICE = {cfg.MODEL.DEVICE!r} but CUDA is not available; "
                           "add `MODEL.DEVICE cpu` to the command line")
    if cfg.SOLVER.AMP.ENABLED and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise UserError("config SOLVER.AMP.ENABLED = True needs a CUDA device (detectron2's AMPTrainer); "
                           "add `SOLVER.AMP.ENABLED False` for CPU runs")
    if cfg.SOLVER.MAX_ITER in cfg.SOLVER.STEPS:
        raise ValueError(f"config SOLVER.STEPS {list(cfg.SOLVER.STEPS)} contains SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER}; "
                         "detectron2's scheduler needs every step < MAX_ITER (a step at MAX_ITER has no effect)")
    if not cfg.DATASETS.TRAIN and not cfg.DATASETS.TEST:
        raise ValueError("config DATASETS.TRAIN and DATASETS.TEST are both empty; nothing to do")
    if cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT != "polygon":
        raise ValueError(f"config INPUT.MASK_FORMAT = {cfg.INPUT.MASK_FORMAT!r}: MODEL.MASK_ON trains on polygon "
                         "targets only here; set INPUT.MASK_FORMAT polygon")
    tconfig.check_solver_numbers(cfg.SOLVER)


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
        # never fvcore's plain torch.load: .pkl through our restricted unpickler, anything else through
        # cocord_common.checkpoint.load_checkpoint (weights_only=True passed explicitly)
        if filename.endswith(".pkl"):
            return {"model": load_d2_file(filename), "__author__": "cocord-transfer", "matching_heuristics": True}
        loaded = load_checkpoint(filename)
        if not isinstance(loaded, dict):
            raise UserError(f"MODEL.WEIGHTS {filename} holds a {type(loaded).__name__}, not a checkpoint dict")
        return loaded if "model" in loaded else {"model": loaded}

    def _load_model(self, checkpoint):
        file_keys = list(checkpoint.get("model", {}))  # fvcore pops "model"
        incompatible = super()._load_model(checkpoint)
        missing = [k for k in incompatible.missing_keys
                   if _TRUNK_KEY.match(k) and not k.endswith("num_batches_tracked")]
        if missing:
            raise UserError(missing_backbone_message(len(missing), missing[:8], file_keys))
        return incompatible


def missing_backbone_message(n_missing, first_missing, file_keys):
    """Why weights that leave backbone tensors unfilled are refused, and the fix (both engines)."""
    tv_names = [k for k in file_keys if re.match(r"^(module\.)?(conv1|bn1|layer[1-4])\.", k)]
    hint = (" It holds torchvision names (e.g. " + ", ".join(tv_names[:3]) + "): convert it with "
            "tools/convert_to_d2.py INPUT OUTPUT.pkl and set MODEL.WEIGHTS to the .pkl." if tv_names else
            " Convert weights that match the config (MODEL.RESNETS.DEPTH, C4 vs FPN) with tools/convert_to_d2.py.")
    return (f"MODEL.WEIGHTS did not provide {n_missing} backbone tensor(s) of this model, e.g. {first_missing}; "
            "training would start them from random init." + hint +
            " Set MODEL.WEIGHTS \"\" to train from scratch on purpose")


# ----------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------
class TransferEvaluator(DatasetEvaluator):
    """detectron2 DatasetEvaluator around transfer.evaluation (the code the torchvision engine uses):
    collects each image's detections, gathers them on rank 0 in rank order (= dataset order, as
    detectron2's InferenceSampler shards contiguously), then scores them per metadata
    evaluator_type. Returns {"bbox": {"AP", "AP50", "AP75", ...}} like detectron2's evaluators, plus
    "segm" (mask AP of the pasted pred_masks, as COCO RLEs) with MODEL.MASK_ON."""

    def __init__(self, dataset_name, distributed=True, mask_on=False):
        self._name = dataset_name
        self._meta = MetadataCatalog.get(dataset_name).as_dict()
        self._distributed = distributed
        self._tasks = eval_tasks(mask_on)
        self.reset()

    def reset(self):
        self._predictions = {}

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            self._predictions[inp["image_id"]] = {"boxes": inst.pred_boxes.tensor.numpy(),
                                                  "scores": inst.scores.numpy(),
                                                  "classes": inst.pred_classes.numpy()}
            if inst.has("pred_masks"):  # MASK_ON: COCO RLEs, as COCOEvaluator encodes them
                self._predictions[inp["image_id"]]["masks"] = encode_rles(inst.pred_masks)

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
        out = {}
        for task in self._tasks:
            res = evaluate(self._meta, predictions, task)
            # detectron2's EvalHook takes numbers only: excluded_classes (names) stays in the log
            out[task] = {k: float(v) for k, v in res.items() if not isinstance(v, (dict, list))}
            for cls, ap in res.get("per_class_AP50", {}).items():
                out[task][f"AP50-{cls}"] = float(ap)
        return out


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
    if "polygons" in d["instances"]:  # MASK_ON: the mapper's transformed polygons, as detectron2's mapper makes them
        inst.gt_masks = PolygonMasks(d["instances"]["polygons"])
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
        return TransferEvaluator(dataset_name, mask_on=cfg.MODEL.MASK_ON)

    @staticmethod
    def precise_bn_batches(cfg):
        """Batches detectron2's PreciseBN hook draws in a run from iteration 0: NUM_ITER at every
        evaluation, i.e. after each multiple of TEST.EVAL_PERIOD (none when it is 0) and after
        the last iteration (a resumed run evaluates, and draws, less)."""
        period, max_iter = cfg.TEST.EVAL_PERIOD, cfg.SOLVER.MAX_ITER
        evals = max_iter // period + (max_iter % period != 0) if period > 0 else 1
        return cfg.TEST.PRECISE_BN.NUM_ITER * evals

    def build_train_loader(self, cfg):
        # an instance method here (DefaultTrainer calls it on self): the stream needs the trainer's seed
        if getattr(self, "_building_hooks", False):
            # PreciseBN's loader: its own stream, as long as the hook consumes (a batch depends only
            # on its index, so the length changes no batch)
            return TrainStream(cfg, lambda: self.loader_seed + 7919, 0, self.precise_bn_batches(cfg))
        return TrainStream(cfg, lambda: self.loader_seed, 0, cfg.SOLVER.MAX_ITER)

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        if resume and self.checkpointer.has_checkpoint() and comm.is_main_process():
            # metrics.json as of the checkpoint: lines after it dropped, lost ones restored (in place: the
            # JSONWriter already holds the file open for appending)
            reconcile_transfer_metrics(self.cfg.OUTPUT_DIR, getattr(self, "_resumed_metrics_lines", None),
                                       self.start_iter - 1, logging.getLogger("transfer").info, in_place=True)
        if self.start_iter:  # restart the stream at the resumed iteration
            self._trainer.data_loader = TrainStream(self.cfg, lambda: self.loader_seed, self.start_iter,
                                                    self.cfg.SOLVER.MAX_ITER)
            self._trainer._data_loader_iter = iter(self._trainer.data_loader)

    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()  # optimizer (+ AMP scaler): detectron2 0.6 omits it
        ret["loader_seed"] = int(self.loader_seed)
        ret["rng"] = rng_state()
        ret["metrics_lines"] = transfer_lines_for_checkpoint(self.cfg.OUTPUT_DIR, self.iter)  # a resume restores them
        return ret

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "_trainer" in state:
            self._trainer.load_state_dict(state["_trainer"])
        if "loader_seed" in state:
            self.loader_seed = int(state["loader_seed"])
        self._resumed_metrics_lines = state.get("metrics_lines")  # for resume_or_load's reconcile
        rng = state.get("rng") or {}
        if "numpy" in rng:
            set_rng_state(rng)
        elif "torch" in rng:  # a checkpoint written before cocord_common.rng: torch (+ CUDA) only
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def build_hooks(self):
        # swap in our checkpointer before the PeriodicCheckpointer hook captures it
        old = self.checkpointer
        self.checkpointer = Checkpointer(old.model, self.cfg.OUTPUT_DIR, **old.checkpointables)
        self._building_hooks = True
        try:
            hook_list = super().build_hooks()
        finally:
            self._building_hooks = False
        # the periodic checkpoint last (detectron2 puts it before the eval and the writer), so that it
        # carries every metrics.json line written up to its iteration (its "metrics_lines")
        periodic = [h for h in hook_list if isinstance(h, hooks.PeriodicCheckpointer)]
        return [h for h in hook_list if h not in periodic] + periodic

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
    # keys sorted, as detectron2's own JSONWriter writes metrics.json
    append_jsonl(os.path.join(output_dir, METRICS_FILE), dict(sorted(line.items())))


def _reset_loggers():
    """Close the handlers detectron2's setup_logger attached, and forget its cache, so that a second
    run in this process (--trials) does not duplicate every log line."""
    for name in ("detectron2", "fvcore", "transfer"):
        close_logging(name)
    if hasattr(setup_logger, "cache_clear"):
        setup_logger.cache_clear()


def setup(cfg, args):
    """Frozen copy of the detectron2 config `cfg`, plus what detectron2's default_setup does (logger
    with log.txt, environment info, seed SEED + rank, config.yaml) and dataset registration."""
    cfg = cfg.clone()
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
    if comm.is_main_process():  # what a run killed mid-write left; config.yaml is written once the run can start
        remove_orphan_temp_files(out, log.info)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    register_datasets(cfg)
    return cfg


def _write_config(cfg):
    if comm.is_main_process():
        write_text_atomic(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())


def _main(cfg, args):
    cfg = setup(cfg, args)
    if getattr(args, "eval_only", False):
        model = Trainer.build_model(cfg)
        ckpt = Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=getattr(args, "resume", False))
        _write_config(cfg)
        iteration = ckpt.get("iteration", -1) if isinstance(ckpt, dict) else -1
        res = Trainer.test(cfg, model)
        line = flatten_results(res, iteration + 1 if iteration >= 0 else -1)  # -1: weights without an iteration
        if comm.is_main_process():
            _append_metrics_line(cfg.OUTPUT_DIR, line)
        return line
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=getattr(args, "resume", False))
    _write_config(cfg)  # only now: the weights loaded, so this folder's config describes its model
    res = trainer.train()
    return flatten_results(res, trainer.iter) if res else {"iteration": int(trainer.iter)}


def check_weights_file(cfg, resume):
    """MODEL.WEIGHTS must be a file unless it is "" or --resume continues a checkpoint of OUTPUT_DIR
    (detectron2 would fail later with a bare AssertionError)."""
    path = cfg.MODEL.WEIGHTS
    if not path or "://" in path or (resume and last_checkpoint(cfg.OUTPUT_DIR)):  # URLs: detectron2 fetches them
        return
    if os.path.isdir(path):
        raise UserError(f"config MODEL.WEIGHTS = {path!r} is a folder; give the weights file inside it")
    if not os.path.isfile(path):
        raise UserError(f"config MODEL.WEIGHTS = {path!r} does not exist; give a .pkl written by "
                        "tools/convert_to_d2.py, a model_*.pth of this engine, or \"\" for random init")


def _check_processes(cfg, num_gpus, num_machines, dist_url):
    """Refuse process layouts detectron2 0.6 cannot run, before anything starts."""
    started_outside = int(os.environ.get("WORLD_SIZE", "1")) > 1 or (
        torch.distributed.is_available() and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1)
    if started_outside:
        raise RuntimeError(
            "the detectron2 engine starts its processes itself (detectron2.engine.launch, which also "
            "creates detectron2's per-machine process group): run transfer/train_net.py --num-gpus N "
            "without torchrun, or use --engine torchvision under torchrun")
    if num_gpus * num_machines > 1 and not str(cfg.MODEL.DEVICE).startswith("cuda"):
        raise ValueError(
            f"--num-gpus {num_gpus} x --num-machines {num_machines} with MODEL.DEVICE "
            f"{cfg.MODEL.DEVICE!r}: detectron2 runs several processes on GPUs only (NCCL); use "
            "--engine torchvision for several CPU processes, or --num-gpus 1")
    if num_machines > 1 and dist_url == "auto":
        raise ValueError("--dist-url is required with --num-machines > 1 (e.g. tcp://host:port)")


def run(cfg, args):
    """Train (or evaluate with args.eval_only) with detectron2 per the config `cfg` (load_d2_config's);
    returns the final metrics as written to metrics.json: {"bbox/AP", "bbox/AP50", "bbox/AP75", ...,
    "iteration"}.

    `args` carries resume / eval_only and detectron2's launcher flags (num_gpus, num_machines,
    machine_rank, dist_url): one process runs here, several are started by detectron2's `launch`.
    Runtime settings and dataset files are checked first, so bad inputs are reported before any
    worker starts or any model is built."""
    check_runtime(cfg)
    check_weights_file(cfg, getattr(args, "resume", False))
    metas = {name: tdata.check_dataset_files(name, cfg) for name in dataset_names(cfg)}
    require_mask_datasets(cfg, metas)
    if cfg.MODEL.MASK_ON:  # an object without polygons would otherwise fail in a loader worker
        for name in cfg.DATASETS.TRAIN:
            require_polygons(tdata.get_dataset_dicts(name, cfg), metas[name]["json_file"])
    for name in cfg.DATASETS.TEST:  # read only after training: a bad file must be found before it
        tdata.check_images(name, cfg)
    num_gpus = int(getattr(args, "num_gpus", 1) or 1)
    num_machines = int(getattr(args, "num_machines", 1) or 1)
    dist_url = getattr(args, "dist_url", "auto")
    _check_processes(cfg, num_gpus, num_machines, dist_url)
    if num_gpus * num_machines == 1:
        return _main(cfg, args)
    launch(_main, num_gpus, num_machines=num_machines, machine_rank=int(getattr(args, "machine_rank", 0)),
           dist_url=dist_url, args=(cfg, args))
    # worker return values do not cross process boundaries: read the eval line back
    return final_eval_line(os.path.join(cfg.OUTPUT_DIR, METRICS_FILE), on_torn="skip") or {}
