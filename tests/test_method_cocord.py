"""CoCoRD (distill/methods/cocord.py): losses vs an independent computation, EMA, queue, modes, state."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

from distill.methods.cocord import CoCoRD
from test_methods import tiny_resnet

B = 4


def make(teacher_width=8, K=7, m_t=0.5, m_slow=0.5, gather=None, **kw):
    student = tiny_resnet(8, 6, seed=0)
    teacher = tiny_resnet(teacher_width, 6, seed=1)
    m = CoCoRD(student, teacher, proj_dim=16, proj_hidden_dim=32, pred_dim=8, queue_size=K, tau=0.1,
               teacher_head_momentum=m_t, slow_momentum=m_slow, gather=gather, **kw)
    # move the student away from its EMA copies, so EMA and its order show in the results
    with torch.no_grad():
        for p in list(m.student.parameters()) + list(m.proj_s.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return m.train()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(3)]
    return views, torch.tensor([0, 1, 2, 5]), torch.arange(B)


def pooled(net, x):
    """Penultimate features via a hook on fc (independent of models.forward_features)."""
    out = {}
    h = net.fc.register_forward_hook(lambda mod, inp, o: out.update(f=inp[0], logits=o))
    y = net(x)
    h.remove()
    return out["f"], y


def ema_(ema_mod, src_mod, m, skip_fc=False):
    src = dict(src_mod.named_parameters())
    for n, p in ema_mod.named_parameters():
        p.data = m * p.data + (1 - m) * src[n].data


def cos(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def reference(ref, views, target, w_ce, w_con, w_pred, ema_first=True):
    """The spec's losses written out by hand on a deep copy of the method taken before its forward."""
    x_s, x_s2, x_t = views
    f_s, logits = pooled(ref.student, x_s)
    f_s2, _ = pooled(ref.student, x_s2)
    z_s, z_s2 = ref.proj_s(f_s), ref.proj_s(f_s2)
    p_s, p_s2 = ref.predictor(z_s), ref.predictor(z_s2)
    with torch.no_grad():
        if ema_first:
            ema_(ref.proj_t, ref.proj_s, ref.m_t)
            ema_(ref.slow_proj, ref.proj_s, ref.m_slow)
            student_nofc = {n: p for n, p in ref.student.named_parameters() if not n.startswith("fc.")}
            for n, p in ref.slow.named_parameters():
                p.data = ref.m_slow * p.data + (1 - ref.m_slow) * student_nofc[n].data
        f_t, _ = pooled(ref.teacher, x_t)
        k = ref.proj_t(f_t)
        slow_s = ref.slow_proj(ref.slow(x_s))     # slow.fc is Identity
        slow_s2 = ref.slow_proj(ref.slow(x_s2))
    q = z_s / z_s.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    pos = (q * kn).sum(1) / ref.tau                                  # [B]
    neg = torch.stack([(q * row).sum(1) for row in ref.queue], 1) / ref.tau  # [B, K]
    all_ = torch.cat([pos[:, None], neg], 1)
    l_con = (torch.logsumexp(all_, 1) - pos).mean()
    l_pred = (2 - 2 * cos(p_s, slow_s2)).mean() + (2 - 2 * cos(p_s2, slow_s)).mean()
    l_ce = -torch.log_softmax(logits, 1)[torch.arange(B), target].mean()
    return {"ce": w_ce * l_ce, "contrast": w_con * l_con, "pred": w_pred * l_pred}, kn, ref


def test_losses_ema_and_keys_match_independent_computation():
    m = make(w_ce=0.5, w_contrast=1.5, w_pred=4.0)
    ref = copy.deepcopy(m)
    stale = copy.deepcopy(m)
    views, target, index = batch()
    logits, losses = m(views, target, index)
    want, k, ref = reference(ref, views, target, 0.5, 1.5, 4.0)
    assert set(losses) == {"ce", "contrast", "pred"} and logits.shape == (B, 6)
    for name in want:
        torch.testing.assert_close(losses[name], want[name], rtol=1e-4, atol=1e-5)
    # EMA'd parameters and the slow student's own BN buffers match the hand computation
    for a, b in zip(m.state_dict().items(), ref.state_dict().items()):
        assert a[0] == b[0]
        if a[0] not in ("queue", "queue_ptr"):  # the reference does not enqueue
            torch.testing.assert_close(a[1], b[1], msg=a[0], rtol=1e-5, atol=1e-6)
    # the slow student's BN buffers are its own (EMA touches parameters only)
    assert not torch.allclose(m.slow.bn1.running_mean, m.student.bn1.running_mean)
    # the keys went into the queue (state_dict() above wrote them), at the pointer
    torch.testing.assert_close(m.queue[:B], k, rtol=1e-5, atol=1e-6)
    assert int(m.queue_ptr) == B
    # order: keys computed before the EMA give a different contrastive loss (so the test above has teeth)
    want_stale, _, _ = reference(stale, views, target, 0.5, 1.5, 4.0, ema_first=False)
    assert not torch.allclose(want_stale["contrast"], losses["contrast"], rtol=1e-3)
    assert not torch.allclose(want_stale["pred"], losses["pred"], rtol=1e-3)


