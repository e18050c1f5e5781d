"""`crd` / `crd+kd`: Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020).

As in the paper and its code (RepDistiller, crd/memory.py + crd/criterion.py):
  embed_s, embed_t  Linear(d, 128) -> L2 norm on the pooled penultimate features (both trained)
  memory_s, memory_t  two banks [N, 128] of every training sample's student / teacher embedding,
                    initialised U(-stdv, stdv) with stdv = 1/sqrt(128/3), updated with momentum 0.5
                    and re-normalised after each step
  negatives         "exact" contrastive sample mode: the positive is the sample itself (column 0), the
                    16384 negatives are drawn uniformly *without replacement* from the samples of the
                    other classes (per-class index lists); with replacement only when a class has fewer
                    other-class samples than negatives (small datasets)
  NCE               scores exp(v . m / T) / Z, T = 0.07, Z = mean(exp(.)) * N fixed on the first batch
                    (per direction); loss = -[log(P_pos / (P_pos + K/N)) + sum log((K/N) / (P_neg + K/N))] / B,
                    for the student-vs-teacher-bank and teacher-vs-student-bank directions, summed
  total             w_ce * CE + w_crd * NCE (+ w_kd * KD for crd+kd), weights 1 / 0.8 (/ 1)
Multi-process: the bank update uses every rank's indices and embeddings (via `gather`), and Z is the mean
over ranks, so all ranks hold identical banks.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import Method, fp32, fp32_region, kd_loss
from distill.models import classifier_in_features, forward_features

EPS = 1e-7  # as CRD's criterion


def nce_loss(P, n_data):
    """CRD's NCE loss on P [B, 1+K] (column 0 the positive) with noise distribution Pn = 1/n_data."""
    B, K = P.shape[0], P.shape[1] - 1
    mPn = K / float(n_data)
    log_d1 = torch.log(P[:, 0] / (P[:, 0] + mPn + EPS))                              # [B]
    log_d0 = torch.log(mPn / (P[:, 1:] + mPn + EPS))                                 # [B, K]
    return -(log_d1.sum() + log_d0.sum()) / B


class Embed(nn.Module):
    def __init__(self, dim_in, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):  # [B, d] -> [B, dim_out], unit norm, fp32
        x = self.linear(x)
        return F.normalize(fp32(x), dim=1)


