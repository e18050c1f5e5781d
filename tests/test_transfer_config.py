"""transfer/config.py and the model/solver pieces it drives, checked against detectron2's semantics
(directly against detectron2's code when its CPU test build is importable)."""
import glob
import os

import pytest
import torch

from transfer import torchvision_engine as engine
from transfer.config import load_config
from transfer.modeling import D2AnchorGenerator, D2ROIPooler, build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")) +
                 glob.glob(os.path.join(REPO, "configs", "cpu", "*.yaml")))


def _d2():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        pytest.skip("detectron2 (CPU test build) not installed")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_repo_configs_load_and_validate(path):
    cfg = load_config(path)
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]


def test_voc_r50_is_moco_protocol():
    cfg = load_config(os.path.join(REPO, "configs", "voc_r50.yaml"))
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm" and cfg.MODEL.RESNETS.NORM == "naiveSyncBN"
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS), cfg.SOLVER.WARMUP_ITERS) == (24000, (18000, 22000), 100)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR) == (16, 0.02)
    assert tuple(cfg.DATASETS.TRAIN) == ("voc_2007_trainval", "voc_2012_trainval")
    assert (cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST) == (6000, 1000)
    assert cfg.TEST.PRECISE_BN.ENABLED and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    coco = load_config(os.path.join(REPO, "configs", "coco_r50.yaml"))
    assert (coco.SOLVER.MAX_ITER, tuple(coco.SOLVER.STEPS)) == (180000, (120000, 160000))


