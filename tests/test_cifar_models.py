"""The CIFAR-100 model zoo against RepDistiller's reference (../shared/reference), plus the feature
and classifier interface the distillation methods use."""
import io
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from conftest import shared_path
from distill.cifar_models import (CIFAR_MODELS, build_cifar_model, classifier_in_features, classifier_layer,
                                  classifier_name, forward_with_features, num_classes_of, replace_classifier)
from distill.models import feature_shapes

REFERENCE = ("reference", "repdistiller_cifar_models.json")
ZOO_NAMES = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
             "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11",
             "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2"]


@pytest.fixture(scope="module")
def reference():
    with open(shared_path(*REFERENCE)) as f:
        return json.load(f)


def randomize_buffers_and_affine(model, gen):
    """Make BN statistics / affine terms non-default so that a reload is visible in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.num_batches_tracked.fill_(1234)


def test_table_lists_exactly_the_reference_names(reference):
    assert list(CIFAR_MODELS) == ZOO_NAMES
    assert sorted(reference) == sorted(ZOO_NAMES)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_model_matches_reference(name, reference):
    """state_dict keys/shapes/order, parameter count, feature and logit shapes (preact False and
    True) at 32x32 in eval mode, and a published-teacher-shaped checkpoint reloaded strictly."""
    ref = reference[name]
    gen = torch.Generator().manual_seed(0)
    model = build_cifar_model(name).eval()
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert classifier_in_features(model) == ref["feat_shapes"][-1][0]
    assert num_classes_of(model) == 100

    randomize_buffers_and_affine(model, gen)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        for preact, key in ((False, "feat_shapes"), (True, "preact_feat_shapes")):
            feats, logits = forward_with_features(model, x, preact=preact)
            assert [list(f.shape) for f in feats] == [[2] + s for s in ref[key]]
            assert list(logits.shape) == [2] + ref["logit_shape"]
        plain_logits = model(x)
    assert torch.equal(plain_logits, logits)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "epoch": 240, "accuracy": 71.5,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005}]}}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    fresh = build_cifar_model(name).eval()
    fresh.load_state_dict(ckpt["model"], strict=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(fresh(x), plain_logits)


def test_preact_features_are_the_values_before_the_stage_relu():
    """Stage entries: relu(preact) is the plain feature (ShuffleV2 shuffles its output after the
    ReLU, MobileNetV2 has no ReLU there); stem and pooled entries are the same in both lists."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)

    def shuffle2(t):  # 2-group channel shuffle: [a0, a1, ..., b0, b1, ...] -> [a0, b0, a1, b1, ...]
        n, c, h, w = t.shape
        return torch.stack([t[:, :c // 2], t[:, c // 2:]], dim=2).reshape(n, c, h, w)

    for name in ("resnet8", "vgg8", "ShuffleV1", "ShuffleV2", "MobileNetV2"):
        model = build_cifar_model(name).eval()
        randomize_buffers_and_affine(model, torch.Generator().manual_seed(1))
        with torch.no_grad():
            plain, _ = forward_with_features(model, x)
            pre, _ = forward_with_features(model, x, preact=True)
        assert torch.equal(plain[0], pre[0]) and torch.equal(plain[-1], pre[-1]), name
        for p, q in zip(plain[1:-1], pre[1:-1]):
            if name == "MobileNetV2":
                assert torch.equal(p, q)
            else:
                assert (q < 0).any(), name  # really taken before a ReLU
                expected = shuffle2(F.relu(q)) if name == "ShuffleV2" else F.relu(q)
                assert torch.equal(p, expected), name


def test_wrn_preact_is_the_next_batchnorm_output_computed_once():
    torch.manual_seed(0)
    model = build_cifar_model("wrn_16_2").eval()
    randomize_buffers_and_affine(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain, _ = forward_with_features(model, x)
        pre, _ = forward_with_features(model, x, preact=True)
        assert torch.allclose(pre[1], model.block2.layer[0].bn1(plain[1]))
        assert torch.allclose(pre[2], model.block3.layer[0].bn1(plain[2]))
        assert torch.allclose(pre[3], model.bn1(plain[3]))
    model.train()
    before = model.block2.layer[0].bn1.num_batches_tracked.item()
    forward_with_features(model, x, preact=True)
    assert model.block2.layer[0].bn1.num_batches_tracked.item() == before + 1  # one BN update per step


def test_feature_shapes_without_side_effects():
    model = build_cifar_model("resnet8x4").train()
    stats = model.bn1.running_mean.clone()
    shapes = feature_shapes(model, 32)
    assert shapes == [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
    assert num_classes_of(model) == 100
    assert [s[0] for s in shapes] == [32, 64, 128, 256, 256]
    assert model.training and torch.equal(model.bn1.running_mean, stats)
    # VGG uses its fourth max-pool only for 64-pixel inputs, as the reference zoo does
    assert feature_shapes(build_cifar_model("vgg8"), image_size=64) == [
        (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 4, 4), (512,)]


def test_classifier_helpers():
    expected = {"resnet8": "fc", "wrn_16_1": "fc", "ResNet50": "linear", "ShuffleV1": "linear",
                "ShuffleV2": "linear", "vgg8": "classifier", "MobileNetV2": "classifier"}
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for name, attr in expected.items():
        model = build_cifar_model(name, num_classes=10).eval()
        assert classifier_name(model) == attr
        head = classifier_layer(model)
        assert isinstance(head, nn.Linear) and head.out_features == 10 == num_classes_of(model)
        width = head.in_features
        with torch.no_grad():
            pooled = forward_with_features(model, x)[0][-1]
            replace_classifier(model, nn.Identity())
            assert torch.equal(model(x), pooled)  # without a classifier, forward gives the pooled feature
        assert classifier_in_features(model) == width
        assert not any(k.startswith(attr + ".") for k in model.state_dict())
    tv = torchvision.models.resnet18(weights=None, num_classes=7)
    assert classifier_name(tv) == "fc" and classifier_in_features(tv) == 512 and num_classes_of(tv) == 7
    with pytest.raises(TypeError, match="not a CIFAR zoo model"):
        forward_with_features(tv, x)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown CIFAR model 'resnet18'.*resnet8, resnet14.*ShuffleV2"):
        build_cifar_model("resnet18")
    for bad in (0, -3, 2.5, "100", True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            build_cifar_model("resnet8", num_classes=bad)


def test_family_initialisations():
    """He-normal (fan_out) convs everywhere; VGG and MobileNetV2 classifiers N(0, 0.01) with zero
    bias; WRN classifier bias zero; BatchNorm weight 1, bias 0."""
    torch.manual_seed(0)
    resnet = build_cifar_model("resnet56")
    conv = resnet.layer3[0].conv2.weight  # 64 x 64 x 3 x 3
    assert abs(conv.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.05
    assert torch.equal(resnet.bn1.weight, torch.ones(16)) and torch.equal(resnet.bn1.bias, torch.zeros(16))
    for name in ("vgg13", "MobileNetV2"):
        head = classifier_layer(build_cifar_model(name))
        assert abs(head.weight.std().item() / 0.01 - 1) < 0.05
        assert torch.equal(head.bias, torch.zeros(100))
    wrn = build_cifar_model("wrn_40_2")
    assert torch.equal(wrn.fc.bias, torch.zeros(100))
    assert abs(wrn.block3.layer[1].conv1.weight.std().item() / math.sqrt(2 / (128 * 9)) - 1) < 0.05
