"""CRD (distill/methods/crd.py): NCE loss vs CRD's formula, Z, bank updates, negatives, state."""
import copy
import io

import pytest
import torch

from distill.methods.crd import CRD, nce_loss
from test_methods import tiny_resnet

B = 4
X = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def make(labels, K=5, gather=None, **kw):
    return CRD(tiny_resnet(8, 5, seed=0), tiny_resnet(12, 5, seed=1), labels, feat_dim=6, nce_k=K, nce_t=0.07,
               momentum=0.5, gather=gather, **kw).train()


def test_nce_loss_matches_crd_formula():
    g = torch.Generator().manual_seed(0)
    P = torch.rand(3, 1 + 4, generator=g) * 0.01
    n_data, eps = 50, 1e-7
    want = 0.0
    for row in P.tolist():
        m_pn = 4 / n_data
        want += torch.log(torch.tensor(row[0] / (row[0] + m_pn + eps)))
        for p in row[1:]:
            want += torch.log(torch.tensor(m_pn / (p + m_pn + eps)))
    torch.testing.assert_close(nce_loss(P, n_data), -want / 3)


def test_forward_losses_z_and_bank_update_match_independent_computation():
    labels = torch.arange(20) % 4
    m = make(labels, K=5, w_ce=1.0, w_crd=0.8)
    ref = copy.deepcopy(m)
    target, index = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 9, 14, 19])
    torch.manual_seed(7)
    idx = m.sample_contrast_idx(index, target)
    torch.manual_seed(7)
    logits, losses = m([X], target, index)

    out = {}
    ref.student.fc.register_forward_hook(lambda mod, i, o: out.update(s=i[0]))
    ref.teacher.fc.register_forward_hook(lambda mod, i, o: out.update(t=i[0]))
    ref_logits = ref.student(X)
    with torch.no_grad():
        ref.teacher(X)
    e_s, e_t = ref.embed_s.linear(out["s"]), ref.embed_t.linear(out["t"])
    v_s, v_t = e_s / e_s.norm(dim=1, keepdim=True), e_t / e_t.norm(dim=1, keepdim=True)
    P_s = torch.exp(torch.einsum("bkd,bd->bk", ref.memory_t[idx], v_s) / 0.07)  # student vs teacher bank
    P_t = torch.exp(torch.einsum("bkd,bd->bk", ref.memory_s[idx], v_t) / 0.07)  # teacher vs student bank
    Z_s, Z_t = P_s.mean().item() * 20, P_t.mean().item() * 20
    want = 0.8 * (nce_loss(P_s / Z_s, 20) + nce_loss(P_t / Z_t, 20))
    torch.testing.assert_close(losses["crd"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["ce"], torch.nn.functional.cross_entropy(ref_logits, target))
    torch.testing.assert_close(m.Z, torch.tensor([Z_s, Z_t]), rtol=1e-5, atol=0)
    # momentum-0.5 update of the sample's rows, re-normalised; other rows untouched
    for bank, old, v in ((m.memory_s, ref.memory_s, v_s), (m.memory_t, ref.memory_t, v_t)):
        new = 0.5 * old[index] + 0.5 * v.detach()
        torch.testing.assert_close(bank[index], new / new.norm(dim=1, keepdim=True))
        rest = torch.ones(20, dtype=torch.bool)
        rest[index] = False
        assert torch.equal(bank[rest], old[rest])
    # Z is fixed by the first batch
    z = m.Z.clone()
    m([X * 2], target, index)
    assert torch.equal(m.Z, z)


def test_negatives_come_from_other_classes():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3] * 30)  # N = 300, class 2 has 120 samples
    index = torch.tensor([0, 3, 5, 9, 15])
    target = labels[index]
    for K, path in ((40, "sparse"), (170, "dense"), (250, "with replacement for class 2")):
        m = make(labels, K=K)
        idx = m.sample_contrast_idx(index, target)
        assert idx.shape == (5, K + 1) and torch.equal(idx[:, 0], index), path
        assert (labels[idx[:, 1:]] != target[:, None]).all(), path
        for row, c in zip(idx[:, 1:], target):
            n_neg = int((labels != c).sum())
            if K <= n_neg:  # without replacement, as CRD's np.random.choice(replace=False)
                assert row.unique().numel() == K, path
    # uniform over the other classes' samples: every candidate shows up across many draws
    m = make(labels, K=40)
    seen = torch.cat([m.sample_contrast_idx(index[:1], target[:1])[0, 1:] for _ in range(100)])
    assert set(seen.tolist()) == set(torch.nonzero(labels != 0).flatten().tolist())


def test_bank_update_uses_every_ranks_samples():
    labels = torch.arange(20) % 4
    other_index = torch.tensor([0, 1, 2, 3])
    other_v = torch.nn.functional.normalize(torch.randn(B, 6), dim=1)

    def gather(t):  # rank 1 contributes other_index / other_v / its own Z estimate
        if t.dtype == torch.long:
            return torch.cat([t, other_index])
        if t.shape[-1] == 2:
            return torch.cat([t, t * 3])
        return torch.cat([t, other_v])

    m = make(labels, gather=gather)
    ref = copy.deepcopy(m)
    ref.gather = None
    index = torch.tensor([4, 9, 14, 19])
    torch.manual_seed(2)
    m([X], labels[index], index)
    torch.manual_seed(2)
    ref([X], labels[index], index)
    for bank, old in ((m.memory_s, make(labels).memory_s), (m.memory_t, make(labels).memory_t)):
        new = 0.5 * old[other_index] + 0.5 * other_v
        torch.testing.assert_close(bank[other_index], new / new.norm(dim=1, keepdim=True))
    torch.testing.assert_close(m.memory_s[index], ref.memory_s[index])
    torch.testing.assert_close(m.Z, ref.Z * 2)  # mean of the two ranks' estimates (z, 3z)


def test_state_dict_round_trip_restores_banks_and_z():
    labels = torch.arange(20) % 4
    m = make(labels)
    index = torch.tensor([4, 9, 14, 19])
    m([X], labels[index], index)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert {"memory_s", "memory_t", "Z"} <= set(state) and "labels" not in state
    fresh = make(labels)
    fresh.load_state_dict(state)
    torch.manual_seed(3)
    _, a = m([X], labels[index], index)
    torch.manual_seed(3)
    _, b = fresh([X], labels[index], index)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(m.memory_s, fresh.memory_s) and torch.equal(m.memory_t, fresh.memory_t)


def test_bad_labels():
    with pytest.raises(ValueError, match="same class"):
        make(torch.zeros(10, dtype=torch.long))
