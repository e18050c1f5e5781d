"""The nine feature-based baseline losses (distill/methods/{fitnet,at,sp,cc,vid,rkd,pkt,ab,ft}.py).

Each loss is checked against a straight-line computation written here from RepDistiller's formulas
(distiller_zoo/*.py, models/util.py), values worked out by hand for AT, SP, RKD and PKT, gradients reaching
only the student side, cross-family shape adaptation, and fp32 losses under bf16 autocast.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.ab import ABLoss
from distill.methods.at import AttentionLoss
from distill.methods.cc import CorrelationLoss
from distill.methods.feature_adapters import ConvReg
from distill.methods.fitnet import HintLoss
from distill.methods.ft import FactorTransferLoss
from distill.methods.pkt import PKTLoss
from distill.methods.rkd import RKDLoss
from distill.methods.sp import SimilarityLoss
from distill.methods.vid import VIDLoss


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pool2(x):
    """2x2 average pooling, by hand."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).mean(dim=(3, 5))


def batch_norm_train(y, bn):
    """BatchNorm2d in train mode, by hand: batch statistics, biased variance."""
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def leaky(y):
    return torch.where(y > 0, y, 0.1 * y)


# --- values worked out by hand -------------------------------------------------------------------------

def test_at_hand_value():
    # 2 samples, 2 channels, 2x2 maps; attention map = channel mean of f^2, flattened, L2-normalised.
    # student s0: both channels [[1,0],[0,0]] -> [1,0,0,0];  s1: ch0 [[0,1],[0,0]], ch1 0 -> [0,.5,0,0] -> [0,1,0,0]
    # teacher t0: both channels all ones -> [1,1,1,1] -> [.5,.5,.5,.5];  t1: ch0 [[0,2],[0,0]] -> [0,1,0,0]
    # squared differences: s0 (.5^2) * 4 = 1, s1 0; mean over 2 * 4 entries = 1 / 8
    s = torch.tensor([[[[1., 0], [0, 0]], [[1, 0], [0, 0]]],
                      [[[0., 1], [0, 0]], [[0, 0], [0, 0]]]])
    t = torch.tensor([[[[1., 1], [1, 1]], [[1, 1], [1, 1]]],
                      [[[0., 2], [0, 0]], [[0, 0], [0, 0]]]])
    assert AttentionLoss()([s], [t]).item() == pytest.approx(0.125, abs=1e-7)
    # two layers: the sum over layers
    assert AttentionLoss()([s, s], [t, t]).item() == pytest.approx(0.25, abs=1e-7)


def test_sp_hand_value():
    # flattened student s0 = e1, s1 = e1 + e2 -> Gram [[1,1],[1,2]] -> rows [1,1]/sqrt2, [1,2]/sqrt5
    # flattened teacher t0 = e1, t1 = e2 (scaled by 3: row normalisation removes it) -> Gram rows I
    # sum of squared differences: (1 - 1/sqrt2)^2 + 1/2 + 1/5 + (1 - 2/sqrt5)^2 = 4 - sqrt2 - 4/sqrt5
    # divided by B^2 = 4: 1 - sqrt2/4 - 1/sqrt5 = 0.19923302...
    s = torch.zeros(2, 2, 2, 2)
    s[0, 0, 0, 0] = 1
    s[1, 0, 0, 0] = s[1, 0, 0, 1] = 1
    t = torch.zeros(2, 2, 2, 2)
    t[0, 0, 0, 0] = 3
    t[1, 0, 0, 1] = 3
    want = 1 - math.sqrt(2) / 4 - 1 / math.sqrt(5)
    assert SimilarityLoss()(s, t).item() == pytest.approx(want, abs=1e-7)


