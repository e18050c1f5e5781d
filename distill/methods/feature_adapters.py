"""Shape adaptation shared by the feature-based baselines (FitNet, AT, VID, AB, FT).

Student and teacher feature maps differ in channels (always, across sizes) and, across families, in
spatial size (e.g. a ResNet student's last map is 8x8 where a VGG or MobileNetV2 teacher's is 4x4).
Two tools, both following CRD/RepDistiller (HobbitLong/RepDistiller):

`ConvReg`     a trained conv + BN (+ ReLU) from the student's (C, H, W) to the teacher's; used by FitNet's
              hint regressor and AB's connectors (models/util.py ConvReg). Its spatial rules:
                student twice the teacher      Conv2d 3x3, stride 2, padding 1
                student half the teacher       ConvTranspose2d 4x4, stride 2, padding 1
                student at least the teacher   Conv2d with kernel (1 + H_s - H_t, 1 + W_s - W_t), no padding
              RepDistiller tests only H (its maps are square) and fails on a student smaller than the teacher
              by other than 2x. Our choices: each rule must hold for H and W alike, and one more rule,
                teacher an integer multiple k of the student   ConvTranspose2d k x k, stride k
              so that any such pair works; other pairs are a ValueError naming both sizes.
`match_spatial`  for parameter-free comparisons (AT, VID, FT): the larger map is average-pooled to the
              smaller one's size (distiller_zoo/AT.py, VID.py, FT.py pool to (H_min, H_min); we pool H and W
              separately, the same for square maps).
"""
import torch.nn as nn
import torch.nn.functional as F


def check_map_shape(shape, what):
    """A (C, H, W) feature-map shape (no batch dimension) as a tuple of 3 positive ints."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{what} must be a feature-map shape (C, H, W) without the batch dimension, got {shape}; "
                         f"pass feature.shape[1:] of a 4-D [B, C, H, W] feature")
    return shape


def check_pairs(g_s, g_t, what):
    """Student and teacher feature lists of equal length (RepDistiller zips them, silently dropping extras)."""
    if len(g_s) != len(g_t) or len(g_s) == 0:
        raise ValueError(f"{what} pairs student and teacher features one to one, got {len(g_s)} student and "
                         f"{len(g_t)} teacher features; pick the same number of block outputs from each network")


def match_spatial(f_s, f_t):
    """Average-pool the larger of two [B, C, H, W] maps to the smaller one's (H, W), per dimension."""
    h, w = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
    if f_s.shape[2:] != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if f_t.shape[2:] != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


def _spatial_layer(c_s, c_t, s_hw, t_hw):
    """The conv that maps a c_s x s_hw map to c_t x t_hw (RepDistiller's rules, plus integer upsampling)."""
    (s_h, s_w), (t_h, t_w) = s_hw, t_hw
    if s_h == 2 * t_h and s_w == 2 * t_w:
        return nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    if 2 * s_h == t_h and 2 * s_w == t_w:
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    if s_h >= t_h and s_w >= t_w:
        return nn.Conv2d(c_s, c_t, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    if t_h % s_h == 0 and t_w % s_w == 0 and t_h // s_h == t_w // s_w:
        k = t_h // s_h
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=k, stride=k)
    raise ValueError(f"ConvReg cannot map a student map of {s_h}x{s_w} to a teacher map of {t_h}x{t_w}: the student "
                     f"must be at least as large in both dimensions, or the teacher an integer multiple of it; "
                     f"pick another pair of layers")


class ConvReg(nn.Module):
    """Student map [B, C_s, H_s, W_s] -> teacher-shaped [B, C_t, H_t, W_t]: conv (rules above), BN, optional ReLU.

    `s_shape`, `t_shape`: (C, H, W) of the student's and the teacher's feature map. FitNet uses the ReLU
    (the hint target is a post-ReLU map), AB's connectors do not (their target is pre-ReLU)."""

    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        c_s, s_h, s_w = check_map_shape(s_shape, "ConvReg s_shape")
        c_t, t_h, t_w = check_map_shape(t_shape, "ConvReg t_shape")
        self.conv = _spatial_layer(c_s, c_t, (s_h, s_w), (t_h, t_w))
        self.bn = nn.BatchNorm2d(c_t)
        self.relu = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))
