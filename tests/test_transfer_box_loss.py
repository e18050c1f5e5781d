"""The torchvision engine's box-regression loss against a hand computation (issue 16): detectron2's
FastRCNNOutputs sums smooth-L1 (L1 for beta 0) over the foreground RoIs' deltas of their ground-truth
class and divides by the number of ALL sampled RoIs, then applies ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT."""
import math
import os

import pytest
import torch
import torch.nn as nn

from transfer.config import load_config
from transfer.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CFG = os.path.join(REPO, "configs", "cpu", "voc_bccd_r18_fpn.yaml")

GT = [[10., 10., 50., 50.], [60., 20., 90., 80.]]
GT_LABELS = [1, 3]  # torchvision's convention: 0 is background, classes are 1..K
# two foreground proposals (IoU >= 0.5 with one box each) and two background ones (IoU < 0.5 with both);
# the ground-truth boxes are appended as proposals 4 and 5 (PROPOSAL_APPEND_GT)
PROPOSALS = [[12., 8., 48., 54.], [58., 25., 92., 78.], [0., 60., 20., 95.], [30., 30., 70., 70.]]
FG = {0: 0, 1: 1, 4: 0, 5: 1}  # sampled RoI -> matched ground-truth box
NUM_ROIS = 6
K = 3


class _Zeros(nn.Module):
    """Stands in for the pooler and the box head: the fixed predictor ignores its input."""

    def forward(self, *args):
        return torch.zeros(NUM_ROIS, 1)


class _FixedPredictor(nn.Module):
    def __init__(self, deltas):
        super().__init__()
        self.deltas = deltas

    def forward(self, x):
        return torch.zeros(len(x), K + 1), self.deltas


def hand_targets(p, g, weights=(10.0, 10.0, 5.0, 5.0)):
    """detectron2's Box2BoxTransform.get_deltas, written out."""
    pw, ph = p[2] - p[0], p[3] - p[1]
    gw, gh = g[2] - g[0], g[3] - g[1]
    pcx, pcy, gcx, gcy = p[0] + pw / 2, p[1] + ph / 2, g[0] + gw / 2, g[1] + gh / 2
    wx, wy, ww, wh = weights
    return [wx * (gcx - pcx) / pw, wy * (gcy - pcy) / ph, ww * math.log(gw / pw), wh * math.log(gh / ph)]


def hand_loss(deltas, beta, weight):
    proposals = PROPOSALS + GT
    total = 0.0
    for roi, gt in FG.items():
        label = GT_LABELS[gt]
        pred = deltas[roi, (label - 1) * 4: label * 4].tolist()
        for d, t in zip(pred, hand_targets(proposals[roi], GT[gt])):
            x = abs(d - t)
            total += x if beta == 0 else (0.5 * x * x / beta if x < beta else x - 0.5 * beta)
    return weight * total / NUM_ROIS


@pytest.mark.parametrize("beta,weight", [(0.0, 1.0), (0.5, 1.0), (0.0, 2.0)])
def test_box_regression_loss_is_normalised_by_all_sampled_rois(beta, weight):
    cfg = load_config(CPU_CFG, ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", str(K),
                                "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",  # every RoI is sampled
                                "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", str(beta),
                                "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", str(weight)])
    heads = build_model(cfg).roi_heads.train()
    deltas = torch.randn(NUM_ROIS, K * 4, generator=torch.Generator().manual_seed(0))
    heads.box_roi_pool, heads.box_head, heads.box_predictor = _Zeros(), _Zeros(), _FixedPredictor(deltas)
    _, losses = heads({}, [torch.tensor(PROPOSALS)], [(100, 100)],
                      [{"boxes": torch.tensor(GT), "labels": torch.tensor(GT_LABELS)}])
    assert losses["loss_box_reg"].item() == pytest.approx(hand_loss(deltas, beta, weight), rel=1e-5)
