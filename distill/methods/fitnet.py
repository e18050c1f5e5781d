"""`fitnet` loss: FitNets hints (Romero et al., ICLR 2015), as CRD/RepDistiller runs it.

    L_hint = mean_{b,c,h,w} ( r(F_s)[b,c,h,w] - F_t[b,c,h,w] )^2

F_s, F_t: the student's and the teacher's hint layer, feature list index HINT_LAYER = 2 (the second block's
output; RepDistiller's `--hint_layer 2` default). r: a trained ConvReg regressor (conv + BN + ReLU from the
student's (C, H, W) to the teacher's; models/util.py, see feature_adapters.py for the spatial rules).
Mean squared error over every element (nn.MSELoss, distiller_zoo/FitNet.py). The teacher map is detached
(helper/loops.py). Published weight beta = 100 with CE gamma = 1, KD alpha = 0 (scripts/run_cifar_distill.sh).
RepDistiller trains FitNet in one stage (the original paper's hint pre-training stage is not used).
Computed in fp32 (regressor included) whatever the autocast mode.
"""
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import fp32, fp32_region
from distill.methods.feature_adapters import ConvReg
from distill.methods.feature_method import FeatureMethod, network_shapes

WEIGHT = 100.0   # beta, scripts/run_cifar_distill.sh
HINT_LAYER = 2   # index into the feature list [stem, block1, block2, ...], train_student.py --hint_layer


class HintLoss(nn.Module):
    """MSE between the regressed student hint map and the teacher's. s_shape / t_shape: (C, H, W) of each."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        self.regressor = ConvReg(s_shape, t_shape, use_relu=True)

    def forward(self, f_s, f_t):
        with fp32_region(f_s.device.type):
            return F.mse_loss(self.regressor(fp32(f_s)), fp32(f_t.detach()))


class FitNet(FeatureMethod):
    """`fitnet`: CE + w_fitnet * L_hint on feature entry `hint_layer` (s_shape / t_shape: its (C, H, W))."""
    loss_name = "fitnet"

    def __init__(self, student, teacher, s_shape, t_shape, hint_layer=HINT_LAYER, w_ce=1.0, w_fitnet=WEIGHT,
                 w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_fitnet, w_kd, kd_T)
        self.hint_layer = hint_layer
        self.hint = HintLoss(s_shape, t_shape)

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        s_shapes, t_shapes = network_shapes(student, teacher, hp)
        layer = hp["hint_layer"]
        last = min(len(s_shapes), len(t_shapes)) - 2  # the pooled feature is not a map
        if not 0 <= layer <= last:
            raise ValueError(f"--hint-layer {layer} is not a feature map of both networks: choose 0 (stem) .. "
                             f"{last} (the student has {len(s_shapes) - 2} stages, the teacher {len(t_shapes) - 2})")
        return cls(student, teacher, s_shapes[layer], t_shapes[layer], hint_layer=layer,
                   **cls.loss_weights(hp))

    def feature_loss(self, feats_s, feats_t):
        return self.hint(feats_s[self.hint_layer], feats_t[self.hint_layer])
