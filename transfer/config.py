"""Transfer-stage configuration: a detectron2-compatible fvcore CfgNode.

`get_cfg()` mirrors the subset of detectron2 0.6's `config/defaults.py` that our engines read, with
the same key names and defaults, so one YAML merges into both this node and detectron2's `get_cfg()`.
Our only extension is `DATASETS.REGISTER` (datasets declared in the config itself; the detectron2
engine adds the same node). Keys detectron2 has but our engines do not implement are absent, so a
YAML that sets them is rejected here instead of being silently ignored.

Loading: `load_config(path, opts)` resolves `_BASE_` chains (paths relative to the including file),
checks every key of every file against the defaults (the error names the key and the file), merges,
applies trailing `KEY VALUE` opts, then `validate(cfg)` refuses values the engines do not support.
"""

from fvcore.common.config import CfgNode as _FvCfgNode

from cocord_common.yaml_config import load_yaml_with_base

# Keys a `DATASETS.REGISTER.<name>` entry may hold, per TYPE (see transfer/data.py).
REGISTER_KEYS_BY_TYPE = {
    "voc": {"TYPE", "ROOT", "SPLIT", "CLASSES", "YEAR", "IMAGE_DIR", "ANNOTATION_DIR", "SPLIT_FILE",
            "TEST_FRACTION", "SPLIT_SEED"},
    "coco": {"TYPE", "IMAGE_ROOT", "JSON_FILE", "CLASSES", "TEST_FRACTION", "SPLIT_SEED"},
}
REGISTER_KEYS = set().union(*REGISTER_KEYS_BY_TYPE.values())


class CfgNode(_FvCfgNode):
    pass


CN = CfgNode