def test_ema_formula_after_an_optimizer_step():
    m = make(m_t=0.999, m_slow=0.9)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    views, target, index = batch()
    _, losses = m(views, target, index)
    sum(losses.values()).backward()
    opt.step()
    slow_before = {n: p.clone() for n, p in m.slow.named_parameters()}
    t_before = {n: p.clone() for n, p in m.proj_t.named_parameters()}
    s_params = {n: p.clone() for n, p in m.student.named_parameters()}
    ps_params = {n: p.clone() for n, p in m.proj_s.named_parameters()}
    m(*batch(2))
    for n, p in m.slow.named_parameters():
        torch.testing.assert_close(p, 0.9 * slow_before[n] + 0.1 * s_params[n], rtol=1e-6, atol=1e-7)
    for n, p in m.proj_t.named_parameters():
        torch.testing.assert_close(p, 0.999 * t_before[n] + 0.001 * ps_params[n], rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in list(m.proj_t.parameters()) + list(m.slow.parameters()))


def test_teacher_head_frozen_random_when_widths_differ():
    m = make(teacher_width=12)
    assert not m.proj_t_is_ema and m.proj_t[0].in_features == 12 and m.proj_s[0].in_features == 8
    before = copy.deepcopy(m.proj_t.state_dict())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    _, losses = m(*batch())
    sum(losses.values()).backward()
    opt.step()
    m(*batch(2))
    for n, p in m.proj_t.named_parameters():
        assert not p.requires_grad and torch.equal(p, before[n]), n
    assert all(torch.isfinite(v) for v in losses.values())
    # equal widths: the teacher head starts as an exact copy of proj_s
    s, t = tiny_resnet(8, 6, seed=0), tiny_resnet(8, 6, seed=1)
    m2 = CoCoRD(s, t, proj_dim=16, proj_hidden_dim=32, pred_dim=8, queue_size=5)
    assert m2.proj_t_is_ema
    for a, b in zip(m2.proj_t.state_dict().values(), m2.proj_s.state_dict().values()):
        assert torch.equal(a, b)


def test_queue_wraps_around_and_overflows():
    m = make(K=5)
    keys = torch.arange(1, 8, dtype=torch.float)[:, None].expand(7, 16).contiguous()  # row i = i+1
    q0 = m.queue.clone()
    m._dequeue_and_enqueue(keys[:3])
    assert int(m.queue_ptr) == 3 and m.queue[:3, 0].tolist() == [1, 2, 3] and torch.equal(m.queue[3:], q0[3:])
    m._dequeue_and_enqueue(keys[3:6])                # 4, 5 at rows 3, 4; 6 wraps to row 0
    assert int(m.queue_ptr) == 1 and m.queue[:, 0].tolist() == [6, 2, 3, 4, 5]
    m._dequeue_and_enqueue(keys)                     # 7 keys > K = 5: the last 5 survive, FIFO order
    assert int(m.queue_ptr) == (1 + 7) % 5
    assert m.queue[:, 0].tolist() == [5, 6, 7, 3, 4]


def test_gathered_keys_are_enqueued_in_rank_order():
    other = F.normalize(torch.randn(B, 16), dim=1)   # "rank 1"'s keys
    m = make(K=5, gather=lambda t: torch.cat([t, other.to(t.dtype)]))
    ref = copy.deepcopy(m)
    ref.gather = None
    views, target, index = batch()
    m(views, target, index)
    ref(views, target, index)                        # same computation, single process
    m.flush_queue()
    ref.flush_queue()
    local = ref.queue[:B]
    # 2B = 8 keys [local(4), other(4)] written FIFO into K = 5 slots from pointer 0: slots 0-2 end up with
    # keys 5-7 (other[1:]), slot 3 with key 3 (local[3]), slot 4 with key 4 (other[0])
    torch.testing.assert_close(m.queue, torch.cat([other[1:], local[3:], other[:1]]))
    assert int(m.queue_ptr) == 8 % 5


