"""`ft` loss: factor transfer (Kim et al., NeurIPS 2018), as CRD/RepDistiller runs it.

On the last feature map before pooling (feature list [-2]; train_student.py). A paraphraser (teacher side)
and a translator (student side) encode the maps to k = int(rate * C_t) channels, rate = 0.5 (models/util.py):

    paraphraser  encoder: conv3x3 C_t->C_t, LReLU(0.1), conv3x3 C_t->k, LReLU, conv3x3 k->k, LReLU
                 decoder: convT3x3 k->k, LReLU, convT3x3 k->C_t, LReLU, convT3x3 C_t->C_t, LReLU
                 (stride 1, padding 1, biases, no BN: RepDistiller's use_bn=False default)
    translator   conv3x3 C_s->C_s, BN, LReLU(0.1), conv3x3 C_s->k, BN, LReLU, conv3x3 k->k, BN, LReLU

After average-pooling the larger factor map to the smaller one's spatial size (distiller_zoo/FT.py, p1 = 2,
p2 = 1):

    phi(G)[b] = q / max(||q||_2, 1e-12),  q[h*W+w] = (1/k) sum_c G[b,c,h,w]^2
    L_FT      = mean_{b,i} | phi(translator(F_s))[b,i] - phi(paraphraser.encoder(F_t))[b,i] |

RepDistiller's particular kept: the factor is this attention-like channel mean of squares, not the paper's
normalised flattened factor. Two stages (train_student.py, helper/pretrain.py, helper/loops.py):
  init stage  INIT_EPOCHS = 30 epochs training the paraphraser alone to reconstruct the teacher map,
              L_rec = mean (paraphraser(F_t) - F_t)^2 (nn.MSELoss), with SGD (LR 0.01 for ResNet / WRN students,
              else the main stage's base LR: 0.05 for VGG / ResNet50, 0.01 for MobileNetV2 / ShuffleNet;
              momentum 0.9, weight decay 5e-4, constant LR); the student is not trained.
  main stage  the student and the translator trained with CE + beta * L_FT, beta = 200
              (scripts/run_cifar_distill.sh); the paraphraser frozen (eval mode, no gradient).
Computed in fp32 (translator and paraphraser included) whatever the autocast mode.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.methods.base import fp32, fp32_region
from distill.cifar_models import CifarResNet, WideResNet
from distill.methods.feature_adapters import match_spatial
from distill.methods.feature_method import TwoStageMethod, network_shapes

WEIGHT = 200.0    # beta, scripts/run_cifar_distill.sh
INIT_EPOCHS = 30  # train_student.py --init_epochs
RATE = 0.5        # models/util.py Paraphraser / Translator k
INIT_LR_RESNET = 0.01  # helper/pretrain.py: the init-stage LR for basic-block ResNet and WRN students


def _conv_stage(c_in, c_out, use_bn, transpose=False):
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(c_in, c_out, 3, 1, 1)
    return [conv] + ([nn.BatchNorm2d(c_out)] if use_bn else []) + [nn.LeakyReLU(0.1)]


def factor_channels(c_t, rate=RATE):
    k = int(c_t * rate)
    if k < 1:
        raise ValueError(f"factor transfer needs int({rate} * teacher channels) >= 1, got {c_t} teacher channels")
    return k


class Paraphraser(nn.Module):
    """Autoencoder of the teacher's [B, c_t, H, W] map through a k-channel factor."""

    def __init__(self, c_t, rate=RATE, use_bn=False):
        super().__init__()
        k = factor_channels(c_t, rate)
        self.encoder = nn.Sequential(*_conv_stage(c_t, c_t, use_bn), *_conv_stage(c_t, k, use_bn),
                                     *_conv_stage(k, k, use_bn))
        self.decoder = nn.Sequential(*_conv_stage(k, k, use_bn, True), *_conv_stage(k, c_t, use_bn, True),
                                     *_conv_stage(c_t, c_t, use_bn, True))

    def forward(self, f_t):
        """Returns (factor [B, k, H, W], reconstruction [B, c_t, H, W])."""
        factor = self.encoder(f_t)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Student [B, c_s, H, W] map -> [B, k, H, W] factor, k = int(rate * c_t)."""

    def __init__(self, c_s, c_t, rate=RATE, use_bn=True):
        super().__init__()
        k = factor_channels(c_t, rate)
        self.encoder = nn.Sequential(*_conv_stage(c_s, c_s, use_bn), *_conv_stage(c_s, k, use_bn),
                                     *_conv_stage(k, k, use_bn))

    def forward(self, f_s):
        return self.encoder(f_s)


def factor(g, p=2):
    """[B, k, H, W] -> [B, H*W]: channel mean of g^p, L2-normalised per sample."""
    return F.normalize(g.pow(p).mean(dim=1).flatten(1), dim=1)


class FactorTransferLoss(nn.Module):
    """c_s / c_t: channels of the student's / teacher's last feature map."""

    def __init__(self, c_s, c_t, rate=RATE):
        super().__init__()
        self.paraphraser = Paraphraser(c_t, rate)
        self.translator = Translator(c_s, c_t, rate)

    def reconstruction_loss(self, f_t):
        """Init stage: MSE of the paraphraser's reconstruction of the (detached) teacher map; trains the paraphraser."""
        with fp32_region(f_t.device.type):
            f_t = fp32(f_t.detach())
            return F.mse_loss(self.paraphraser(f_t)[1], f_t)

    def forward(self, f_s, f_t):
        """Main stage: L_FT; gradients reach the student and the translator, never the paraphraser."""
        with fp32_region(f_s.device.type):
            factor_s = self.translator(fp32(f_s))
            with torch.no_grad():
                factor_t = self.paraphraser.encoder(fp32(f_t))
            factor_s, factor_t = match_spatial(factor_s, factor_t)
            return (factor(factor_s) - factor(factor_t)).abs().mean()


