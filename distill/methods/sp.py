"""`sp` loss: similarity-preserving KD (Tung & Mori, ICCV 2019), as CRD/RepDistiller runs it.

On the last feature map before pooling (feature list [-2]), each flattened to Q = F.view(B, -1):

    G      = Q Q^T                                  [B, B]
    G~[i]  = G[i] / max(||G[i]||_2, 1e-12)          (each row L2-normalised)
    L_SP   = (1 / B^2) sum_{i,j} ( G~_t[i,j] - G~_s[i,j] )^2

(distiller_zoo/SP.py: the squared Frobenius norm divided by bsz * bsz, as in the paper.) Channel and spatial
sizes of student and teacher need not match (both Gram matrices are B x B). The teacher map is detached.
Published weight beta = 3000 with CE gamma = 1, KD alpha = 0 (scripts/run_cifar_distill.sh).
Computed in fp32 whatever the autocast mode.
"""
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import fp32, fp32_region
from distill.methods.feature_method import FeatureMethod

WEIGHT = 3000.0  # beta, scripts/run_cifar_distill.sh


def similarity_matrix(f):
    """[B, ...] -> [B, B] row-normalised Gram matrix of the flattened features."""
    q = f.flatten(1)
    return F.normalize(q @ q.t(), dim=1)


class SimilarityLoss(nn.Module):
    def forward(self, f_s, f_t):
        """f_s, f_t: [B, ...] student and teacher features of the same batch."""
        bsz = f_s.shape[0]
        with fp32_region(f_s.device.type):
            diff = similarity_matrix(fp32(f_t.detach())) - similarity_matrix(fp32(f_s))
            return diff.pow(2).sum() / (bsz * bsz)


class SP(FeatureMethod):
    """`sp`: CE + w_sp * L_SP on the last feature map (feature list [-2])."""
    loss_name = "sp"

    def __init__(self, student, teacher, w_ce=1.0, w_sp=WEIGHT, w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_sp, w_kd, kd_T)
        self.similarity = SimilarityLoss()

    def feature_loss(self, feats_s, feats_t):
        return self.similarity(feats_s[-2], feats_t[-2])
