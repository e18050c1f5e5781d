"""The method interface (distill/methods): registry, flags, errors, supervised / KD losses, AMP.

Also home of `tiny_resnet`, a few-thousand-parameter network with torchvision's ResNet attribute
layout (conv1 ... layer4, avgpool, fc), so method tests run in milliseconds on a CPU.
"""
import argparse
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods import METHODS, add_method_args, build_method, default_method_args
from distill.methods.base import kd_loss


class TinyResNet(nn.Module):
    """torchvision-ResNet-shaped toy: same attribute names and forward, widths of our choosing."""

    def __init__(self, width=8, num_classes=5):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1, self.layer2 = block(4, 4), block(4, width)
        self.layer3, self.layer4 = block(width, width), block(width, width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_resnet(width=8, num_classes=5, seed=0):
    torch.manual_seed(seed)
    return TinyResNet(width, num_classes)


B = 4
X = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(3))
Y = torch.tensor([0, 1, 2, 4])
IDX = torch.tensor([3, 0, 7, 9])
LABELS = torch.arange(12) % 5  # 12 training samples, 5 classes


def build(name, **flags):
    teacher = None if name == "supervised" else tiny_resnet(12, seed=1)
    args = default_method_args(queue_size=6, crd_nce_k=5, proj_dim=8, proj_hidden_dim=8, pred_dim=4, **flags)
    return build_method(name, args, tiny_resnet(), teacher, len(LABELS), LABELS).train()


def test_every_method_runs_under_one_interface():
    for name in METHODS:
        m = build(name)
        assert m.num_views == (3 if name.startswith("cocord") else 1)
        views = [X + 0.1 * i for i in range(m.num_views)]
        logits, losses = m(views, Y, IDX)
        assert logits.shape == (B, 5)
        expected = {"supervised": {"ce"}, "kd": {"ce", "kd"}, "crd": {"ce", "crd"}, "crd+kd": {"ce", "crd", "kd"},
                    "cocord": {"ce", "contrast", "pred"}, "cocord+kd": {"ce", "contrast", "pred", "kd"}}[name]
        assert set(losses) == expected, name
        sum(losses.values()).backward()
        assert all(p.grad is not None for p in m.student.parameters()), name
        assert m.slow_student_state_dict() is None or name.startswith("cocord")


def test_flags_defaults_and_method_weight_defaults():
    p = add_method_args(argparse.ArgumentParser())
    a = p.parse_args(["--tau", "0.2", "--queue-size", "2048", "--w-kd", "3"])
    assert (a.tau, a.queue_size, a.w_kd, a.kd_T, a.w_pred, a.crd_nce_k, a.crd_nce_t) == (0.2, 2048, 3.0, 4.0, 4.0,
                                                                                          16384, 0.07)
    d = default_method_args()
    assert (d.queue_size, d.proj_dim, d.pred_dim, d.teacher_head_momentum, d.slow_momentum, d.crd_momentum,
            d.w_crd, d.crd_feat_dim) == (16384, 2048, 512, 0.999, 0.9, 0.5, 0.8, 128)
    assert build("kd").hparams["w_ce"] == 0.1 and build("kd").hparams["w_kd"] == 0.9
    assert build("crd+kd").hparams["w_kd"] == 1.0 and build("cocord").hparams["w_ce"] == 1.0
    assert build("kd", w_ce=0.7).hparams["w_ce"] == 0.7


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="unknown --method 'moco'.*cocord"):
        build_method("moco", default_method_args(), tiny_resnet(), tiny_resnet(), 12, LABELS)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_method("kd", default_method_args(), tiny_resnet(), None, 12, LABELS)
    with pytest.raises(ValueError, match="without a teacher"):
        build_method("supervised", default_method_args(), tiny_resnet(), tiny_resnet(), 12, LABELS)
    with pytest.raises(ValueError, match="--tau = -1.0"):
        build("cocord", tau=-1.0)
    with pytest.raises(ValueError, match="--slow-momentum"):
        build("cocord", slow_momentum=1.0)
    with pytest.raises(ValueError, match="--w-kd"):
        build("cocord+kd", w_kd=0.0)
    with pytest.raises(ValueError, match="teacher predicts 7 classes but the student 5"):
        build_method("kd", default_method_args(), tiny_resnet(), tiny_resnet(num_classes=7), 12, LABELS)
    with pytest.raises(ValueError, match="12 training samples"):
        build_method("crd", default_method_args(), tiny_resnet(), tiny_resnet(), 12, LABELS[:5])
    with pytest.raises(ValueError, match="1 view"):
        build("kd")([X, X], Y, IDX)
    with pytest.raises(AttributeError, match="no method flag named 'tua'"):
        default_method_args(tua=1)


