"""The CIFAR-100 model zoo of the distillation literature (CRD / RepDistiller's 22 networks).

Every model here has exactly the parameter names, shapes and order of the zoo the field's published
teachers were trained with, so a checkpoint `{'model': state_dict, ...}` of such a teacher loads
strictly (`model.load_state_dict(ckpt['model'])`). Architectures are for 32x32 inputs.

Names (CIFAR_MODELS): resnet8 resnet14 resnet20 resnet32 resnet44 resnet56 resnet110 (basic-block
ResNets, widths 16/16/32/64), resnet8x4 resnet32x4 (widths 32/64/128/256), ResNet50 (bottleneck,
64..2048), wrn_16_1 wrn_16_2 wrn_40_1 wrn_40_2 (pre-activation wide ResNets), vgg8 vgg11 vgg13 vgg16
vgg19 (with BatchNorm, no hidden fc layers), MobileNetV2 (expansion 6, width 0.5), ShuffleV1 (3
groups), ShuffleV2 (1x).

Feature contract, shared with the torchvision ResNets of distill/models.py
-------------------------------------------------------------------------
`forward_with_features(model, x, preact=False)` returns `(feats, logits)`:

  feats[0]      the stem output (after its ReLU; WRN's is a bare conv) [B, C0, H0, W0]
  feats[1:-1]   the output of each stage, shallow to deep             [B, Ci, Hi, Wi]
  feats[-1]     the pooled penultimate feature, the classifier input  [B, D]
  logits        classifier(feats[-1])                                 [B, num_classes]

ResNets, WRNs and ShuffleNets have 3 stages (5 entries; ResNet50 4 stages, 6 entries); VGGs list
their 5 conv blocks (6 entries) and MobileNetV2 the outputs of inverted-residual groups 2, 3, 5
and 7 (6 entries). With `preact=True` each stage entry is taken *before* the ReLU that ends it
(the sum of the residual branch and the shortcut, or the BatchNorm output that the next ReLU
reads); the stem and the pooled feature are unchanged. MobileNetV2 stages end without a ReLU, so
its preact list equals the plain one. A torchvision ResNet implements the same contract with
[stem after maxpool, layer1, layer2, layer3, layer4, pooled] and, for preact, the pre-ReLU sum of
each layer's last block.

Which entries the feature-based methods read (RepDistiller's choices): FitNet the hint layer
feats[2]; AT and VID every stage output feats[1:-1]; AB the preact stage outputs feats[1:-1]; SP
and FT the last feature map feats[-2]; CC, RKD, PKT and CRD the pooled feature feats[-1].
`distill.models.feature_shapes(model, image_size)` gives every entry's shape without side effects (one eval-mode
dummy pass); `classifier_in_features(model)` the pooled width D without any pass.

The classifier lives under the attribute the published state_dicts fix: `fc` (ResNets, WRNs),
`linear` (ResNet50, ShuffleNets) or `classifier` (VGGs; MobileNetV2, where it is
Sequential(Linear)). `classifier_name`, `classifier_layer` and `replace_classifier` hide that.

Where the reference computes a preact feature by running a BatchNorm a second time (WRN), we take
the value from the one pass instead: the same numbers, without updating that layer's running
statistics twice per step in training mode.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- weight initialisation (each family as the zoo initialises it) -----------------------------

def init_conv_bn(model):
    """Convs: He-normal with fan_out (std sqrt(2 / (k*k*out_channels))), bias 0; BN: weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_linear(model, weight_std=None):
    """Linear layers: bias 0; weight N(0, weight_std) when given, else PyTorch's default init."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            if weight_std is not None:
                nn.init.normal_(m.weight, 0.0, weight_std)
            nn.init.zeros_(m.bias)


def stage_features(x, stages, preact):
    """Run `stages` (Sequentials of blocks that return (out, preact)) from the stem output x.

    Returns ([x, then each stage's output, or its last block's preact value], final output)."""
    feats = [x]
    for stage in stages:
        pre = None
        for block in stage:
            x, pre = block(x)
        feats.append(pre if preact else x)
    return feats, x


def channel_shuffle(x, groups):
    """Interleave the channels of `groups` equal groups: [g0c0, g1c0, ..., g0c1, g1c1, ...]."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ZooModel(nn.Module):
    """Base of the zoo: forward(x) -> logits; subclasses implement forward_with_features.

    `classifier_attr` names the classifier attribute; `feature_dim` is the pooled feature width."""
    classifier_attr = "fc"

    def forward(self, x):
        return self.forward_with_features(x)[1]

    def forward_with_features(self, x, preact=False):
        raise NotImplementedError(f"{type(self).__name__} must define forward_with_features")

    def classify(self, pooled):
        return getattr(self, self.classifier_attr)(pooled)


