"""The one reader of "a ResNet state dict from any file a user may have".

Files accepted (all loaded with `torch.load(weights_only=True)` through cocord_common.checkpoint, so
a file holding code is refused, never run):

  - a plain torchvision state dict (`torch.save(model.state_dict())`, e.g. distill's
    `student_backbone.pth`), optionally with DDP's `module.` prefix;
  - a checkpoint with a `state_dict` entry: pytorch/examples' ImageNet checkpoints and MoCo's
    (whose backbone is under `module.encoder_q.`); its `arch` entry is reported when present;
  - a checkpoint with a `model` entry: the CIFAR teachers CRD/RepDistiller publish
    (`{'model': state_dict, 'epoch', 'accuracy', 'optimizer'}`);
  - a checkpoint of distill/train_imagenet.py (`student`, `slow_student`, `arch`, `method`, ...):
    the network named by `source` ("student", the default, or "slow_student").

API:

    read_state_dict(path, source="student") -> FoundWeights
        load_weights_file + find_state_dict + strip_module_prefix: the state dict of `path` with
        DDP's `module.` stripped. FoundWeights fields: state_dict (dict name -> tensor), kind
        (KIND_DISTILL, KIND_STATE_DICT_ENTRY or KIND_PLAIN), description (one line, for logs), arch
        (the file's `arch` entry or None), notes (what was done to the names, for logs).
    select_backbone(state_dict, is_backbone_key, is_head_key, prefix=None) -> Backbone
        The ResNet under one key prefix (BACKBONE_PREFIXES tried in order unless `prefix` is given),
        with the prefix removed. Backbone fields: state_dict, prefix, notes, outside (keys not under
        the prefix; all are heads by `is_head_key`, anything else is refused). The name predicates
        are parameters because the torchvision name rules live with the stage that maps them
        (transfer.d2_format.tv_to_d2_name / is_head_key).
    load_weights_file(path) -> object         the file's content (safe load), checked to exist
    find_state_dict(obj, path, source) -> FoundWeights   (module. not stripped yet; notes empty)
    strip_module_prefix(state_dict) -> (state_dict, stripped: bool)

Every refusal is a WeightsError (a cocord_common.errors.UserError, so a ValueError) naming the file
and saying what was expected.
"""
import collections
import os
import re
from typing import Callable, List, NamedTuple, Optional

import torch

from cocord_common.checkpoint import load_checkpoint
from cocord_common.errors import UserError

SOURCES = ("student", "slow_student")
KIND_DISTILL = "distill"            # a checkpoint of distill/train_imagenet.py
KIND_STATE_DICT_ENTRY = "state_dict"  # pytorch/examples or MoCo: weights under 'state_dict'
KIND_MODEL_ENTRY = "model"          # CRD/RepDistiller's CIFAR checkpoints: {'model': state_dict, 'epoch', ...}
KIND_PLAIN = "plain"                # the file is the state dict
DDP_PREFIX = "module."
# Prefixes under which a backbone is found automatically, in order of preference.
BACKBONE_PREFIXES = collections.OrderedDict([
    ("", "torchvision names"),
    ("encoder_q.", "MoCo query encoder"),
    ("backbone.", "backbone."),
    ("encoder.", "encoder."),
])


class WeightsError(UserError):
    """A file that holds no usable state dict; the message names the file and the fix."""


class FoundWeights(NamedTuple):
    state_dict: dict
    kind: str
    description: str
    arch: Optional[str]
    notes: List[str]


class Backbone(NamedTuple):
    state_dict: dict
    prefix: str
    notes: List[str]
    outside: List[str]


