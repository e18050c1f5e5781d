"""distill/models.py: arch checks, feature widths, one-pass features + logits."""
import pytest
import torch

from distill.models import ARCHS, build_resnet, feature_dim, forward_features


def test_archs_and_feature_dims():
    assert ARCHS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    assert [feature_dim(a) for a in ARCHS] == [512, 512, 2048, 2048, 2048]
    for arch in ("resnet18", "resnet50"):
        m = build_resnet(arch, 7)
        assert m.fc.in_features == feature_dim(arch) and m.fc.out_features == 7


def test_unknown_arch_and_bad_classes():
    with pytest.raises(ValueError, match="resnet19.*resnet18, resnet34"):
        build_resnet("resnet19", 10)
    with pytest.raises(ValueError, match="vgg16"):
        feature_dim("vgg16")
    with pytest.raises(ValueError, match="num_classes"):
        build_resnet("resnet18", 0)


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
