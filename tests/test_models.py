"""distill/models.py: both model families behind one interface (arch names, builders, feature widths,
one-pass features + logits, the feature list with and without preact, the classifier helpers)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models import (ALL_ARCHS, ARCHS, CIFAR_ARCHS, build_model, build_resnet, classifier_in_features,
                            classifier_name, feature_dim, feature_shapes, forward_features, forward_with_features,
                            num_classes_of, replace_classifier)

ZOO = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
       "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
       "MobileNetV2", "ShuffleV1", "ShuffleV2")


def test_archs_and_feature_dims():
    assert ARCHS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    assert CIFAR_ARCHS == ZOO and ALL_ARCHS == ARCHS + ZOO
    assert [feature_dim(a) for a in ARCHS] == [512, 512, 2048, 2048, 2048]
    # the zoo's pooled widths (RepDistiller's models): 256 for resnetNx4, 64 for resnet8..110, 1280 MobileNetV2
    assert [feature_dim(a) for a in ("resnet32x4", "resnet56", "vgg13", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                                     "wrn_40_2", "ResNet50")] == [256, 64, 512, 1280, 960, 1024, 128, 2048]
    for arch in ("resnet18", "resnet50"):
        m = build_resnet(arch, 7)
        assert m.fc.in_features == feature_dim(arch) and m.fc.out_features == 7


def test_build_model_covers_both_families():
    m = build_model("resnet18", 7)
    assert type(m).__name__ == "ResNet" and m.fc.out_features == 7
    for arch in ("vgg8", "MobileNetV2", "ShuffleV2", "resnet8"):
        m = build_model(arch, 9)
        assert num_classes_of(m) == 9 and classifier_in_features(m) == feature_dim(arch), arch


def test_unknown_arch_and_bad_classes():
    with pytest.raises(ValueError, match="resnet19.*resnet18, resnet34"):
        build_resnet("resnet19", 10)
    with pytest.raises(ValueError, match="'vgg16'.*resnet152"):
        build_resnet("vgg16", 10)  # a zoo name is not a torchvision ResNet
    with pytest.raises(ValueError, match="resnet19.*ShuffleV2"):
        build_model("resnet19", 10)
    with pytest.raises(ValueError, match="wrn_16_3"):
        feature_dim("wrn_16_3")
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="num_classes"):
            build_resnet("resnet18", bad)
        with pytest.raises(ValueError, match="num_classes"):
            build_model("vgg8", bad)


def test_forward_features_matches_model_forward():
    torch.manual_seed(0)
    m = build_resnet("resnet18", 5).eval()
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    m.fc.register_forward_hook(lambda mod, inp, out: captured.update(feat=inp[0]))
    with torch.no_grad():
        ref_logits = m(x)
        feat, logits = forward_features(m, x)
    assert feat.shape == (2, 512) and logits.shape == (2, 5)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(feat, captured["feat"])


def hooked_outputs(model, names, x):
    """Outputs of the named submodules during a plain model(x)."""
    out = {}
    handles = [getattr(model, n).register_forward_hook(lambda mod, i, o, n=n: out.update({n: o})) for n in names]
    with torch.no_grad():
        logits = model(x)
    for h in handles:
        h.remove()
    return out, logits


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_feature_list_and_preact(arch):
    torch.manual_seed(0)
    m = build_resnet(arch, 5).eval()
    x = torch.randn(2, 3, 64, 64)
    names = ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    ref, ref_logits = hooked_outputs(m, names, x)
    # pre-ReLU value of each layer's last block: the input of its last ReLU call (the ReLU is in place,
    # so a pre-hook clones it before the call); the last call of the block's relu is the final one
    pre = {}
    handles = [getattr(m, n)[-1].relu.register_forward_pre_hook(lambda mod, i, n=n: pre.update({n: i[0].clone()}))
               for n in names[1:5]]
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        feats, logits = forward_with_features(m, x)
        feats_pre, logits_pre = forward_with_features(m, x, preact=True)
    assert len(feats) == 6
    for f, n in zip(feats[:5], names[:5]):
        torch.testing.assert_close(f, ref[n])
    torch.testing.assert_close(feats[5], ref["avgpool"].flatten(1))
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(logits_pre, ref_logits)
    torch.testing.assert_close(feats_pre[0], feats[0])
    torch.testing.assert_close(feats_pre[5], feats[5])
    for f, n in zip(feats_pre[1:5], names[1:5]):
        assert (f < 0).any(), n  # really before the ReLU
        torch.testing.assert_close(f, pre[n])
        torch.testing.assert_close(F.relu(f), ref[n])
    c = 1 if arch == "resnet18" else 4
    assert feature_shapes(m, 64) == [(64, 16, 16), (64 * c, 16, 16), (128 * c, 8, 8), (256 * c, 4, 4),
                                     (512 * c, 2, 2), (512 * c,)]


def test_preact_needs_a_trailing_relu():
    m = build_resnet("resnet18", 5)
    m.layer2 = nn.Sequential(nn.Conv2d(64, 128, 1), nn.BatchNorm2d(128))
    with pytest.raises(TypeError, match="end in a ReLU"):
        forward_with_features(m, torch.randn(2, 3, 32, 32), preact=True)


def test_zoo_models_dispatch_and_feature_shapes_leave_no_trace():
    torch.manual_seed(0)
    m = build_model("resnet8x4", 10).train()
    x = torch.randn(2, 3, 32, 32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    shapes = feature_shapes(m, 32)
    assert shapes == [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    m.eval()
    with torch.no_grad():
        feat, logits = forward_features(m, x)
        torch.testing.assert_close(logits, m(x))
        torch.testing.assert_close(logits, m.fc(feat))
    with pytest.raises(ValueError, match="image_size"):
        feature_shapes(m, 0)


def test_classifier_helpers_on_both_families():
    tv = build_resnet("resnet18", 5)
    assert classifier_name(tv) == "fc" and classifier_in_features(tv) == 512 and num_classes_of(tv) == 5
    replace_classifier(tv, nn.Identity())
    x = torch.randn(2, 3, 32, 32)
    feat, out = forward_features(tv.eval(), x)
    torch.testing.assert_close(out, feat)
    assert not any(k.startswith("fc.") for k in tv.state_dict())
    for arch, name in (("vgg8", "classifier"), ("ShuffleV1", "linear"), ("MobileNetV2", "classifier")):
        m = build_model(arch, 3)
        assert classifier_name(m) == name
        replace_classifier(m, nn.Identity())
        feat, out = forward_features(m.eval(), x)
        assert out.shape == (2, feature_dim(arch)) and torch.equal(out, feat)
