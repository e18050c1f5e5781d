"""The torchvision engine's ResNet trunk, and loading detectron2-format weights into it.

The trunk is a plain torchvision ResNet (stride on the 3x3 conv, i.e. detectron2's
STRIDE_IN_1X1=False) with the classifier removed; stages are named as detectron2 names them:
stem = conv1+bn1+relu+maxpool, res2..res5 = layer1..layer4. Weights come only from a detectron2
`.pkl` (see transfer/d2_format.py); a weights file that misses any backbone tensor is an error,
never a silent random init. `MODEL.WEIGHTS ""` (weights=None here) is the only way to train from
scratch.
"""
import collections
import logging
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from fvcore.nn.distributed import differentiable_all_reduce
from torchvision.ops import FrozenBatchNorm2d

from transfer.config import C4_HEADS
from transfer.d2_format import RESNET_SPECS, OPTIONAL_SUFFIX, d2_to_torchvision, split_d2_backbone

NORMS = ("BN", "SyncBN", "naiveSyncBN", "FrozenBN")
STAGES = ("res2", "res3", "res4", "res5")

logger = logging.getLogger(__name__)


class NaiveSyncBatchNorm2d(nn.BatchNorm2d):
    """detectron2's NaiveSyncBatchNorm (stats_mode "", MODEL.RESNETS.NORM "naiveSyncBN", MoCo's choice).

    Training with several processes: each process takes the mean and the mean of squares of its own
    batch over (N, H, W); both are all-reduced and divided by the world size, so every process gets
    the same statistics with EQUAL weight per process whatever its batch size or image size:
        mean = (1/W) sum_r mean_r,  var = (1/W) sum_r meansq_r - mean^2   (biased)
    The all-reduce is differentiable (gradients are summed over processes). Running statistics move
    by `momentum` towards (mean, var) — the biased variance, unlike BatchNorm2d's unbiased one — and
    num_batches_tracked stays put, as in detectron2. One process, or eval mode: plain BatchNorm2d.
    Half-precision inputs are reduced in float32 and the output is cast back.
    """

    def forward(self, x):
        if not self.training or not dist.is_available() or not dist.is_initialized() \
                or dist.get_world_size() == 1:
            return super().forward(x)
        if x.shape[0] == 0:
            raise ValueError("naiveSyncBN got an empty batch on this process; detectron2's equal-weight "
                             "mode cannot average it (use BN or SyncBN)")
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        channels = x.shape[1]
        stats = torch.cat([x.mean(dim=[0, 2, 3]), (x * x).mean(dim=[0, 2, 3])])
        stats = differentiable_all_reduce(stats) * (1.0 / dist.get_world_size())
        mean, meansq = torch.split(stats, channels)
        var = meansq - mean * mean
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        with torch.no_grad():
            self.running_mean += self.momentum * (mean.detach() - self.running_mean)
            self.running_var += self.momentum * (var.detach() - self.running_var)
        out = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        return out.to(dtype)


def norm_layer(norm: str):
    if norm == "BN":
        return nn.BatchNorm2d
    if norm == "SyncBN":
        return nn.SyncBatchNorm
    if norm == "naiveSyncBN":
        return NaiveSyncBatchNorm2d
    if norm == "FrozenBN":
        return FrozenBatchNorm2d  # eps 1e-5, as detectron2's FrozenBatchNorm2d
    raise ValueError(f"unsupported norm '{norm}' for the ResNet trunk (MODEL.RESNETS.NORM); "
                     f"choices: {NORMS}")


def build_resnet_trunk(depth: int, norm: str = "BN") -> torchvision.models.ResNet:
    """A randomly initialised torchvision resnet{depth} without its classifier (`fc` = Identity,
    so `state_dict()` holds backbone tensors only). No downloads."""
    if depth not in RESNET_SPECS:
        raise ValueError(f"unsupported ResNet depth {depth} (MODEL.RESNETS.DEPTH); choices: "
                         f"{sorted(RESNET_SPECS)}")
    trunk = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer(norm))
    trunk.fc = nn.Identity()
    return trunk


def trunk_depth(trunk: torchvision.models.ResNet) -> int:
    """Depth of a torchvision ResNet from its block layout."""
    kind = "bottleneck" if isinstance(trunk.layer1[0], torchvision.models.resnet.Bottleneck) \
        else "basic"
    counts = tuple(len(getattr(trunk, f"layer{i}")) for i in range(1, 5))
    for depth, spec in RESNET_SPECS.items():
        if spec == (kind, counts):
            return depth
    raise ValueError(f"the trunk ({kind} blocks {counts}) is no standard ResNet")