def get_cfg():
    """Fresh default config (detectron2 0.6 defaults for the keys we use)."""
    _C = CN()
    _C.VERSION = 2

    _C.MODEL = CN()
    _C.MODEL.LOAD_PROPOSALS = False
    _C.MODEL.MASK_ON = False
    _C.MODEL.KEYPOINT_ON = False
    _C.MODEL.DEVICE = "cuda"
    _C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    _C.MODEL.WEIGHTS = ""
    _C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
    _C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]

    _C.INPUT = CN()
    _C.INPUT.MIN_SIZE_TRAIN = (800,)
    _C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    _C.INPUT.MAX_SIZE_TRAIN = 1333
    _C.INPUT.MIN_SIZE_TEST = 800
    _C.INPUT.MAX_SIZE_TEST = 1333
    _C.INPUT.RANDOM_FLIP = "horizontal"
    _C.INPUT.CROP = CN({"ENABLED": False})
    _C.INPUT.FORMAT = "BGR"

    _C.DATASETS = CN()
    _C.DATASETS.TRAIN = ()
    _C.DATASETS.TEST = ()
    # Extension: datasets declared in the config (name -> TYPE/ROOT/SPLIT/CLASSES/YEAR or
    # TYPE/IMAGE_ROOT/JSON_FILE). See transfer/data.py.
    _C.DATASETS.REGISTER = CN(new_allowed=True)

    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = 4
    _C.DATALOADER.ASPECT_RATIO_GROUPING = True
    _C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    _C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True

    _C.MODEL.BACKBONE = CN()
    _C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    _C.MODEL.BACKBONE.FREEZE_AT = 2

    _C.MODEL.FPN = CN()
    _C.MODEL.FPN.IN_FEATURES = []
    _C.MODEL.FPN.OUT_CHANNELS = 256
    _C.MODEL.FPN.NORM = ""
    _C.MODEL.FPN.FUSE_TYPE = "sum"

    _C.MODEL.PROPOSAL_GENERATOR = CN()
    _C.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"
    _C.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 0

    _C.MODEL.ANCHOR_GENERATOR = CN()
    _C.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
    _C.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
    _C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    _C.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0

    _C.MODEL.RPN = CN()
    _C.MODEL.RPN.HEAD_NAME = "StandardRPNHead"
    _C.MODEL.RPN.IN_FEATURES = ["res4"]
    _C.MODEL.RPN.BOUNDARY_THRESH = -1
    _C.MODEL.RPN.IOU_THRESHOLDS = [0.3, 0.7]
    _C.MODEL.RPN.IOU_LABELS = [0, -1, 1]
    _C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256
    _C.MODEL.RPN.POSITIVE_FRACTION = 0.5
    _C.MODEL.RPN.BBOX_REG_LOSS_TYPE = "smooth_l1"
    _C.MODEL.RPN.BBOX_REG_LOSS_WEIGHT = 1.0
    _C.MODEL.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    _C.MODEL.RPN.SMOOTH_L1_BETA = 0.0
    _C.MODEL.RPN.LOSS_WEIGHT = 1.0
    _C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 12000
    _C.MODEL.RPN.PRE_NMS_TOPK_TEST = 6000
    _C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000
    _C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000
    _C.MODEL.RPN.NMS_THRESH = 0.7
    _C.MODEL.RPN.CONV_DIMS = [-1]

    _C.MODEL.ROI_HEADS = CN()
    _C.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    _C.MODEL.ROI_HEADS.NUM_CLASSES = 80
    _C.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]
    _C.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.5]
    _C.MODEL.ROI_HEADS.IOU_LABELS = [0, 1]
    _C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512
    _C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
    _C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05
    _C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
    _C.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True

    _C.MODEL.ROI_BOX_HEAD = CN()
    _C.MODEL.ROI_BOX_HEAD.NAME = ""
    _C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "smooth_l1"
    _C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT = 1.0
    _C.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
    _C.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0
    _C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
    _C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
    _C.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    _C.MODEL.ROI_BOX_HEAD.NUM_FC = 0
    _C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
    _C.MODEL.ROI_BOX_HEAD.NUM_CONV = 0
    _C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
    _C.MODEL.ROI_BOX_HEAD.NORM = ""
    _C.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
    _C.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES = False

    # Mask R-CNN (MODEL.MASK_ON, C4 only): the POOLER_* keys are unused by C4 heads, as in detectron2
    _C.MODEL.ROI_MASK_HEAD = CN()
    _C.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    _C.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    _C.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 0
    _C.MODEL.ROI_MASK_HEAD.NUM_CONV = 0
    _C.MODEL.ROI_MASK_HEAD.CONV_DIM = 256
    _C.MODEL.ROI_MASK_HEAD.NORM = ""
    _C.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = False
    _C.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"

    _C.MODEL.RESNETS = CN()
    _C.MODEL.RESNETS.DEPTH = 50
    _C.MODEL.RESNETS.OUT_FEATURES = ["res4"]
    _C.MODEL.RESNETS.NUM_GROUPS = 1
    _C.MODEL.RESNETS.NORM = "FrozenBN"
    _C.MODEL.RESNETS.WIDTH_PER_GROUP = 64
    _C.MODEL.RESNETS.STRIDE_IN_1X1 = True
    _C.MODEL.RESNETS.RES5_DILATION = 1
    _C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    _C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64
    _C.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, False]

    _C.SOLVER = CN()
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    _C.SOLVER.MAX_ITER = 40000
    _C.SOLVER.BASE_LR = 0.001
    _C.SOLVER.MOMENTUM = 0.9
    _C.SOLVER.NESTEROV = False
    _C.SOLVER.WEIGHT_DECAY = 0.0001
    _C.SOLVER.WEIGHT_DECAY_NORM = 0.0
    _C.SOLVER.GAMMA = 0.1
    _C.SOLVER.STEPS = (30000,)
    _C.SOLVER.WARMUP_FACTOR = 1.0 / 1000
    _C.SOLVER.WARMUP_ITERS = 1000
    _C.SOLVER.WARMUP_METHOD = "linear"
    _C.SOLVER.CHECKPOINT_PERIOD = 5000
    _C.SOLVER.IMS_PER_BATCH = 16
    _C.SOLVER.REFERENCE_WORLD_SIZE = 0
    _C.SOLVER.BIAS_LR_FACTOR = 1.0
    _C.SOLVER.WEIGHT_DECAY_BIAS = None  # None: same as WEIGHT_DECAY
    _C.SOLVER.CLIP_GRADIENTS = CN({"ENABLED": False})
    _C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    _C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    _C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    _C.SOLVER.AMP = CN({"ENABLED": False})

    _C.TEST = CN()
    _C.TEST.EXPECTED_RESULTS = []
    _C.TEST.EVAL_PERIOD = 0
    _C.TEST.DETECTIONS_PER_IMAGE = 100
    _C.TEST.AUG = CN({"ENABLED": False})
    _C.TEST.PRECISE_BN = CN({"ENABLED": False})
    _C.TEST.PRECISE_BN.NUM_ITER = 200

    _C.OUTPUT_DIR = "./output"
    _C.SEED = -1
    _C.CUDNN_BENCHMARK = False
    _C.VIS_PERIOD = 0
    return _C


