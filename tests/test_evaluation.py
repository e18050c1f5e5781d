"""transfer/evaluation.py: VOC AP against hand-computed numbers and detectron2's evaluator; COCO against
pycocotools / detectron2's COCOEvaluator(use_fast_impl=False)."""
import contextlib
import io
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from cocord_pipeline.synthetic_shapes import voc_xml

from transfer import evaluation
from transfer.evaluation import evaluate, evaluate_coco, evaluate_voc, voc_ap


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def write_voc(root, images, split="test"):
    """images: {file_id: [(name, (xmin, ymin, xmax, ymax) 1-based as in the XML, difficult)]}"""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    for fid, objs in images.items():
        (root / "Annotations" / f"{fid}.xml").write_text(voc_xml(fid, 300, 300, objs))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def loader_box(b):
    """The VOC loader's 0-based coordinates of an XML box (detectron2: xmin, ymin - 1)."""
    return [b[0] - 1, b[1] - 1, b[2], b[3]]


def pred(boxes, scores, classes):
    return dict(boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                classes=np.array(classes, np.int64))


A1, A2, A3, D = (10, 10, 49, 49), (100, 100, 139, 139), (10, 10, 49, 49), (200, 200, 239, 239)
B1 = (1, 1, 100, 100)


def crafted(tmp_path, d_difficult=1):
    """Class a: GT A1, A2 in img0; A3 and a difficult D in img1. Class b: B1 in img0.
    Class-a detections by score: exact A1 (TP), A1 again (dup -> FP), exact D (difficult -> ignored),
    far away (FP), exact A3 (TP), exact A2 (TP). Class b: one box of IoU exactly 0.6 with B1."""
    root = write_voc(tmp_path / "voc", {
        "img0": [("a", A1, 0), ("a", A2, 0), ("b", B1, 0)],
        "img1": [("a", A3, 0), ("a", D, d_difficult)],
    })
    preds = {
        "img0": pred([loader_box(A1), loader_box(A1), loader_box(A2), [0, 0, 100, 60]],
                     [0.9, 0.8, 0.4, 0.7], [0, 0, 0, 1]),
        "img1": pred([loader_box(D), [250, 10, 290, 40], loader_box(A3)], [0.7, 0.6, 0.5], [0, 0, 0]),
    }
    return root, preds


def voc_meta(root, year, classes=("a", "b"), split="test"):
    return dict(thing_classes=list(classes), dirname=str(root), split=split, year=year,
                evaluator_type="pascal_voc")


# ----------------------------------------------------------------------------------------------------
# VOC: hand-computed
# ----------------------------------------------------------------------------------------------------
# Class a, sorted: TP FP (ignored) FP TP TP, npos 3 (D difficult):
#   cum tp 1 1 1 1 2 3, cum fp 0 1 1 2 2 2 -> rec 1/3 1/3 1/3 1/3 2/3 1, prec 1 .5 .5 1/3 .5 .6
#   area: envelope 1 | .6 | .6 over recall steps of 1/3 -> (1 + .6 + .6) / 3
#   11-point: t=0..0.3 -> 1 (4 points), t=0.4..0.6 -> .6 (3), t=0.7..1.0 -> .6 (4) -> 8.2 / 11
# Class b: IoU = (100*60) / (100*100) = 0.6 exactly -> TP only when 0.6 > t, i.e. t = 0.50, 0.55:
#   AP_b = 1 at 50, 55 and 0 at 60..95.  All IoUs of class a are 1 -> same AP_a at every threshold.
AREA_A = (1 + 0.6 + 0.6) / 3
ELEVEN_A = (4 * 1 + 3 * 0.6 + 4 * 0.6) / 11


@pytest.mark.parametrize("year,ap_a", [(2012, AREA_A), (2007, ELEVEN_A)])
def test_voc_hand_computed(tmp_path, year, ap_a):
    root, preds = crafted(tmp_path)
    r = evaluate_voc(voc_meta(root, year), preds)
    assert r["AP50"] == pytest.approx((ap_a + 1) / 2 * 100, abs=1e-9)
    assert r["AP75"] == pytest.approx(ap_a / 2 * 100, abs=1e-9)
    assert r["AP"] == pytest.approx((ap_a + 2 / 10) / 2 * 100, abs=1e-9)  # mean over 10 thresholds
    assert r["per_class_AP50"] == pytest.approx({"a": ap_a * 100, "b": 100.0}, abs=1e-9)
    assert list(r)[:3] == ["AP", "AP50", "AP75"]
    assert evaluate(voc_meta(root, year), preds)["AP"] == r["AP"]


