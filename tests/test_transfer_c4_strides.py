"""MODEL.RESNETS.STRIDE_IN_1X1 in both engines' C4 models (issue 16): where the first block of each stage
puts its stride. torchvision ResNets (and so every converted student) stride in the 3x3 conv (conv2),
which is detectron2's STRIDE_IN_1X1 False; True puts it in the 1x1 conv (conv1), MSRA's layout."""
import os

import pytest

from transfer.config import load_config
from transfer.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C4_CONFIG = os.path.join(REPO, "configs", "voc_r50.yaml")
OPTS = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN"]


def expected_strides(stride_in_1x1):
    """(conv1 stride, conv2 stride) of the first block of res2..res5: res2 keeps the resolution
    (the stem's max-pool already halved it), res3..res5 halve it once, in conv1 or in conv2."""
    halve = ((2, 2), (1, 1)) if stride_in_1x1 else ((1, 1), (2, 2))
    return {"res2": ((1, 1), (1, 1)), "res3": halve, "res4": halve, "res5": halve}


def strides(first_blocks):
    return {name: (b.conv1.stride, b.conv2.stride) for name, b in first_blocks.items()}


def test_torchvision_engine_c4_strides_in_the_3x3_conv():
    m = build_model(load_config(C4_CONFIG, OPTS + ["MODEL.RESNETS.STRIDE_IN_1X1", "False"]))
    blocks = {"res2": m.backbone.res2[0], "res3": m.backbone.res3[0], "res4": m.backbone.res4[0],
              "res5": m.roi_heads.box_head.res5[0]}
    assert strides(blocks) == expected_strides(False)


def test_torchvision_engine_refuses_stride_in_1x1():
    """Our engine builds torchvision's layout only, so True must be refused, not silently ignored."""
    with pytest.raises(ValueError, match="MODEL.RESNETS.STRIDE_IN_1X1 = True is not supported"):
        load_config(C4_CONFIG, OPTS + ["MODEL.RESNETS.STRIDE_IN_1X1", "True"])


@pytest.mark.detectron2
@pytest.mark.parametrize("stride_in_1x1", [True, False])
def test_detectron2_engine_c4_strides_follow_the_config(stride_in_1x1):
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model as d2_build_model

    from transfer.detectron2_engine import load_d2_config

    cfg = load_d2_config(C4_CONFIG, OPTS + ["MODEL.RESNETS.STRIDE_IN_1X1", str(stride_in_1x1)])
    m = d2_build_model(cfg)
    blocks = {"res2": m.backbone.res2[0], "res3": m.backbone.res3[0], "res4": m.backbone.res4[0],
              "res5": m.roi_heads.res5[0]}
    assert strides(blocks) == expected_strides(stride_in_1x1)
