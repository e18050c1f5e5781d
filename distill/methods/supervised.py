"""`supervised`: cross-entropy only (trains teachers and the plain "Student" baseline)."""
import torch.nn.functional as F

from distill.methods.base import Method, fp32, fp32_region
from distill.models import forward_features


class Supervised(Method):
    num_views = 1

    def __init__(self, student, w_ce=1.0):
        super().__init__(student, teacher=None)
        self.w_ce = w_ce

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        return cls(student, w_ce=hp["w_ce"])

    def forward(self, views, target, index):
        self._check_views(views)
        _, logits = forward_features(self.student, views[0])  # [B, C]
        with fp32_region(logits.device.type):
            ce = F.cross_entropy(fp32(logits), target)
        return logits, {"ce": self.w_ce * ce}
