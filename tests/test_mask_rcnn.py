"""Mask R-CNN C4 (issue 14, point 1: MoCo's COCO protocol coco_R_50_C4_2x_moco) in the torchvision engine,
against detectron2 0.6 (the CPU test build): COCO polygons loaded and augmented as detectron2 does, the mask
head, mask targets (PolygonMasks.crop_and_resize), mask loss (mask_rcnn_loss), the res5 mask branch in
training and inference (Res5ROIHeads with MASK_ON, detector_postprocess' paste_masks_in_image), segm AP
(COCOEvaluator), the detectron2 engine's evaluator, the config, and a tiny end-to-end run."""
import contextlib
import copy
import io
import json
import os

import numpy as np
import pytest
import torch

from conftest import shared_path
from transfer import data as tdata
from transfer import train_net
from transfer.config import load_config
from transfer.evaluation import evaluate_coco
from transfer.masks import crop_and_resize, encode_rles, mask_loss, mask_targets, paste_masks_in_image
from transfer.modeling import MaskHead, build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK_CFG = os.path.join(REPO, "configs", "coco_r50_mask_moco.yaml")
SIDE = 14  # C4: res5 halves the 14x14 RoI features, the deconv doubles them back


def d2_or_skip():
    return pytest.importorskip("detectron2")


def coco_tiny(split="train"):
    root = shared_path("data", "coco_tiny")
    return str(root / f"{split}2017"), str(root / "annotations" / f"instances_{split}2017.json")


# --------------------------------------------------------------------------------------------- config
# facebookresearch/moco detection/configs/ (as last published, before the repository was emptied)
MOCO_CONFIGS = {
    "Base-RCNN-C4-BN.yaml": """\
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  RPN:
    PRE_NMS_TOPK_TEST: 6000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "Res5ROIHeadsExtraNorm"
  BACKBONE:
    FREEZE_AT: 0
  RESNETS:
    # SyncBN seems to cause larger variance for unknown reasons
    NORM: "naiveSyncBN"
TEST:
  PRECISE_BN:
    ENABLED: True
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
""",
    "coco_R_50_C4_2x.yaml": """\
_BASE_: "Base-RCNN-C4-BN.yaml"
MODEL:
  MASK_ON: True
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
  MIN_SIZE_TEST: 800
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  STEPS: (120000, 160000)
  MAX_ITER: 180000
""",
    "coco_R_50_C4_2x_moco.yaml": """\
_BASE_: "coco_R_50_C4_2x.yaml"
MODEL:
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  WEIGHTS: "See Instructions"
  RESNETS:
    STRIDE_IN_1X1: False
INPUT:
  FORMAT: "RGB"
"""}


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_moco_mask_config_is_moco_coco_R_50_C4_2x_moco(tmp_path):
    """MoCo's chain Base-RCNN-C4-BN -> coco_R_50_C4_2x -> coco_R_50_C4_2x_moco merged into detectron2's
    get_cfg() equals configs/coco_r50_mask_moco.yaml key for key (both loaders), but for the weights and
    the output folder."""
    d2_or_skip()
    from detectron2.config import get_cfg
    from transfer.detectron2_engine import load_d2_config
    for file_name, text in MOCO_CONFIGS.items():
        (tmp_path / file_name).write_text(text)
    moco = get_cfg()
    moco.merge_from_file(str(tmp_path / "coco_R_50_C4_2x_moco.yaml"))
    want = {k: v for k, v in _flat(moco).items() if k not in ("MODEL.WEIGHTS", "OUTPUT_DIR")}
    ours_d2, ours = _flat(load_d2_config(MASK_CFG)), _flat(load_config(MASK_CFG))
    assert {k: ours_d2[k] for k in want} == want
    shared = [k for k in want if k in ours]
    assert len(shared) > 100 and {k: ours[k] for k in shared} == {k: want[k] for k in shared}
    assert not load_config(os.path.join(REPO, "configs", "coco_r50.yaml")).MODEL.MASK_ON  # Faster R-CNN stays


