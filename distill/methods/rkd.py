"""`rkd` loss: relational KD (Park et al., CVPR 2019), distance + angle, as CRD/RepDistiller runs it.

On the pooled features (feature list [-1]), flattened to s_i (student) and t_i (teacher), i = 1..B
(distiller_zoo/RKD.py):

    d(x)_ij   = sqrt(max(||x_i - x_j||^2, 1e-12)) for i != j, 0 on the diagonal
                (||x_i - x_j||^2 as ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j)
    psi_D(x)  = d(x) / mu(x),  mu(x) = mean of the positive entries of d(x)
    e(x)_ijk  = (x_j - x_i) / max(||x_j - x_i||, 1e-12)
    psi_A(x)  = < e(x)_ij , e(x)_ik >                                     [B, B, B]
    L_RKD     = 25 * huber(psi_D(s), psi_D(t)) + 50 * huber(psi_A(s), psi_A(t))

huber: smooth L1 with threshold 1, averaged over all B^2 (distance) or B^3 (angle) entries, diagonal
included. The teacher's relations are computed without gradient (RepDistiller: torch.no_grad). mu is taken
from the positive entries, as RepDistiller (d[d > 0].mean()), written as sum / count to avoid a host sync;
a batch whose features all coincide gives NaN as there. Weights: distance 25, angle 50 inside the loss,
published beta = 1 with CE gamma = 1, KD alpha = 0 (scripts/run_cifar_distill.sh). Computed in fp32 whatever
the autocast mode.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import fp32, fp32_region
from distill.methods.feature_method import FeatureMethod

WEIGHT = 1.0     # beta, scripts/run_cifar_distill.sh
W_DIST = 25.0    # distance weight inside the loss, distiller_zoo/RKD.py
W_ANGLE = 50.0   # angle weight inside the loss, distiller_zoo/RKD.py


def pairwise_distance(e, eps=1e-12):
    """[B, D] -> [B, B] Euclidean distances (squared ones clamped at eps before the root), zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def distance_relation(e):
    d = pairwise_distance(e)
    return d / (d.sum() / (d > 0).sum())  # d >= 0, so sum / count of positives == mean of positives


def angle_relation(e):
    """[B, D] -> [B*B*B]: cosines of the angles at every vertex i between e_j - e_i and e_k - e_i."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [i, j] = e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


class RKDLoss(nn.Module):
    def __init__(self, w_dist=W_DIST, w_angle=W_ANGLE):
        super().__init__()
        self.w_dist, self.w_angle = w_dist, w_angle

    def forward(self, f_s, f_t):
        """f_s [B, ...], f_t [B, ...]: flattened per sample; widths may differ."""
        with fp32_region(f_s.device.type):
            s = fp32(f_s).flatten(1)
            with torch.no_grad():
                t = fp32(f_t).flatten(1)
                t_dist, t_angle = distance_relation(t), angle_relation(t)
            loss_d = F.smooth_l1_loss(distance_relation(s), t_dist)
            loss_a = F.smooth_l1_loss(angle_relation(s), t_angle)
            return self.w_dist * loss_d + self.w_angle * loss_a


class RKD(FeatureMethod):
    """`rkd`: CE + w_rkd * L_RKD on the pooled features (feature list [-1])."""
    loss_name = "rkd"

    def __init__(self, student, teacher, w_dist=W_DIST, w_angle=W_ANGLE, w_ce=1.0, w_rkd=WEIGHT, w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_rkd, w_kd, kd_T)
        self.relation = RKDLoss(w_dist=w_dist, w_angle=w_angle)

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        return cls(student, teacher, w_dist=hp["rkd_w_dist"], w_angle=hp["rkd_w_angle"],
                   **cls.loss_weights(hp))

    def feature_loss(self, feats_s, feats_t):
        return self.relation(feats_s[-1], feats_t[-1])
