"""`at` loss: attention transfer (Zagoruyko & Komodakis, ICLR 2017), as CRD/RepDistiller runs it.

For each pair of block outputs (F_s^j, F_t^j), after average-pooling the larger map to the smaller one's
spatial size (distiller_zoo/AT.py):

    a(F)[b]  = q / max(||q||_2, 1e-12),   q[h*W+w] = (1/C) sum_c F[b,c,h,w]^p        (p = 2)
    L_AT     = sum_j mean_{b,i} ( a(F_s^j)[b,i] - a(F_t^j)[b,i] )^2

RepDistiller's particulars kept: the squared difference of the normalised maps (not its L2 norm as in the
paper), averaged over batch and positions (the channel mean instead of the paper's sum changes nothing after
the normalisation). Features: every block
output between the stem and the pooled feature (feature list [1:-1]; train_student.py). Teacher maps are
detached. Published weight beta = 1000 with CE gamma = 1, KD alpha = 0 (scripts/run_cifar_distill.sh).
Computed in fp32 whatever the autocast mode.
"""
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import fp32, fp32_region
from distill.methods.feature_adapters import check_pairs, match_spatial
from distill.methods.feature_method import FeatureMethod, check_stage_pairs, network_shapes

WEIGHT = 1000.0  # beta, scripts/run_cifar_distill.sh


class AttentionLoss(nn.Module):
    def __init__(self, p=2):
        super().__init__()
        self.p = p

    def attention_map(self, f):
        """[B, C, H, W] -> [B, H*W]: channel mean of f^p, L2-normalised per sample."""
        return F.normalize(f.pow(self.p).mean(dim=1).flatten(1), dim=1)

    def forward(self, g_s, g_t):
        """g_s, g_t: lists of [B, C, H, W] block outputs, paired one to one; returns the sum over pairs."""
        check_pairs(g_s, g_t, "AttentionLoss")
        with fp32_region(g_s[0].device.type):
            total = 0.0
            for f_s, f_t in zip(g_s, g_t):
                f_s, f_t = match_spatial(fp32(f_s), fp32(f_t.detach()))
                total = total + (self.attention_map(f_s) - self.attention_map(f_t)).pow(2).mean()
            return total


class AT(FeatureMethod):
    """`at`: CE + w_at * L_AT over every stage output (feature list [1:-1])."""
    loss_name = "at"

    def __init__(self, student, teacher, w_ce=1.0, w_at=WEIGHT, w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_at, w_kd, kd_T)
        self.attention = AttentionLoss(p=2)

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        check_stage_pairs(*network_shapes(student, teacher, hp), "at")
        return cls(student, teacher, **cls.loss_weights(hp))

    def feature_loss(self, feats_s, feats_t):
        return self.attention(feats_s[1:-1], feats_t[1:-1])
