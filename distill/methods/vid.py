"""`vid` loss: variational information distillation (Ahn et al., CVPR 2019), as CRD/RepDistiller runs it.

For every pair of block outputs (feature list [1:-1]; train_student.py), after average-pooling the larger map
to the smaller one's spatial size, a trained regressor mu (1x1 conv C_s -> C_t, ReLU, 1x1 conv C_t -> C_t,
ReLU, 1x1 conv C_t -> C_t, no biases: the middle width is the teacher's channels) predicts the teacher map,
with a learned per-channel variance (distiller_zoo/VID.py):

    sigma_c^2 = softplus(alpha_c) + eps,   eps = 1e-5,
                alpha_c initialised to log(exp(5 - eps) - 1), so sigma_c^2 starts at 5
    L_j       = mean_{b,c,h,w} 0.5 * ( (mu(F_s^j) - F_t^j)^2 / sigma_c^2 + log sigma_c^2 )
    L_VID     = sum_j L_j

(the negative Gaussian log-likelihood without its constant, averaged over every element). The teacher maps are
detached; the regressors and alpha are trained with the student. Published weight beta = 1 with CE gamma = 1,
KD alpha = 0 (scripts/run_cifar_distill.sh). Computed in fp32 (regressors included) whatever the autocast mode.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import fp32, fp32_region
from distill.methods.feature_adapters import check_pairs, match_spatial
from distill.methods.feature_method import FeatureMethod, check_stage_pairs, network_shapes, stage_outputs

WEIGHT = 1.0  # beta, scripts/run_cifar_distill.sh


class VIDLayerLoss(nn.Module):
    """One (student map, teacher map) pair: c_s / c_t channels; mid_channels defaults to c_t as in RepDistiller."""

    def __init__(self, c_s, c_t, mid_channels=None, init_pred_var=5.0, eps=1e-5):
        super().__init__()
        mid = c_t if mid_channels is None else mid_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, c_t, 1, bias=False))
        # inverse softplus, so that softplus(alpha) + eps == init_pred_var at the start
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_pred_var - eps))))
        self.eps = eps

    def forward(self, f_s, f_t):
        f_s, f_t = match_spatial(f_s, f_t)
        mean = self.regressor(f_s)
        var = (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)
        return (0.5 * ((mean - f_t).pow(2) / var + var.log())).mean()


class VIDLoss(nn.Module):
    """Sum of VIDLayerLoss over paired block outputs; s_channels / t_channels: C of each, in order."""

    def __init__(self, s_channels, t_channels):
        super().__init__()
        check_pairs(s_channels, t_channels, "VIDLoss")
        self.layers = nn.ModuleList(VIDLayerLoss(c_s, c_t) for c_s, c_t in zip(s_channels, t_channels))

    def forward(self, g_s, g_t):
        check_pairs(g_s, g_t, "VIDLoss")
        if len(g_s) != len(self.layers):
            raise ValueError(f"VIDLoss was built for {len(self.layers)} block outputs, got {len(g_s)}")
        with fp32_region(g_s[0].device.type):
            return sum(layer(fp32(f_s), fp32(f_t.detach())) for layer, f_s, f_t in zip(self.layers, g_s, g_t))


class VID(FeatureMethod):
    """`vid`: CE + w_vid * L_VID over every stage output (feature list [1:-1]); s_channels / t_channels:
    the channels of those outputs."""
    loss_name = "vid"

    def __init__(self, student, teacher, s_channels, t_channels, w_ce=1.0, w_vid=WEIGHT, w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_vid, w_kd, kd_T)
        self.vid = VIDLoss(s_channels, t_channels)

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        s_shapes, t_shapes = network_shapes(student, teacher, hp)
        check_stage_pairs(s_shapes, t_shapes, "vid")
        return cls(student, teacher, [s[0] for s in stage_outputs(s_shapes)], [t[0] for t in stage_outputs(t_shapes)],
                   **cls.loss_weights(hp))

    def feature_loss(self, feats_s, feats_t):
        return self.vid(feats_s[1:-1], feats_t[1:-1])
