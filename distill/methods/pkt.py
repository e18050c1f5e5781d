"""`pkt` loss: probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as CRD/RepDistiller runs it.

On the pooled features (feature list [-1]), flattened to x_i (student) and y_i (teacher), i = 1..B, with
eps = 1e-7 (distiller_zoo/PKT.py, the authors' code):

    x^_i   = x_i / (||x_i||_2 + eps)      (NaN entries set to 0)
    K_ij   = (x^_i . x^_j + 1) / 2        cosine similarity mapped to [0, 1]
    P_ij   = K_ij / sum_k K_ik            conditional probabilities, each row sums to 1
    (Q from y in the same way)
    L_PKT  = (1 / B^2) sum_{i,j} Q_ij * log( (Q_ij + eps) / (P_ij + eps) )

i.e. the KL divergence of the teacher's from the student's similarity distribution, averaged over all B^2
entries (torch.mean, not a per-row sum). The teacher side is detached. Published weight beta = 30000 with
CE gamma = 1, KD alpha = 0 (scripts/run_cifar_distill.sh). Computed in fp32 whatever the autocast mode.
"""
import torch
import torch.nn as nn

from distill.methods.base import fp32, fp32_region
from distill.methods.feature_method import FeatureMethod

WEIGHT = 30000.0  # beta, scripts/run_cifar_distill.sh
EPS = 1e-7        # distiller_zoo/PKT.py


def similarity_distribution(f, eps=EPS):
    """[B, ...] -> [B, B] row-stochastic matrix of cosine similarities mapped to [0, 1]."""
    x = f.flatten(1)
    x = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


class PKTLoss(nn.Module):
    def __init__(self, eps=EPS):
        super().__init__()
        self.eps = eps

    def forward(self, f_s, f_t):
        with fp32_region(f_s.device.type):
            p = similarity_distribution(fp32(f_s), self.eps)
            q = similarity_distribution(fp32(f_t.detach()), self.eps)
            return (q * torch.log((q + self.eps) / (p + self.eps))).mean()


class PKT(FeatureMethod):
    """`pkt`: CE + w_pkt * L_PKT on the pooled features (feature list [-1])."""
    loss_name = "pkt"

    def __init__(self, student, teacher, w_ce=1.0, w_pkt=WEIGHT, w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_pkt, w_kd, kd_T)
        self.pkt = PKTLoss()

    def feature_loss(self, feats_s, feats_t):
        return self.pkt(feats_s[-1], feats_t[-1])
