"""What the feature-based baselines share: `FeatureMethod` (one stage) and `TwoStageMethod` (AB, FT).

FeatureMethod (fitnet, at, sp, cc, vid, rkd, pkt; RepDistiller's train_student.py with -r 1 -a 0 -b beta):

    loss = w_ce * CE(student logits, y) + beta * L_feat(student features, teacher features) [+ w_kd * KD]

Features come from `distill.models.forward_with_features` (torchvision ResNets and the CIFAR zoo alike):
the student's with gradient, the teacher's under no_grad in eval mode (Method.teacher_features). Which
entries a method reads is its `feature_loss`'s business. The feature term is always computed (also at
beta = 0), so every trainable extra gets a gradient each step (DDP needs that).

Modules whose shapes depend on the networks (regressors, connectors, VID layers, translators) are built
in `from_hparams` from one eval-mode dummy pass of each network at the training resolution
(`hp["image_size"]`, see `network_shapes`), so they exist before the trainer builds the optimizer and are
part of `state_dict()` (checkpoints), `parameters()` (optimizer, DDP) and `.to(device)`.

TwoStageMethod (ab, ft) adds RepDistiller's initialisation stage (helper/pretrain.py). The stage
progress is a count of finished initialisation epochs, saved in `state_dict()` (as extra state), so a
run interrupted in either stage resumes exactly. The trainer's side of the protocol:

    method.init_epochs                number of initialisation epochs (0: the method starts in its main stage)
    method.in_init_stage              True while init_epochs_done < init_epochs
    method.stage_parameters()         the parameters trained in the current stage; exactly those have
                                      requires_grad (so `[p for p in method.parameters() if p.requires_grad]`
                                      is the same list, and DDP wrapped after a stage change sees only them)
    method.init_stage_lr(base_lr)     the initialisation stage's constant learning rate
    method(views, target, index)      the current stage's (logits, weighted losses)
    method.finish_init_epoch()        call after each initialisation epoch; returns True when that epoch was
                                      the last one, i.e. the main stage starts now (fresh optimizer and
                                      schedule over the new stage_parameters(), DDP wrapped anew)
"""
import torch
import torch.nn.functional as F

from distill.methods.base import Method, fp32, fp32_region, kd_loss
from distill.methods.feature_adapters import check_pairs
from distill.models import feature_shapes, forward_features, forward_with_features


def network_shapes(student, teacher, hp, preact=False):
    """(student, teacher) feature shapes at the training resolution hp["image_size"] (see models.feature_shapes)."""
    size = hp.get("image_size")
    if size is None:
        raise ValueError("this method sizes its modules from the networks' feature maps and needs the training "
                         "resolution: pass image_size to build_method (the trainer's --crop-size)")
    return feature_shapes(student, size, preact), feature_shapes(teacher, size, preact)


def stage_outputs(shapes):
    """The stage entries of a feature list (between the stem and the pooled feature)."""
    return shapes[1:-1]


def check_stage_pairs(s_shapes, t_shapes, method):
    """Stage-by-stage methods need as many student as teacher stages (e.g. 3 for CIFAR ResNets and
    ShuffleNets, 4 for VGGs, MobileNetV2, ResNet50 and torchvision ResNets)."""
    check_pairs(stage_outputs(s_shapes), stage_outputs(t_shapes), f"--method {method}")