class FT(TwoStageMethod):
    """`ft`: initialisation stage trains the paraphraser on L_rec (the student frozen, in eval mode), then the
    student and the translator on CE + w_ft * L_FT (+ w_kd * KD), the paraphraser frozen in eval mode.
    c_s / c_t: channels of the student's / teacher's last feature map (feature list [-2])."""
    loss_name = "ft"

    def __init__(self, student, teacher, c_s, c_t, init_epochs=INIT_EPOCHS, w_ce=1.0, w_ft=WEIGHT, w_kd=0.0,
                 kd_T=4.0):
        super().__init__(student, teacher, w_ce, w_ft, w_kd, kd_T, init_epochs)
        self.factor = FactorTransferLoss(c_s, c_t)
        self.enter_stage()

    @classmethod
    def from_hparams(cls, student, teacher, hp, num_samples, sample_labels, gather):
        s_shapes, t_shapes = network_shapes(student, teacher, hp)
        return cls(student, teacher, s_shapes[-2][0], t_shapes[-2][0], init_epochs=hp["init_epochs"],
                   **cls.loss_weights(hp))

    def init_stage_parameters(self):
        return list(self.factor.paraphraser.parameters())

    def main_stage_parameters(self):
        return list(self.student.parameters()) + list(self.factor.translator.parameters())

    def init_stage_lr(self, base_lr):
        # RepDistiller lists the CIFAR basic-block ResNets and the WRNs by name (ResNet50 not among them)
        return INIT_LR_RESNET if isinstance(self.student, (CifarResNet, WideResNet)) else base_lr

    def stage_modes(self):
        (self.student if self.in_init_stage else self.factor.paraphraser).eval()

    def init_stage_forward(self, x, target):
        feats_t, _ = self.teacher_features(x)
        return self.frozen_student_logits(x), {"ft_rec": self.factor.reconstruction_loss(feats_t[-2])}

    def feature_loss(self, feats_s, feats_t):
        return self.factor(feats_s[-2], feats_t[-2])
