"""The feature-based baselines as `--method` choices (distill/methods/{fitnet,at,sp,cc,vid,rkd,pkt,ab,ft}.py):
which features each method reads, its weight and CE term (checked against features taken with forward hooks
and the formulas written out here), the shape-dependent modules built before the optimizer, errors, AMP, and
every method of the table training on cross-family CIFAR-zoo pairs and on torchvision ResNets (slow)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from distill.methods import METHODS, build_method, default_method_args
from distill.models import build_model
from test_methods import LABELS, X, Y, IDX, B, tiny_resnet

LAYERS = ("maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


def build(name, student=None, teacher=None, image_size=16, **flags):
    student = tiny_resnet() if student is None else student
    teacher = tiny_resnet(12, seed=1) if teacher is None else teacher
    return build_method(name, default_method_args(**flags), student, teacher, len(LABELS), LABELS,
                        image_size=image_size, drives_init_stage=True).train()


def hooked_features(model, x):
    """[maxpool, layer1..4, pooled] of a torchvision-layout model, read by forward hooks during model(x)."""
    out = {}
    handles = [getattr(model, n).register_forward_hook(lambda mod, i, o, n=n: out.update({n: o})) for n in LAYERS]
    logits = model(x)
    for h in handles:
        h.remove()
    return [out[n] for n in LAYERS[:-1]] + [out["avgpool"].flatten(1)], logits


def student_and_teacher_features(m, x):
    """Features of copies of the student (train mode, as the method runs it) and the teacher (eval, no grad)."""
    s = copy.deepcopy(m.student).train()
    t = copy.deepcopy(m.teacher).eval()
    feats_s, logits_s = hooked_features(s, x)
    with torch.no_grad():
        feats_t, _ = hooked_features(t, x)
    return feats_s, logits_s, feats_t


def attention(f):
    a = (f ** 2).mean(dim=1).reshape(f.shape[0], -1)
    return a / a.norm(dim=1, keepdim=True)


def test_at_reads_every_stage_output_with_weight_1000():
    m = build("at")
    feats_s, logits_s, feats_t = student_and_teacher_features(m, X)
    _, losses = m([X], Y, IDX)
    want = sum(((attention(fs) - attention(ft)) ** 2).mean() for fs, ft in zip(feats_s[1:5], feats_t[1:5]))
    torch.testing.assert_close(losses["at"], 1000.0 * want)
    torch.testing.assert_close(losses["ce"], F.cross_entropy(logits_s, Y))


def test_sp_reads_the_last_map():
    m = build("sp", w_sp=2.0)
    feats_s, _, feats_t = student_and_teacher_features(m, X)
    _, losses = m([X], Y, IDX)

    def gram(f):
        q = f.reshape(B, -1)
        g = q @ q.t()
        return g / g.norm(dim=1, keepdim=True)
    want = ((gram(feats_s[4]) - gram(feats_t[4])) ** 2).sum() / B ** 2
    torch.testing.assert_close(losses["sp"], 2.0 * want)


def test_pkt_reads_the_pooled_feature():
    m = build("pkt").double()  # the KL of two near-uniform distributions: fp32 rounding is ~1e-3 of it
    feats_s, _, feats_t = student_and_teacher_features(m, X.double())
    _, losses = m([X.double()], Y, IDX)

    def cond_prob(f):
        x = f / (f.norm(dim=1, keepdim=True) + 1e-7)
        k = (x @ x.t() + 1) / 2
        return k / k.sum(dim=1, keepdim=True)
    p, q = cond_prob(feats_s[5]), cond_prob(feats_t[5])
    want = (q * torch.log((q + 1e-7) / (p + 1e-7))).mean()
    torch.testing.assert_close(losses["pkt"], 30000.0 * want)


def test_cc_embeds_both_pooled_features_and_trains_both_embeddings():
    m = build("cc", cc_feat_dim=6)
    feats_s, _, feats_t = student_and_teacher_features(m, X)
    _, losses = m([X], Y, IDX)
    es, et = m.correlation.embed_s, m.correlation.embed_t
    assert (es.in_features, et.in_features, es.out_features) == (8, 12, 6)  # tiny widths: student 8, teacher 12
    d = (feats_s[5] @ es.weight.t() + es.bias - feats_t[5] @ et.weight.t() - et.bias).abs()
    want = (d[:-1] * d[1:]).sum() / (B - 1)
    torch.testing.assert_close(losses["cc"], 0.02 * want)
    sum(losses.values()).backward()
    assert es.weight.grad is not None and et.weight.grad is not None


def test_fitnet_regresses_the_hint_layer_through_conv_bn_relu():
    m = build("fitnet", hint_layer=3)
    reg = m.hint.regressor
    assert reg.conv.in_channels == 8 and reg.conv.out_channels == 12 and reg.conv.kernel_size == (1, 1)
    feats_s, _, feats_t = student_and_teacher_features(m, X)
    _, losses = m([X], Y, IDX)
    y = F.conv2d(feats_s[3], reg.conv.weight, reg.conv.bias)
    mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (y - mean) / torch.sqrt(var + reg.bn.eps) * reg.bn.weight.view(1, -1, 1, 1) + reg.bn.bias.view(1, -1, 1, 1)
    want = ((torch.relu(y) - feats_t[3]) ** 2).mean()
    torch.testing.assert_close(losses["fitnet"], 100.0 * want)


def test_vid_and_rkd_weights_and_features():
    m = build("vid", w_vid=3.0)
    assert [layer.regressor[0].in_channels for layer in m.vid.layers] == [4, 8, 8, 8]   # student stage widths
    assert [layer.regressor[-1].out_channels for layer in m.vid.layers] == [4, 12, 12, 12]
    feats_s, _, feats_t = student_and_teacher_features(m, X)
    _, losses = m([X], Y, IDX)
    want = 0.0
    for layer, fs, ft in zip(m.vid.layers, feats_s[1:5], feats_t[1:5]):
        mu = layer.regressor(fs)
        var = (F.softplus(layer.log_scale) + 1e-5).view(1, -1, 1, 1)
        want = want + (0.5 * ((mu - ft) ** 2 / var + torch.log(var))).mean()
    torch.testing.assert_close(losses["vid"], 3.0 * want)

    m = build("rkd", rkd_w_dist=0.0, rkd_w_angle=1.0, w_rkd=2.0)
    feats_s, _, feats_t = student_and_teacher_features(m, X)
    _, losses = m([X], Y, IDX)

    def angles(e):
        d = e[None, :, :] - e[:, None, :]
        d = d / d.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return torch.einsum("ijd,ikd->ijk", d, d)
    want = F.smooth_l1_loss(angles(feats_s[5]), angles(feats_t[5]))
    torch.testing.assert_close(losses["rkd"], 2.0 * want)


def test_kd_term_is_available_to_every_feature_method():
    m = build("sp", w_kd=0.5, kd_T=2.0)
    ref_s, ref_t = copy.deepcopy(m.student), copy.deepcopy(m.teacher)
    _, losses = m([X], Y, IDX)
    s, t = F.log_softmax(ref_s(X) / 2.0, dim=1), F.softmax(ref_t(X) / 2.0, dim=1)
    torch.testing.assert_close(losses["kd"], 0.5 * 4.0 * (t * (torch.log(t) - s)).sum(dim=1).mean())


def test_extra_modules_are_in_state_dict_parameters_and_built_before_any_step():
    for name, prefix in (("fitnet", "hint."), ("cc", "correlation."), ("vid", "vid."), ("ab", "ab."),
                         ("ft", "factor.")):
        m = build(name)
        assert any(k.startswith(prefix) for k in m.state_dict()), name
        names = {n for n, _ in m.named_parameters()}
        assert any(n.startswith(prefix) for n in names), name
        assert not any(k.startswith("teacher.") for k in m.state_dict()), name
    m = build("vid").to(torch.float64)
    assert m.vid.layers[0].log_scale.dtype == torch.float64


def test_building_leaves_models_and_rng_untouched():
    student, teacher = tiny_resnet().train(), tiny_resnet(12, seed=1)
    before = copy.deepcopy(student.state_dict())
    build("vid", student=student, teacher=teacher)
    assert student.training and all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="--hint-layer 5 is not a feature map.*0 \\(stem\\) .. 4"):
        build("fitnet", hint_layer=5)
    with pytest.raises(ValueError, match="--hint-layer = -1"):
        build("fitnet", hint_layer=-1)
    with pytest.raises(ValueError, match="--w-at = -1.0"):
        build("at", w_at=-1.0)
    with pytest.raises(ValueError, match="--init-epochs = -2"):
        build("ab", init_epochs=-2)
    with pytest.raises(ValueError, match="training resolution.*--crop-size"):
        build_method("vid", default_method_args(), tiny_resnet(), tiny_resnet(12), len(LABELS), LABELS)
    # 3 student stages (CIFAR ResNet) against 4 teacher stages (VGG): stage-by-stage methods refuse the pair
    for name in ("at", "vid", "ab"):
        with pytest.raises(ValueError, match=f"--method {name} pairs student and teacher features one to one, "
                                             f"got 3 student and 4 teacher"):
            build(name, student=build_model("resnet8", 5), teacher=build_model("vgg8", 5), image_size=32)


@pytest.mark.parametrize("name", ["fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft"])
def test_amp_bf16_losses_are_fp32_and_finite(name):
    m = build(name, init_epochs=0)  # ab / ft: straight into the main stage
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = m([X], Y, IDX)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()


def train_steps(m, x, y, index):
    """Two SGD steps (for ab / ft: one initialisation step, then one main-stage step); the losses of each."""
    seen = []
    for _ in range(2):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        _, losses = m([x] * m.num_views, y, index)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        seen.append(losses)
        if getattr(m, "in_init_stage", False):
            m.finish_init_epoch()
    return seen


PAIRS = [("vgg13", "MobileNetV2", 32), ("resnet32x4", "ShuffleV1", 32), ("resnet18", "resnet18", 32)]


@pytest.mark.slow
@pytest.mark.parametrize("teacher_arch,student_arch,size", PAIRS)
def test_every_method_trains_on_cross_family_and_torchvision_pairs(teacher_arch, student_arch, size):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, size, size, generator=gen)
    y, index = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 5, 2, 7])
    for name in METHODS:
        torch.manual_seed(0)
        teacher = build_model(teacher_arch, 10) if METHODS[name].needs_teacher else None
        student = build_model(student_arch, 10)
        before = copy.deepcopy(student.state_dict())
        args = default_method_args(queue_size=16, crd_nce_k=8, proj_dim=16, proj_hidden_dim=16, pred_dim=8,
                                   init_epochs=1)
        m = build_method(name, args, student, teacher, 20, torch.arange(20) % 10, image_size=size,
                         drives_init_stage=True).train()
        seen = train_steps(m, x, y, index)
        assert all(torch.isfinite(v) for losses in seen for v in losses.values()), (name, seen)
        assert any(not torch.equal(v, before[k]) for k, v in m.student.state_dict().items()
                   if v.dtype.is_floating_point), name


@pytest.mark.parametrize("name", ["at", "sp", "cc"])
def test_imagenet_r34_r18_recipes_load(name):
    from conftest import REPO
    from distill import train_imagenet
    args = train_imagenet.parse_args(["DATA", "--config", str(REPO / "configs" / "distill" / f"r34_r18_{name}.yaml")])
    assert (args.method, args.arch, args.teacher_arch, args.crop_size) == (name, "resnet18", "resnet34", 224)
    assert getattr(args, f"w_{name}") == {"at": 1000.0, "sp": 3000.0, "cc": 0.02}[name]
    assert args.output_dir.endswith(f"r34_r18_{name}")
