"""The one torchvision <-> Detectron2 ResNet name mapping, and safe I/O of Detectron2 `.pkl` files.

Name mapping (torchvision ResNet -> Detectron2 ResNet, as detectron2's convert-torchvision-to-d2):

    conv1.weight                      -> stem.conv1.weight
    bn1.<p>                           -> stem.conv1.norm.<p>
    layer{i}.{b}.conv{k}.weight       -> res{i+1}.{b}.conv{k}.weight
    layer{i}.{b}.bn{k}.<p>            -> res{i+1}.{b}.conv{k}.norm.<p>
    layer{i}.{b}.downsample.0.weight  -> res{i+1}.{b}.shortcut.weight
    layer{i}.{b}.downsample.1.<p>     -> res{i+1}.{b}.shortcut.norm.<p>

with <p> in weight, bias, running_mean, running_var, num_batches_tracked. The `.pkl` holds these
names without any `backbone.`/`bottom_up.`/`roi_heads.` prefix: detectron2's matching heuristics
(`align_and_update_state_dicts`, enabled by `"matching_heuristics": True`) place `res5.*` under
`roi_heads.res5.*` for C4 models and everything under `backbone.bottom_up.*` for FPN models.

Assumed: standard torchvision ResNets (base width 64, no groups): ResNet-18/34 (BasicBlock) and
ResNet-50/101/152 (Bottleneck, stride on the 3x3 conv, i.e. detectron2's STRIDE_IN_1X1=False).
`num_batches_tracked` is a BN step counter, not a weight: converted when present, never required.
"""
import collections
import os
import pickle
import re
from typing import List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
import torch

from cocord_common.checkpoint import atomic_write  # the project's one atomic writer

# depth -> (block kind, blocks per stage res2..res5), as torchvision builds them.
RESNET_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
BN_PARAMS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
OPTIONAL_SUFFIX = ".num_batches_tracked"

_TV_STEM = re.compile(r"^(conv1\.weight|bn1\.(%s))$" % "|".join(BN_PARAMS))
_TV_BLOCK = re.compile(
    r"^layer([1-4])\.(\d+)\.(conv[1-3]\.weight|bn[1-3]\.(?:%s)|downsample\.0\.weight|"
    r"downsample\.1\.(?:%s))$" % ("|".join(BN_PARAMS), "|".join(BN_PARAMS)))
# Anything starting like a torchvision backbone tensor; used to tell "backbone but unplaceable"
# apart from other keys.
_TV_BACKBONE_LIKE = re.compile(r"^(conv1|bn1|layer\d+)(\.|$)")

_D2_STEM = re.compile(r"^stem\.conv1\.(weight|norm\.(?:%s))$" % "|".join(BN_PARAMS))
_D2_BLOCK = re.compile(
    r"^res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(weight|norm\.(?:%s))$" % "|".join(BN_PARAMS))
_D2_BACKBONE_LIKE = re.compile(r"^(stem|res\d+)(\.|$)")
# Detectron2's own convert-torchvision-to-d2 keeps the classifier as stem.fc.*: not a backbone key.
_D2_IGNORED = re.compile(r"^stem\.fc\.")


def tv_to_d2_name(name: str) -> Optional[str]:
    """Detectron2 name of a torchvision ResNet backbone key, or None when it is not one."""
    m = _TV_STEM.match(name)
    if m:
        return "stem.conv1.weight" if name == "conv1.weight" else "stem.conv1.norm." + name[4:]
    m = _TV_BLOCK.match(name)
    if not m:
        return None
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    if rest.startswith("downsample.0."):
        rest = "shortcut." + rest[len("downsample.0."):]
    elif rest.startswith("downsample.1."):
        rest = "shortcut.norm." + rest[len("downsample.1."):]
    elif rest.startswith("bn"):
        rest = "conv%s.norm.%s" % (rest[2], rest[4:])
    return "res%d.%s.%s" % (stage, block, rest)


