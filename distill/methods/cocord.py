"""CoCoRD: Contrastive Consistent Representation Distillation (Fu, Yang & Yang), in one module.

Networks (the authors' released settings):
  teacher   frozen backbone, eval mode, no grad (held outside the module registry, see methods/base.py)
  student   backbone + classifier (torchvision ResNet incl. fc, or a CIFAR zoo model), trained
  proj_s    Linear(d_s, H) -> BN1d -> ReLU -> Linear(H, P), trained          (H = P = 2048)
  predictor Linear(P, R) -> BN1d -> ReLU -> Linear(R, P), trained            (R = 512)
  proj_t    teacher projection head: a copy of proj_s, EMA of it (m = 0.999). When d_t != d_s it cannot
            be an EMA of proj_s: it gets its own input width d_t, random init, and stays frozen.
  slow      slow-moving student: copy of student backbone (fc dropped) + proj_s, EMA (m = 0.9)
All modules except the teacher backbone run in train mode, so proj_t and the slow student use batch
statistics; their BN running buffers are their own (EMA touches parameters only).

Per step, with views [x_s, x_s', x_t] of the same images:
  1. student forward on x_s and x_s' (with grad)
  2. EMA of proj_t and of the slow student, under no_grad, after the student's forward and before
     any key is computed
  3. keys: k+ = normalize(proj_t(teacher(x_t))), slow(x_s), slow(x_s')  (no grad)
  4. losses (fp32): InfoNCE over [q.k+, q.queue] / tau (target 0), prediction loss
     D(pred(z_s), slow(x_s')) + D(pred(z_s'), slow(x_s)) (the sum, as in the authors' code), D = 2 - 2 cos,
     CE on x_s
  5. enqueue the keys of all ranks (FIFO of K negatives, wrap-around, no K % B requirement); the write
     itself is deferred to the next forward / state_dict() so that backward can use the queue uncopied
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import Method, fp32, fp32_region, kd_loss
from distill.models import classifier_in_features, classifier_name, forward_features, replace_classifier


def mlp(in_dim, hidden_dim, out_dim):
    """Linear -> BatchNorm1d -> ReLU -> Linear (the projection head and predictor shape)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def prediction_loss(p, z):
    """D(p, z) = 2 - 2 cos(p, z), averaged over the batch; z is a target (detached)."""
    return (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1)).mean()