def test_rkd_hand_value():
    # student points (0,0), (3,0), (0,4): distances d01 = 3, d02 = 4, d12 = 5, mean 4 -> 3/4, 1, 5/4
    # teacher points (0,0), (1,0), (2,0): distances 1, 2, 1, mean 4/3        -> 3/4, 3/2, 3/4
    # differences 0, -1/2, 1/2, each twice in the 3x3 matrix (diagonal 0); smooth L1 (|x| < 1: x^2/2):
    #   2 * (1/8 + 1/8) / 9 = 1/18
    # angles: cos at each vertex i between the other two; student: vertex0 0, vertex1 3/5, vertex2 4/5;
    # teacher (collinear): 1, -1, 1. Differences -1, 8/5, -1/5 -> smooth L1 1/2, 8/5 - 1/2 = 11/10, 1/50;
    # each twice among the 27 entries (j = k entries are 1 on both sides, j = i or k = i are 0 on both):
    #   2 * (0.5 + 1.1 + 0.02) / 27 = 3.24 / 27 = 0.12
    # total 25 * 1/18 + 50 * 0.12 = 133/18
    s = torch.tensor([[0., 0], [3, 0], [0, 4]])
    t = torch.tensor([[0., 0], [1, 0], [2, 0]])
    assert RKDLoss()(s, t).item() == pytest.approx(133 / 18, abs=1e-5)


def test_pkt_hand_value():
    # student (1,0), (0,1): cosines [[1,0],[0,1]] -> (c+1)/2 [[1,.5],[.5,1]] -> rows [2/3, 1/3], [1/3, 2/3]
    # teacher (1,0), (2,0): cosines all 1 -> all 1 -> rows [1/2, 1/2]
    # each row: 1/2 log((1/2)/(2/3)) + 1/2 log((1/2)/(1/3)) = 1/2 log(9/8); two rows, mean over 4 entries:
    #   log(9/8) / 4 = 0.02944580...   (eps = 1e-7 moves it by ~1e-7)
    s = torch.tensor([[1., 0], [0, 1]])
    t = torch.tensor([[1., 0], [2, 0]])
    assert PKTLoss()(s, t).item() == pytest.approx(math.log(9 / 8) / 4, abs=1e-6)


# --- against straight-line computations ------------------------------------------------------------------

def test_at_matches_formula_with_pooling():
    s, t = randn(3, 5, 8, 8, seed=1), randn(3, 7, 4, 4, seed=2)
    s2, t2 = randn(3, 5, 4, 4, seed=3), randn(3, 6, 4, 4, seed=4)
    want = 0.0
    for a, b in ((pool2(s), t), (s2, t2)):  # the 8x8 student map pooled to the teacher's 4x4
        qa = (a ** 2).mean(dim=1).reshape(3, -1)
        qb = (b ** 2).mean(dim=1).reshape(3, -1)
        qa = qa / qa.norm(dim=1, keepdim=True)
        qb = qb / qb.norm(dim=1, keepdim=True)
        want = want + ((qa - qb) ** 2).mean()
    torch.testing.assert_close(AttentionLoss()([s, s2], [t, t2]), want)


def test_sp_matches_formula():
    s, t = randn(4, 3, 4, 4, seed=1), randn(4, 8, 2, 2, seed=2)
    gs = s.reshape(4, -1) @ s.reshape(4, -1).t()
    gt = t.reshape(4, -1) @ t.reshape(4, -1).t()
    gs = gs / gs.norm(dim=1, keepdim=True)
    gt = gt / gt.norm(dim=1, keepdim=True)
    torch.testing.assert_close(SimilarityLoss()(s, t), ((gt - gs) ** 2).sum() / 16)