def d2_to_tv_name(name: str) -> Optional[str]:
    """torchvision name of an un-prefixed detectron2 ResNet key (`stem.*`, `res2..5.*`), or None."""
    m = _D2_STEM.match(name)
    if m:
        p = m.group(1)
        return "conv1.weight" if p == "weight" else "bn1." + p[len("norm."):]
    m = _D2_BLOCK.match(name)
    if not m:
        return None
    stage, block, conv, p = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    layer = "layer%d.%s." % (stage - 1, block)
    if conv == "shortcut":
        return layer + ("downsample.0.weight" if p == "weight" else "downsample.1." + p[5:])
    return layer + (conv + ".weight" if p == "weight" else "bn%s.%s" % (conv[4], p[5:]))


def expected_torchvision_shapes(depth: int) -> "collections.OrderedDict[str, Tuple[int, ...]]":
    """Names and shapes of torchvision's resnet{depth} backbone (no fc), built on the meta device."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"unsupported ResNet depth {depth}; choices: {sorted(RESNET_SPECS)}")
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    return collections.OrderedDict(
        (k, tuple(v.shape)) for k, v in model.state_dict().items() if not k.startswith("fc."))


def recognise_depth(keys) -> Tuple[Optional[int], str]:
    """ResNet depth whose block layout the torchvision backbone `keys` show, and a description.

    Returns (None, description) when the layout matches no standard ResNet.
    """
    counts = [0, 0, 0, 0]
    bottleneck = False
    for k in keys:
        m = _TV_BLOCK.match(k)
        if m:
            i, b = int(m.group(1)) - 1, int(m.group(2))
            counts[i] = max(counts[i], b + 1)
            bottleneck |= m.group(3).startswith(("conv3", "bn3"))
    kind = "bottleneck" if bottleneck else "basic"
    for depth, spec in RESNET_SPECS.items():
        if spec == (kind, tuple(counts)):
            return depth, f"ResNet-{depth} ({kind} blocks {tuple(counts)})"
    return None, f"{kind} blocks per stage {tuple(counts)}, which is no standard ResNet " \
                 f"(known: " + ", ".join(f"R{d}={s[0]} {s[1]}" for d, s in RESNET_SPECS.items()) + ")"


class ConversionResult(NamedTuple):
    model: "collections.OrderedDict[str, np.ndarray]"  # detectron2 name -> array
    mapping: List[Tuple[str, str, Tuple[int, ...]]]   # (torchvision name, detectron2 name, shape)
    dropped: List[str]                                 # input keys left out on purpose (heads)
    depth: int


def _to_numpy(t) -> np.ndarray:
    t = torch.as_tensor(t).detach().cpu()
    if t.is_floating_point():
        t = t.float()  # fp16/bf16 checkpoints: detectron2 and numpy both want float32
    return t.numpy().copy()


def _short_list(keys, n=20):
    keys = list(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def is_head_key(name: str) -> bool:
    """Keys that are classifiers or distillation/self-supervision heads, dropped by name."""
    return _HEAD.match(name) is not None


# fc: classifier; proj/pred/embed/head: CRD/CoCoRD/MoCo-v2 heads; queue/memory/bank: negatives;
# encoder_k/momentum/teacher/slow: second networks stored beside the one converted.
_HEAD = re.compile(r"^(fc|classifier|head|heads|proj\w*|pred\w*|embed\w*|queue\w*|memory\w*|"
                   r"bank\w*|encoder_k|momentum\w*|teacher\w*|slow\w*|criterion\w*|contrast\w*)"
                   r"(\.|$)")


def torchvision_to_d2(state_dict: Mapping[str, torch.Tensor], depth: Optional[int] = None
                      ) -> ConversionResult:
    """Convert a torchvision ResNet state dict (prefixes already stripped) to detectron2 names.

    `depth` (optional) is the architecture the caller expects; without it the depth is recognised
    from the block layout. Raises ValueError, naming the keys, when: no backbone tensor is found;
    a tensor of the architecture is missing; a shape disagrees; a key is neither a backbone tensor
    of that architecture nor a known head (`is_head_key`).
    """
    keys = list(state_dict.keys())
    backbone = [k for k in keys if tv_to_d2_name(k) is not None]
    if not backbone:
        raise ValueError(
            "no ResNet backbone tensor found (expected torchvision names such as conv1.weight, "
            f"bn1.weight, layer1.0.conv1.weight); keys seen: {_short_list(keys, 10) or '(none)'}")
    found, desc = recognise_depth(backbone)
    if depth is None:
        if found is None:
            raise ValueError(f"cannot recognise the architecture: {desc}; pass the expected "
                             "architecture (--arch) to see which tensors are missing")
        depth = found
    elif found is not None and found != depth:
        raise ValueError(f"the weights are a {desc}, but ResNet-{depth} was expected; fix --arch "
                         "(or the checkpoint's 'arch') or pass the right file")
    expected = expected_torchvision_shapes(depth)

    missing = [k for k in expected if k not in state_dict and not k.endswith(OPTIONAL_SUFFIX)]
    if missing:
        raise ValueError(f"ResNet-{depth} is missing {len(missing)} tensor(s): "
                         f"{_short_list(missing)}")
    bad_shape = [f"{k}: file {tuple(state_dict[k].shape)} vs ResNet-{depth} {expected[k]}"
                 for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if bad_shape:
        raise ValueError(f"shape mismatch for {len(bad_shape)} tensor(s): {_short_list(bad_shape)}")

    dropped, unplaceable = [], []
    for k in keys:
        if k in expected:
            continue
        if is_head_key(k):
            dropped.append(k)
        else:  # e.g. layer3.6.* given ResNet-50, or a name we do not know
            unplaceable.append(k)
    if unplaceable:
        raise ValueError(f"{len(unplaceable)} key(s) cannot be placed in a ResNet-{depth} and are "
                         f"not a known head: {_short_list(unplaceable)}")

    model, mapping = collections.OrderedDict(), []
    for k in expected:
        if k in state_dict:
            dst = tv_to_d2_name(k)
            model[dst] = _to_numpy(state_dict[k])
            mapping.append((k, dst, expected[k]))
    return ConversionResult(model, mapping, dropped, depth)


def split_d2_backbone(model: Mapping[str, object]):
    """Split detectron2 keys into (un-prefixed backbone keys -> value, source key of each, ignored).

    Accepts `stem.*`/`res2..5.*`, `backbone.bottom_up.*` (FPN), `backbone.*` and `roi_heads.res5.*`
    (C4). Every other key (FPN laterals, RPN, box head, pixel_mean, ...) is returned as ignored.
    Raises ValueError on backbone-looking keys that fit no ResNet name, and on a backbone key given
    twice with different values.
    """
    out, source, ignored, bad = collections.OrderedDict(), {}, [], []
    for key, value in model.items():
        name = key
        for prefix in ("backbone.bottom_up.", "backbone."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        else:
            if name.startswith("roi_heads.res5."):
                name = name[len("roi_heads."):]
        if not _D2_BACKBONE_LIKE.match(name) or _D2_IGNORED.match(name):
            ignored.append(key)
            continue
        if d2_to_tv_name(name) is None:
            bad.append(key)
            continue
        if name in out:
            a, b = np.asarray(torch.as_tensor(out[name]).cpu()), np.asarray(
                torch.as_tensor(value).cpu())
            if a.shape != b.shape or not np.array_equal(a, b):
                raise ValueError(f"'{source[name]}' and '{key}' both give backbone tensor '{name}' "
                                 "with different values; keep only one of them in the file")
            ignored.append(key)
            continue
        out[name], source[name] = value, key
    if bad:
        raise ValueError(f"{len(bad)} backbone key(s) fit no ResNet name: {_short_list(bad)}")
    return out, source, ignored


def d2_to_torchvision(model: Mapping[str, object], depth: Optional[int] = None
                      ) -> "collections.OrderedDict[str, torch.Tensor]":
    """Detectron2 ResNet weights -> torchvision ResNet keys (no fc), as float/int tensors.

    With `depth`, the result is checked against torchvision's resnet{depth}: missing tensors,
    shape mismatches and tensors of a deeper network raise ValueError naming them.
    """
    backbone, source, _ = split_d2_backbone(model)
    out = collections.OrderedDict()
    for name, value in backbone.items():
        out[d2_to_tv_name(name)] = torch.tensor(np.asarray(torch.as_tensor(value).cpu()))
    if depth is not None:
        expected = expected_torchvision_shapes(depth)
        missing = [tv_to_d2_name(k) for k in expected
                   if k not in out and not k.endswith(OPTIONAL_SUFFIX)]
        extra = [source[tv_to_d2_name(k)] for k in out if k not in expected]
        bad = [f"{source[tv_to_d2_name(k)]}: file {tuple(v.shape)} vs ResNet-{depth} {expected[k]}"
               for k, v in out.items() if k in expected and tuple(v.shape) != expected[k]]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing: {_short_list(missing)}")
        if bad:
            problems.append(f"{len(bad)} with the wrong shape: {_short_list(bad)}")
        if extra:
            problems.append(f"{len(extra)} not in a ResNet-{depth}: {_short_list(extra)}")
        if problems:
            raise ValueError(f"the weights do not fit a ResNet-{depth} backbone: "
                             + "; ".join(problems))
    return out


# ---------------------------------------------------------------------------------------------
# Safe .pkl I/O

_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    # protocol-5 pickles of arrays
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_SAFE_GLOBALS = _NUMPY_GLOBALS | {("collections", "OrderedDict")}


class ForbiddenPickleContent(pickle.UnpicklingError):
    """The pickle names a global (a class or function) outside the admitted set."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only containers, strings, numbers and numpy arrays; nothing that can run code."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise ForbiddenPickleContent(
            f"global '{module}.{name}' is not allowed (only dicts, lists, tuples, strings, numbers "
            "and numpy arrays are)")