class CoCoRD(Method):
    num_views = 3                                                                # [x_s, x_s', x_t]

    def __init__(self, student, teacher, proj_dim=2048, proj_hidden_dim=2048, pred_dim=512, queue_size=16384,
                 tau=0.1, teacher_head_momentum=0.999, slow_momentum=0.9, w_ce=1.0, w_contrast=1.0, w_pred=4.0,
                 w_kd=0.0, kd_T=4.0, gather=None):
        super().__init__(student, teacher)
        d_s, d_t = classifier_in_features(student), classifier_in_features(teacher)
        self.tau, self.m_t, self.m_slow = tau, teacher_head_momentum, slow_momentum
        self.w_ce, self.w_contrast, self.w_pred, self.w_kd, self.kd_T = w_ce, w_contrast, w_pred, w_kd, kd_T
        self.gather = gather

        self.proj_s = mlp(d_s, proj_hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, pred_dim, proj_dim)

        # teacher head: EMA copy of proj_s when the widths agree, else frozen random (documented deviation)
        self.proj_t_is_ema = d_s == d_t
        self.proj_t = copy.deepcopy(self.proj_s) if self.proj_t_is_ema else mlp(d_t, proj_hidden_dim, proj_dim)
        for p in self.proj_t.parameters():
            p.requires_grad_(False)

        # slow-moving student: backbone without fc + its own projection head
        self.slow = copy.deepcopy(student)
        replace_classifier(self.slow, nn.Identity())
        self.slow_proj = copy.deepcopy(self.proj_s)
        for p in list(self.slow.parameters()) + list(self.slow_proj.parameters()):
            p.requires_grad_(False)

        # queue of K normalised teacher keys (negatives only) and its write pointer
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))  # [K, P]
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # This step's loss reads the queue and backward needs it unchanged, so instead of copying K x P
        # floats every step, the (already gathered) keys wait here and are written at the start of the
        # next forward, or when state_dict() is taken: every loss sees exactly the queue that a write
        # right after the loss would give. Writing is local (no collective), so rank-0-only saves are safe.
        self._pending_keys = None
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.flush_queue())
        self.register_load_state_dict_pre_hook(lambda module, *args: setattr(module, "_pending_keys", None))

    # --- EMA ----------------------------------------------------------------------------------------
    def _ema_pairs(self):
        """[(EMA params, source params, momentum)], matched by name. Built per call (cheap), so it stays right
        when parameters are replaced (e.g. SyncBN conversion, dtype/device moves)."""
        head = classifier_name(self.student) + "."
        student = {n: p for n, p in self.student.named_parameters() if not n.startswith(head)}
        slow = dict(self.slow.named_parameters())
        if student.keys() != slow.keys():
            raise RuntimeError("slow student and student backbones differ in parameter names")
        pairs = [([slow[n] for n in student] + list(self.slow_proj.parameters()),
                  list(student.values()) + list(self.proj_s.parameters()), self.m_slow)]
        if self.proj_t_is_ema:
            pairs.append((list(self.proj_t.parameters()), list(self.proj_s.parameters()), self.m_t))
        return pairs

    @torch.no_grad()
    def _momentum_update(self):
        """ema = m * ema + (1 - m) * source, for the slow student and (when it is an EMA) proj_t."""
        for ema, src, m in self._ema_pairs():
            torch._foreach_lerp_(ema, src, 1.0 - m)  # one fused pass: ema + (1 - m) * (src - ema)

    # --- queue --------------------------------------------------------------------------------------
    def flush_queue(self):
        """Write the keys of the last step into the queue (see __init__); read the queue after this."""
        if self._pending_keys is not None:
            keys, self._pending_keys = self._pending_keys, None
            self._dequeue_and_enqueue(keys)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """FIFO write of keys [N, P] at the pointer, wrapping around; no host sync (pointer stays on device)."""
        K, n = self.queue.shape[0], keys.shape[0]
        first = max(0, n - K)  # more keys than slots: only the last K survive a sequential write
        pos = (self.queue_ptr + torch.arange(first, n, device=self.queue.device)) % K  # [min(N, K)]
        self.queue.index_copy_(0, pos, keys[first:].to(self.queue.device, self.queue.dtype))
        self.queue_ptr.add_(n).remainder_(K)

    # --- forward ------------------------------------------------------------------------------------
    def forward(self, views, target, index):
        self._check_views(views)
        self.flush_queue()  # the previous step's keys (its backward is done)
        x_s, x_s2, x_t = views

        # 1. student, two views (with grad)
        feat_s, logits = forward_features(self.student, x_s)                     # [B, d_s], [B, C]
        feat_s2, _ = forward_features(self.student, x_s2)                        # [B, d_s]
        z_s, z_s2 = self.proj_s(feat_s), self.proj_s(feat_s2)                    # [B, P]
        p_s, p_s2 = self.predictor(z_s), self.predictor(z_s2)                    # [B, P]

        # 2. EMA after the student's forward, before any key
        self._momentum_update()

        # 3. keys (no grad; proj_t and the slow student use batch statistics)
        with torch.no_grad():
            feat_t, _ = self.teacher_forward(x_t)                                # [B, d_t]
            k = self.proj_t(feat_t)                                              # [B, P]
            slow_s = self.slow_proj(forward_features(self.slow, x_s)[0])         # [B, P]
            slow_s2 = self.slow_proj(forward_features(self.slow, x_s2)[0])       # [B, P]
            logits_t = self.teacher_forward(x_s)[1] if self.w_kd else None       # [B, C], KD on the student's view

        # 4. losses in fp32
        with fp32_region(x_s.device.type):
            q = F.normalize(fp32(z_s), dim=1)                                    # [B, P]
            k = F.normalize(fp32(k), dim=1)                                      # [B, P]
            l_pos = (q * k).sum(dim=1, keepdim=True)                             # [B, 1]
            l_neg = q @ self.queue.to(q.dtype).t()                               # [B, K]
            logits_con = torch.cat([l_pos, l_neg], dim=1) / self.tau             # [B, 1+K]
            zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            loss_con = F.cross_entropy(logits_con, zeros)
            # the two distances are added, not averaged (authors' code): about 4 at init, 16 weighted
            loss_pred = (prediction_loss(fp32(p_s), fp32(slow_s2))
                         + prediction_loss(fp32(p_s2), fp32(slow_s)))
            loss_ce = F.cross_entropy(fp32(logits), target)
            losses = {"ce": self.w_ce * loss_ce, "contrast": self.w_contrast * loss_con,
                      "pred": self.w_pred * loss_pred}
            if self.w_kd:
                losses["kd"] = self.w_kd * kd_loss(logits, logits_t, self.kd_T)

        # 5. enqueue every rank's keys, so all ranks hold the same queue (written by the next flush_queue)
        self._pending_keys = self.gather(k) if self.gather is not None else k.detach()
        return logits, losses

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        return cls(student, teacher, proj_dim=hp["proj_dim"], proj_hidden_dim=hp["proj_hidden_dim"],
                   pred_dim=hp["pred_dim"], queue_size=hp["queue_size"], tau=hp["tau"],
                   teacher_head_momentum=hp["teacher_head_momentum"], slow_momentum=hp["slow_momentum"],
                   w_ce=hp["w_ce"], w_contrast=hp["w_contrast"], w_pred=hp["w_pred"], w_kd=hp["w_kd"],
                   kd_T=hp["kd_T"], gather=gather)

    def slow_student_state_dict(self):
        return self.slow.state_dict()  # the student's layout without its classifier (nn.Identity)
