"""torchvision ResNets for the distillation stage: build (random init, never a download) and one pass
that returns both the pooled penultimate features and the logits.

Assumes the torchvision ResNet layout (conv1/bn1/relu/maxpool/layer1-4/avgpool/fc); `fc` may be
replaced by `nn.Identity()` (then the "logits" are the features), which is how the slow-moving
student of CoCoRD drops its classifier.
"""
import torch
import torchvision

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_FEATURE_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}


def _check_arch(arch):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; choose one of {', '.join(ARCHS)}")


def build_resnet(arch: str, num_classes: int) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet with a `num_classes`-way fc (weights=None: no download)."""
    _check_arch(arch)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def feature_dim(arch: str) -> int:
    """Width of the pooled penultimate features: 512 (ResNet-18/34) or 2048 (ResNet-50 and deeper)."""
    _check_arch(arch)
    return _FEATURE_DIM[arch]


def forward_features(model, x):
    """One pass: (feat [B,d] pooled penultimate features, logits [B,num_classes] = model.fc(feat))."""
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