def load_d2_file(path) -> "collections.OrderedDict[str, np.ndarray]":
    """The `model` dict of a detectron2-format `.pkl`, read without executing code from the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"detectron2 weights file {path} does not exist")
    if not path.endswith(".pkl"):
        raise ValueError(f"{path}: expected a detectron2 '.pkl' file (write one with "
                         "tools/convert_to_d2.py)")
    with open(path, "rb") as f:
        try:
            data = _RestrictedUnpickler(f, encoding="latin1").load()
        except ForbiddenPickleContent as e:
            raise ValueError(f"refusing to load {path}: {e}") from None
        except Exception as e:  # truncated or not a pickle at all
            raise ValueError(f"cannot read {path} as a pickle: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        top = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not in detectron2 format: expected a dict with a 'model' dict "
                         f"of arrays, found {top}; convert the weights with tools/convert_to_d2.py")
    model = collections.OrderedDict()
    for k, v in data["model"].items():
        if not isinstance(k, str):
            raise ValueError(f"{path}: model key {k!r} is not a string")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = np.asarray(v)
        if not isinstance(v, (np.ndarray, np.generic)) or v.dtype.kind not in "biuf":
            raise ValueError(f"{path}: model['{k}'] is a {type(v).__name__}"
                             f"{' of ' + str(v.dtype) if hasattr(v, 'dtype') else ''}, not a "
                             "numeric array")
        model[k] = np.asarray(v)
    return model


def save_d2_file(model: Mapping[str, np.ndarray], path) -> None:
    """Write `{"model": model, "__author__": "cocord-transfer", "matching_heuristics": True}`
    to `path` atomically (temp file + rename: a failure never leaves a partial file)."""
    path = os.fspath(path)
    data = {"model": {k: np.asarray(v) for k, v in model.items()},
            "__author__": "cocord-transfer", "matching_heuristics": True}
    # protocol 4: readable by every Python 3 detectron2 install (5 would need PickleBuffer support)
    atomic_write(path, lambda f: pickle.dump(data, f, protocol=4))