class FeatureMethod(Method):
    num_views = 1
    loss_name = None  # key of the feature term in the losses dict

    def __init__(self, student, teacher, w_ce, w_feat, w_kd, kd_T):
        super().__init__(student, teacher)
        self.w_ce, self.w_feat, self.w_kd, self.kd_T = w_ce, w_feat, w_kd, kd_T

    @classmethod
    def loss_weights(cls, hp):
        """The keyword arguments every feature method takes from the resolved flags: w_ce, w_<loss_name>,
        w_kd, kd_T."""
        w_feat = f"w_{cls.loss_name}"
        return {"w_ce": hp["w_ce"], w_feat: hp[w_feat], "w_kd": hp["w_kd"], "kd_T": hp["kd_T"]}

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        """Methods without modules sized from the networks need the weights only."""
        return cls(student, teacher, **cls.loss_weights(hp))

    def feature_loss(self, feats_s, feats_t):
        """The unweighted feature loss from the two feature lists [stem, stages..., pooled]."""
        raise NotImplementedError(f"{type(self).__name__} must define feature_loss")

    def forward(self, views, target, index):
        self._check_views(views)
        return self.main_stage_forward(views[0], target)

    def main_stage_forward(self, x, target):
        feats_s, logits = forward_with_features(self.student, x)   # [stem, stages..., pooled], [B, C]
        feats_t, logits_t = self.teacher_features(x)                # no grad, eval mode
        loss_feat = self.feature_loss(feats_s, feats_t)                                 # fp32 inside
        with fp32_region(x.device.type):
            losses = {"ce": self.w_ce * F.cross_entropy(fp32(logits), target),
                      self.loss_name: self.w_feat * loss_feat}
            if self.w_kd:
                losses["kd"] = self.w_kd * kd_loss(logits, logits_t, self.kd_T)
        return logits, losses


class TwoStageMethod(FeatureMethod):
    """A FeatureMethod with an initialisation stage of `init_epochs` epochs (protocol: module docstring).
    Subclasses define init_stage_parameters, main_stage_parameters and init_stage_forward, and call
    `self.enter_stage()` at the end of __init__."""

    def __init__(self, student, teacher, w_ce, w_feat, w_kd, kd_T, init_epochs):
        super().__init__(student, teacher, w_ce, w_feat, w_kd, kd_T)
        if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
            raise ValueError(f"--init-epochs must be an int >= 0, got {init_epochs!r}")
        self.init_epochs = init_epochs
        self.init_epochs_done = 0

    # --- stage -------------------------------------------------------------------------------------
    @property
    def in_init_stage(self):
        return self.init_epochs_done < self.init_epochs

    def init_stage_parameters(self):
        raise NotImplementedError

    def main_stage_parameters(self):
        raise NotImplementedError

    def stage_parameters(self):
        return self.init_stage_parameters() if self.in_init_stage else self.main_stage_parameters()

    def init_stage_lr(self, base_lr):
        return base_lr

    def enter_stage(self):
        """requires_grad exactly on the current stage's parameters, and the stage's train/eval modes."""
        trained = {id(p) for p in self.stage_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trained)
        self.train(self.training)

    def stage_modes(self):
        """Put the modules that the current stage runs frozen into eval mode (called by train())."""

    def train(self, mode=True):
        super().train(mode)
        if mode:
            self.stage_modes()
        return self

    def finish_init_epoch(self):
        """Count one finished initialisation epoch; True when the main stage starts with the next step."""
        if not self.in_init_stage:
            raise RuntimeError(f"{type(self).__name__}: finish_init_epoch called after all {self.init_epochs} "
                               f"initialisation epochs; check method.in_init_stage first")
        self.init_epochs_done += 1
        if self.in_init_stage:
            return False
        self.enter_stage()
        return True

    # --- checkpoint: the stage progress travels in state_dict() ------------------------------------
    def get_extra_state(self):
        return {"init_epochs": self.init_epochs, "init_epochs_done": self.init_epochs_done}

    def set_extra_state(self, state):
        if state["init_epochs"] != self.init_epochs:
            raise ValueError(f"the checkpoint was trained with --init-epochs {state['init_epochs']}, this run has "
                             f"{self.init_epochs}; resume with --init-epochs {state['init_epochs']}")
        self.init_epochs_done = int(state["init_epochs_done"])
        self.enter_stage()

    # --- forward -----------------------------------------------------------------------------------
    def init_stage_forward(self, x, target):
        raise NotImplementedError

    def forward(self, views, target, index):
        self._check_views(views)
        if self.in_init_stage:
            return self.init_stage_forward(views[0], target)
        return self.main_stage_forward(views[0], target)

    @torch.no_grad()
    def frozen_student_logits(self, x):
        """The student's logits when a stage does not train it (the trainer still reports accuracy)."""
        return forward_features(self.student, x)[1]