# ----------------------------------------------------------------------------------------------
# loading


def problem_list(problems, what):
    """One message for several problems: the message itself for one, else a count and one line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with {what}:\n" + "\n".join(f"  - {p}" for p in problems)


def _unknown_keys(data, node, path, prefix=""):
    """Every problem with the keys of `data` (a file's mapping) against `node`: one message each."""
    if not isinstance(data, dict):
        return [f"{path}: expected a mapping at '{prefix or '<top level>'}', got {data!r}"]
    problems = []
    for k, v in data.items():
        full = f"{prefix}{k}"
        if full == "DATASETS.REGISTER":
            problems += register_problems(v, path)
        elif k not in node:
            problems.append(f"{path}: unknown config key '{full}'")
        elif isinstance(node[k], _FvCfgNode):
            problems += _unknown_keys(v, node[k], path, full + ".")
    return problems


def _check_keys(data, node, path):
    """Raise one KeyError listing every unknown key of `data` (keys of the file `path`)."""
    problems = _unknown_keys(data, node, path)
    if problems:
        raise KeyError(problem_list(problems, "the config keys") + "\nCheck the spelling against "
                       "transfer/config.py (the detectron2-compatible keys our engines implement; DATASETS.REGISTER "
                       f"entries take {sorted(REGISTER_KEYS)})")


def register_problems(reg, where):
    """Every problem of a DATASETS.REGISTER node (name -> mapping of REGISTER_KEYS), one message each."""
    if not isinstance(reg, dict):
        return [f"{where}: DATASETS.REGISTER must map dataset names to settings, got {reg!r}"]
    problems = []
    for name, entry in reg.items():
        if not isinstance(entry, dict):
            problems.append(f"{where}: DATASETS.REGISTER.{name} must be a mapping, got {entry!r}")
            continue
        problems += [f"{where}: unknown config key 'DATASETS.REGISTER.{name}.{k}'"
                     for k in entry if k not in REGISTER_KEYS]
        kind = str(entry.get("TYPE", "")).lower()
        if kind in REGISTER_KEYS_BY_TYPE:  # a key of the other TYPE would be ignored: refuse it instead
            own = REGISTER_KEYS_BY_TYPE[kind]
            problems += [f"{where}: DATASETS.REGISTER.{name}.{k} is not a key of a TYPE {kind} dataset "
                         f"(its keys: {sorted(own)})" for k in entry if k in REGISTER_KEYS and k not in own]
    return problems


def check_register(reg, where):
    """The one check of a DATASETS.REGISTER node; `where` names the file (or 'config') in the error.
    Used by both engines' config loaders. One KeyError lists every bad entry."""
    problems = register_problems(reg, where)
    if problems:
        raise KeyError(problem_list(problems, "DATASETS.REGISTER") + f"\nA DATASETS.REGISTER entry takes "
                       f"{sorted(REGISTER_KEYS)}")


def list_value(text):
    """The items of a list written on the command line (the one parser of such lists): a Python literal
    (`"('a', 'b')"`, `[1, 2]`), or a comma list `a,b` / `[a, b]` / `(a, b)` (brackets as a shell passes
    them unquoted), each item decoded as a config value (`160,176` gives numbers) with stray quotes
    stripped from names. A single `a` gives [a]; empty text or `[]` gives []."""
    decoded = CN._decode_cfg_value(text)
    if isinstance(decoded, (list, tuple)):
        return list(decoded)
    text = str(text).strip()
    if text[:1] + text[-1:] in ("[]", "()"):
        text = text[1:-1]
    items = [CN._decode_cfg_value(x.strip()) for x in text.split(",") if x.strip()]
    items = [x.strip("'\"").strip() if isinstance(x, str) else x for x in items]
    return [x for x in items if x != ""]


def _list_value(current, text):
    """A command-line value for config key holding `current`: list_value's items for a list/tuple key
    (as that type), else the decoded config value."""
    if not isinstance(current, (list, tuple)):
        return CN._decode_cfg_value(text)
    return type(current)(list_value(text))


def merge_opts(cfg, opts):
    """Apply trailing `KEY VALUE` pairs; `DATASETS.REGISTER.<name>.<KEY>` may create new entries. List
    keys and DATASETS.REGISTER.<name>.CLASSES take list_value's lists (`DATASETS.TRAIN a_train,b_train`,
    `[a_train, b_train]`, a Python literal). One KeyError lists every bad key."""
    if len(opts) % 2:
        raise ValueError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
    plain, problems, registered = [], [], set()
    for k, v in zip(opts[0::2], opts[1::2]):
        parts = k.split(".")
        if parts[:2] == ["DATASETS", "REGISTER"]:
            if len(parts) != 4 or parts[3] not in REGISTER_KEYS:
                problems.append(f"command line: bad key '{k}'; use DATASETS.REGISTER.<name>.<KEY> with KEY in "
                                f"{sorted(REGISTER_KEYS)}")
                continue
            reg = cfg.DATASETS.REGISTER
            if parts[2] not in reg:
                reg[parts[2]] = type(reg)()
            reg[parts[2]][parts[3]] = (list_value(v) if parts[3] == "CLASSES" and isinstance(v, str)
                                       else CN._decode_cfg_value(v))
            registered.add(parts[2])
            continue
        node = cfg
        for i, part in enumerate(parts):
            if not isinstance(node, _FvCfgNode) or part not in node:
                problems.append(f"command line: unknown config key '{k}' ('{'.'.join(parts[:i + 1])}' does not "
                                "exist); check its spelling against transfer/config.py")
                break
            node = node[part]
        else:
            plain += [k, _list_value(node, v) if isinstance(v, str) else v]
    # the entries the command line touched, as merged with the file's: keys that fit their TYPE
    problems += register_problems({n: cfg.DATASETS.REGISTER[n] for n in sorted(registered)}, "command line")
    if problems:
        raise KeyError(problem_list(problems, "the command line's config keys"))
    try:
        cfg.merge_from_list(plain)  # every key exists (checked above); values may still be refused
    except (ValueError, AssertionError) as e:
        raise ValueError(f"command line override {plain}: {e}") from e
    return cfg


def load_config(path=None, opts=(), validate_cfg=True):
    """Defaults <- YAML file (with `_BASE_`) <- `KEY VALUE` opts, validated. Returns a frozen node."""
    cfg = get_cfg()
    if path:
        data = load_yaml_with_base(path, check=lambda d, p: _check_keys(d, cfg, p))  # cfg: still the defaults
        try:
            cfg.merge_from_other_cfg(CN(data))
        except (KeyError, ValueError, AssertionError) as e:
            raise ValueError(f"{path}: {e}") from e
    merge_opts(cfg, list(opts))
    if validate_cfg:
        validate(cfg)
    cfg.freeze()
    return cfg


# ----------------------------------------------------------------------------------------------
# validation: refuse values our engines do not implement (never silently ignore a key)

# ROI_HEADS.NAME values of a C4 model (res5 in the box head, which detectron2 builds from bottleneck
# blocks) and of an FPN model
C4_HEADS = ("Res5ROIHeads", "Res5ROIHeadsExtraNorm")
FPN_HEADS = ("StandardROIHeads",)


def is_fpn(cfg):
    return cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"


def _require(cond, key, value, fix):
    if not cond:
        raise ValueError(f"config {key} = {value!r} is not supported: {fix}")


def validate(cfg):
    """Refuse settings our engines do not implement. Dataset-dependent checks (files, classes vs
    ROI_HEADS.NUM_CLASSES) run in transfer.data.resolve_datasets (train_net.py, before either engine)
    and again when an engine prepares its datasets (transfer.data.check_dataset_files,
    torchvision_engine.prepare_datasets)."""
    _validate_model(cfg)
    _validate_resnet(cfg.MODEL.RESNETS)
    _validate_heads(cfg)
    _validate_input(cfg)
    _validate_solver(cfg)


def _validate_model(cfg):
    m = cfg.MODEL
    _require(cfg.VERSION == 2, "VERSION", cfg.VERSION, "only detectron2 config version 2")
    _require(cfg.VIS_PERIOD == 0, "VIS_PERIOD", cfg.VIS_PERIOD, "training visualisation is not implemented; use 0")
    _require(m.DEVICE.split(":")[0] in ("cpu", "cuda"), "MODEL.DEVICE", m.DEVICE, "use cuda or cpu")
    _require(m.META_ARCHITECTURE == "GeneralizedRCNN", "MODEL.META_ARCHITECTURE", m.META_ARCHITECTURE,
             "only 'GeneralizedRCNN' (Faster R-CNN, or Mask R-CNN with MODEL.MASK_ON)")
    for key in ("KEYPOINT_ON", "LOAD_PROPOSALS"):
        _require(not m[key], f"MODEL.{key}", m[key], "boxes and masks only; set it to False")
    if m.MASK_ON:
        _require(not is_fpn(cfg), "MODEL.MASK_ON", True, "masks are implemented for the C4 model (MoCo's "
                 "Mask R-CNN R50-C4) only; use build_resnet_backbone or set MODEL.MASK_ON False")
        _require(m.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NAME",
                 m.ROI_MASK_HEAD.NAME, "only MaskRCNNConvUpsampleHead")
        _require(m.ROI_MASK_HEAD.NORM == "", "MODEL.ROI_MASK_HEAD.NORM", m.ROI_MASK_HEAD.NORM, "only ''")
        _require(m.ROI_MASK_HEAD.NUM_CONV >= 0, "MODEL.ROI_MASK_HEAD.NUM_CONV", m.ROI_MASK_HEAD.NUM_CONV, "use >= 0")
        _require(m.ROI_MASK_HEAD.CONV_DIM >= 1, "MODEL.ROI_MASK_HEAD.CONV_DIM", m.ROI_MASK_HEAD.CONV_DIM, "use >= 1")
    _require(m.BACKBONE.NAME in ("build_resnet_backbone", "build_resnet_fpn_backbone"),
             "MODEL.BACKBONE.NAME", m.BACKBONE.NAME, "use build_resnet_backbone (C4) or build_resnet_fpn_backbone")
    _require(0 <= m.BACKBONE.FREEZE_AT <= 5, "MODEL.BACKBONE.FREEZE_AT", m.BACKBONE.FREEZE_AT, "use 0..5")


def _validate_resnet(r):
    _require(r.DEPTH in (18, 34, 50, 101, 152), "MODEL.RESNETS.DEPTH", r.DEPTH, "use 18/34/50/101/152")
    _require(r.NORM in ("BN", "SyncBN", "naiveSyncBN", "FrozenBN"), "MODEL.RESNETS.NORM", r.NORM,
             "use BN, SyncBN, naiveSyncBN or FrozenBN")
    _require(not r.STRIDE_IN_1X1, "MODEL.RESNETS.STRIDE_IN_1X1", r.STRIDE_IN_1X1,
             "torchvision ResNets put the stride in the 3x3 conv; set it to False")
    _require(r.NUM_GROUPS == 1 and r.WIDTH_PER_GROUP == 64, "MODEL.RESNETS.NUM_GROUPS/WIDTH_PER_GROUP",
             (r.NUM_GROUPS, r.WIDTH_PER_GROUP), "only plain ResNets (1, 64)")
    _require(r.RES5_DILATION == 1, "MODEL.RESNETS.RES5_DILATION", r.RES5_DILATION, "use 1")
    _require(r.STEM_OUT_CHANNELS == 64, "MODEL.RESNETS.STEM_OUT_CHANNELS", r.STEM_OUT_CHANNELS, "use 64")
    res2 = 64 if r.DEPTH in (18, 34) else 256
    _require(r.RES2_OUT_CHANNELS == res2, "MODEL.RESNETS.RES2_OUT_CHANNELS", r.RES2_OUT_CHANNELS,
             f"ResNet-{r.DEPTH} needs {res2}")
    _require(not any(r.DEFORM_ON_PER_STAGE), "MODEL.RESNETS.DEFORM_ON_PER_STAGE", r.DEFORM_ON_PER_STAGE,
             "deformable convs are not implemented")


def _validate_heads(cfg):
    m, r = cfg.MODEL, cfg.MODEL.RESNETS
    _require(m.PROPOSAL_GENERATOR.NAME == "RPN", "MODEL.PROPOSAL_GENERATOR.NAME", m.PROPOSAL_GENERATOR.NAME,
             "only 'RPN'")
    _require(m.ANCHOR_GENERATOR.NAME == "DefaultAnchorGenerator", "MODEL.ANCHOR_GENERATOR.NAME",
             m.ANCHOR_GENERATOR.NAME, "only 'DefaultAnchorGenerator'")
    _require(m.RPN.HEAD_NAME == "StandardRPNHead", "MODEL.RPN.HEAD_NAME", m.RPN.HEAD_NAME, "only StandardRPNHead")
    _require(list(m.RPN.CONV_DIMS) == [-1], "MODEL.RPN.CONV_DIMS", m.RPN.CONV_DIMS, "only [-1]")
    _require(m.RPN.BOUNDARY_THRESH == -1, "MODEL.RPN.BOUNDARY_THRESH", m.RPN.BOUNDARY_THRESH, "only -1")
    _require(list(m.RPN.IOU_LABELS) == [0, -1, 1], "MODEL.RPN.IOU_LABELS", m.RPN.IOU_LABELS, "only [0, -1, 1]")
    _require(len(m.RPN.IOU_THRESHOLDS) == 2, "MODEL.RPN.IOU_THRESHOLDS", m.RPN.IOU_THRESHOLDS, "give [bg, fg]")
    _require(list(m.ROI_HEADS.IOU_LABELS) == [0, 1] and len(m.ROI_HEADS.IOU_THRESHOLDS) == 1,
             "MODEL.ROI_HEADS.IOU_THRESHOLDS/IOU_LABELS", (m.ROI_HEADS.IOU_THRESHOLDS, m.ROI_HEADS.IOU_LABELS),
             "only one threshold with labels [0, 1]")
    for node in ("RPN", "ROI_BOX_HEAD"):
        t = m[node].BBOX_REG_LOSS_TYPE
        _require(t == "smooth_l1", f"MODEL.{node}.BBOX_REG_LOSS_TYPE", t, "only smooth_l1 (beta 0 = L1)")
    bh = m.ROI_BOX_HEAD
    _require(bh.POOLER_TYPE in ("ROIAlignV2", "ROIAlign"), "MODEL.ROI_BOX_HEAD.POOLER_TYPE", bh.POOLER_TYPE,
             "use ROIAlignV2 (aligned) or ROIAlign")
    _require(not bh.CLS_AGNOSTIC_BBOX_REG, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True, "set False")
    _require(not bh.TRAIN_ON_PRED_BOXES, "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", True, "set False")
    _require(m.FPN.NORM == "" and m.FPN.FUSE_TYPE == "sum", "MODEL.FPN.NORM/FUSE_TYPE",
             (m.FPN.NORM, m.FPN.FUSE_TYPE), "only '' and 'sum'")
    if is_fpn(cfg):
        _require(m.ROI_HEADS.NAME in FPN_HEADS, "MODEL.ROI_HEADS.NAME", m.ROI_HEADS.NAME,
                 "the FPN backbone needs StandardROIHeads")
        _require(bh.NAME == "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NAME", bh.NAME,
                 "StandardROIHeads needs FastRCNNConvFCHead")
        _require(bh.NUM_FC >= 1 or bh.NUM_CONV >= 1, "MODEL.ROI_BOX_HEAD.NUM_FC", bh.NUM_FC, "use >= 1")
        _require(bh.NORM == "", "MODEL.ROI_BOX_HEAD.NORM", bh.NORM, "only ''")
        fpn_in = list(m.FPN.IN_FEATURES)
        _require(fpn_in == ["res2", "res3", "res4", "res5"][-len(fpn_in):] and fpn_in,
                 "MODEL.FPN.IN_FEATURES", fpn_in, "a suffix of [res2, res3, res4, res5]")
        _require(list(r.OUT_FEATURES) == fpn_in, "MODEL.RESNETS.OUT_FEATURES", r.OUT_FEATURES,
                 f"must equal MODEL.FPN.IN_FEATURES {fpn_in}")
    else:
        _require(m.ROI_HEADS.NAME in C4_HEADS, "MODEL.ROI_HEADS.NAME", m.ROI_HEADS.NAME,
                 f"the C4 backbone needs one of {C4_HEADS}")
        _require(list(r.OUT_FEATURES) == ["res4"], "MODEL.RESNETS.OUT_FEATURES", r.OUT_FEATURES, "C4 uses ['res4']")
        for key in ("RPN", "ROI_HEADS"):
            _require(list(m[key].IN_FEATURES) == ["res4"], f"MODEL.{key}.IN_FEATURES", m[key].IN_FEATURES,
                     "C4 uses ['res4']")
        from transfer.backbone import check_arch_for_meta  # the one place this rule lives
        check_arch_for_meta(r.DEPTH, m.ROI_HEADS.NAME)


def _validate_input(cfg):
    i = cfg.INPUT
    _require(i.FORMAT in ("RGB", "BGR"), "INPUT.FORMAT", i.FORMAT, "use RGB or BGR")
    _require(i.MIN_SIZE_TRAIN_SAMPLING in ("choice", "range"), "INPUT.MIN_SIZE_TRAIN_SAMPLING",
             i.MIN_SIZE_TRAIN_SAMPLING, "use choice or range")
    if i.MIN_SIZE_TRAIN_SAMPLING == "range":
        _require(len(i.MIN_SIZE_TRAIN) == 2, "INPUT.MIN_SIZE_TRAIN", i.MIN_SIZE_TRAIN, "range needs (min, max)")
    _require(i.RANDOM_FLIP in ("horizontal", "vertical", "none"), "INPUT.RANDOM_FLIP", i.RANDOM_FLIP,
             "use horizontal, vertical or none")
    _require(not i.CROP.ENABLED, "INPUT.CROP.ENABLED", True, "cropping is not implemented")
    _require(not cfg.TEST.AUG.ENABLED, "TEST.AUG.ENABLED", True, "test-time augmentation is not implemented")
    _require(cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler", "DATALOADER.SAMPLER_TRAIN",
             cfg.DATALOADER.SAMPLER_TRAIN, "only TrainingSampler")
    _require(len(cfg.MODEL.PIXEL_MEAN) == 3 and len(cfg.MODEL.PIXEL_STD) == 3, "MODEL.PIXEL_MEAN/STD",
             (cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD), "give 3 values each")


def check_solver_numbers(s):
    """SOLVER values torch's optimizer would refuse with a message that names no key (both engines)."""
    for key in ("BASE_LR", "MOMENTUM", "WEIGHT_DECAY"):
        value = s.get(key)
        if value is not None and not value >= 0:  # also refuses NaN
            raise ValueError(f"config SOLVER.{key} = {value!r} must be a number >= 0")


def _validate_solver(cfg):
    s = cfg.SOLVER
    check_solver_numbers(s)
    _require(s.LR_SCHEDULER_NAME == "WarmupMultiStepLR", "SOLVER.LR_SCHEDULER_NAME", s.LR_SCHEDULER_NAME,
             "only WarmupMultiStepLR")
    _require(s.WARMUP_METHOD in ("linear", "constant"), "SOLVER.WARMUP_METHOD", s.WARMUP_METHOD,
             "use linear or constant")
    _require(list(s.STEPS) == sorted(s.STEPS), "SOLVER.STEPS", s.STEPS, "steps must increase")
    _require(s.MAX_ITER > 0 and s.IMS_PER_BATCH > 0, "SOLVER.MAX_ITER/IMS_PER_BATCH",
             (s.MAX_ITER, s.IMS_PER_BATCH), "must be positive")
    _require(s.REFERENCE_WORLD_SIZE == 0, "SOLVER.REFERENCE_WORLD_SIZE", s.REFERENCE_WORLD_SIZE,
             "automatic rescaling is not implemented; set the batch and LR yourself")
    _require(s.CLIP_GRADIENTS.CLIP_TYPE in ("value", "norm"), "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
             s.CLIP_GRADIENTS.CLIP_TYPE, "use value or norm")
