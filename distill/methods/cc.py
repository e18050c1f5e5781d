"""`cc` loss: correlation congruence (Peng et al., ICCV 2019), as CRD/RepDistiller runs it.

The pooled features (feature list [-1]) pass through two trained linear embeddings to FEAT_DIM = 128
(models/util.py LinearEmbed: Linear only, no normalisation; train_student.py trains both, the teacher's
included), then, over the batch in its order (distiller_zoo/CC.py):

    e_s = W_s f_s + b_s,   e_t = W_t f_t + b_t,   delta = |e_s - e_t|            [B, 128]
    L_CC = 1/(B-1) sum_{i=1}^{B-1} sum_d delta[i,d] * delta[i+1,d]

Note: this is the code the CC authors shared with RepDistiller (its docstring says so), a product of the
embedding gaps of neighbouring samples. It is *not* the paper's Gaussian-RBF correlation with a p-th order
Taylor expansion (RepDistiller keeps no such kernel, not even commented out); the published weight was tuned
for this form, so we follow it. The teacher *feature* is detached; the teacher *embedding* W_t is trained.
Needs B >= 2. Published weight beta = 0.02 with CE gamma = 1, KD alpha = 0 (scripts/run_cifar_distill.sh).
Computed in fp32 (embeddings included) whatever the autocast mode.
"""
import torch.nn as nn

from distill.methods.base import fp32, fp32_region
from distill.methods.feature_method import FeatureMethod
from distill.models import classifier_in_features

WEIGHT = 0.02    # beta, scripts/run_cifar_distill.sh
FEAT_DIM = 128   # train_student.py --feat_dim


class CorrelationLoss(nn.Module):
    """dim_s / dim_t: widths of the student's / teacher's pooled features."""

    def __init__(self, dim_s, dim_t, feat_dim=FEAT_DIM):
        super().__init__()
        self.embed_s = nn.Linear(dim_s, feat_dim)
        self.embed_t = nn.Linear(dim_t, feat_dim)

    def forward(self, f_s, f_t):
        """f_s [B, dim_s], f_t [B, dim_t] (or any [B, ...] that flattens to those widths)."""
        if f_s.shape[0] < 2:
            raise ValueError(f"CorrelationLoss compares neighbouring samples and needs a batch of at least 2, "
                             f"got {f_s.shape[0]}; raise the batch size")
        with fp32_region(f_s.device.type):
            e_s = self.embed_s(fp32(f_s).flatten(1))
            e_t = self.embed_t(fp32(f_t.detach()).flatten(1))
            delta = (e_s - e_t).abs()
            return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CC(FeatureMethod):
    """`cc`: CE + w_cc * L_CC on the embedded pooled features (feature list [-1]); both embeddings trained."""
    loss_name = "cc"

    def __init__(self, student, teacher, feat_dim=FEAT_DIM, w_ce=1.0, w_cc=WEIGHT, w_kd=0.0, kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_cc, w_kd, kd_T)
        self.correlation = CorrelationLoss(classifier_in_features(student), classifier_in_features(teacher),
                                           feat_dim)

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        return cls(student, teacher, feat_dim=hp["cc_feat_dim"], **cls.loss_weights(hp))

    def feature_loss(self, feats_s, feats_t):
        return self.correlation(feats_s[-1], feats_t[-1])