def test_voc_difficult_is_what_changes_the_answer(tmp_path):
    # Same detections, D not difficult: npos 4 and the detection on D is a TP.
    # TP FP TP FP TP TP: rec .25 .25 .5 .5 .75 1, prec 1 .5 2/3 .5 .6 2/3
    # area: .25 * (1 + 2/3 + 2/3 + 2/3) = .75
    root, preds = crafted(tmp_path, d_difficult=0)
    r = evaluate_voc(voc_meta(root, 2012), preds)
    assert r["per_class_AP50"]["a"] == pytest.approx(75.0, abs=1e-9)


def test_voc_ap_primitives():
    rec, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    assert voc_ap(rec, prec) == pytest.approx(0.5 * 1 + 0.5 * 0.5)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    assert voc_ap(np.zeros(0), np.zeros(0)) == 0 and voc_ap(np.zeros(0), np.zeros(0), True) == 0


def test_voc_images_without_predictions_and_rounding(tmp_path):
    root, preds = crafted(tmp_path)
    # no predictions for img1: A3 missed; class a -> TP FP TP with npos 3 (rec 1/3 1/3 2/3, prec 1 .5 2/3)
    only0 = {"img0": preds["img0"]}
    r = evaluate_voc(voc_meta(root, 2012), only0)
    assert r["per_class_AP50"]["a"] == pytest.approx(100 * (1 / 3 + 2 / 3 * 1 / 3), abs=1e-9)
    # detectron2 writes xmin+1 with 1 decimal: a box 0.04 px off rounds onto the GT (IoU 1 > 0.95)
    nudged = {"img0": pred([[9.04, 9.04, 49.04, 48.96]], [0.9], [0]), "img1": None}
    r = evaluate_voc(voc_meta(root, 2012), nudged)
    assert r["per_class_AP50"]["a"] == pytest.approx(100 / 3, abs=1e-9)
    assert r["AP"] == pytest.approx(100 / 3 / 2, abs=1e-9)


def test_voc_bad_inputs(tmp_path):
    root, preds = crafted(tmp_path)
    with pytest.raises(ValueError, match="not listed in"):
        evaluate_voc(voc_meta(root, 2012), {"nope": preds["img0"]})
    with pytest.raises(ValueError, match=r"class ids \[5\]"):
        evaluate_voc(voc_meta(root, 2012), {"img0": pred([[0, 0, 5, 5]], [0.5], [5])})
    with pytest.raises(ValueError, match="same length"):
        evaluate_voc(voc_meta(root, 2012), {"img0": pred([[0, 0, 5, 5]], [0.5, 0.2], [0])})
    with pytest.raises(FileNotFoundError, match="val.txt"):
        evaluate_voc(voc_meta(root, 2012, split="val"), preds)
    with pytest.raises(ValueError, match="lacks"):
        evaluate_voc({"thing_classes": ["a"], "split": "test", "year": 2012}, preds)
    (root / "Annotations" / "img1.xml").write_text("<annotation><object>")
    with pytest.raises(ValueError, match="img1.xml is not valid XML"):
        evaluate_voc(voc_meta(root, 2012), preds)
    (root / "Annotations" / "img1.xml").unlink()
    with pytest.raises(FileNotFoundError, match="img1.xml is missing"):
        evaluate_voc(voc_meta(root, 2012), preds)
    with pytest.raises(ValueError, match="unknown evaluator_type 'lvis'"):
        evaluate({"evaluator_type": "lvis"}, preds)


