"""The method interface (distill/methods): the METHODS table, flags, errors, supervised / KD losses, AMP.

Also home of `tiny_resnet`, a few-thousand-parameter network with torchvision's ResNet attribute
layout (conv1 ... layer4, avgpool, fc), so method tests run in milliseconds on a CPU.
"""
import argparse
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods import METHODS, MethodEntry, add_method_args, build_method, default_method_args
from distill.methods.base import Method
from distill.methods.base import kd_loss
from distill.models import forward_features


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
    return build_method(name, args, tiny_resnet(), teacher, len(LABELS), LABELS, image_size=16,
                        drives_init_stage=True).train()


FEATURE_METHODS = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft")
LOSS_TERMS = {"supervised": {"ce"}, "kd": {"ce", "kd"}, "crd": {"ce", "crd"}, "crd+kd": {"ce", "crd", "kd"},
              "cocord": {"ce", "contrast", "pred"}, "cocord+kd": {"ce", "contrast", "pred", "kd"},
              "fitnet": {"ce", "fitnet"}, "at": {"ce", "at"}, "sp": {"ce", "sp"}, "cc": {"ce", "cc"},
              "vid": {"ce", "vid"}, "rkd": {"ce", "rkd"}, "pkt": {"ce", "pkt"},
              "ab": {"ab"}, "ft": {"ft_rec"}}  # ab / ft start in their initialisation stage


def test_every_method_runs_under_one_interface():
    for name in METHODS:
        m = build(name)
        assert m.num_views == (3 if name.startswith("cocord") else 1)
        views = [X + 0.1 * i for i in range(m.num_views)]
        logits, losses = m(views, Y, IDX)
        assert logits.shape == (B, 5)
        assert set(losses) == LOSS_TERMS[name], name
        sum(losses.values()).backward()
        trained = m.stage_parameters() if name in ("ab", "ft") else list(m.student.parameters())
        assert all(p.grad is not None for p in trained), name
        assert m.slow_student_state_dict() is None or name.startswith("cocord")


def test_the_table_lists_every_method_once_and_drives_build_method():
    assert list(METHODS) == ["supervised", "kd", "crd", "crd+kd", "cocord", "cocord+kd", *FEATURE_METHODS]
    for name, entry in METHODS.items():
        assert issubclass(entry.cls, Method) and entry.description, name
        assert entry.needs_teacher == (name != "supervised"), name
        assert entry.kd_term == (name in ("kd", "crd+kd", "cocord+kd")), name
        assert type(build(name)) is entry.cls, name


class Doubled(Method):
    """A toy method for the test below: CE on the student's logits, times two."""

    def __init__(self, student, w_ce=2.0):
        super().__init__(student)
        self.w_ce = w_ce

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        return cls(student, w_ce=hp["w_ce"])

    def forward(self, views, target, index):
        _, logits = forward_features(self.student, views[0])
        return logits, {"ce": self.w_ce * F.cross_entropy(logits, target)}


def test_a_new_method_is_one_class_plus_one_table_row(monkeypatch):
    monkeypatch.setitem(METHODS, "doubled", MethodEntry(Doubled, False, False, "CE times two"))
    m = build_method("doubled", default_method_args(), tiny_resnet(), None, len(LABELS), LABELS)
    assert isinstance(m, Doubled) and m.hparams["w_ce"] == 2.0 and m.hparams["w_kd"] == 0.0  # its own defaults
    _, losses = m([X], Y, IDX)
    torch.testing.assert_close(losses["ce"], 2.0 * F.cross_entropy(m.student(X), Y))
    from distill import train_imagenet
    assert "doubled" in train_imagenet.build_parser().format_help()  # --method's help lists the table


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
    # (whether a teacher is given is checked once, on the command line: test_train_imagenet.test_bad_arguments)
    with pytest.raises(ValueError, match="unknown --method 'moco'.*cocord"):
        build_method("moco", default_method_args(), tiny_resnet(), tiny_resnet(), 12, LABELS)
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
    for name in [n for n in METHODS if METHODS[n].needs_teacher]:
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


def test_methods_reach_the_classifier_through_the_helpers_on_zoo_models():
    """CIFAR zoo students and teachers: classifiers named `classifier` (VGG, MobileNetV2) or `linear`
    (ShuffleNets), widths that differ; nothing may assume torchvision's `fc`."""
    from distill.models import build_model
    torch.manual_seed(0)
    student, teacher = build_model("vgg8", 5), build_model("ShuffleV1", 5)
    x = torch.randn(2, 3, 32, 32)
    args = default_method_args(queue_size=6, proj_dim=8, proj_hidden_dim=8, pred_dim=4, crd_nce_k=5)
    m = build_method("cocord", args, student, teacher, len(LABELS), LABELS).train()
    slow = m.slow_student_state_dict()
    assert list(slow) == [k for k in student.state_dict() if not k.startswith("classifier.")]
    assert m.proj_s[0].in_features == 512 and m.proj_t[0].in_features == 960 and not m.proj_t_is_ema
    m([x, x, x], Y[:2], IDX[:2])
    ema = m._ema_pairs()[0]
    assert len(ema[0]) == len(ema[1]) == len([n for n, _ in student.named_parameters()
                                              if not n.startswith("classifier.")]) + len(list(m.slow_proj.parameters()))
    m = build_method("crd", args, student, teacher, len(LABELS), LABELS)
    assert (m.embed_s.linear.in_features, m.embed_t.linear.in_features) == (512, 960)
    with pytest.raises(ValueError, match="teacher predicts 7 classes but the student 5"):
        build_method("kd", args, build_model("MobileNetV2", 5), build_model("ShuffleV2", 7), len(LABELS), LABELS)