def test_rkd_matches_formula():
    s, t = randn(5, 6, seed=1), randn(5, 9, seed=2)

    def relations(x):
        n = x.shape[0]
        d = torch.zeros(n, n)
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = (x[i] - x[j]).norm()
        d = d / (d.sum() / (n * n - n))
        a = torch.zeros(n, n, n)
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    if j != i and k != i:
                        u, v = x[j] - x[i], x[k] - x[i]
                        a[i, j, k] = (u @ v) / (u.norm() * v.norm())
        return d, a

    def huber(x):
        return torch.where(x.abs() < 1, 0.5 * x ** 2, x.abs() - 0.5).mean()

    (ds, as_), (dt, at) = relations(s), relations(t)
    want = 25 * huber(ds - dt) + 50 * huber(as_ - at)
    torch.testing.assert_close(RKDLoss()(s, t), want, rtol=1e-5, atol=1e-6)


def test_pkt_matches_formula():
    s, t = randn(4, 6, seed=1), randn(4, 3, 2, 2, seed=2).reshape(4, -1)
    eps = 1e-7

    def dist(x):
        x = x / (x.norm(dim=1, keepdim=True) + eps)
        k = (x @ x.t() + 1) / 2
        return k / k.sum(dim=1, keepdim=True)

    p, q = dist(s), dist(t)
    want = (q * torch.log((q + eps) / (p + eps))).sum() / 16
    torch.testing.assert_close(PKTLoss()(s, t.reshape(4, 3, 2, 2)), want)


def test_fitnet_matches_formula_downsampling_regressor():
    torch.manual_seed(0)
    s, t = randn(4, 16, 8, 8, seed=1), randn(4, 64, 4, 4, seed=2)
    m = HintLoss((16, 8, 8), (64, 4, 4))
    conv = m.regressor.conv
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
    y = F.conv2d(s, conv.weight, conv.bias, stride=2, padding=1)
    y = batch_norm_train(y, m.regressor.bn).clamp(min=0)
    torch.testing.assert_close(m(s, t), ((y - t) ** 2).mean())


def test_cc_matches_formula():
    torch.manual_seed(0)
    s, t = randn(5, 12, seed=1), randn(5, 20, seed=2)
    m = CorrelationLoss(12, 20, feat_dim=7)
    es = s @ m.embed_s.weight.t() + m.embed_s.bias
    et = t @ m.embed_t.weight.t() + m.embed_t.bias
    delta = (es - et).abs()
    want = sum((delta[i] * delta[i + 1]).sum() for i in range(4)) / 4
    torch.testing.assert_close(m(s, t), want)


def test_vid_matches_formula_with_initial_variance_5():
    torch.manual_seed(0)
    s = [randn(3, 4, 8, 8, seed=1), randn(3, 6, 4, 4, seed=2)]
    t = [randn(3, 5, 4, 4, seed=3), randn(3, 10, 4, 4, seed=4)]
    m = VIDLoss([4, 6], [5, 10])
    want = 0.0
    for layer, a, b in zip(m.layers, [pool2(s[0]), s[1]], t):
        w = [conv.weight[:, :, 0, 0] for conv in layer.regressor if isinstance(conv, nn.Conv2d)]
        assert [tuple(x.shape) for x in w] == [(b.shape[1], a.shape[1]), (b.shape[1],) * 2, (b.shape[1],) * 2]
        h = torch.einsum("oc,bchw->bohw", w[0], a).clamp(min=0)
        h = torch.einsum("oc,bchw->bohw", w[1], h).clamp(min=0)
        mean = torch.einsum("oc,bchw->bohw", w[2], h)
        var = torch.log(1 + torch.exp(layer.log_scale)) + 1e-5
        # RepDistiller's init: alpha = log(exp(5 - eps) - 1), so that softplus(alpha) + eps = 5
        torch.testing.assert_close(layer.log_scale, torch.full_like(var, math.log(math.exp(5 - 1e-5) - 1)))
        torch.testing.assert_close(var, torch.full_like(var, 5.0), rtol=0, atol=1e-6)
        var = var.view(1, -1, 1, 1)
        want = want + (0.5 * ((mean - b) ** 2 / var + torch.log(var))).mean()
    torch.testing.assert_close(m(s, t), want)