# --- CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) ------------------------------

def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (1x1 conv + BN `downsample` when the shape changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact


class CifarResNet(ZooModel):
    """3x3 stem, three stages of `(depth - 2) / 6` basic blocks (strides 1, 2, 2), 8x8 average pool."""

    def __init__(self, depth, widths, num_classes):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            strides = [stride] + [1] * (blocks_per_stage - 1)
            stages.append(nn.Sequential(*[CifarBasicBlock(cin if i == 0 else cout, cout, s)
                                          for i, s in enumerate(strides)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AvgPool2d(8)
        self.feature_dim = widths[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_conv_bn(self)

    def forward_with_features(self, x, preact=False):
        stem = F.relu(self.bn1(self.conv1(x)))
        feats, x = stage_features(stem, (self.layer1, self.layer2, self.layer3), preact)
        pooled = torch.flatten(self.avgpool(x), 1)
        feats.append(pooled)
        return feats, self.classify(pooled)


# --- ResNet50 for CIFAR (bottleneck blocks, 3x3 stem without max-pool) -------------------------

class Bottleneck(nn.Module):
    """1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(x4)-BN, plus the input (projected by `shortcut` if needed)."""
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity; parameter-free, so absent from the state_dict
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        return F.relu(preact), preact


class BottleneckResNet(ZooModel):
    """3x3 stem (64), four bottleneck stages (planes 64/128/256/512, strides 1/2/2/2), global pool."""
    classifier_attr = "linear"

    def __init__(self, blocks_per_stage, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for planes, n, stride in zip((64, 128, 256, 512), blocks_per_stage, (1, 2, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(Bottleneck(cin, planes, s))
                cin = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.linear = nn.Linear(cin, num_classes)
        init_conv_bn(self)

    def forward_with_features(self, x, preact=False):
        stem = F.relu(self.bn1(self.conv1(x)))
        feats, x = stage_features(stem, (self.layer1, self.layer2, self.layer3, self.layer4), preact)
        pooled = torch.flatten(self.avgpool(x), 1)
        feats.append(pooled)
        return feats, self.classify(pooled)


# --- Wide ResNets (pre-activation blocks) ------------------------------------------------------

class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus the input.

    When the width changes (in the zoo, exactly the stride-2 blocks), the shortcut is a 1x1 conv
    (`convShortcut`) of the *activated* input; otherwise it is the raw input."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.convShortcut = None
        if cin != cout:
            self.convShortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward_normalized(self, x, x_bn):
        """The block given its input x and bn1(x) (computed by the caller, who may keep it)."""
        act = F.relu(x_bn)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))

    def forward(self, x):
        return self.forward_normalized(x, self.bn1(x))


class WideStage(nn.Module):
    """A stage of wide blocks; registered as `.layer` to match the published parameter names."""

    def __init__(self, num_blocks, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(num_blocks)])

    def forward(self, x):
        return self.layer(x)

    def forward_from_normalized(self, x, x_bn):
        """Run the stage when bn1 of its first block has already been applied to x (x_bn)."""
        x = self.layer[0].forward_normalized(x, x_bn)
        for block in self.layer[1:]:
            x = block(x)
        return x


class WideResNet(ZooModel):
    """WRN-depth-k: 3x3 stem (16), three stages of (depth - 4) / 6 blocks (16k/32k/64k, strides
    1/2/2), final BN-ReLU, 8x8 average pool. A stage's preact feature is its output after the
    BatchNorm that starts the next stage (or the final BN), before that BN's ReLU."""

    def __init__(self, depth, widen_factor, num_classes):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(3, widths[0])
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)
        init_linear(self)

    def forward_with_features(self, x, preact=False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f1_bn = self.block2.layer[0].bn1(f1)
        f2 = self.block2.forward_from_normalized(f1, f1_bn)
        f2_bn = self.block3.layer[0].bn1(f2)
        f3 = self.block3.forward_from_normalized(f2, f2_bn)
        f3_bn = self.bn1(f3)
        pooled = torch.flatten(F.avg_pool2d(F.relu(f3_bn), 8), 1)
        stages = [f1_bn, f2_bn, f3_bn] if preact else [f1, f2, f3]
        return [f0, *stages, pooled], self.classify(pooled)


# --- VGG with BatchNorm (five conv blocks, no hidden fc layers) --------------------------------

VGG_BLOCK_WIDTHS = {  # conv output widths of blocks 0..4
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def vgg_block(cin, widths):
    """[conv3x3(bias)-BN-ReLU] per width, without the last ReLU (the model applies it, keeping preact)."""
    layers = []
    for cout in widths:
        layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    """Five BN conv blocks with 2x2 max-pools between them and a global average pool.

    As in the zoo, the pool between blocks 3 and 4 is used only for 64-pixel inputs: at 32x32,
    blocks 3 and 4 both run at 4x4."""
    classifier_attr = "classifier"

    def __init__(self, block_widths, num_classes):
        super().__init__()
        cins = [3] + [w[-1] for w in block_widths[:-1]]
        self.block0, self.block1, self.block2, self.block3, self.block4 = [
            vgg_block(cin, widths) for cin, widths in zip(cins, block_widths)]
        self.pool0, self.pool1, self.pool2, self.pool3 = [nn.MaxPool2d(kernel_size=2, stride=2)
                                                          for _ in range(4)]
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = block_widths[-1][-1]
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        init_conv_bn(self)
        init_linear(self, weight_std=0.01)

    def forward_with_features(self, x, preact=False):
        pool_before_block4 = x.shape[2] == 64
        x = F.relu(self.block0(x))
        feats = [x]
        x = self.pool0(x)
        steps = ((self.block1, self.pool1), (self.block2, self.pool2),
                 (self.block3, self.pool3 if pool_before_block4 else None), (self.block4, None))
        for block, pool in steps:
            pre = block(x)
            x = F.relu(pre)
            feats.append(pre if preact else x)
            if pool is not None:
                x = pool(x)
        pooled = torch.flatten(self.pool4(x), 1)
        feats.append(pooled)
        return feats, self.classify(pooled)


# --- MobileNetV2 (the zoo's "mobile_half": expansion 6, width 0.5) -----------------------------

def conv_bn_relu(cin, cout, kernel_size, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise(stride)-BN-ReLU, 1x1 project-BN (linear); plus the input
    when stride is 1 and the width is unchanged. All in one Sequential named `conv`."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, width at multiplier 1, blocks, first stride) of the seven groups
MOBILENETV2_GROUPS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                      (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENETV2_FEATURE_GROUPS = (1, 2, 4, 6)  # groups whose outputs are the stage features


class MobileNetV2(ZooModel):
    """Stride-2 3x3 stem, seven inverted-residual groups, 1x1 conv to 1280, 2x2 average pool
    (ceil mode, sized for 32x32 inputs), Linear in a Sequential named `classifier`."""
    classifier_attr = "classifier"

    def __init__(self, width_mult, num_classes):
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, cin, 3, 2)
        groups = []
        for t, c, n, s in MOBILENETV2_GROUPS:
            cout = int(c * width_mult)
            blocks = []
            for stride in [s] + [1] * (n - 1):
                blocks.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        self.feature_dim = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(cin, self.feature_dim, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.feature_dim, num_classes))
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        init_conv_bn(self)
        init_linear(self, weight_std=0.01)

    def forward_with_features(self, x, preact=False):
        # No stage ends in a ReLU (the projection is linear): preact changes nothing.
        x = self.conv1(x)
        feats = [x]
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in MOBILENETV2_FEATURE_GROUPS:
                feats.append(x)
        pooled = torch.flatten(self.avgpool(self.conv2(x)), 1)
        feats.append(pooled)
        return feats, self.classify(pooled)


# --- ShuffleNet V1 (3 groups) ------------------------------------------------------------------

class ShuffleV1Block(nn.Module):
    """Grouped 1x1-BN-ReLU, channel shuffle, depthwise 3x3(stride)-BN-ReLU, grouped 1x1-BN; then
    added to the input (stride 1) or concatenated with its 3x3 average pool (stride 2)."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid = cout // 4
        self.first_groups = 1 if cin == 24 else groups  # the 24-channel stem output is not grouped
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, mid, kernel_size=1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact


class ShuffleNetV1(ZooModel):
    """1x1 stem (24), three stages (240/480/960 wide; 4/8/4 blocks, the first with stride 2),
    4x4 average pool."""
    classifier_attr = "linear"

    def __init__(self, widths, num_blocks, groups, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, cin = [], 24
        for cout, n in zip(widths, num_blocks):
            # the first block's branch makes cout - cin channels; the pooled input supplies the rest
            blocks = [ShuffleV1Block(cin, cout - cin, 2, groups)]
            blocks += [ShuffleV1Block(cout, cout, 1, groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = widths[-1]
        self.linear = nn.Linear(self.feature_dim, num_classes)

    def forward_with_features(self, x, preact=False):
        stem = F.relu(self.bn1(self.conv1(x)))
        feats, x = stage_features(stem, (self.layer1, self.layer2, self.layer3), preact)
        pooled = torch.flatten(F.avg_pool2d(x, 4), 1)
        feats.append(pooled)
        return feats, self.classify(pooled)


# --- ShuffleNet V2 (1x) ------------------------------------------------------------------------

class ShuffleV2Block(nn.Module):
    """Split channels in halves; the second half goes 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU;
    concatenate with the first half and shuffle (2 groups). The preact value is the concatenation
    before the ReLU, unshuffled."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, kernel_size=3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        c = x.shape[1] // 2
        kept, branch = x[:, :c], x[:, c:]
        branch = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(branch)))))
        branch = self.bn3(self.conv3(branch))
        out = channel_shuffle(torch.cat([kept, F.relu(branch)], 1), 2)
        return out, torch.cat([kept, branch], 1)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches, each giving half the output channels, concatenated and shuffled:
    left depthwise 3x3-BN, 1x1-BN-ReLU; right 1x1-BN-ReLU, depthwise 3x3-BN, 1x1-BN-ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, kernel_size=3, stride=2, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        out = channel_shuffle(torch.cat([left, right], 1), 2)
        return out, out  # only stage-final blocks report preact; this one never is


class ShuffleNetV2(ZooModel):
    """1x1 stem (24), three stages (one down block + 3/7/3 blocks; 116/232/464 wide), 1x1 conv to
    1024 with BN-ReLU, 4x4 average pool."""
    classifier_attr = "linear"

    def __init__(self, widths, num_blocks, last_width, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, cin = [], 24
        for cout, n in zip(widths, num_blocks):
            blocks = [ShuffleV2DownBlock(cin, cout)] + [ShuffleV2Block(cout) for _ in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(cin, last_width, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_width)
        self.feature_dim = last_width
        self.linear = nn.Linear(last_width, num_classes)

    def forward_with_features(self, x, preact=False):
        stem = F.relu(self.bn1(self.conv1(x)))
        feats, x = stage_features(stem, (self.layer1, self.layer2, self.layer3), preact)
        x = F.relu(self.bn2(self.conv2(x)))
        pooled = torch.flatten(F.avg_pool2d(x, 4), 1)
        feats.append(pooled)
        return feats, self.classify(pooled)


# --- the name -> builder table -----------------------------------------------------------------

RESNET_NARROW = (16, 16, 32, 64)
RESNET_WIDE = (32, 64, 128, 256)

CIFAR_MODELS = {
    "resnet8": lambda num_classes: CifarResNet(8, RESNET_NARROW, num_classes),
    "resnet14": lambda num_classes: CifarResNet(14, RESNET_NARROW, num_classes),
    "resnet20": lambda num_classes: CifarResNet(20, RESNET_NARROW, num_classes),
    "resnet32": lambda num_classes: CifarResNet(32, RESNET_NARROW, num_classes),
    "resnet44": lambda num_classes: CifarResNet(44, RESNET_NARROW, num_classes),
    "resnet56": lambda num_classes: CifarResNet(56, RESNET_NARROW, num_classes),
    "resnet110": lambda num_classes: CifarResNet(110, RESNET_NARROW, num_classes),
    "resnet8x4": lambda num_classes: CifarResNet(8, RESNET_WIDE, num_classes),
    "resnet32x4": lambda num_classes: CifarResNet(32, RESNET_WIDE, num_classes),
    "ResNet50": lambda num_classes: BottleneckResNet((3, 4, 6, 3), num_classes),
    "wrn_16_1": lambda num_classes: WideResNet(16, 1, num_classes),
    "wrn_16_2": lambda num_classes: WideResNet(16, 2, num_classes),
    "wrn_40_1": lambda num_classes: WideResNet(40, 1, num_classes),
    "wrn_40_2": lambda num_classes: WideResNet(40, 2, num_classes),
    "vgg8": lambda num_classes: VGG(VGG_BLOCK_WIDTHS["vgg8"], num_classes),
    "vgg11": lambda num_classes: VGG(VGG_BLOCK_WIDTHS["vgg11"], num_classes),
    "vgg13": lambda num_classes: VGG(VGG_BLOCK_WIDTHS["vgg13"], num_classes),
    "vgg16": lambda num_classes: VGG(VGG_BLOCK_WIDTHS["vgg16"], num_classes),
    "vgg19": lambda num_classes: VGG(VGG_BLOCK_WIDTHS["vgg19"], num_classes),
    "MobileNetV2": lambda num_classes: MobileNetV2(0.5, num_classes),
    "ShuffleV1": lambda num_classes: ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes),
    "ShuffleV2": lambda num_classes: ShuffleNetV2((116, 232, 464), (3, 7, 3), 1024, num_classes),
}


def build_cifar_model(name, num_classes=100):
    """A randomly initialised zoo model `name` with a `num_classes`-way classifier."""
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown CIFAR model '{name}'; choose one of {', '.join(CIFAR_MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return CIFAR_MODELS[name](num_classes)


# --- the model-independent interface the methods use -------------------------------------------

def forward_with_features(model, x, preact=False):
    """(feats, logits) of `model` on x; see the module docstring for what each entry is."""
    if not isinstance(model, ZooModel):
        raise TypeError(f"{type(model).__name__} is not a CIFAR zoo model; forward_with_features "
                        f"here serves the models of distill.cifar_models.CIFAR_MODELS")
    return model.forward_with_features(x, preact=preact)


def classifier_name(model):
    """Attribute holding the classifier: 'fc', 'linear' or 'classifier' (fixed by the state_dict keys);
    'fc' for any other model with an `fc` attribute (torchvision ResNets)."""
    if isinstance(model, ZooModel):
        return model.classifier_attr
    if hasattr(model, "fc"):
        return "fc"
    raise TypeError(f"{type(model).__name__} has no known classifier attribute (fc, linear, classifier)")


def classifier_layer(model):
    """The final nn.Linear (MobileNetV2 wraps it in a one-element Sequential)."""
    head = getattr(model, classifier_name(model))
    if isinstance(head, nn.Sequential) and len(head) == 1:
        head = head[0]
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__}.{classifier_name(model)} is {type(head).__name__}, "
                        f"not a Linear classifier (was it replaced?)")
    return head


def classifier_in_features(model):
    """Width of the pooled penultimate feature; works after replace_classifier(model, Identity())."""
    if isinstance(model, ZooModel):
        return model.feature_dim
    return classifier_layer(model).in_features


def num_classes_of(model):
    return classifier_layer(model).out_features


def replace_classifier(model, module):
    """Swap the classifier (e.g. for nn.Identity(), so forward returns the pooled feature)."""
    setattr(model, classifier_name(model), module)
    return model