def trunk_features(trunk: torchvision.models.ResNet, x: torch.Tensor,
                   out_features: Sequence[str] = STAGES) -> "collections.OrderedDict":
    """Stage outputs {res2: [B,C2,H/4,W/4], ..., res5: [B,C5,H/32,W/32]} for normalised input x."""
    out = collections.OrderedDict()
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))  # stem, stride 4
    for name, layer in zip(STAGES, (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        x = layer(x)
        if name in out_features:
            out[name] = x
        if len(out) == len(out_features):
            break
    return out


def _emit(log: Union[None, logging.Logger, Callable[[str], None]], msg: str):
    if log is None:
        logger.info(msg)
    elif hasattr(log, "info"):
        log.info(msg)
    else:
        log(msg)


def load_trunk_weights(trunk: torchvision.models.ResNet, d2_model: Mapping[str, object],
                       log: Union[None, logging.Logger, Callable[[str], None]] = None) -> dict:
    """Load detectron2-format weights (`load_d2_file`'s dict, or a full detectron2 model state
    dict) into `trunk`.

    Raises ValueError naming every missing backbone key, every shape mismatch and every backbone
    tensor that does not fit this depth. Non-backbone keys (FPN, RPN, box head, ...) are ignored
    and reported through `log` (a Logger, a callable taking a string, or None for this module's
    logger). Returns {"loaded": [torchvision keys], "ignored": [file keys]}.
    """
    depth = trunk_depth(trunk)
    _, _, ignored = split_d2_backbone(d2_model)
    tv = d2_to_torchvision(d2_model, depth)  # raises on missing / shape / extra
    own = trunk.state_dict()
    missing = [k for k in own if k not in tv and not k.endswith(OPTIONAL_SUFFIX)]
    if missing:  # only reachable if the trunk itself is not torchvision's layout
        raise ValueError(f"backbone keys missing from the weights: {', '.join(missing)}")
    # FrozenBN has no num_batches_tracked: keep only what the trunk holds.
    to_load = {k: v for k, v in tv.items() if k in own}
    result = trunk.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    not_loaded = [k for k in result.missing_keys if not k.endswith(OPTIONAL_SUFFIX)]
    if not_loaded:
        raise ValueError(f"backbone keys missing from the weights: {', '.join(not_loaded)}")
    _emit(log, f"loaded {len(to_load)} ResNet-{depth} backbone tensors"
               + (f"; ignored {len(ignored)} non-backbone key(s): "
                  + ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else "")
                  if ignored else ""))
    return {"loaded": sorted(to_load), "ignored": ignored}


def freeze_stages(trunk: torchvision.models.ResNet, freeze_at: int) -> torchvision.models.ResNet:
    """detectron2's MODEL.BACKBONE.FREEZE_AT: 0 = nothing, 1 = stem, k>=2 = stem and res2..res{k}.

    Frozen stages get requires_grad=False and their BatchNorms become FrozenBatchNorm2d (as
    detectron2's `freeze()` does), so their statistics stay fixed in train mode too.
    """
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"MODEL.BACKBONE.FREEZE_AT must be in 0..5, got {freeze_at}")
    modules = []
    if freeze_at >= 1:
        modules += [("conv1", trunk.conv1), ("bn1", trunk.bn1)]
    modules += [(f"layer{i}", getattr(trunk, f"layer{i}")) for i in range(1, freeze_at)]
    for name, m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
        setattr(trunk, name, _to_frozen_bn(m))
    return trunk


def _to_frozen_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = _to_frozen_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


def check_arch_for_meta(depth: int, roi_head: str, res2_out_channels: Optional[int] = None,
                        stride_in_1x1: Optional[bool] = None) -> None:
    """Refuse backbone/detector combinations that cannot use torchvision ResNet weights.

    `roi_head` is MODEL.ROI_HEADS.NAME. ResNet-18/34 have basic blocks, but the C4 heads build a
    bottleneck res5, so they need an FPN config. For detectron2-built models,
    `res2_out_channels` (MODEL.RESNETS.RES2_OUT_CHANNELS) must match the depth and
    `stride_in_1x1` (MODEL.RESNETS.STRIDE_IN_1X1) must be False for torchvision weights.
    """
    if depth not in RESNET_SPECS:
        raise ValueError(f"MODEL.RESNETS.DEPTH {depth} is not supported; choices: "
                         f"{sorted(RESNET_SPECS)}")
    if depth in (18, 34) and roi_head in C4_HEADS:
        raise ValueError(
            f"ResNet-{depth} has basic blocks, but MODEL.ROI_HEADS.NAME {roi_head} (a C4 config) "
            "builds a bottleneck res5 head that its weights cannot fill; use an FPN config for "
            "ResNet-18/34 instead, e.g. configs/voc_r18_fpn.yaml (MODEL.BACKBONE.NAME "
            "build_resnet_fpn_backbone, MODEL.ROI_HEADS.NAME StandardROIHeads)")
    if res2_out_channels is not None:
        want = 64 if depth in (18, 34) else 256
        if res2_out_channels != want:
            raise ValueError(f"MODEL.RESNETS.RES2_OUT_CHANNELS is {res2_out_channels}, but a "
                             f"torchvision ResNet-{depth} has {want}; set it to {want}")
    if stride_in_1x1 is not None and stride_in_1x1 and depth >= 50:
        raise ValueError("MODEL.RESNETS.STRIDE_IN_1X1 is True, but torchvision ResNets stride in "
                         "the 3x3 conv; set MODEL.RESNETS.STRIDE_IN_1X1 False for these weights")