def test_teacher_is_frozen_eval_and_outside_state():
    m = make()
    t_state = copy.deepcopy(m.teacher.state_dict())
    m.train()
    assert not m.teacher.training and m.slow.training and m.proj_t.training and m.student.training
    assert all(not k.startswith("teacher.") for k in m.state_dict())
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert {id(p) for p in m.teacher.parameters()}.isdisjoint({id(p) for p in m.parameters()})
    _, losses = m(*batch())
    sum(losses.values()).backward()
    for n, v in m.teacher.state_dict().items():      # eval mode: BN running stats untouched
        assert torch.equal(v, t_state[n]), n
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.slow_student_state_dict().keys() == {k for k in m.student.state_dict() if not k.startswith("fc.")}


def test_state_dict_round_trip_restores_exact_state():
    m = make()
    for s in (1, 2):
        m(*batch(s))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make()
    with torch.no_grad():
        fresh.queue.normal_()
    fresh(*batch(5))                                 # leaves keys pending: loading must drop them
    fresh.load_state_dict(state)
    assert fresh._pending_keys is None
    fresh.teacher.load_state_dict(m.teacher.state_dict())
    assert torch.equal(fresh.queue, m.queue) and torch.equal(fresh.queue_ptr, m.queue_ptr)
    _, a = m(*batch(3))
    _, b = fresh(*batch(3))
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert torch.equal(fresh.queue, m.queue)
    for (n, x), (_, y) in zip(m.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(x, y), n


def test_kd_term_and_amp_bf16():
    m = make(w_kd=2.0, kd_T=4.0)
    ref_teacher = copy.deepcopy(m.teacher)
    views, target, index = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, losses = m(views, target, index)
    assert set(losses) == {"ce", "contrast", "pred", "kd"}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        lt = ref_teacher(views[0]).float() / 4.0     # KD on the student's own view x_s
    ls = logits.detach().float() / 4.0
    want = (F.softmax(lt, 1) * (F.log_softmax(lt, 1) - F.log_softmax(ls, 1))).sum() / B * 16 * 2.0
    torch.testing.assert_close(losses["kd"].detach(), want, rtol=2e-2, atol=1e-3)


def test_wrong_number_of_views():
    m = make()
    with pytest.raises(ValueError, match="3 view"):
        m([torch.randn(B, 3, 16, 16)], torch.zeros(B, dtype=torch.long), torch.arange(B))


# --- the prediction term is the SUM of the two distances (authors' code), pinned by hand --------
def test_prediction_term_is_the_sum_of_two_distances_by_hand():
    """Heads set so that every prediction is e1 and every slow-student target e2 (orthogonal): each
    distance D = 2 - 2 cos = 2 exactly, so L_pred = 2 + 2 = 4 and the weighted term 4 * 4 = 16."""
    P = 16
    e1, e2 = torch.zeros(P), torch.zeros(P)
    e1[0], e2[1] = 1.0, 1.0
    m = CoCoRD(tiny_resnet(8, 6, seed=0), tiny_resnet(8, 6, seed=1), proj_dim=P, proj_hidden_dim=32, pred_dim=8,
               queue_size=7, tau=0.1, w_pred=4.0).train()
    with torch.no_grad():
        for head, out in ((m.proj_s, e2), (m.slow_proj, e2), (m.proj_t, e2), (m.predictor, e1)):
            head[3].weight.zero_()            # output = bias, whatever the input
            head[3].bias.copy_(out)
    _, losses = m(*batch())
    assert losses["pred"].item() == 16.0
    m.w_pred = 1.0
    _, losses = m(*batch(2))
    assert losses["pred"].item() == 4.0


# --- three whole steps of ResNet-18 CoCoRD against a straight-line re-computation ------------------
def _pooled_and_logits(net, x):
    """(penultimate features, output) of a torchvision ResNet, read through a hook on fc."""
    seen = {}
    hook = net.fc.register_forward_hook(lambda mod, inp, out: seen.update(f=inp[0]))
    out = net(x)
    hook.remove()
    return seen["f"], out


def test_three_resnet18_steps_match_a_straight_line_recomputation():
    """Written from the formulas of issue 9 / docs, sharing no code with distill: modes set explicitly
    (everything trains except the teacher, which is in eval mode), EMA m*ema + (1-m)*src after the student's
    forward, keys, InfoNCE via logsumexp, L_pred = D1 + D2, CE, SGD, FIFO queue write that wraps (K=6, B=4)."""
    import torchvision
    torch.manual_seed(0)
    Bs, K, P, tau, m_t, m_slow = 4, 6, 16, 0.1, 0.99, 0.9
    student = torchvision.models.resnet18(num_classes=5)
    teacher = torchvision.models.resnet18(num_classes=5)
    m = CoCoRD(student, teacher, proj_dim=P, proj_hidden_dim=32, pred_dim=8, queue_size=K, tau=tau,
               teacher_head_momentum=m_t, slow_momentum=m_slow).double()   # fp64: 3 steps of BN on 4 images
    # amplify fp32 rounding past any useful tolerance; in fp64 both sides agree to ~1e-10
    # independent copies of every network and buffer before the first step
    r_student, r_teacher = copy.deepcopy(m.student), copy.deepcopy(m.teacher)
    r_proj_s, r_pred, r_proj_t = copy.deepcopy(m.proj_s), copy.deepcopy(m.predictor), copy.deepcopy(m.proj_t)
    r_slow, r_slow_proj = copy.deepcopy(m.slow), copy.deepcopy(m.slow_proj)
    r_queue, r_ptr = m.queue.clone(), 0
    for net in (r_student, r_proj_s, r_pred, r_proj_t, r_slow, r_slow_proj):
        net.train()
    r_teacher.eval()
    m.train()

    def sgd(params):
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = sgd([p for p in m.parameters() if p.requires_grad])
    r_opt = sgd(list(r_student.parameters()) + list(r_proj_s.parameters()) + list(r_pred.parameters()))

    def D(p, z):
        return (2 - 2 * (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))).mean()

    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        x_s, x_s2, x_t = (torch.randn(Bs, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(3))
        target = torch.randint(0, 5, (Bs,), generator=g)

        _, losses = m([x_s, x_s2, x_t], target, torch.arange(Bs))
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()

        f1, logits = _pooled_and_logits(r_student, x_s)
        f2, _ = _pooled_and_logits(r_student, x_s2)
        z1, z2 = r_proj_s(f1), r_proj_s(f2)
        p1, p2 = r_pred(z1), r_pred(z2)
        with torch.no_grad():
            src = {n: p for n, p in r_student.named_parameters() if not n.startswith("fc.")}
            for n, p in r_slow.named_parameters():
                p.copy_(m_slow * p + (1 - m_slow) * src[n])
            for ema, mom in ((r_slow_proj, m_slow), (r_proj_t, m_t)):
                for p, s in zip(ema.parameters(), r_proj_s.parameters()):
                    p.copy_(mom * p + (1 - mom) * s)
            k = r_proj_t(_pooled_and_logits(r_teacher, x_t)[0])
            k = k / k.norm(dim=1, keepdim=True)
            t1, t2 = r_slow_proj(r_slow(x_s)), r_slow_proj(r_slow(x_s2))   # slow.fc is the identity
        q = z1 / z1.norm(dim=1, keepdim=True)
        pos = (q * k).sum(1, keepdim=True) / tau
        neg = q @ r_queue.t() / tau
        l_ctr = (torch.logsumexp(torch.cat([pos, neg], 1), 1) - pos[:, 0]).mean()
        l_pred = D(p1, t2) + D(p2, t1)
        l_ce = (torch.logsumexp(logits, 1) - logits[torch.arange(Bs), target]).mean()
        want = {"ce": l_ce, "contrast": l_ctr, "pred": 4.0 * l_pred}
        r_opt.zero_grad()
        (l_ce + l_ctr + 4.0 * l_pred).backward()
        r_opt.step()
        for i in range(Bs):
            r_queue[(r_ptr + i) % K] = k[i]
        r_ptr = (r_ptr + Bs) % K

        for name in want:
            torch.testing.assert_close(losses[name].detach(), want[name].detach(), rtol=1e-9, atol=1e-9,
                                       msg=lambda s, step=step, name=name: f"step {step} {name}: {s}")
    m.flush_queue()
    torch.testing.assert_close(m.queue, r_queue, rtol=1e-9, atol=1e-9)
    assert int(m.queue_ptr) == r_ptr == (3 * Bs) % K
    for (n, a), (_, b) in zip(m.student.state_dict().items(), r_student.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=n)
    for (n, a), (_, b) in zip(m.slow.state_dict().items(), r_slow.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=n)
