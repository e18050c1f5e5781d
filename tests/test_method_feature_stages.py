"""The two-stage methods `ab` and `ft` (distill/methods/feature_method.py TwoStageMethod): which parameters
each stage trains (exactly those have requires_grad, and each gets a gradient every step, as DDP needs),
train/eval modes, the stage's losses, the initialisation-stage learning rate, the switch to the main stage,
and a checkpoint taken in the middle of the initialisation stage that resumes bit-exactly."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from distill.methods import build_method, default_method_args
from distill.models import build_model
from test_methods import LABELS, X, Y, IDX, tiny_resnet


def build(name, seed=0, **flags):
    return build_method(name, default_method_args(**flags), tiny_resnet(seed=seed), tiny_resnet(12, seed=1),
                        len(LABELS), LABELS, image_size=16, drives_init_stage=True).train()


def ids(params):
    return {id(p) for p in params}


def step(m, opt):
    _, losses = m([X], Y, IDX)
    opt.zero_grad()
    sum(losses.values()).backward()
    return losses


def test_ab_initialisation_stage_then_student_alone():
    m = build("ab", init_epochs=1)
    assert m.in_init_stage and m.init_stage_lr(0.05) == 0.05
    init = m.stage_parameters()
    backbone = [p for n, p in m.student.named_parameters() if not n.startswith("fc.")]
    assert ids(init) == ids(backbone) | ids(m.ab.parameters())
    assert ids(p for p in m.parameters() if p.requires_grad) == ids(init)
    fc_before = copy.deepcopy(m.student.fc.state_dict())
    opt = torch.optim.SGD(init, lr=0.1)
    losses = step(m, opt)
    assert set(losses) == {"ab"}
    assert all(p.grad is not None for p in init)  # every trained parameter takes part (DDP)
    opt.step()
    assert all(torch.equal(v, fc_before[k]) for k, v in m.student.fc.state_dict().items())

    assert m.finish_init_epoch() is True and not m.in_init_stage
    main = m.stage_parameters()
    assert ids(main) == ids(m.student.parameters())
    assert not any(p.requires_grad for p in m.ab.parameters())
    connectors = copy.deepcopy(m.ab.state_dict())
    ref = copy.deepcopy(m.student)
    opt = torch.optim.SGD(main, lr=0.1)
    losses = step(m, opt)
    assert set(losses) == {"ce"}
    torch.testing.assert_close(losses["ce"], F.cross_entropy(ref(X), Y))
    opt.step()
    assert all(torch.equal(v, connectors[k]) for k, v in m.ab.state_dict().items())
    with pytest.raises(RuntimeError, match="after all 1 initialisation epochs"):
        m.finish_init_epoch()


def test_ab_init_loss_reads_pre_relu_stage_outputs():
    m = build("ab", w_ab=2.0)
    pre = {}
    s, t = copy.deepcopy(m.student).train(), copy.deepcopy(m.teacher).eval()
    # each tiny layer is conv-BN-ReLU: the pre-ReLU value is the BN output
    for tag, net in (("s", s), ("t", t)):
        for i, n in enumerate(("layer1", "layer2", "layer3", "layer4")):
            getattr(net, n)[1].register_forward_hook(lambda mod, inp, out, key=(tag, i): pre.update({key: out}))
    s(X)
    with torch.no_grad():
        t(X)
    _, losses = m([X], Y, IDX)
    want = 0.0
    for i, (w, conn) in enumerate(zip((1 / 8, 1 / 4, 1 / 2, 1.0), m.ab.connectors)):
        sv, tv = conn(pre[("s", i)]), pre[("t", i)]
        l = ((sv + 1) ** 2 * ((sv > -1) & (tv <= 0)) + (sv - 1) ** 2 * ((sv <= 1) & (tv > 0))).sum()
        want = want + w * l / X.shape[0] * 3 / 1000
    torch.testing.assert_close(losses["ab"], 2.0 * want)


def test_ft_paraphraser_first_then_student_and_translator():
    m = build("ft", init_epochs=1)
    assert ids(m.stage_parameters()) == ids(m.factor.paraphraser.parameters())
    assert ids(p for p in m.parameters() if p.requires_grad) == ids(m.factor.paraphraser.parameters())
    m.train()
    assert not m.student.training and m.factor.paraphraser.training  # the frozen student keeps its BN statistics
    student_before = copy.deepcopy(m.student.state_dict())
    f_t = {}
    t = copy.deepcopy(m.teacher).eval()
    t.layer4.register_forward_hook(lambda mod, inp, out: f_t.update(x=out))
    with torch.no_grad():
        t(X)
    para = copy.deepcopy(m.factor.paraphraser)
    opt = torch.optim.SGD(m.stage_parameters(), lr=0.1)
    losses = step(m, opt)
    assert set(losses) == {"ft_rec"}
    torch.testing.assert_close(losses["ft_rec"], F.mse_loss(para(f_t["x"])[1], f_t["x"]))
    opt.step()
    assert all(torch.equal(v, student_before[k]) for k, v in m.student.state_dict().items())

    assert m.finish_init_epoch() is True
    assert ids(m.stage_parameters()) == ids(m.student.parameters()) | ids(m.factor.translator.parameters())
    assert m.student.training and not m.factor.paraphraser.training
    assert not any(p.requires_grad for p in m.factor.paraphraser.parameters())
    opt = torch.optim.SGD(m.stage_parameters(), lr=0.1)
    losses = step(m, opt)
    assert set(losses) == {"ce", "ft"}
    assert all(p.grad is not None for p in m.stage_parameters())


def test_ft_initialisation_lr_follows_repdistiller():
    for arch, lr in (("resnet8", 0.01), ("wrn_16_1", 0.01), ("vgg8", 0.05), ("ResNet50", 0.05),
                     ("MobileNetV2", 0.05)):
        m = build_method("ft", default_method_args(), build_model(arch, 5), build_model("resnet8x4", 5),
                         len(LABELS), LABELS, drives_init_stage=True)
        assert m.init_stage_lr(0.05) == lr, arch
    assert build("ft").init_stage_lr(0.1) == 0.1  # torchvision-layout students: the base LR


def test_zero_init_epochs_starts_in_the_main_stage():
    m = build("ft", init_epochs=0)
    assert not m.in_init_stage
    assert not any(p.requires_grad for p in m.factor.paraphraser.parameters())


def test_a_caller_that_does_not_drive_the_stages_is_refused():
    """The initialisation stage needs the trainer's cooperation (finish_init_epoch, a new optimizer); a
    caller that does not say it drives it would train the initialisation stage forever."""
    for name in ("ab", "ft"):
        with pytest.raises(ValueError, match=f"--method {name} starts with an initialisation stage of "
                                             f"--init-epochs 30, which this trainer does not run; pass "
                                             f"--init-epochs 0"):
            build_method(name, default_method_args(), tiny_resnet(), tiny_resnet(12), len(LABELS), LABELS,
                         image_size=16)
        m = build_method(name, default_method_args(init_epochs=0), tiny_resnet(), tiny_resnet(12), len(LABELS),
                         LABELS, image_size=16)
        assert not m.in_init_stage


def run(m, opt_state, epochs, steps, gen_seed):
    """Drive `m` through the protocol for `epochs` epochs of `steps` steps (the data of step k is fixed by
    gen_seed + k); a fresh SGD at every stage start, as the trainer does; returns the optimizer."""
    def new_opt():
        lr = m.init_stage_lr(0.1) if m.in_init_stage else 0.05
        return torch.optim.SGD(m.stage_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    opt = new_opt()
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for e in range(epochs):
        for k in range(steps):
            g = torch.Generator().manual_seed(gen_seed + 10 * e + k)
            x = torch.randn(4, 3, 16, 16, generator=g)
            _, losses = m([x], Y, IDX)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
        if m.in_init_stage and m.finish_init_epoch():
            opt = new_opt()
    return opt


@pytest.mark.parametrize("name", ["ab", "ft"])
def test_checkpoint_in_the_initialisation_stage_resumes_bit_exactly(name):
    ref = build(name, init_epochs=2)
    run(ref, None, epochs=3, steps=2, gen_seed=0)      # init epochs 0, 1, then one main-stage epoch

    a = build(name, init_epochs=2)
    opt = run(a, None, epochs=1, steps=2, gen_seed=0)  # one init epoch, then "interrupted"
    buf = io.BytesIO()
    torch.save({"method": a.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)          # the trainer's safe loader
    assert ckpt["method"]["_extra_state"] == {"init_epochs": 2, "init_epochs_done": 1}

    b = build(name, seed=5, init_epochs=2)             # another initialisation: everything comes from the file
    b.load_state_dict(ckpt["method"], strict=True)
    assert b.in_init_stage and b.init_epochs_done == 1
    assert ids(p for p in b.parameters() if p.requires_grad) == ids(b.stage_parameters())
    # epochs continue with their own data: the resumed run's epoch e is the reference's epoch e + 1
    run(b, ckpt["optimizer"], epochs=2, steps=2, gen_seed=10)
    assert not b.in_init_stage
    got, want = b.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        if k != "_extra_state":
            assert torch.equal(got[k], want[k]), k
    assert got["_extra_state"] == want["_extra_state"] == {"init_epochs": 2, "init_epochs_done": 2}


def test_resume_with_other_init_epochs_is_refused():
    sd = build("ab", init_epochs=2).state_dict()
    with pytest.raises(ValueError, match="--init-epochs 2, this run has 3; resume with --init-epochs 2"):
        build("ab", init_epochs=3).load_state_dict(sd)