def test_ab_matches_formula_with_identity_and_conv_connectors():
    torch.manual_seed(0)
    s = [randn(2, 8, 4, 4, seed=1), randn(2, 16, 8, 8, seed=2)]   # pre-ReLU maps, signed
    t = [randn(2, 8, 4, 4, seed=3).clamp(min=0), randn(2, 32, 4, 4, seed=4)]  # exact zeros count as "off"
    m = ABLoss([(8, 4, 4), (16, 8, 8)], [(8, 4, 4), (32, 4, 4)])
    assert isinstance(m.connectors[0], nn.Identity)                  # shapes match: no connector
    conv = m.connectors[1].conv
    c1 = batch_norm_train(F.conv2d(s[1], conv.weight, conv.bias, stride=2, padding=1), m.connectors[1].bn)
    want = 0.0
    for w, a, b in ((0.5, s[0], t[0]), (1.0, c1, t[1])):  # layer weights 2^(j - n + 1): 1/2 then 1
        off = ((a > -1) & (b <= 0)).float()
        on = ((a <= 1) & (b > 0)).float()
        want = want + w * ((a + 1) ** 2 * off + (a - 1) ** 2 * on).sum() / 2 * 3 / 1000
    torch.testing.assert_close(m(s, t), want)


def test_ft_matches_formula_and_reconstruction():
    torch.manual_seed(0)
    s, t = randn(3, 6, 8, 8, seed=1), randn(3, 8, 4, 4, seed=2).relu()
    m = FactorTransferLoss(6, 8)
    tr = [x for x in m.translator.encoder if not isinstance(x, nn.LeakyReLU)]  # conv, bn, conv, bn, conv, bn
    pe = [x for x in m.paraphraser.encoder if isinstance(x, nn.Conv2d)]
    pd = [x for x in m.paraphraser.decoder if isinstance(x, nn.ConvTranspose2d)]
    assert [c.out_channels for c in tr[0::2]] == [6, 4, 4] and [c.out_channels for c in pe] == [8, 4, 4]

    ys = s
    for conv, bn in zip(tr[0::2], tr[1::2]):
        ys = leaky(batch_norm_train(F.conv2d(ys, conv.weight, conv.bias, padding=1), bn))
    yt = t
    for conv in pe:
        yt = leaky(F.conv2d(yt, conv.weight, conv.bias, padding=1))
    fs = (pool2(ys) ** 2).mean(dim=1).reshape(3, -1)
    ft = (yt ** 2).mean(dim=1).reshape(3, -1)
    fs, ft = fs / fs.norm(dim=1, keepdim=True), ft / ft.norm(dim=1, keepdim=True)
    torch.testing.assert_close(m(s, t), (fs - ft).abs().mean())

    rec = yt
    for conv in pd:
        rec = leaky(F.conv_transpose2d(rec, conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(m.reconstruction_loss(t), ((rec - t) ** 2).mean())


# --- shape adaptation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_hw,t_hw,kind,kernel,stride", [
    ((8, 8), (4, 4), nn.Conv2d, (3, 3), (2, 2)),             # student twice the teacher
    ((4, 4), (8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),    # student half the teacher
    ((8, 8), (6, 6), nn.Conv2d, (3, 3), (1, 1)),             # student larger: kernel 1 + 8 - 6
    ((4, 4), (4, 4), nn.Conv2d, (1, 1), (1, 1)),             # same size: 1x1
    ((8, 8), (2, 2), nn.Conv2d, (7, 7), (1, 1)),
    ((2, 2), (8, 8), nn.ConvTranspose2d, (4, 4), (4, 4)),    # our extension: integer upsampling
])
def test_convreg_spatial_rules(s_hw, t_hw, kind, kernel, stride):
    reg = ConvReg((5,) + s_hw, (7,) + t_hw)
    assert type(reg.conv) is kind and reg.conv.kernel_size == kernel and reg.conv.stride == stride
    assert reg(torch.randn(2, 5, *s_hw)).shape == (2, 7) + t_hw


def test_convreg_rejects_unmappable_sizes_and_bad_shapes():
    with pytest.raises(ValueError, match="3x3 to a teacher map of 4x4"):
        ConvReg((5, 3, 3), (7, 4, 4))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ConvReg((2, 5, 8, 8), (7, 4, 4))


CROSS = [((4, 16, 8, 8), (4, 64, 4, 4)), ((4, 64, 4, 4), (4, 16, 8, 8))]  # ResNet-like vs VGG-like, both ways


@pytest.mark.parametrize("s_shape,t_shape", CROSS)
def test_cross_family_shapes(s_shape, t_shape):
    s, t = randn(*s_shape, seed=1), randn(*t_shape, seed=2)
    losses = {
        "fitnet": HintLoss(s_shape[1:], t_shape[1:])(s, t),
        "at": AttentionLoss()([s], [t]),
        "sp": SimilarityLoss()(s, t),
        "vid": VIDLoss([s_shape[1]], [t_shape[1]])([s], [t]),
        "ab": ABLoss([s_shape[1:]], [t_shape[1:]])([s], [t]),
        "ft": FactorTransferLoss(s_shape[1], t_shape[1])(s, t),
        "cc": CorrelationLoss(s_shape[1], t_shape[1])(s.mean((2, 3)), t.mean((2, 3))),
        "rkd": RKDLoss()(s.mean((2, 3)), t.mean((2, 3))),
        "pkt": PKTLoss()(s.mean((2, 3)), t.mean((2, 3))),
    }
    for name, loss in losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name


# --- gradients -------------------------------------------------------------------------------------------

def _builders():
    s4, t4 = (4, 16, 8, 8), (4, 64, 4, 4)
    return {
        "fitnet": (HintLoss(s4[1:], t4[1:]), lambda m, s, t: m(s, t), "map"),
        "at": (AttentionLoss(), lambda m, s, t: m([s], [t]), "map"),
        "sp": (SimilarityLoss(), lambda m, s, t: m(s, t), "map"),
        "vid": (VIDLoss([16], [64]), lambda m, s, t: m([s], [t]), "map"),
        "ab": (ABLoss([s4[1:]], [t4[1:]]), lambda m, s, t: m([s], [t]), "map"),
        "ft": (FactorTransferLoss(16, 64), lambda m, s, t: m(s, t), "map"),
        "cc": (CorrelationLoss(16, 64), lambda m, s, t: m(s, t), "vec"),
        "rkd": (RKDLoss(), lambda m, s, t: m(s, t), "vec"),
        "pkt": (PKTLoss(), lambda m, s, t: m(s, t), "vec"),
    }


@pytest.mark.parametrize("name", list(_builders()))
def test_gradients_reach_the_student_side_only(name):
    m, call, kind = _builders()[name]
    s_shape, t_shape = ((4, 16, 8, 8), (4, 64, 4, 4)) if kind == "map" else ((4, 16), (4, 64))
    s = randn(*s_shape, seed=1).requires_grad_(True)
    t = randn(*t_shape, seed=2).requires_grad_(True)  # a teacher tensor that *could* take a gradient
    call(m, s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0, name
    assert t.grad is None, f"{name}: the teacher feature must be detached"
    if name == "ft":  # the paraphraser is frozen in the main stage, the translator trains
        assert all(p.grad is None for p in m.paraphraser.parameters())
        assert all(p.grad is not None for p in m.translator.parameters())
    else:  # every helper (regressor, connector, embeddings incl. the teacher's, VID variance) trains
        assert all(p.grad is not None for p in m.parameters()), name


def test_ft_reconstruction_trains_the_paraphraser_only():
    m = FactorTransferLoss(16, 64)
    t = randn(4, 64, 4, 4, seed=2).requires_grad_(True)
    m.reconstruction_loss(t).backward()
    assert t.grad is None
    assert all(p.grad is not None for p in m.paraphraser.parameters())
    assert all(p.grad is None for p in m.translator.parameters())


# --- AMP -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(_builders()))
def test_bf16_autocast_inputs_give_fp32_losses(name):
    m, call, kind = _builders()[name]
    s_shape, t_shape = ((4, 16, 8, 8), (4, 64, 4, 4)) if kind == "map" else ((4, 16), (4, 64))
    s, t = randn(*s_shape, seed=1).bfloat16(), randn(*t_shape, seed=2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(m, s, t)
    want = call(m, s.float(), t.float())  # the same (bf16-rounded) values, fp32 throughout, no autocast
    assert got.dtype == torch.float32, name
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- bad input -------------------------------------------------------------------------------------------

def test_bad_input_errors():
    with pytest.raises(ValueError, match="one to one"):
        AttentionLoss()([torch.randn(2, 3, 4, 4)] * 2, [torch.randn(2, 3, 4, 4)])
    with pytest.raises(ValueError, match="built for 2 block outputs"):
        VIDLoss([3, 3], [4, 4])([torch.randn(2, 3, 4, 4)], [torch.randn(2, 4, 4, 4)])
    with pytest.raises(ValueError, match="one to one"):
        ABLoss([(3, 4, 4)], [])
    with pytest.raises(ValueError, match="at least 2"):
        CorrelationLoss(3, 4)(torch.randn(1, 3), torch.randn(1, 4))
    with pytest.raises(ValueError, match="teacher channels"):
        FactorTransferLoss(3, 1)


# --- every CIFAR pair of the paper's tables, with RepDistiller's feature shapes ----------------------------

def test_every_cross_family_paper_pair_adapts_shapes(shared):
    """Build each loss for every different-family teacher -> student pair of the paper's CIFAR tables (and one
    same-family pair) from RepDistiller's feature shapes (feat_shapes: [stem, blocks..., pooled]) and run it on
    meta tensors (shapes only, no memory). Same-family pairs differ only in channels."""
    import json
    tables = json.loads(shared("reference", "paper_tables.json").read_text())["cifar100_top1"]
    shapes = json.loads(shared("reference", "repdistiller_cifar_models.json").read_text())
    pairs = tables["different_family"]["pairs"] + ["resnet32x4->resnet8x4"]
    assert len(pairs) == 7
    B = 2
    for pair in pairs:
        teacher, student = pair.split("->")
        fs, ft = shapes[student]["feat_shapes"], shapes[teacher]["feat_shapes"]
        with torch.device("meta"):
            g_s = [torch.empty(B, *f) for f in fs]
            g_t = [torch.empty(B, *f) for f in ft]
            hint = HintLoss(fs[2], ft[2])
            assert hint.regressor(g_s[2]).shape == g_t[2].shape, pair
            ab = ABLoss(fs[1:-1], ft[1:-1])
            for conn, a, b in zip(ab.connectors, g_s[1:-1], g_t[1:-1]):
                assert conn(a).shape == b.shape, pair
            losses = [hint(g_s[2], g_t[2]), ab(g_s[1:-1], g_t[1:-1]),
                      AttentionLoss()(g_s[1:-1], g_t[1:-1]), SimilarityLoss()(g_s[-2], g_t[-2]),
                      VIDLoss([f[0] for f in fs[1:-1]], [f[0] for f in ft[1:-1]])(g_s[1:-1], g_t[1:-1]),
                      FactorTransferLoss(fs[-2][0], ft[-2][0])(g_s[-2], g_t[-2]),
                      CorrelationLoss(fs[-1][0], ft[-1][0])(g_s[-1], g_t[-1]),
                      RKDLoss()(g_s[-1], g_t[-1]), PKTLoss()(g_s[-1], g_t[-1])]
        assert all(loss.shape == () for loss in losses), pair
