"""`kd`: Hinton et al. knowledge distillation, CE + KL(teacher || student) at temperature T, scaled by T^2."""
import torch.nn.functional as F

from distill.methods.base import Method, fp32, fp32_region, kd_loss
from distill.models import forward_features


class KD(Method):
    num_views = 1

    def __init__(self, student, teacher, w_ce, w_kd, T):
        super().__init__(student, teacher)
        self.w_ce, self.w_kd, self.T = w_ce, w_kd, T

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        return cls(student, teacher, w_ce=hp["w_ce"], w_kd=hp["w_kd"], T=hp["kd_T"])

    def forward(self, views, target, index):
        self._check_views(views)
        _, logits = forward_features(self.student, views[0])  # [B, C]
        _, logits_t = self.teacher_forward(views[0])           # [B, C], no grad, eval mode
        with fp32_region(logits.device.type):
            ce = F.cross_entropy(fp32(logits), target)
            kd = kd_loss(logits, logits_t, self.T)
        return logits, {"ce": self.w_ce * ce, "kd": self.w_kd * kd}