# ----------------------------------------------------------------------------------------------------
# VOC: equal to detectron2's PascalVOCDetectionEvaluator
# ----------------------------------------------------------------------------------------------------
def random_voc_predictions(root, split, classes, seed):
    """Jittered GT boxes (some with a wrong class) plus random boxes; scores on a coarse grid so that
    ties exist and the tie order must match."""
    rng = np.random.RandomState(seed)
    ids = [x.strip() for x in (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split() if x.strip()]
    preds = {}
    for k, fid in enumerate(ids):
        if k % 7 == 3:
            continue  # some images without predictions
        bs, ss, cs = [], [], []
        for o in ET.parse(root / "Annotations" / f"{fid}.xml").findall("object"):
            b = loader_box([float(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")])
            if rng.rand() < 0.8:
                bs.append(np.array(b) + rng.randn(4) * 6)
                ss.append(rng.rand())
                cs.append(classes.index(o.findtext("name")) if rng.rand() < 0.9 else rng.randint(len(classes)))
        for _ in range(rng.randint(0, 5)):
            x, y = rng.rand(2) * 250
            bs.append([x, y, x + rng.rand() * 90 + 1, y + rng.rand() * 90 + 1])
            ss.append(rng.rand())
            cs.append(rng.randint(len(classes)))
        preds[fid] = pred(np.array(bs).reshape(-1, 4), np.round(np.array(ss), 2), cs)
    return preds


def d2_voc(name, meta, preds):
    torch = pytest.importorskip("torch")
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import PascalVOCDetectionEvaluator
    from detectron2.structures import Boxes, Instances

    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(thing_classes=meta["thing_classes"], dirname=meta["dirname"],
                                  split=meta["split"], year=meta["year"])
    ev = PascalVOCDetectionEvaluator(name)
    ev.reset()
    for fid, p in preds.items():
        inst = Instances((300, 300))
        inst.pred_boxes = Boxes(torch.as_tensor(p["boxes"]))
        inst.scores = torch.as_tensor(p["scores"])
        inst.pred_classes = torch.as_tensor(p["classes"])
        ev.process([{"image_id": fid}], [{"instances": inst}])
    return ev.evaluate()["bbox"]


@pytest.mark.detectron2
@pytest.mark.parametrize("year", [2007, 2012])
def test_voc_equals_detectron2_on_written_folder(tmp_path, year, monkeypatch):
    pytest.importorskip("detectron2")
    rng = np.random.RandomState(year)
    classes = ["cat", "dog", "car"]
    images = {}
    for i in range(25):
        objs = []
        for _ in range(rng.randint(0, 6)):
            x, y = rng.randint(1, 200, size=2)
            objs.append((classes[rng.randint(3)], (x, y, x + rng.randint(5, 90), y + rng.randint(5, 90)),
                         int(rng.rand() < 0.15)))
        images[f"{i:06d}"] = objs
    root = write_voc(tmp_path / "rand", images)
    root_crafted, preds_crafted = crafted(tmp_path)
    for r, preds, cls in ((root, random_voc_predictions(root, "test", classes, seed=year), classes),
                          (root_crafted, preds_crafted, ["a", "b"])):
        meta = voc_meta(r, year, classes=cls)
        ref = d2_voc(f"_test_voc_{year}_{r.name}", meta, preds)
        ours = evaluate_voc(meta, preds)
        for k in ("AP", "AP50", "AP75"):
            assert ours[k] == pytest.approx(float(ref[k]), abs=1e-9, rel=0), k
        monkeypatch.setattr(evaluation, "VOC_CHUNK", 7)  # IoU computed in many blocks: same answer
        assert evaluate_voc(meta, preds) == ours
        monkeypatch.undo()


@pytest.mark.detectron2
@pytest.mark.parametrize("year", [2007, 2012])
def test_voc_equals_detectron2_on_bccd(shared, year):
    pytest.importorskip("detectron2")
    root = shared("data", "voc_bccd")
    classes = ["RBC", "WBC", "Platelets"]
    preds = random_voc_predictions(root, "test", classes, seed=0)
    meta = voc_meta(root, year, classes=classes)
    ref = d2_voc(f"_test_bccd_{year}", meta, preds)
    ours = evaluate_voc(meta, preds)
    assert 5 < ours["AP50"] < 95  # a non-trivial operating point
    for k in ("AP", "AP50", "AP75"):
        assert ours[k] == pytest.approx(float(ref[k]), abs=1e-9, rel=0), k


# ----------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------
def write_coco(path, images, cats, anns):
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in images],
        "categories": [{"id": c, "name": f"c{c}"} for c in cats],
        "annotations": [{"id": k + 1, "image_id": im, "category_id": c, "bbox": list(b),
                         "area": b[2] * b[3], "iscrowd": 0} for k, (im, c, b) in enumerate(anns)],
    }))
    return path


