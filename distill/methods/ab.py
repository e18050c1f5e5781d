"""`ab` loss: activation boundaries (Heo et al., AAAI 2019), as CRD/RepDistiller runs it.

On the *pre-ReLU* outputs of every block between the stem and the pooled feature (feature list [1:-1] of
the preact features; train_student.py), the student's map goes through a trained connector c_j (identity when
channels and spatial size already match, else ConvReg without ReLU: conv + BN; models/util.py Connector), then
the alternative L2 loss with margin m = 1 pushes each student neuron to the teacher neuron's side of 0
(distiller_zoo/AB.py):

    l_j  = sum_{b,c,h,w} (s + m)^2 [s > -m and t <= 0]  +  (s - m)^2 [s <= m and t > 0],   s = c_j(F_s^j), t = F_t^j
    L_AB = sum_j w_j * l_j / B * 3 / 1000,      w_j = 2^(j - n + 1) for j = 0..n-1 (the last block 1, then 1/2, ...)

(the sum over elements, divided by the batch size, and RepDistiller's fixed 3/1000 scale.) The teacher enters
only through the sign of t, so no gradient reaches it.

Two stages (train_student.py, helper/pretrain.py, helper/loops.py):
  init stage  INIT_EPOCHS = 30 epochs of L_AB alone (no CE), training the connectors and the student's
              feature modules (everything but the classifier) with SGD (the main stage's base LR: 0.05, 0.01 for
              MobileNetV2 / ShuffleNet students; momentum 0.9, weight decay 5e-4, constant LR), the student's
              feature modules and the connectors in train mode.
  main stage  a fresh SGD over the student alone with CE only: RepDistiller's main-stage AB term is 0, so the
              published beta = 1 (scripts/run_cifar_distill.sh) multiplies nothing; the connectors are unused.
Computed in fp32 (connectors included) whatever the autocast mode.
"""
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import fp32, fp32_region, kd_loss
from distill.methods.feature_adapters import ConvReg, check_map_shape, check_pairs
from distill.methods.feature_method import TwoStageMethod, check_stage_pairs, network_shapes, stage_outputs
from distill.models import classifier_name, forward_features, forward_with_features

WEIGHT = 1.0      # beta, scripts/run_cifar_distill.sh (multiplies RepDistiller's zero main-stage AB term)
INIT_EPOCHS = 30  # train_student.py --init_epochs
MARGIN = 1.0      # distiller_zoo/AB.py


def make_connector(s_shape, t_shape):
    """Identity when (C, H, W) already match the teacher's (RepDistiller compares C and H), else conv + BN."""
    s_shape = check_map_shape(s_shape, "AB student shape")
    t_shape = check_map_shape(t_shape, "AB teacher shape")
    return nn.Identity() if s_shape == t_shape else ConvReg(s_shape, t_shape, use_relu=False)


class ABLoss(nn.Module):
    """s_shapes / t_shapes: (C, H, W) of each paired pre-ReLU block output, in order (stem side first)."""

    def __init__(self, s_shapes, t_shapes, margin=MARGIN):
        super().__init__()
        check_pairs(s_shapes, t_shapes, "ABLoss")
        self.connectors = nn.ModuleList(make_connector(s, t) for s, t in zip(s_shapes, t_shapes))
        n = len(s_shapes)
        self.layer_weights = [2.0 ** (j - n + 1) for j in range(n)]
        self.margin = margin

    def alternative_l2(self, s, t):
        m = self.margin
        below = ((s > -m) & (t <= 0)).to(s.dtype)  # teacher off: push the student below -m
        above = ((s <= m) & (t > 0)).to(s.dtype)   # teacher on: push the student above +m
        return ((s + m).pow(2) * below + (s - m).pow(2) * above).sum()

    def forward(self, g_s, g_t):
        check_pairs(g_s, g_t, "ABLoss")
        if len(g_s) != len(self.connectors):
            raise ValueError(f"ABLoss was built for {len(self.connectors)} block outputs, got {len(g_s)}")
        bsz = g_s[0].shape[0]
        with fp32_region(g_s[0].device.type):
            total = 0.0
            for w, conn, f_s, f_t in zip(self.layer_weights, self.connectors, g_s, g_t):
                total = total + w * self.alternative_l2(conn(fp32(f_s)), fp32(f_t.detach())) / bsz * 3 / 1000
            return total


class AB(TwoStageMethod):
    """`ab`: initialisation stage w_ab * L_AB (connectors + the student without its classifier), then the
    student alone on CE (+ w_kd * KD). s_shapes / t_shapes: (C, H, W) of the pre-ReLU stage outputs.
    --w-ab weights L_AB in the initialisation stage (RepDistiller's weight there is 1 and its -b 1 multiplies
    a zero main-stage term), so the default, 1, reproduces RepDistiller."""
    loss_name = "ab"

    def __init__(self, student, teacher, s_shapes, t_shapes, init_epochs=INIT_EPOCHS, w_ce=1.0, w_ab=WEIGHT,
                 w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_ab, w_kd, kd_T, init_epochs)
        self.ab = ABLoss(s_shapes, t_shapes)
        self.enter_stage()

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        s_shapes, t_shapes = network_shapes(student, teacher, hp, preact=True)
        check_stage_pairs(s_shapes, t_shapes, "ab")
        return cls(student, teacher, stage_outputs(s_shapes), stage_outputs(t_shapes), init_epochs=hp["init_epochs"],
                   **cls.loss_weights(hp))

    def init_stage_parameters(self):
        head = classifier_name(self.student) + "."
        return [p for n, p in self.student.named_parameters() if not n.startswith(head)] + list(self.ab.parameters())

    def main_stage_parameters(self):
        return list(self.student.parameters())

    def init_stage_forward(self, x, target):
        feats_s, logits = forward_with_features(self.student, x, preact=True)
        feats_t, _ = self.teacher_features(x, preact=True)
        return logits, {"ab": self.w_feat * self.ab(feats_s[1:-1], feats_t[1:-1])}

    def main_stage_forward(self, x, target):
        _, logits = forward_features(self.student, x)
        with fp32_region(x.device.type):
            losses = {"ce": self.w_ce * F.cross_entropy(fp32(logits), target)}
            if self.w_kd:
                losses["kd"] = self.w_kd * kd_loss(logits, self.teacher_forward(x)[1], self.kd_T)
        return logits, losses