def test_mask_on_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="MODEL.MASK_ON = True is not supported: masks are implemented for the C4"):
        load_config(os.path.join(REPO, "configs", "cpu", "coco_tiny_r18_fpn.yaml"), ["MODEL.MASK_ON", "True"])
    with pytest.raises(ValueError, match="MODEL.ROI_MASK_HEAD.NORM = 'GN' is not supported"):
        load_config(MASK_CFG, ["MODEL.ROI_MASK_HEAD.NORM", "GN"])
    with pytest.raises(ValueError, match="MODEL.ROI_MASK_HEAD.NAME = 'Other' is not supported"):
        load_config(MASK_CFG, ["MODEL.ROI_MASK_HEAD.NAME", "Other"])
    with pytest.raises(ValueError, match="MODEL.ROI_MASK_HEAD.NUM_CONV = -1 is not supported: use >= 0"):
        load_config(MASK_CFG, ["MODEL.ROI_MASK_HEAD.NUM_CONV", "-1"])
    with pytest.raises(ValueError, match="MODEL.ROI_MASK_HEAD.CONV_DIM = 0 is not supported: use >= 1"):
        load_config(MASK_CFG, ["MODEL.ROI_MASK_HEAD.CONV_DIM", "0"])
    from cocord_pipeline.synthetic_shapes import register_opts, write_shapes
    root = write_shapes(str(tmp_path / "voc"), n_train=2, n_test=2)
    opts = register_opts("s_train", root, "train") + register_opts("s_test", root, "test") + [
        "DATASETS.TRAIN", "('s_train',)", "DATASETS.TEST", "('s_test',)", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"MODEL.MASK_ON is True but datasets \['s_train', 's_test'\] are PASCAL VOC"):
        train_net.main(["--engine", "torchvision", "--config", MASK_CFG] + opts)


@pytest.mark.detectron2
def test_detectron2_engine_refuses_bitmask_targets():
    """detectron2's INPUT.MASK_FORMAT bitmask would be trained on polygon targets here: refused."""
    d2_or_skip()
    from transfer.detectron2_engine import check_runtime, load_d2_config
    cfg = load_d2_config(MASK_CFG, ["MODEL.DEVICE", "cpu", "INPUT.MASK_FORMAT", "bitmask"])
    with pytest.raises(ValueError, match=r"INPUT.MASK_FORMAT = 'bitmask'.*set INPUT.MASK_FORMAT polygon"):
        check_runtime(cfg)
    cfg.INPUT.MASK_FORMAT = "polygon"
    check_runtime(cfg)


# --------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("mask_on", [False, True])
def test_coco_polygons_load_as_detectron2(tmp_path, mask_on):
    """load_coco_json keeps polygons of 3+ points (even length) and drops an object left with none, also
    for boxes only (which then carry no segmentation)."""
    d2_or_skip()
    from detectron2.data.datasets.coco import load_coco_json
    poly = [10.0, 10.0, 40.0, 12.5, 30.0, 35.0]
    anns = [([poly], 0), ([poly, [1.0, 2.0, 3.0, 4.0]], 0), ([[1.0, 2.0, 3.0, 4.0]], 0), ([], 0),
            ({"size": [50, 60], "counts": [0, 5, 2995]}, 1)]
    (tmp_path / "0.jpg").write_bytes(b"")
    js = tmp_path / "inst.json"
    js.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "0.jpg", "width": 60, "height": 50}],
        "categories": [{"id": 3, "name": "c"}],
        "annotations": [{"id": k + 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 25], "area": 750.0,
                         "iscrowd": crowd, "segmentation": s} for k, (s, crowd) in enumerate(anns)]}))
    ours = tdata.load_coco(str(js), str(tmp_path), mask_on=mask_on)[0]["annotations"]
    with contextlib.redirect_stdout(io.StringIO()):
        ref = load_coco_json(str(js), str(tmp_path))[0]["annotations"]
    assert len(ours) == len(ref) == 4  # the object whose only polygon has 2 points is gone
    for a, r in zip(ours, ref):
        if a["iscrowd"]:
            continue  # crowd RLEs: evaluation reads them from the JSON, training skips crowd objects
        assert a.get("segmentation", []) == (r.get("segmentation", []) if mask_on else [])


def _flat_segmentation_json(tmp_path):
    """One image, two objects: annotation 7 with a flat [x0, y0, ...] segmentation, 8 a proper one."""
    (tmp_path / "0.jpg").write_bytes(b"")
    js = tmp_path / "flat.json"
    poly = [10.0, 10.0, 40.0, 12.5, 30.0, 35.0]
    js.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "0.jpg", "width": 60, "height": 50}],
        "categories": [{"id": 3, "name": "c"}],
        "annotations": [{"id": 7 + k, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 25], "area": 750.0,
                         "iscrowd": 0, "segmentation": s} for k, s in enumerate([poly, [poly]])]}))
    return str(js)