def is_state_dict(obj):
    """A non-empty dict of name -> tensor."""
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_weights_file(path):
    """The content of the torch file `path`, loaded without running code from it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise WeightsError(f"input {path} is a folder; give the weights file inside it")
    if not os.path.isfile(path):
        raise WeightsError(f"input {path} does not exist")
    if path.endswith(".pkl"):
        raise WeightsError(f"{path} is a .pkl (already detectron2 format?); the input must be a "
                           "torch checkpoint or state dict (.pth)")
    try:
        return load_checkpoint(path)
    except RuntimeError as e:  # arbitrary objects (code) in the pickle, or a corrupt file
        reason = str(e).strip()
        reason = reason[len(f"cannot load checkpoint {path}: "):] if reason.startswith(
            f"cannot load checkpoint {path}: ") else reason
        raise WeightsError(
            f"refusing to load {path}: it cannot be read with torch.load(weights_only=True) "
            f"({reason}). Only tensors, containers, strings and numbers are accepted; re-save the "
            "weights as a plain state dict (torch.save(model.state_dict(), ...))") from None


def _from_distill_checkpoint(obj, path, source):
    sd = obj.get(source)
    what = (f"distillation checkpoint of distill/train_imagenet.py (method "
            f"{obj.get('method', '?')}, arch {obj.get('arch', '?')}, epoch "
            f"{obj.get('epoch', '?')}); converting '{source}'")
    if sd is None:
        raise WeightsError(
            f"{path} has no '{source}' weights (method {obj.get('method', '?')} keeps no "
            "slow-moving student); use --source student")
    if not is_state_dict(sd):
        raise WeightsError(f"{path}: '{source}' is not a state dict of tensors")
    return FoundWeights(dict(sd), KIND_DISTILL, what, obj.get("arch"), [])


def _check_source(source):
    if source not in SOURCES:
        raise WeightsError(f"--source {source}: choices are {SOURCES}")


def find_state_dict(obj, path, source="student"):
    """The state dict inside the loaded file content `obj` (see the module docstring)."""
    _check_source(source)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    if "student" in obj and isinstance(obj.get("student"), dict):
        return _from_distill_checkpoint(obj, path, source)
    if source != "student":
        raise WeightsError(f"--source {source} needs a checkpoint of distill/train_imagenet.py; "
                           f"{path} is not one (it has no 'student' entry)")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        if not is_state_dict(sd):
            raise WeightsError(f"{path}: 'state_dict' holds values that are not tensors")
        return FoundWeights(dict(sd), KIND_STATE_DICT_ENTRY,
                            "checkpoint with a 'state_dict' entry (MoCo-style)", obj.get("arch"), [])
    if "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
        if not is_state_dict(sd):
            raise WeightsError(f"{path}: 'model' holds values that are not tensors")
        return FoundWeights(dict(sd), KIND_MODEL_ENTRY,
                            "checkpoint with a 'model' entry (CRD/RepDistiller CIFAR teacher)", obj.get("arch"), [])
    if is_state_dict(obj):
        return FoundWeights(dict(obj), KIND_PLAIN, "plain state dict", None, [])
    raise WeightsError(
        f"{path} is neither a distillation checkpoint ('student'), a MoCo-style checkpoint "
        f"('state_dict'), a CIFAR teacher checkpoint ('model') nor a state dict of tensors; "
        f"top-level keys: {sorted(map(str, obj))[:20]}")


def strip_module_prefix(state_dict):
    """(state dict without DDP's `module.` prefix, whether it was stripped). Stripped only when
    every key has it."""
    if state_dict and all(k.startswith(DDP_PREFIX) for k in state_dict):
        return {k[len(DDP_PREFIX):]: v for k, v in state_dict.items()}, True
    return state_dict, False


def read_state_dict(path, source="student"):
    """FoundWeights of the file `path`, DDP's `module.` prefix stripped (noted in .notes)."""
    _check_source(source)  # before touching the file: a bad argument is named first
    found = find_state_dict(load_weights_file(path), os.fspath(path), source)
    sd, stripped = strip_module_prefix(found.state_dict)
    notes = ["DDP 'module.' prefix stripped"] if stripped else []
    return found._replace(state_dict=sd, notes=notes)


def _has_backbone_under(sd, prefix, is_backbone_key):
    return any(k.startswith(prefix) and is_backbone_key(k[len(prefix):]) for k in sd)


def _find_prefix(sd, is_backbone_key):
    found = [p for p in BACKBONE_PREFIXES if _has_backbone_under(sd, p, is_backbone_key)]
    if found:
        return found[0]
    # a stem conv that is not a block's conv1 hints where an unknown prefix ends
    others = sorted({k[:-len("conv1.weight")] for k in sd if k.endswith("conv1.weight")
                     and not re.search(r"layer\d+\.\d+\.conv1\.weight$", k)})
    hint = f"; pass --prefix (candidates: {others})" if others else ""
    raise WeightsError(
        "no backbone tensor found (torchvision names such as conv1.weight, "
        f"layer1.0.conv1.weight) under the known prefixes {list(BACKBONE_PREFIXES)}{hint}; "
        f"keys seen: {', '.join(list(sd)[:10])}")


def select_backbone(state_dict, is_backbone_key: Callable[[str], bool],
                    is_head_key: Callable[[str], bool], prefix=None):
    """Backbone of `state_dict` (DDP prefix already stripped) under `prefix` or a known prefix."""
    if prefix is None:
        prefix = _find_prefix(state_dict, is_backbone_key)
    elif not _has_backbone_under(state_dict, prefix, is_backbone_key):
        raise WeightsError(f"--prefix '{prefix}': no backbone tensor under it")
    notes = []
    if prefix:
        notes.append(f"backbone under '{prefix}' ({BACKBONE_PREFIXES.get(prefix, 'from --prefix')})")
    inner = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    outside = [k for k in state_dict if not k.startswith(prefix)]
    unplaceable = [k for k in outside if not is_head_key(k)]
    if unplaceable:
        raise WeightsError(
            f"{len(unplaceable)} key(s) outside the backbone '{prefix}*' are not a known head, so "
            f"they cannot be placed: {', '.join(unplaceable[:20])}"
            + (" ..." if len(unplaceable) > 20 else ""))
    return Backbone(inner, prefix, notes, outside)