def test_coco_maps_contiguous_ids_back(tmp_path):
    # JSON category ids 3 and 7 -> contiguous 0 and 1. Perfect detections score 100 only if mapped back.
    js = write_coco(tmp_path / "inst.json", [1, 2], [7, 3],
                    [(1, 3, (10, 10, 50, 40)), (1, 7, (100, 100, 40, 60)), (2, 7, (20, 30, 60, 60))])
    meta = {"json_file": str(js), "evaluator_type": "coco"}
    preds = {1: pred([[10, 10, 60, 50], [100, 100, 140, 160]], [0.9, 0.8], [0, 1]),
             2: pred([[20, 30, 80, 90]], [0.7], [1])}
    r = evaluate(meta, preds)
    assert set(r) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert r["AP"] == pytest.approx(100.0) and r["AP50"] == pytest.approx(100.0)
    assert np.isnan(r["APs"])  # no small objects -> COCOeval gives -1 -> NaN, as detectron2
    # image 2 without predictions: its object is missed -> category 7 recall 1/2, AP at every IoU
    # = 0.5 (101-point interpolation: precision 1 up to recall .5) -> mean over categories .75
    r = evaluate_coco(meta, {1: preds[1]})
    assert r["AP"] == pytest.approx(100 * (1 + 51 / 101) / 2)
    # an explicit metadata mapping wins over the sorted-ids default
    swapped = dict(meta, thing_dataset_id_to_contiguous_id={7: 0, 3: 1})
    assert evaluate_coco(swapped, preds)["AP"] < 1
    assert all(np.isnan(v) for v in evaluate_coco(meta, {1: pred([], [], [])}).values())
    with pytest.raises(ValueError, match=r"image ids \[99\]"):
        evaluate_coco(meta, {99: preds[2]})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate_coco(meta, {1: pred([[0, 0, 5, 5]], [0.5], [2])})
    with pytest.raises(FileNotFoundError, match="missing.json"):
        evaluate_coco({"json_file": str(tmp_path / "missing.json")}, preds)


def random_coco_predictions(coco, seed):
    rng = np.random.RandomState(seed)
    cat_ids = sorted(coco.getCatIds())
    preds = {}
    for k, img in enumerate(sorted(coco.getImgIds())):
        if k % 6 == 1:
            continue
        bs, ss, cs = [], [], []
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img)):
            if rng.rand() < 0.8:
                x, y, w, h = a["bbox"]
                bs.append(np.array([x, y, x + w, y + h]) + rng.randn(4) * 0.08 * np.sqrt(w * h + 1))
                ss.append(rng.rand())
                cs.append(cat_ids.index(a["category_id"]))
        for _ in range(rng.randint(0, 4)):
            x, y = rng.rand(2) * 300
            bs.append([x, y, x + rng.rand() * 150 + 1, y + rng.rand() * 150 + 1])
            ss.append(rng.rand())
            cs.append(rng.randint(len(cat_ids)))
        preds[img] = pred(np.array(bs).reshape(-1, 4), ss, cs)
    return preds


def test_coco_equals_pycocotools_on_coco_tiny(shared):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    js = shared("data", "coco_tiny", "annotations", "instances_val2017.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(js))
    preds = random_coco_predictions(gt, seed=1)
    cat_ids = sorted(gt.getCatIds())
    dets = [{"image_id": img, "category_id": cat_ids[c], "score": float(s),
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
            for img, p in preds.items() for b, s, c in zip(p["boxes"], p["scores"], p["classes"])]
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = evaluate_coco({"json_file": str(js)}, preds)
    assert 10 < ours["AP"] < 90
    for k, name in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        assert ours[name] == pytest.approx(ev.stats[k] * 100, abs=1e-4), name


@pytest.mark.detectron2
def test_coco_equals_detectron2_on_coco_tiny(shared):
    pytest.importorskip("detectron2")
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances
    from pycocotools.coco import COCO

    js = shared("data", "coco_tiny", "annotations", "instances_val2017.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(js))
    cat_ids = sorted(gt.getCatIds())
    name = "_test_coco_tiny_val"
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(json_file=str(js), thing_classes=[c["name"] for c in gt.loadCats(cat_ids)],
                                  thing_dataset_id_to_contiguous_id={c: i for i, c in enumerate(cat_ids)})
    preds = random_coco_predictions(gt, seed=2)
    ev = COCOEvaluator(name, distributed=False, use_fast_impl=False)
    ev.reset()
    for img in sorted(gt.getImgIds()):
        inst = Instances((480, 640))
        p = preds.get(img, pred([], [], []))
        inst.pred_boxes = Boxes(torch.as_tensor(p["boxes"]).reshape(-1, 4))
        inst.scores = torch.as_tensor(p["scores"])
        inst.pred_classes = torch.as_tensor(p["classes"])
        ev.process([{"image_id": img}], [{"instances": inst}])
    with contextlib.redirect_stdout(io.StringIO()):
        ref = ev.evaluate()["bbox"]
    ours = evaluate_coco({"json_file": str(js)}, preds)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        if np.isnan(ref[k]):
            assert np.isnan(ours[k]), k
        else:
            assert ours[k] == pytest.approx(ref[k], abs=1e-9, rel=0), k