def test_supervised_and_kd_losses_match_independent_computation():
    m = build("supervised", w_ce=0.3)
    ref = copy.deepcopy(m.student)
    logits, losses = m([X], Y, IDX)
    want = -torch.log_softmax(ref(X), 1)[torch.arange(B), Y].mean() * 0.3
    torch.testing.assert_close(losses["ce"], want)

    m = build("kd", w_ce=0.25, w_kd=2.0, kd_T=3.0)
    ref_s, ref_t = copy.deepcopy(m.student), copy.deepcopy(m.teacher)
    logits, losses = m([X], Y, IDX)
    s, t = ref_s(X) / 3.0, ref_t(X).detach() / 3.0
    pt = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
    kl = (pt * (torch.log(pt) - (s - torch.logsumexp(s, 1, keepdim=True)))).sum(1).mean()
    torch.testing.assert_close(losses["kd"], 2.0 * 9.0 * kl)
    torch.testing.assert_close(losses["ce"], 0.25 * F.cross_entropy(ref_s(X), Y))
    torch.testing.assert_close(kd_loss(s * 3, t * 3, 3.0), 9.0 * kl)


def test_teacher_eval_no_grad_for_every_teacher_method():
    for name in METHODS[1:]:
        m = build(name)
        before = copy.deepcopy(m.teacher.state_dict())
        m.train()
        assert not m.teacher.training
        assert not any(k.startswith("teacher.") for k in m.state_dict())
        _, losses = m([X + 0.1 * i for i in range(m.num_views)], Y, IDX)
        sum(losses.values()).backward()
        assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
        assert all(torch.equal(v, before[k]) for k, v in m.teacher.state_dict().items()), name


def test_to_moves_the_unregistered_teacher():
    m = build("cocord").to(torch.float64)
    assert next(m.teacher.parameters()).dtype == torch.float64
    with torch.no_grad():
        m.student.conv1.weight.add_(1.0)
    slow_before = m.slow.conv1.weight.clone()
    m([X.double()] * 3, Y, IDX)  # EMA pairs follow the converted parameters
    torch.testing.assert_close(m.slow.conv1.weight, slow_before + 0.1)
    assert m.queue.dtype == torch.float64


@pytest.mark.parametrize("name", ["kd", "crd+kd", "cocord+kd"])
def test_amp_bf16_losses_are_fp32_and_finite(name):
    m = build(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = m([X + 0.1 * i for i in range(m.num_views)], Y, IDX)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()


def test_benchmark_prints_ratios_and_imagenet_memory(capsys):
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("benchmark_distill", REPO / "tools" / "benchmark_distill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["-a", "resnet18", "--teacher-arch", "resnet18", "-b", "2", "--image-size", "32", "--iters", "1",
                    "--warmup", "0", "--num-classes", "10", "--device", "cpu", "--threads", "1",
                    "--queue-size", "1024", "--proj-dim", "256", "--proj-hidden-dim", "256", "--pred-dim", "64"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for row in ("supervised step", "KD step", "CoCoRD step", "unavoidable passes alone", "bookkeeping (cpu)"):
        assert row in out, out
    # from the real buffers: 1024 x 256 fp32 queue = 1 MiB; CRD's default 2 x 1,281,167 x 128 fp32 banks
    assert "CoCoRD queue 1.0 MiB" in out and "CRD banks 1251.1 MiB" in out and "= 1251.1x" in out, out
