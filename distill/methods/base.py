"""What every distillation method shares (interface I2).

A Method owns the student (a torchvision ResNet or a CIFAR zoo model, classifier included) and every
trainable or stateful extra (heads, predictor, EMA networks, queue, memory banks, regressors).
`forward(views, target, index)` returns the student's logits on views[0] and a dict of *weighted* loss
terms whose sum is the loss to minimise.
`from_hparams` builds it from the parsed flags (one row per method in `distill.methods.METHODS`).

The teacher backbone is frozen and comes from `--teacher-weights`, so it is kept outside the module
registry: it is not in `state_dict()` (checkpoints stay student-sized), not in `parameters()` (the
optimizer and DDP never see it), and stays in eval mode whatever `train()` says. `_apply` moves it
along with the method (`.to(device)`, `.cuda()`, `.to(memory_format=...)`).

Under DDP, wrap the whole Method (not the student), so one forward covers every student pass.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.models import forward_features, forward_with_features


def fp32_region(device_type):
    """Disable autocast: normalisations, logits and losses are computed in fp32 whatever the AMP mode."""
    if device_type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def fp32(t):
    """Half / bfloat16 tensors (autocast outputs) up to fp32; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kd_loss(logits_s, logits_t, T):
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (at least fp32)."""
    log_p_s = F.log_softmax(fp32(logits_s) / T, dim=1)
    p_t = F.softmax(fp32(logits_t) / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * (T * T)


class Method(nn.Module):
    num_views = 1

    def __init__(self, student, teacher=None):
        super().__init__()
        self.student = student
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # deliberately unregistered, see module docstring

    # --- the frozen, unregistered teacher -------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        if self.teacher is not None:
            self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher backbone always uses its running BN statistics
        return self

    @torch.no_grad()
    def teacher_forward(self, x):
        return forward_features(self.teacher, x)  # ([B, d_t], [B, C_t])

    @torch.no_grad()
    def teacher_features(self, x, preact=False):
        return forward_with_features(self.teacher, x, preact=preact)  # ([stem, stages..., pooled], logits)

    # --- interface --------------------------------------------------------------------------------
    def slow_student_state_dict(self):
        """The slow-moving student's backbone in torchvision layout (no fc), or None."""
        return None

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        """Build from resolved hyper-parameters `hp` (flag name -> value, see methods/__init__.py);
        `num_samples` / `sample_labels` describe the training set, `gather` is None in one process."""
        raise NotImplementedError(f"{cls.__name__} must define from_hparams to be listed in METHODS")

    def forward(self, views, target, index):
        raise NotImplementedError

    def _check_views(self, views):
        if not isinstance(views, (list, tuple)) or len(views) != self.num_views:
            got = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
            raise ValueError(f"{type(self).__name__} expects a list of {self.num_views} view(s) per batch, "
                             f"got {got}; build the loader with num_views=method.num_views")