def test_flat_segmentation_is_ignored_for_boxes_and_refused_with_mask_on(tmp_path, caplog):
    js = _flat_segmentation_json(tmp_path)
    with caplog.at_level("WARNING"):
        annos = tdata.load_coco(js, str(tmp_path))[0]["annotations"]
    assert [a["bbox"] for a in annos] == [[10.0, 10.0, 40.0, 35.0]] * 2 and not any("segmentation" in a for a in annos)
    assert f"{js}: ignored the 'segmentation' of 1 annotation(s)" in caplog.text and "annotation ids 7)" in caplog.text
    with pytest.raises(ValueError, match=rf"{js}: 1 annotation\(s\) have a 'segmentation' that is not a list of "
                                         r"polygons \(annotation ids 7\).*wrap each flat polygon in a list, or set "
                                         "MODEL.MASK_ON False"):
        tdata.load_coco(js, str(tmp_path), mask_on=True)


def test_mapper_transforms_polygons_as_detectron2():
    """Resize + flip of every training image's polygons equal detectron2's transform_instance_annotations
    (ResizeTransform, HFlipTransform) followed by annotations_to_instances / filter_empty_instances."""
    d2_or_skip()
    import detectron2.data.transforms as T
    from detectron2.data import detection_utils as du
    image_root, js = coco_tiny("train")
    dicts = tdata.load_coco(js, image_root, mask_on=True)[:6]
    opts = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(72, 90)", "INPUT.MAX_SIZE_TRAIN", "150"]
    flip_mapper = tdata.Mapper(load_config(MASK_CFG, opts), True)
    plain_mapper = tdata.Mapper(load_config(MASK_CFG, opts + ["INPUT.RANDOM_FLIP", "none"]), True)
    flips = 0
    for k, d in enumerate(dicts):
        out = flip_mapper(d, torch.Generator().manual_seed(k))
        plain = plain_mapper(d, torch.Generator().manual_seed(k))  # same size draw, no flip
        h, w = out["image"].shape[1:]
        flipped = not torch.equal(out["image"], plain["image"])
        assert not flipped or torch.equal(out["image"], plain["image"].flip(-1))
        flips += flipped
        tfm = [T.ResizeTransform(d["height"], d["width"], h, w)] + ([T.HFlipTransform(w)] if flipped else [])
        annos = [du.transform_instance_annotations(copy.deepcopy(a), T.TransformList(tfm), (h, w))
                 for a in d["annotations"] if not a["iscrowd"]]
        ref = du.filter_empty_instances(du.annotations_to_instances(annos, (h, w), mask_format="polygon"))
        ours = out["instances"]["polygons"]
        assert len(ours) == len(ref.gt_masks.polygons) == len(out["instances"]["boxes"])
        for p_obj, r_obj in zip(ours, ref.gt_masks.polygons):
            assert len(p_obj) == len(r_obj)
            for p, r in zip(p_obj, r_obj):
                assert p.dtype == r.dtype == np.float64 and np.array_equal(p, r)
    assert 0 < flips < len(dicts)  # both branches ran