@pytest.mark.parametrize("path", [p for p in CONFIGS if "Base" not in p], ids=os.path.basename)
def test_repo_configs_merge_into_detectron2(path):
    _d2()
    from transfer import detectron2_engine
    d2cfg = detectron2_engine.load_d2_config(path)
    ours = load_config(path)
    for key in ("MODEL.RESNETS.DEPTH", "MODEL.ROI_HEADS.NAME", "INPUT.MIN_SIZE_TRAIN", "SOLVER.STEPS",
                "MODEL.ANCHOR_GENERATOR.SIZES", "MODEL.RPN.POST_NMS_TOPK_TRAIN"):
        a, b = d2cfg, ours
        for part in key.split("."):
            a, b = a[part], b[part]
        assert a == b, key


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("MODEL:\n  RESNET:\n    DEPTH: 50\n")
    child = tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.1\n")
    with pytest.raises(KeyError, match=r"base\.yaml: unknown config key 'MODEL.RESNET'"):
        load_config(str(child))
    with pytest.raises(KeyError, match="DATASETS.REGISTER.x.PATH"):
        load_config(None, ["DATASETS.REGISTER.x.PATH", "/a"])
    with pytest.raises(ValueError, match="MODEL.RESNETS.STRIDE_IN_1X1"):
        load_config(None, ["MODEL.RESNETS.NORM", "BN"])  # detectron2's default True is not torchvision's layout
    with pytest.raises(ValueError, match="INPUT.CROP.ENABLED"):
        load_config(os.path.join(REPO, "configs", "voc_r50.yaml"), ["INPUT.CROP.ENABLED", "True"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    cfg = load_config(None, ["DATASETS.REGISTER.x.TYPE", "voc", "DATASETS.REGISTER.x.YEAR", "2007"],
                      validate_cfg=False)
    assert cfg.DATASETS.REGISTER.x.YEAR == 2007


def test_anchors_match_detectron2_formula():
    gen = D2AnchorGenerator([[32, 64]], [[0.5, 1.0, 2.0]], [16], 0.0)
    feats = [torch.zeros(1, 8, 2, 3)]

    class Img:
        tensors = torch.zeros(1, 3, 32, 48)
    a = gen(Img, feats)[0]
    assert a.shape == (2 * 3 * 6, 4)
    w = (32 * 32 / 0.5) ** 0.5  # size 32, ratio 0.5: w = sqrt(area / ar), h = ar * w
    assert torch.allclose(a[0], torch.tensor([-w / 2, -0.25 * w, w / 2, 0.25 * w]))
    # second location (x shift one stride), same cell anchor
    assert torch.allclose(a[6], a[0] + torch.tensor([16.0, 0, 16.0, 0]))
    try:
        from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
    except ImportError:
        return
    d2 = DefaultAnchorGenerator(sizes=[[32, 64]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[16], offset=0.0)
    assert torch.allclose(d2(feats)[0].tensor, a)


def test_pooler_matches_detectron2():
    torch.manual_seed(0)
    feats = [torch.randn(2, 4, 32, 32), torch.randn(2, 4, 16, 16), torch.randn(2, 4, 8, 8)]
    boxes = [torch.tensor([[1.0, 2.0, 20.0, 30.0], [0.0, 0.0, 120.0, 100.0]]),
             torch.tensor([[10.0, 5.0, 300.0, 200.0]])]
    ours = D2ROIPooler(7, [1 / 4, 1 / 8, 1 / 16], 0, True)(feats, boxes)
    assert ours.shape == (3, 4, 7, 7)
    _d2()
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes
    d2 = ROIPooler(7, (1 / 4, 1 / 8, 1 / 16), 0, "ROIAlignV2")(feats, [Boxes(b) for b in boxes])
    assert torch.allclose(ours, d2, atol=1e-6)


def test_lr_schedule_and_param_groups_match_detectron2():
    cfg = load_config(os.path.join(REPO, "configs", "voc_r50.yaml"), ["MODEL.DEVICE", "cpu"])
    assert engine.lr_factor(cfg, 0) == pytest.approx(0.001)
    assert engine.lr_factor(cfg, 50) == pytest.approx(0.001 * 0.5 + 0.5)
    assert engine.lr_factor(cfg, 100) == 1.0
    assert engine.lr_factor(cfg, 17999) == 1.0 and engine.lr_factor(cfg, 18000) == pytest.approx(0.1)
    assert engine.lr_factor(cfg, 22000) == pytest.approx(0.01)
    small = load_config(os.path.join(REPO, "configs", "cpu", "voc_bccd_r18_fpn.yaml"))
    model = build_model(small)
    opt = engine.build_optimizer(small, model)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    bn = model.backbone.bottom_up.bn1
    assert decay[id(bn.weight)] == 0.0 and decay[id(bn.bias)] == 0.0
    assert decay[id(model.backbone.bottom_up.conv1.weight)] == 1e-4
    assert decay[id(model.roi_heads.box_predictor.cls_score.bias)] == 1e-4
    try:
        from detectron2.solver import build_lr_scheduler
    except ImportError:
        return
    _d2()
    from transfer import detectron2_engine
    d2cfg = detectron2_engine.load_d2_config(os.path.join(REPO, "configs", "voc_r50.yaml"))
    p = torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([p], lr=d2cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(d2cfg, o)
    for it in range(0, 24000):
        if it in (0, 1, 50, 99, 100, 17999, 18000, 21999, 22000, 23999):
            assert o.param_groups[0]["lr"] == pytest.approx(0.02 * engine.lr_factor(cfg, it)), it
        o.step()
        sched.step()


def test_c4_model_structure():
    cfg = load_config(os.path.join(REPO, "configs", "voc_r50.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN"])
    m = build_model(cfg)
    head = m.roi_heads.box_head
    assert isinstance(head.norm, torch.nn.BatchNorm2d) and head.norm.num_features == 2048  # extra norm
    assert head.res5[0].conv2.stride == (2, 2)  # stride on the 3x3 conv: STRIDE_IN_1X1 False
    assert m.roi_heads.box_roi_pool.output_size == 14 and m.roi_heads.box_roi_pool.aligned
    assert m.roi_heads.box_predictor.bbox_pred.out_features == 20 * 4
    assert m.rpn.head.cls_logits.out_channels == 15  # 5 sizes x 3 ratios on res4
    assert not hasattr(m.backbone, "res5")
    assert all(p.requires_grad for p in m.parameters())  # FREEZE_AT 0
    assert m.rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    cfg2 = load_config(os.path.join(REPO, "configs", "voc_r50.yaml"),
                       ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.ROI_HEADS.NAME",
                        "Res5ROIHeads"])
    m2 = build_model(cfg2)
    assert isinstance(m2.roi_heads.box_head.norm, torch.nn.Identity)
    assert not any(p.requires_grad for p in m2.backbone.stem.parameters())
    assert not any(p.requires_grad for p in m2.backbone.res2.parameters())
    assert all(p.requires_grad for p in m2.backbone.res3.parameters())


def test_c4_forward_backward_and_inference():
    """R50-C4 (MoCo's head) trains and infers at a tiny size; outputs are in the original image's frame."""
    torch.manual_seed(0)
    cfg = load_config(os.path.join(REPO, "configs", "voc_r50.yaml"),
                      ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "BN", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
                       "MODEL.RPN.POST_NMS_TOPK_TRAIN", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "10"])
    m = build_model(cfg)
    x = [{"image": torch.randint(0, 255, (3, 64, 80), dtype=torch.uint8), "height": 128, "width": 160,
          "instances": {"boxes": torch.tensor([[8.0, 8.0, 40.0, 50.0]]), "classes": torch.tensor([3])}}]
    losses = m(x)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    sum(losses.values()).backward()
    assert m.roi_heads.box_head.norm.weight.grad is not None  # the extra norm is trained
    m.eval()
    with torch.no_grad():
        out = m(x)[0]
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) <= 100
    if len(out["boxes"]):
        assert out["boxes"][:, 2].max() <= 160 and out["boxes"][:, 3].max() <= 128
        assert (out["scores"] > 0.05).all() and out["classes"].max() < 20


def test_detector_postprocess_rescales_clips_and_drops_empty():
    from transfer.modeling import FasterRCNN
    r = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0], [70.0, 5.0, 90.0, 30.0], [85.0, 0.0, 95.0, 10.0]]),
         "scores": torch.tensor([0.9, 0.8, 0.7]), "classes": torch.tensor([0, 1, 2])}
    out = FasterRCNN._rescale(r, {"height": 128, "width": 160}, (64, 80))
    assert torch.equal(out["boxes"], torch.tensor([[20.0, 20.0, 40.0, 40.0], [140.0, 10.0, 160.0, 60.0]]))
    assert out["classes"].tolist() == [0, 1]


def test_register_key_of_the_other_type_is_refused_not_ignored(tmp_path):
    """A COCO entry cannot take a VOC-only key (it would be ignored): the error names entry, key and TYPE."""
    f = tmp_path / "reg.yaml"
    f.write_text("DATASETS:\n  REGISTER:\n    mine: {TYPE: coco, IMAGE_ROOT: i, JSON_FILE: j.json, YEAR: 2007}\n")
    with pytest.raises(KeyError, match=r"reg\.yaml: DATASETS.REGISTER.mine.YEAR is not a key of a TYPE coco"):
        load_config(str(f), validate_cfg=False)
    with pytest.raises(KeyError, match=r"DATASETS.REGISTER.mine.JSON_FILE is not a key of a TYPE voc"):
        load_config(None, ["DATASETS.REGISTER.mine.TYPE", "voc", "DATASETS.REGISTER.mine.JSON_FILE", "a.json"],
                    validate_cfg=False)