class CRD(Method):
    num_views = 1

    def __init__(self, student, teacher, sample_labels, feat_dim=128, nce_k=16384, nce_t=0.07, momentum=0.5,
                 w_ce=1.0, w_crd=0.8, w_kd=0.0, kd_T=4.0, gather=None):
        super().__init__(student, teacher)
        labels = torch.as_tensor(sample_labels, dtype=torch.long).flatten()
        N = labels.numel()
        if N < 2 or labels.min() < 0:
            raise ValueError(f"CRD needs the class of every training sample (>= 2 samples, ids >= 0); got {N} "
                             f"labels with min {labels.min().item() if N else None}")
        num_classes = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=num_classes)
        if (counts == N).any():
            raise ValueError("CRD draws negatives from other classes, but every training sample has the same class")
        self.n_data, self.nce_k, self.nce_t, self.momentum = N, nce_k, nce_t, momentum
        self.w_ce, self.w_crd, self.w_kd, self.kd_T = w_ce, w_crd, w_kd, kd_T
        self.gather = gather

        self.embed_s = Embed(classifier_in_features(student), feat_dim)
        self.embed_t = Embed(classifier_in_features(teacher), feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(N, feat_dim).mul_(2 * stdv).add_(-stdv))  # [N, D] student bank
        self.register_buffer("memory_t", torch.rand(N, feat_dim).mul_(2 * stdv).add_(-stdv))  # [N, D] teacher bank
        self.register_buffer("Z", torch.full((2,), -1.0))                            # [Z_s, Z_t]; < 0 = not set yet
        # per-class index lists, as one class-sorted index array + offsets (derived from labels: not saved)
        self.register_buffer("labels", labels, persistent=False)                     # [N]
        self.register_buffer("order", torch.argsort(labels, stable=True), persistent=False)  # [N] by class
        self.register_buffer("cls_count", counts, persistent=False)                  # [C]
        self.register_buffer("cls_start", torch.cumsum(counts, 0) - counts, persistent=False)  # [C]

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        if sample_labels is None or len(sample_labels) != num_samples:
            raise ValueError(f"CRD needs the class of each of the {num_samples} training samples "
                             f"(sample_labels), got {None if sample_labels is None else len(sample_labels)}")
        return cls(student, teacher, sample_labels, feat_dim=hp["crd_feat_dim"], nce_k=hp["crd_nce_k"],
                   nce_t=hp["crd_nce_t"], momentum=hp["crd_momentum"], w_ce=hp["w_ce"], w_crd=hp["w_crd"],
                   w_kd=hp["w_kd"], kd_T=hp["kd_T"], gather=gather)

    # --- negatives ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_contrast_idx(self, index, target):
        """[B, 1+K] sample indices: column 0 the sample itself, then K samples of other classes."""
        B, K, dev = index.shape[0], self.nce_k, self.order.device
        target = target.to(dev)
        n_neg = self.n_data - self.cls_count[target]                                 # [B] other-class sample count
        r = torch.empty(B, K, dtype=torch.long, device=dev)               # rank among other-class samples
        repl = n_neg < K                                                  # too few: with replacement (as CRD)
        if repl.any():
            u = torch.rand(int(repl.sum()), K, device=dev)
            r[repl] = (u * n_neg[repl, None]).long().clamp_max_(n_neg[repl, None] - 1)
        if (~repl).any():
            r[~repl] = self._without_replacement(n_neg[~repl], K)
        # skip the sample's own class block in the class-sorted order
        start, count = self.cls_start[target][:, None], self.cls_count[target][:, None]
        neg = self.order[r + (r >= start) * count]                                   # [B, K]
        return torch.cat([index.to(dev)[:, None], neg], dim=1)

    @staticmethod
    def _without_replacement(n, K):
        """[b, K] uniform K-subsets of range(n[i]) per row (K <= n[i]), in random order."""
        b, dev = n.shape[0], n.device
        n_max = int(n.max())
        if n_max <= 4 * K:  # dense: random keys, the K smallest among the valid positions
            keys = torch.rand(b, n_max, device=dev)
            keys[torch.arange(n_max, device=dev)[None, :] >= n[:, None]] = 2.0
            return keys.topk(K, dim=1, largest=False).indices
        # sparse (K <= n/4): draw with replacement, redraw duplicates until none are left; the procedure
        # treats every element alike, so the resulting set is a uniform K-subset
        r = (torch.rand(b, K, device=dev) * n[:, None]).long().clamp_max_(n[:, None] - 1)
        while True:
            r, _ = r.sort(dim=1)
            dup = torch.zeros_like(r, dtype=torch.bool)
            dup[:, 1:] = r[:, 1:] == r[:, :-1]
            if not dup.any():
                return r[:, torch.randperm(K, device=dev)]
            redraw = (torch.rand(b, K, device=dev) * n[:, None]).long().clamp_max_(n[:, None] - 1)
            r = torch.where(dup, redraw, r)

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, views, target, index):
        self._check_views(views)
        x = views[0]
        feat_s, logits = forward_features(self.student, x)                           # [B, d_s], [B, C]
        feat_t, logits_t = self.teacher_forward(x)                                   # [B, d_t], [B, C] (no grad)
        idx = self.sample_contrast_idx(index, target)                                # [B, 1+K]
        B, D, N = x.shape[0], self.memory_s.shape[1], self.n_data

        with fp32_region(x.device.type):
            v_s = self.embed_s(fp32(feat_s))                                         # [B, D]
            v_t = self.embed_t(fp32(feat_t))                                         # [B, D]
            w_t = self.memory_t[idx.flatten()].view(B, -1, D).to(v_s.dtype)          # [B, 1+K, D] teacher bank rows
            w_s = self.memory_s[idx.flatten()].view(B, -1, D).to(v_t.dtype)          # [B, 1+K, D] student bank rows
            out_s = torch.exp(torch.bmm(w_t, v_s[:, :, None]).squeeze(2) / self.nce_t)  # [B, 1+K]
            out_t = torch.exp(torch.bmm(w_s, v_t[:, :, None]).squeeze(2) / self.nce_t)  # [B, 1+K]
            self._set_Z(out_s.detach(), out_t.detach())
            loss_crd = nce_loss(out_s / self.Z[0], N) + nce_loss(out_t / self.Z[1], N)
            loss_ce = F.cross_entropy(fp32(logits), target)
            losses = {"ce": self.w_ce * loss_ce, "crd": self.w_crd * loss_crd}
            if self.w_kd:
                losses["kd"] = self.w_kd * kd_loss(logits, logits_t, self.kd_T)

        self._update_banks(index, v_s.detach(), v_t.detach())
        return logits, losses

    @torch.no_grad()
    def _set_Z(self, out_s, out_t):
        """Fix Z = mean(exp(score/T)) * N from the first batch (mean over ranks), without a host sync."""
        z = torch.stack([out_s.mean(), out_t.mean()]) * self.n_data                  # [2]
        if self.gather is not None:
            z = self.gather(z[None]).mean(dim=0)
        self.Z.copy_(torch.where(self.Z < 0, z, self.Z))

    @torch.no_grad()
    def _update_banks(self, index, v_s, v_t):
        if self.gather is not None:
            index, v_s, v_t = self.gather(index), self.gather(v_s), self.gather(v_t)
        index = index.to(self.memory_s.device)
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = bank[index].mul_(self.momentum).add_(v * (1 - self.momentum))     # [B, D]
            bank.index_copy_(0, index, F.normalize(rows, dim=1).to(bank.dtype))