@pytest.mark.parametrize("engine", ["torchvision", pytest.param("detectron2", marks=pytest.mark.detectron2)])
def test_mask_on_needs_a_polygon_for_every_object(tmp_path, engine):
    """Checked on the training dicts before any model is built (one error: JSON, counts, ids, fix); the
    mapper checks again per image."""
    if engine == "detectron2":
        d2_or_skip()
    image_root, js = coco_tiny("train")
    with open(js) as f:
        data = json.load(f)
    first = [a for a in data["annotations"] if a["image_id"] == 5802 and not a["iscrowd"]][:3]
    assert [a["id"] for a in first] == [370322, 370407, 370516]  # coco_tiny's first image, in JSON order
    del first[0]["segmentation"], first[1]["segmentation"]
    first[2]["segmentation"] = {"size": [10, 10], "counts": "abc"}
    bad = tmp_path / "no_polygons.json"
    bad.write_text(json.dumps(data))
    opts = ["DATASETS.REGISTER.x.TYPE", "coco", "DATASETS.REGISTER.x.IMAGE_ROOT", image_root,
            "DATASETS.REGISTER.x.JSON_FILE", str(bad), "DATASETS.TRAIN", "('x',)", "DATASETS.TEST", "()",
            "MODEL.ROI_HEADS.NUM_CLASSES", str(len(data["categories"])), "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "", "OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=rf"{bad}: MODEL.MASK_ON needs a polygon 'segmentation' for every "
                                         r"non-crowd object; 2 have none and 1 an RLE \(annotation ids "
                                         r"\[370322, 370407, 370516\]\); add polygons, or set MODEL.MASK_ON False"):
        train_net.main(["--engine", engine, "--config", MASK_CFG] + opts)
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")

    image_root, js = coco_tiny("train")
    d = copy.deepcopy(tdata.load_coco(js, image_root, mask_on=True)[0])
    mapper = tdata.Mapper(load_config(MASK_CFG, ["INPUT.MIN_SIZE_TRAIN", "(64,)"]), True)
    inst = mapper(d, torch.Generator().manual_seed(0))["instances"]
    assert len(inst["polygons"]) == len(inst["boxes"]) > 0
    del d["annotations"][0]["segmentation"]
    d["annotations"][1]["segmentation"] = {"size": [d["height"], d["width"]], "counts": "abc"}
    with pytest.raises(ValueError, match=r"000000005802.jpg: MODEL.MASK_ON needs a polygon 'segmentation' .*"
                                         r"1 have none and 1 an RLE"):
        mapper(d, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------- targets, loss
def _objects_and_boxes(seed=0, n_images=2):
    """Per image: polygons of its objects (float64 arrays, coco_tiny train), their boxes, and proposals
    around them (jittered, shifted half out, degenerate under 0.1 px)."""
    image_root, js = coco_tiny("train")
    rng = np.random.RandomState(seed)
    out = []
    for d in tdata.load_coco(js, image_root, mask_on=True)[:n_images]:
        annos = [a for a in d["annotations"] if not a["iscrowd"]][:6]
        polygons = [[np.asarray(p, dtype=np.float64) for p in a["segmentation"]] for a in annos]
        boxes = torch.tensor([a["bbox"] for a in annos], dtype=torch.float32)
        props, matched = [], []
        for i, b in enumerate(boxes.tolist()):
            w, h = b[2] - b[0], b[3] - b[1]
            for _ in range(3):
                j = rng.randn(4) * [w, h, w, h] * 0.1
                props.append([b[0] + j[0], b[1] + j[1], b[2] + j[2], b[3] + j[3]])
                matched.append(i)
            props.append([b[0] + w / 2, b[1], b[2] + w / 2, b[3]])
            props.append([b[0], b[1], b[0] + 0.05, b[1] + 0.07])
            matched += [i, i]
        out.append((polygons, boxes, torch.tensor(props, dtype=torch.float32), torch.tensor(matched),
                    torch.tensor([a["category_id"] for a in annos])))
    return out


def test_mask_targets_equal_detectron2_crop_and_resize():
    d2_or_skip()
    from detectron2.structures import PolygonMasks
    for polygons, _, props, matched, _ in _objects_and_boxes():
        per_prop = [polygons[int(i)] for i in matched]
        ours = crop_and_resize(per_prop, props, SIDE)
        ref = PolygonMasks(per_prop).crop_and_resize(props, SIDE)
        assert ours.dtype == ref.dtype == torch.bool and torch.equal(ours, ref)
        assert 0 < ours.float().mean() < 1


def test_mask_loss_equals_detectron2_mask_rcnn_loss():
    """Fixed foreground proposals, ground truth and logits: loss_mask is detectron2's to the last bit."""
    d2_or_skip()
    from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
    from detectron2.structures import Boxes, Instances, PolygonMasks
    from detectron2.utils.events import EventStorage
    images = _objects_and_boxes(seed=1)
    k = 80
    n = sum(len(p) for _, _, p, _, _ in images)
    logits = torch.randn(n, k, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 3
    instances, proposals, matched_idxs, labels, targets = [], [], [], [], []
    for polygons, boxes, props, matched, classes in images:
        inst = Instances((1000, 1000))
        inst.proposal_boxes = Boxes(props)
        inst.gt_classes = classes[matched]
        inst.gt_masks = PolygonMasks([polygons[int(i)] for i in matched])
        instances.append(inst)
        # ours: torchvision's matching outputs (1-based labels, 0 = background), with two background
        # proposals appended that must not count
        proposals.append(torch.cat([props, props[:2]]))
        matched_idxs.append(torch.cat([matched, torch.zeros(2, dtype=torch.int64)]))
        labels.append(torch.cat([classes[matched] + 1, torch.zeros(2, dtype=torch.int64)]))
        targets.append({"polygons": polygons})
    with EventStorage():
        ref = mask_rcnn_loss(logits, instances)
    gt_masks, gt_classes = mask_targets(proposals, matched_idxs, labels, targets, SIDE)
    ours = mask_loss(logits, gt_masks, gt_classes)
    assert torch.equal(ours, ref), (ours, ref)
    # class-agnostic: the one channel
    with EventStorage():
        ref1 = mask_rcnn_loss(logits[:, :1], instances)
    assert torch.equal(mask_loss(logits[:, :1], gt_masks, gt_classes), ref1)
    # no foreground at all: 0, with a gradient path to the head
    x = logits[:0].clone().requires_grad_(True)
    empty = mask_loss(x, None, None)
    assert empty.item() == 0 and empty.requires_grad


# --------------------------------------------------------------------------------------------- the head
@pytest.mark.parametrize("num_conv,agnostic", [(0, False), (1, False), (0, True)])
def test_mask_head_equals_detectron2(num_conv, agnostic):
    d2_or_skip()
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.roi_heads.mask_head import build_mask_head
    from transfer.detectron2_engine import load_d2_config
    opts = ["MODEL.ROI_HEADS.NUM_CLASSES", "5", "MODEL.ROI_MASK_HEAD.NUM_CONV", str(num_conv),
            "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK", str(agnostic)]
    ref = build_mask_head(load_d2_config(MASK_CFG, opts), ShapeSpec(channels=64, height=7, width=7)).eval()
    ours = MaskHead(64, num_conv, 16, 1 if agnostic else 5).eval()
    names = {"deconv": "deconv", "predictor": "predictor", "mask_fcn1": "convs.0"}
    ours.load_state_dict({names[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in ref.state_dict().items()})
    x = torch.randn(6, 64, 7, 7, generator=torch.Generator().manual_seed(num_conv))
    with torch.no_grad():
        got, want = ours(x), ref.layers(x)
    assert got.shape == (6, 1 if agnostic else 5, SIDE, SIDE) and torch.equal(got, want)
    # detectron2's init: msra fill (fan_out) on the deconv, normal(0.001) on the predictor, zero biases
    fresh = MaskHead(2048, 0, 256, 80)
    assert not fresh.deconv.bias.any() and not fresh.predictor.bias.any()
    assert fresh.predictor.weight.std().item() == pytest.approx(0.001, rel=0.05)
    # c2_msra_fill is kaiming_normal_(fan_out); torch reads a ConvTranspose2d weight [in, out, kh, kw] as
    # if dim 0 were the outputs, so its "fan_out" is 2048 x 2 x 2
    fan_out = fresh.deconv.weight.shape[0] * 2 * 2
    assert fresh.deconv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


# --------------------------------------------------------------------------------------------- the model
MODEL_OPTS = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512",
              "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "8",
              "TEST.DETECTIONS_PER_IMAGE", "8", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
              "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160"]


def _d2_key(ours_key):
    """detectron2 GeneralizedRCNN (Res5ROIHeadsExtraNorm, MASK_ON) name of one of our model's keys."""
    from transfer.d2_format import tv_to_d2_name
    k = ours_key
    if k.startswith("backbone."):
        tv = k[len("backbone."):].replace("stem.0.", "conv1.").replace("stem.1.", "bn1.")
        for i, stage in enumerate(("res2", "res3", "res4")):
            if tv.startswith(stage + "."):
                tv = f"layer{i + 1}." + tv[len(stage) + 1:]
        return "backbone." + tv_to_d2_name(tv)
    if k.startswith("roi_heads.box_head.res5."):
        return "roi_heads." + tv_to_d2_name("layer4." + k[len("roi_heads.box_head.res5."):])
    renames = {"roi_heads.box_head.norm.": "roi_heads.res5.norm.", "roi_heads.c4_mask_head.": "roi_heads.mask_head.",
               "rpn.head.conv.0.0.": "proposal_generator.rpn_head.conv.",
               "rpn.head.cls_logits.": "proposal_generator.rpn_head.objectness_logits.",
               "rpn.head.bbox_pred.": "proposal_generator.rpn_head.anchor_deltas.",
               "roi_heads.box_predictor.": "roi_heads.box_predictor."}
    for a, b in renames.items():
        if k.startswith(a):
            return b + k[len(a):]
    raise KeyError(k)


@pytest.fixture(scope="module")
def model_pair():
    """(detectron2's model, ours) from configs/coco_r50_mask_moco.yaml with detectron2's random weights
    copied into ours (background logit moved from last to first), BN statistics randomised."""
    d2_or_skip()
    from detectron2.modeling import build_model as d2_build_model
    from transfer.detectron2_engine import load_d2_config
    torch.manual_seed(0)
    ref = d2_build_model(load_d2_config(MASK_CFG, MODEL_OPTS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            if k.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g) + 0.5)
            elif k.endswith("running_mean"):
                v.copy_(torch.randn(v.shape, generator=g) * 0.1)
            elif k.endswith(("mask_head.predictor.weight", "cls_score.weight")):
                v.copy_(torch.randn(v.shape, generator=g) * 0.01)
    ours = build_model(load_config(MASK_CFG, MODEL_OPTS))
    state = ref.state_dict()
    mapped = {}
    for k in ours.state_dict():
        v = state[_d2_key(k)]
        mapped[k] = torch.cat([v[-1:], v[:-1]]) if k.startswith("roi_heads.box_predictor.cls_score") else v
    assert set(state) == {_d2_key(k) for k in mapped}  # every detectron2 tensor has its counterpart
    ours.load_state_dict(mapped)
    return ref, ours


def _val_inputs(cfg_opts, n=1):
    image_root, js = coco_tiny("val")
    mapper = tdata.Mapper(load_config(MASK_CFG, cfg_opts), False)
    return [mapper(d) for d in tdata.load_coco(js, image_root, mask_on=True)[:n]]


def _frozen_norms(model, training):
    """train(training) with every BN on its running statistics: per-RoI results then do not depend on
    the RoI order, which differs between the two samplers."""
    model.train(training)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def test_mask_inference_equals_detectron2(model_pair):
    """On detectron2's detections of a real image: our res5 mask branch gives detectron2's soft masks
    bit for bit, and the masks pasted into the original image (detector_postprocess) are identical."""
    from detectron2.modeling.postprocessing import detector_postprocess
    ref, ours = model_pair
    ref.eval(), ours.eval()
    inputs = _val_inputs(MODEL_OPTS)
    with torch.no_grad():
        inst = ref.inference(inputs, do_postprocess=False)[0]
        images = ours.preprocess(inputs)
        feats = ours.backbone(images.tensors)
        results = [{"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "classes": inst.pred_classes}]
        ours.roi_heads.predict_masks([feats["res4"]], results)
    assert len(inst) == 8
    assert torch.equal(results[0]["mask_probs"], inst.pred_masks[:, 0])
    h, w = inputs[0]["height"], inputs[0]["width"]
    pasted = ours._rescale(results[0], inputs[0], images.image_sizes[0])
    want = detector_postprocess(inst, h, w)
    assert torch.equal(pasted["boxes"], want.pred_boxes.tensor)
    assert pasted["masks"].shape == (len(want), h, w) and torch.equal(pasted["masks"], want.pred_masks)
    assert pasted["masks"].any()


def test_mask_branch_losses_equal_detectron2(model_pair):
    """Training on fixed proposals and ground truth (one real image, every proposal sampled): the RoI
    heads' loss_cls, loss_box_reg and loss_mask equal detectron2's Res5ROIHeads (MASK_ON). The two
    samplers order the RoIs differently, so the means agree to float rounding (measured: loss_cls and
    loss_mask identical, loss_box_reg 8e-8 relative), not necessarily bit for bit."""
    from detectron2.structures import Boxes, Instances, PolygonMasks
    from detectron2.utils.events import EventStorage
    ref, ours = model_pair
    opts = MODEL_OPTS + ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.RANDOM_FLIP", "none"]
    image_root, js = coco_tiny("train")
    d = tdata.load_coco(js, image_root, mask_on=True)[0]
    x = tdata.Mapper(load_config(MASK_CFG, opts), True)(d, torch.Generator().manual_seed(0))
    n = 4  # objects kept: each RoI costs a res5 pass
    gt = {k: v[:n] for k, v in x["instances"].items()}
    assert len(gt["polygons"]) == n
    rng = np.random.RandomState(0)
    props = []
    for b in gt["boxes"].tolist():
        w, h = b[2] - b[0], b[3] - b[1]
        props += [list(np.array(b) + rng.randn(4) * [w, h, w, h] * 0.15) for _ in range(2)]
    props = torch.tensor(props, dtype=torch.float32)
    h, w = x["image"].shape[1:]
    props[:, 0::2] = props[:, 0::2].clamp(0, w)
    props[:, 1::2] = props[:, 1::2].clamp(0, h)
    p = Instances((h, w))
    p.proposal_boxes, p.objectness_logits = Boxes(props), torch.zeros(len(props))
    t = Instances((h, w))
    t.gt_boxes, t.gt_classes, t.gt_masks = Boxes(gt["boxes"]), gt["classes"], PolygonMasks(gt["polygons"])
    _frozen_norms(ref, True), _frozen_norms(ours, True)
    try:
        with torch.no_grad(), EventStorage():
            feats = ours.backbone(ours.preprocess([x]).tensors)
            _, losses = ours.roi_heads(feats, [props], [(h, w)], [{"boxes": gt["boxes"], "labels": gt["classes"] + 1,
                                                                   "polygons": gt["polygons"]}])
            _, want = ref.roi_heads(None, {"res4": feats["res4"]}, [p], [t])
    finally:
        ref.eval(), ours.eval()
    assert set(losses) == set(want) == {"loss_cls", "loss_box_reg", "loss_mask"}
    for k in want:
        assert losses[k].item() == pytest.approx(want[k].item(), rel=1e-6, abs=1e-7), k
    assert losses["loss_mask"].item() > 0.1


def test_paste_masks_equals_detectron2_on_both_paths():
    """The CPU path (mask by mask, near its box) and the GPU path (whole image, in chunks) of
    paste_masks_in_image give detectron2's masks; boxes reach past the image and are sub-pixel."""
    d2_or_skip()
    from detectron2.layers.mask_ops import _do_paste_mask, paste_masks_in_image as d2_paste
    from transfer.masks import _paste
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(7, SIDE, SIDE, generator=g)
    boxes = torch.tensor([[10.0, 5.0, 60.0, 40.0], [-8.0, -3.0, 20.0, 30.0], [70.5, 50.2, 99.0, 80.0],
                          [30.0, 30.0, 30.4, 30.6], [0.0, 0.0, 100.0, 90.0], [55.5, 2.25, 61.75, 88.0],
                          [80.0, 70.0, 130.0, 120.0]])
    want = d2_paste(probs, boxes, (90, 100))
    assert torch.equal(paste_masks_in_image(probs, boxes, (90, 100)), want)
    whole, _ = _paste(probs[:, None], boxes, 90, 100, skip_empty=False)
    ref_whole, _ = _do_paste_mask(probs[:, None], boxes, 90, 100, skip_empty=False)
    assert torch.equal(whole, ref_whole) and torch.equal(whole >= 0.5, want)
    assert paste_masks_in_image(probs[:0], boxes[:0], (90, 100)).shape == (0, 90, 100)


# --------------------------------------------------------------------------------------------- evaluation
def _random_mask_predictions(coco, seed):
    """Per image: masks from its objects' polygons (some shifted, some taken from another class) plus
    random rectangles, with random scores."""
    from pycocotools import mask as mask_util
    rng = np.random.RandomState(seed)
    cat_ids = sorted(coco.getCatIds())
    preds = {}
    for k, img_id in enumerate(sorted(coco.getImgIds())):
        if k % 5 == 2:
            continue  # images without predictions
        img = coco.imgs[img_id]
        h, w = img["height"], img["width"]
        masks, boxes, scores, classes = [], [], [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            if a["iscrowd"] or rng.rand() > 0.8:
                continue
            m = coco.annToMask(a).astype(bool)
            dx, dy = rng.randint(-6, 7, size=2)
            masks.append(np.roll(m, (dy, dx), axis=(0, 1)))
            classes.append(cat_ids.index(a["category_id"]) if rng.rand() < 0.9 else rng.randint(len(cat_ids)))
        for _ in range(rng.randint(0, 3)):
            m = np.zeros((h, w), bool)
            x0, y0 = rng.randint(0, w - 20), rng.randint(0, h - 20)
            m[y0:y0 + rng.randint(5, 150), x0:x0 + rng.randint(5, 150)] = True
            masks.append(m)
            classes.append(rng.randint(len(cat_ids)))
        for m in masks:
            x, y, bw, bh = mask_util.toBbox(mask_util.encode(np.asfortranarray(m.astype(np.uint8))))
            boxes.append([x, y, x + bw, y + bh])
            scores.append(rng.rand())
        preds[img_id] = {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
                         "classes": np.array(classes, np.int64), "masks": np.array(masks).reshape(-1, h, w)}
    return preds


def _as_instances(p):
    """detectron2 Instances of one image's predictions (numpy boxes, scores, classes, bool masks)."""
    from detectron2.structures import Boxes, Instances
    inst = Instances(p["masks"].shape[1:])
    inst.pred_boxes, inst.scores = Boxes(torch.as_tensor(p["boxes"])), torch.as_tensor(p["scores"])
    inst.pred_classes, inst.pred_masks = torch.as_tensor(p["classes"]), torch.as_tensor(p["masks"])
    return inst


def _detectron2_coco_evaluator(gt, js, preds):
    """detectron2's COCOEvaluator (bbox and segm, pycocotools' COCOeval) on `preds` of `js` (`gt` loaded)."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    cat_ids = sorted(gt.getCatIds())
    name = "_test_mask_coco_tiny_val"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(json_file=js, thing_classes=[c["name"] for c in gt.loadCats(cat_ids)],
                                  thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(cat_ids)})
    ev = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, use_fast_impl=False)
    ev.reset()
    for img_id, p in preds.items():
        ev.process([{"image_id": img_id}], [{"instances": _as_instances(p)}])
    with contextlib.redirect_stdout(io.StringIO()):
        return ev.evaluate()


def test_segm_ap_equals_detectron2_coco_evaluator():
    d2_or_skip()
    from pycocotools.coco import COCO
    _, js = coco_tiny("val")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(js)
    preds = _random_mask_predictions(gt, seed=3)
    want = _detectron2_coco_evaluator(gt, js, preds)
    ours = {i: {**p, "masks": encode_rles(p["masks"])} for i, p in preds.items()}
    meta = {"json_file": js, "evaluator_type": "coco"}
    segm, bbox = evaluate_coco(meta, ours, "segm"), evaluate_coco(meta, ours)
    assert 10 < segm["AP"] < 90 and segm["AP"] != bbox["AP"]
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert segm[k] == pytest.approx(want["segm"][k], abs=1e-9, nan_ok=True), k
        assert bbox[k] == pytest.approx(want["bbox"][k], abs=1e-9, nan_ok=True), k


def test_detectron2_engine_evaluator_reports_segm():
    """The detectron2 engine's evaluator (MASK_ON): RLEs of detectron2's pred_masks, scored as segm."""
    d2_or_skip()
    from detectron2.data import MetadataCatalog
    from pycocotools.coco import COCO
    from transfer.detectron2_engine import TransferEvaluator
    image_root, js = coco_tiny("val")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(js)
    name = "_test_mask_transfer_evaluator"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    meta = dict(tdata.get_metadata("x", _registered_cfg(image_root, js)))
    meta.pop("name")
    MetadataCatalog.get(name).set(**meta)
    preds = _random_mask_predictions(gt, seed=4)
    ev = TransferEvaluator(name, distributed=False, mask_on=True)
    ev.reset()
    for img_id, p in preds.items():
        ev.process([{"image_id": img_id}], [{"instances": _as_instances(p)}])
    got = ev.evaluate()
    want = _detectron2_coco_evaluator(gt, js, preds)
    assert set(got) == {"bbox", "segm"} and 10 < got["segm"]["AP"] < 90
    for task in ("bbox", "segm"):
        for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert got[task][k] == pytest.approx(want[task][k], abs=1e-9, nan_ok=True), (task, k)


def _registered_cfg(image_root, json_file):
    """A config registering `x` (COCO); not validated, as only its DATASETS node is read."""
    return load_config(None, validate_cfg=False, opts=[
        "DATASETS.REGISTER.x.TYPE", "coco", "DATASETS.REGISTER.x.IMAGE_ROOT", image_root,
        "DATASETS.REGISTER.x.JSON_FILE", json_file])


# --------------------------------------------------------------------------------------------- end to end
def _subset_json(split, n, path):
    _, js = coco_tiny(split)
    with open(js) as f:
        d = json.load(f)
    d["images"] = d["images"][:n]
    ids = {i["id"] for i in d["images"]}
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] in ids]
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torchvision", pytest.param("detectron2", marks=pytest.mark.detectron2)])
def test_tiny_mask_rcnn_run_reports_box_and_mask_ap(tmp_path, engine):
    """The MoCo Mask R-CNN config, shrunk (R50-C4 from scratch, 2 iterations of 1 image, a handful of
    RoIs, 2 test images), in both engines: it trains with loss_mask and writes bbox/* and segm/* AP to
    metrics.json."""
    if engine == "detectron2":
        d2_or_skip()
    opts = []
    for name, split, n in (("mt_train", "train", 4), ("mt_val", "val", 2)):
        image_root, _ = coco_tiny(split)
        opts += [f"DATASETS.REGISTER.{name}.TYPE", "coco", f"DATASETS.REGISTER.{name}.IMAGE_ROOT", image_root,
                 f"DATASETS.REGISTER.{name}.JSON_FILE", _subset_json(split, n, tmp_path / f"{split}.json")]
    out = tmp_path / "run"
    res = train_net.main(["--engine", engine, "--config", MASK_CFG] + opts + [
        "DATASETS.TRAIN", "('mt_train',)", "DATASETS.TEST", "('mt_val',)", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "8",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "6", "TEST.DETECTIONS_PER_IMAGE", "4",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "1", "SOLVER.BASE_LR", "0.001", "SOLVER.MAX_ITER", "2",
        "SOLVER.STEPS", "(100,)", "SOLVER.WARMUP_ITERS", "1", "TEST.PRECISE_BN.ENABLED", "False",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "0", "OUTPUT_DIR", str(out)])
    with open(out / "metrics.json") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "total_loss" in r]
    assert train and 0 < train[-1]["loss_mask"] < 2
    keys = {f"{t}/{m}" for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
    ev = [r for r in rows if "segm/AP" in r]
    assert len(ev) == 1 and keys <= set(ev[0]) and keys <= set(res)
    assert all(0 <= res[k] <= 100 or res[k] != res[k] for k in keys)
