"""The student / teacher networks of the distillation stage, both families behind one interface.

Families:
  torchvision ResNets (ARCHS: resnet18 ... resnet152) for ImageNet-sized inputs, random init (never a
  download); layout conv1/bn1/relu/maxpool/layer1-4/avgpool/fc.
  the CIFAR zoo (CIFAR_ARCHS, distill/cifar_models.py: resnet8 ... ShuffleV2) for 32x32 inputs.
`build_model(arch, num_classes)` builds any name of ALL_ARCHS; `build_resnet` only the torchvision ones.

Feature interface (the contract is written out in distill/cifar_models.py's docstring):
  forward_features(model, x)                 -> (pooled [B, d], logits [B, C]), one pass
  forward_with_features(model, x, preact)    -> ([stem, stage 1, ..., stage n, pooled], logits)
  feature_shapes(model, image_size, preact)  -> the (C, H, W) / (d,) of every entry for a square input
For a torchvision ResNet the list is [maxpool output, layer1, layer2, layer3, layer4, pooled]; with
preact=True each layer entry is its last block's output before the final ReLU (the residual sum).
The classifier helpers (classifier_name, classifier_in_features, num_classes_of, replace_classifier)
work on both families; replacing the classifier by nn.Identity() makes the "logits" the pooled feature,
which is how CoCoRD's slow-moving student drops it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from distill.cifar_models import (CIFAR_MODELS, ZooModel, build_cifar_model, classifier_in_features,  # noqa: F401
                                  classifier_name, num_classes_of, replace_classifier)
from distill.cifar_models import forward_with_features as zoo_forward_with_features

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # torchvision (ImageNet trainer)
CIFAR_ARCHS = tuple(CIFAR_MODELS)                                          # the CIFAR-100 zoo
ALL_ARCHS = ARCHS + CIFAR_ARCHS
_FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


def _check_arch(arch, choices=ARCHS):
    if arch not in choices:
        raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(choices)}")


def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def build_resnet(arch: str, num_classes: int) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet with a `num_classes`-way fc (weights=None: no download)."""
    _check_arch(arch)
    _check_num_classes(num_classes)
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised network of either family: a torchvision ResNet or a CIFAR zoo model."""
    _check_arch(arch, ALL_ARCHS)
    if arch in ARCHS:
        return build_resnet(arch, num_classes)
    _check_num_classes(num_classes)
    return build_cifar_model(arch, num_classes)


def feature_dim(arch: str) -> int:
    """Width of the pooled penultimate features (512 for ResNet-18/34, 2048 for ResNet-50 and deeper;
    the zoo's from a meta-device build, which allocates nothing)."""
    _check_arch(arch, ALL_ARCHS)
    if arch in _FEATURE_DIM:
        return _FEATURE_DIM[arch]
    with torch.device("meta"):
        return build_cifar_model(arch, 1).feature_dim


def forward_features(model, x):
    """One pass: (feat [B,d] pooled penultimate features, logits [B,num_classes] = classifier(feat))."""
    if isinstance(model, ZooModel):
        feats, logits = model.forward_with_features(x)
        return feats[-1], logits
    x = model.conv1(x)
    x = model.bn1(x)
    x = model.relu(x)
    x = model.maxpool(x)
    x = model.layer1(x)
    x = model.layer2(x)
    x = model.layer3(x)
    x = model.layer4(x)                       # [B, d, H/32, W/32]
    feat = torch.flatten(model.avgpool(x), 1)  # [B, d]
    return feat, model.fc(feat)                # [B, d], [B, C]


def _block_preact(block, x):
    """A torchvision residual block's output before its final ReLU: the residual sum."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out)) + identity
    return block.bn2(block.conv2(out)) + identity


def _layer_preact(layer, x):
    """(pre-ReLU value, output) of a layer whose last step is a ReLU: a residual block, or a Sequential
    ending in one (nested Sequentials of them included)."""
    if isinstance(layer, (BasicBlock, Bottleneck)):
        pre = _block_preact(layer, x)
        return pre, F.relu(pre)  # not in place: `pre` is returned too
    if isinstance(layer, nn.Sequential) and len(layer) > 0:
        for module in list(layer)[:-1]:
            x = module(x)
        last = layer[-1]
        if isinstance(last, nn.ReLU):
            return x, F.relu(x)
        return _layer_preact(last, x)
    raise TypeError(f"preact features need layers that end in a ReLU or a torchvision residual block, "
                    f"got {type(layer).__name__}")


def forward_with_features(model, x, preact=False):
    """(feats, logits): [stem, stage outputs ..., pooled] and the classifier's output, for either family."""
    if isinstance(model, ZooModel):
        return zoo_forward_with_features(model, x, preact=preact)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    feats = [x]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        if preact:
            pre, x = _layer_preact(layer, x)
            feats.append(pre)
        else:
            x = layer(x)
            feats.append(x)
    pooled = torch.flatten(model.avgpool(x), 1)
    feats.append(pooled)
    return feats, model.fc(pooled)


@torch.no_grad()
def feature_shapes(model, image_size, preact=False):
    """Shapes (without the batch dim) of every feature entry for a square `image_size` input: one
    eval-mode pass on zeros, so running BN statistics and RNG streams are untouched; the model's
    train/eval mode is restored."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (the training crop), got {image_size!r}")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(2, 3, image_size, image_size, device=param.device, dtype=param.dtype)
        feats, _ = forward_with_features(model, x, preact=preact)
    finally:
        model.train(was_training)
    return [tuple(f.shape[1:]) for f in feats]
