"""Detection evaluation shared by both engines: PASCAL VOC (detectron2 semantics) and COCO (pycocotools).

Predictions, for every evaluator here, are one dict keyed by the dataset's ``image_id``::

    {image_id: {"boxes": np.ndarray[N, 4]  XYXY absolute, in the loader's coordinates,
                "scores": np.ndarray[N],
                "classes": np.ndarray[N]  contiguous ids 0..K-1,
                "masks": [N COCO RLEs]  only for COCO mask AP (iou_type "segm", MODEL.MASK_ON)}}

Images of the split that have no entry (or an empty one) simply have no detections: their ground
truth still counts as missed. The insertion order of the dict is the order detectron2 would have
processed the images in; it only matters for ties in score (see ``evaluate_voc``).

``evaluate_voc`` reproduces detectron2 0.6's ``PascalVOCDetectionEvaluator`` number for number:
  * detections are written as text first, so boxes become ``xmin+1, ymin+1, xmax, ymax`` (the inverse
    of the -1 that the VOC loader applies to the XML's 1-based corners) rounded to 0.1 px, and scores
    are rounded to 3 decimals; the sort by score uses numpy's default (unstable) argsort on that list;
  * ground truth is re-read from ``Annotations/<id>.xml`` for every id in
    ``ImageSets/Main/<split>.txt`` (so boxes the loader dropped still count, as in detectron2);
  * IoU uses the devkit's "+1 pixel" widths; a detection is a match when IoU > threshold (strictly);
    a match on a "difficult" object is neither TP nor FP, and difficult objects are not positives;
  * AP per class is the 11-point metric when ``year == 2007`` else the area under the interpolated
    PR curve (VOC2010+); for each IoU in 0.50:0.05:0.95 the classes' APs are averaged; AP is the
    mean of those 10 numbers; everything x100.
Deviations (inputs on which detectron2 would crash): coordinates written as floats in the XML are
accepted, a missing ``<difficult>`` reads as 0, blank lines in the split file are skipped, and any
``year`` is accepted (only 2007 selects the 11-point metric).
Deviation on purpose: a class with no non-difficult ground truth in the split (never on standard VOC)
is left out of the headline means and named in ``excluded_classes`` (detectron2 averages in its NaN AP).
"""
import contextlib
import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import OrderedDict

import numpy as np

logger = logging.getLogger(__name__)

VOC_IOU_THRESHOLDS = tuple(range(50, 100, 5))  # percent, as detectron2
VOC_CHUNK = 8192  # detections per IoU block (bounds memory: chunk x max-GT-per-image x 4 floats)
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------
def _flatten_predictions(predictions, num_classes, what):
    """Concatenate per-image predictions in dict order -> (image_ids list, img_index[N], boxes[N,4]
    float32, scores[N] float32, classes[N] int64). Validates shapes and class range."""
    if not isinstance(predictions, dict):
        raise TypeError(f"{what}: predictions must be a dict image_id -> dict(boxes, scores, classes), "
                        f"got {type(predictions).__name__}")
    image_ids, idx, boxes, scores, classes = [], [], [], [], []
    for i, (image_id, pred) in enumerate(predictions.items()):
        image_ids.append(image_id)
        if pred is None:
            continue
        missing = [k for k in ("boxes", "scores", "classes") if k not in pred]
        if missing:
            raise ValueError(f"{what}: predictions[{image_id!r}] lacks key(s) {missing}; "
                             "each entry needs 'boxes' [N,4] XYXY, 'scores' [N] and 'classes' [N]")
        b = np.asarray(_to_numpy(pred["boxes"]), dtype=np.float32)
        if b.size == 0:
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"{what}: predictions[{image_id!r}]['boxes'] has shape {b.shape}; expected [N, 4]")
        s = np.asarray(_to_numpy(pred["scores"]), dtype=np.float32).reshape(-1)
        c = np.asarray(_to_numpy(pred["classes"])).reshape(-1)
        if not (len(b) == len(s) == len(c)):
            raise ValueError(f"{what}: predictions[{image_id!r}] has {len(b)} boxes, {len(s)} scores and "
                             f"{len(c)} classes; they must have the same length")
        if len(c) and (c.min() < 0 or c.max() >= num_classes or not np.all(c == np.round(c))):
            raise ValueError(f"{what}: predictions[{image_id!r}] has class ids {sorted(set(c.tolist()))}; "
                             f"contiguous ids must be integers in [0, {num_classes - 1}]")
        idx.append(np.full(len(b), i, dtype=np.int64))
        boxes.append(b)
        scores.append(s)
        classes.append(c.astype(np.int64))
    if idx:
        return (image_ids, np.concatenate(idx), np.concatenate(boxes), np.concatenate(scores),
                np.concatenate(classes))
    return image_ids, np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32), \
        np.zeros(0, np.int64)


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    return x


def _require(meta, keys, what):
    missing = [k for k in keys if k not in meta or meta[k] is None]
    if missing:
        raise ValueError(f"{what}: dataset metadata lacks {missing} (has {sorted(meta)}); "
                         "build it with transfer.data.get_metadata(name, cfg)")


# ----------------------------------------------------------------------------------------------------
# PASCAL VOC
# ----------------------------------------------------------------------------------------------------
def parse_voc_xml(path):
    """Objects of one VOC annotation file as [(name, [xmin, ymin, xmax, ymax] as in the XML, difficult)]."""
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise FileNotFoundError(f"VOC evaluation: annotation file {path} is missing (the image is listed in "
                                "the split file); add it or remove the id from ImageSets/Main/<split>.txt")
    except ET.ParseError as e:
        raise ValueError(f"VOC evaluation: {path} is not valid XML ({e}); fix or regenerate the file")
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name, box = obj.findtext("name"), obj.find("bndbox")
        if name is None or box is None:
            raise ValueError(f"VOC evaluation: {path}, object #{k} lacks <name> or <bndbox>")
        try:
            coords = [float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
            difficult = int(obj.findtext("difficult") or 0)
        except (TypeError, ValueError):
            raise ValueError(f"VOC evaluation: {path}, object #{k} ({name!r}) has a missing or non-numeric "
                             "<bndbox> coordinate or <difficult> flag")
        objects.append((name.strip(), coords, difficult))
    return objects


def voc_ap(rec, prec, use_07_metric=False):
    """VOC average precision from cumulative recall/precision (the devkit's two definitions)."""
    if use_07_metric:  # 11-point interpolation (VOC2007)
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # the very same floats as the devkit port
            p = np.max(prec[rec >= t]) if np.sum(rec >= t) > 0 else 0
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope (running max from the right)
    i = np.where(mrec[1:] != mrec[:-1])[0]  # points where recall changes
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def _round_text(x, fmt):
    """What detectron2's text round trip does to a number: float(f"{x:{fmt}}")."""
    if x.size == 0:
        return x.astype(np.float64)
    return np.char.mod("%" + fmt, x.astype(np.float64)).astype(np.float64)


def _voc_overlaps(det_boxes, det_img, gt_boxes, gt_img_start, gt_img_count, chunk):
    """For every detection: max IoU ("+1" convention) over the GT of its image and the global index of
    the first GT reaching it (-1 and -inf when the image has no GT of the class). Padded vectorisation:
    each detection is compared with up to max-GT-per-image boxes."""
    nd = len(det_boxes)
    ovmax = np.full(nd, -np.inf)
    gmax = np.full(nd, -1, dtype=np.int64)
    if nd == 0 or len(gt_boxes) == 0:
        return ovmax, gmax
    width = int(gt_img_count.max())
    for s in range(0, nd, chunk):
        bb = det_boxes[s:s + chunk]
        start, count = gt_img_start[det_img[s:s + chunk]], gt_img_count[det_img[s:s + chunk]]
        cols = np.arange(width)
        valid = cols[None, :] < count[:, None]  # [n, width]
        gidx = np.where(valid, start[:, None] + cols[None, :], 0)
        g = gt_boxes[gidx]  # [n, width, 4]
        # same operations, same order as the devkit port, so results are bit-identical
        ixmin = np.maximum(g[..., 0], bb[:, None, 0])
        iymin = np.maximum(g[..., 1], bb[:, None, 1])
        ixmax = np.minimum(g[..., 2], bb[:, None, 2])
        iymax = np.minimum(g[..., 3], bb[:, None, 3])
        iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
        ih = np.maximum(iymax - iymin + 1.0, 0.0)
        inters = iw * ih
        uni = ((bb[:, None, 2] - bb[:, None, 0] + 1.0) * (bb[:, None, 3] - bb[:, None, 1] + 1.0)
               + (g[..., 2] - g[..., 0] + 1.0) * (g[..., 3] - g[..., 1] + 1.0) - inters)
        with np.errstate(divide="ignore", invalid="ignore"):
            ov = inters / uni
        ov = np.where(valid, ov, -np.inf)
        has = count > 0
        j = np.argmax(ov, axis=1)  # first maximum (a NaN counts as maximum, like np.argmax in the port)
        m = np.max(ov, axis=1)
        ovmax[s:s + chunk] = np.where(has, m, -np.inf)
        gmax[s:s + chunk] = np.where(has, start + j, -1)
    return ovmax, gmax


def _voc_class_ap(ovmax, gmax, gt_difficult, npos, thresholds, use_07_metric):
    """Greedy matching (detections already sorted by score) for every IoU threshold -> list of AP.
    A GT is taken by the first detection above threshold whose best GT it is; later ones are FP."""
    aps = []
    nd = len(ovmax)
    hit_difficult = np.zeros(nd, dtype=bool)
    hit_difficult[gmax >= 0] = gt_difficult[gmax[gmax >= 0]]
    for thr in thresholds:
        above = ovmax > thr
        tp = np.zeros(nd)
        fp = np.zeros(nd)
        fp[~above] = 1.0
        cand = np.nonzero(above & ~hit_difficult)[0]  # in score order
        first = np.zeros(len(cand), dtype=bool)
        if len(cand):
            _, first_pos = np.unique(gmax[cand], return_index=True)
            first[first_pos] = True
        tp[cand[first]] = 1.0
        fp[cand[~first]] = 1.0
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        with np.errstate(divide="ignore", invalid="ignore"):  # npos == 0: NaN, as detectron2
            rec = tp / float(npos)
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        with np.errstate(invalid="ignore"):
            aps.append(voc_ap(rec, prec, use_07_metric))
    return aps


def _headline_means(aps, included):
    """{IoU: mean AP over the included classes}; NaN when no class is included. With every class
    included this is detectron2's mean over all classes, bit for bit."""
    if not any(included):
        return {t: float("nan") for t in aps}
    return {t: np.mean([a for a, inc in zip(v, included) if inc]) for t, v in aps.items()}


def evaluate_voc(meta, predictions):
    """PASCAL VOC detection AP with detectron2's ``PascalVOCDetectionEvaluator`` semantics.

    ``meta`` needs ``thing_classes``, ``dirname`` (VOC root with Annotations/ and ImageSets/Main/),
    ``split`` and ``year``. ``predictions`` as in the module docstring, keyed by the file id (the
    ``image_id`` of the VOC loader). Returns OrderedDict(AP, AP50, AP75, per_class_AP50={name: AP50}),
    all x100, plus ``excluded_classes`` [names] when some class has no non-difficult ground truth in
    the split: the headline AP/AP50/AP75 average only the classes that have some (detectron2 averages
    in NaN, or 0 with the 11-point metric, which would turn a mean over trials into NaN); their
    per-class AP50 stays detectron2's NaN / 0. On standard VOC every class has ground truth and the
    numbers are detectron2's.
    """
    what = "VOC evaluation"
    _require(meta, ("thing_classes", "dirname", "split", "year"), what)
    classes = list(meta["thing_classes"])
    dirname, split, year = meta["dirname"], meta["split"], int(meta["year"])
    use_07 = year == 2007
    # transfer.data's metadata may name other folders / a split file elsewhere (custom datasets)
    split_file = meta.get("split_file") or os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    annotation_dir = meta.get("annotation_dir") or os.path.join(dirname, "Annotations")
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"{what}: split file {split_file} not found (metadata dirname={dirname!r}, "
                                f"split={split!r}); point the dataset at a VOC-layout folder")
    with open(split_file) as f:
        image_names = [x.strip() for x in f if x.strip()]
    name_to_idx = {n: i for i, n in enumerate(image_names)}
    cls_to_id = {c: i for i, c in enumerate(classes)}

    # ground truth, grouped by class then image (split order)
    per_class = [[] for _ in classes]  # (image index, box, difficult)
    for i, name in enumerate(image_names):
        for obj_name, box, difficult in parse_voc_xml(os.path.join(annotation_dir, name + ".xml")):
            c = cls_to_id.get(obj_name)
            if c is not None:  # other names never match any class, as in the devkit port
                per_class[c].append((i, box, difficult))

    pred_ids, det_pos, det_boxes, det_scores, det_classes = _flatten_predictions(predictions, len(classes), what)
    # predictions keyed by id -> index in the split
    pred_img = np.empty(len(pred_ids), dtype=np.int64)
    for k, image_id in enumerate(pred_ids):
        j = name_to_idx.get(str(image_id))
        if j is None:
            raise ValueError(f"{what}: prediction for image_id {image_id!r}, which is not listed in "
                             f"{split_file}; evaluate on the split the predictions were made for")
        pred_img[k] = j
    det_img = pred_img[det_pos]
    # detectron2's text round trip: "xmin+1 ymin+1 xmax ymax" with .1f, score with .3f (float32 arithmetic)
    det_boxes = det_boxes.copy()
    det_boxes[:, :2] += np.float32(1)
    det_boxes = _round_text(det_boxes, ".1f")
    det_scores = _round_text(det_scores, ".3f")

    thresholds = [t / 100.0 for t in VOC_IOU_THRESHOLDS]
    aps = {t: [] for t in VOC_IOU_THRESHOLDS}
    included = []  # per class: has non-difficult ground truth in the split
    for c in range(len(classes)):
        gts = per_class[c]
        gt_img = np.array([g[0] for g in gts], dtype=np.int64)
        gt_boxes = np.array([g[1] for g in gts], dtype=np.float64).reshape(-1, 4)
        gt_diff = np.array([bool(g[2]) for g in gts], dtype=bool)
        npos = int((~gt_diff).sum())
        included.append(npos > 0)
        gt_count = np.bincount(gt_img, minlength=len(image_names))
        gt_start = np.concatenate(([0], np.cumsum(gt_count)[:-1]))  # gts are in image order

        sel = np.nonzero(det_classes == c)[0]  # keeps processing order, like detectron2's per-class lines
        order = np.argsort(-det_scores[sel])  # default quicksort, exactly as the port (tie order matters)
        sel = sel[order]
        ovmax, gmax = _voc_overlaps(det_boxes[sel], det_img[sel], gt_boxes, gt_start, gt_count, VOC_CHUNK)
        for t, ap in zip(VOC_IOU_THRESHOLDS, _voc_class_ap(ovmax, gmax, gt_diff, npos, thresholds, use_07)):
            aps[t].append(ap * 100)

    mAP = _headline_means(aps, included)
    ret = OrderedDict()
    ret["AP"] = float(np.mean(list(mAP.values())))
    ret["AP50"] = float(mAP[50])
    ret["AP75"] = float(mAP[75])
    ret["per_class_AP50"] = OrderedDict((n, float(a)) for n, a in zip(classes, aps[50]))
    excluded = [n for n, inc in zip(classes, included) if not inc]
    if excluded:
        ret["excluded_classes"] = excluded
        logger.warning(f"{what}: class(es) {excluded} have no non-difficult ground truth in {split_file}; the "
                       f"headline AP/AP50/AP75 average the other {len(classes) - len(excluded)} class(es) "
                       "(detectron2 would average in a NaN AP, or 0 with the 11-point metric, for each)")
    logger.info(f"{what} of {dirname} [{split}] with the {2007 if use_07 else 2012} metric: "
                f"AP {ret['AP']:.3f}  AP50 {ret['AP50']:.3f}  AP75 {ret['AP75']:.3f}")
    return ret


# ----------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------
def _coco_id_map(meta, coco_api):
    """contiguous id -> JSON category id. Uses the metadata's mapping when given, else the loader's
    convention (detectron2's load_coco_json): sorted JSON category ids."""
    m = meta.get("thing_dataset_id_to_contiguous_id")
    if m:
        contiguous = sorted(m.values())
        if contiguous != list(range(len(contiguous))):
            raise ValueError("COCO evaluation: metadata thing_dataset_id_to_contiguous_id values must be "
                             f"0..K-1, got {contiguous[:10]}...")
        return {int(v): int(k) for k, v in m.items()}
    return {i: cid for i, cid in enumerate(sorted(coco_api.getCatIds()))}


def _flatten_masks(predictions, what):
    """Every detection's COCO RLE (``masks``: one per box), in the order of _flatten_predictions."""
    rles = []
    for image_id, pred in predictions.items():
        if pred is None:
            continue
        masks, n = pred.get("masks"), len(_to_numpy(pred["scores"]).reshape(-1))
        if masks is None or len(masks) != n:
            raise ValueError(f"{what}: segm evaluation needs predictions[{image_id!r}]['masks'], one COCO RLE per "
                             f"box ({n}), got {None if masks is None else len(masks)}; is MODEL.MASK_ON set?")
        rles.extend(masks)
    return rles


def evaluate_coco(meta, predictions, iou_type="bbox"):
    """COCO bbox (or, with iou_type "segm", mask) AP with pycocotools' official ``COCOeval`` (as
    detectron2's COCOEvaluator with ``use_fast_impl=False``). ``meta`` needs ``json_file``; class ids
    are mapped back to the JSON's category ids. All images of the JSON are evaluated. For segm every
    prediction also needs ``masks``: a list of COCO RLEs ({"size", "counts"}; transfer.masks.encode_rles),
    one per box, scored without their boxes (as detectron2: S/M/L by mask area). Returns {AP, AP50,
    AP75, APs, APm, APl} x100; a metric COCOeval cannot compute (or no detections at all) is NaN."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    what = "COCO evaluation"
    _require(meta, ("json_file",), what)
    json_file = meta["json_file"]
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{what}: annotation file {json_file} not found")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(json_file)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"{what}: {json_file} is not a valid COCO instances file ({type(e).__name__}: {e})")
    if "annotations" not in coco_gt.dataset:
        raise ValueError(f"{what}: {json_file} has no 'annotations' (a test-dev style file); it cannot be "
                         "evaluated locally")
    id_map = _coco_id_map(meta, coco_gt)
    ids, pos, boxes, scores, classes = _flatten_predictions(predictions, len(id_map), what)
    known = set(coco_gt.getImgIds())
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"{what}: predictions for image ids {unknown[:5]} that are not in {json_file}")

    # XYXY -> XYWH in float32 as detectron2's BoxMode.convert, then Python floats
    xywh = boxes.copy()
    xywh[:, 2] -= xywh[:, 0]
    xywh[:, 3] -= xywh[:, 1]
    if iou_type == "segm":
        results = [{"image_id": ids[p], "category_id": id_map[int(c)], "segmentation": m, "score": s}
                   for p, c, m, s in zip(pos.tolist(), classes.tolist(), _flatten_masks(predictions, what),
                                         scores.tolist())]
    elif iou_type == "bbox":
        results = [{"image_id": ids[p], "category_id": id_map[int(c)], "bbox": b, "score": s}
                   for p, c, b, s in zip(pos.tolist(), classes.tolist(), xywh.tolist(), scores.tolist())]
    else:
        raise ValueError(f"{what}: iou_type {iou_type!r}; use 'bbox' or 'segm'")
    if not results:
        logger.warning(f"{what}: no detections at all; every metric is NaN (as detectron2)")
        return {m: float("nan") for m in COCO_METRICS}

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, 100]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    logger.info(f"{what} ({iou_type}) of {json_file}:\n{buf.getvalue()}")
    return {m: float(ev.stats[k] * 100 if ev.stats[k] >= 0 else "nan") for k, m in enumerate(COCO_METRICS)}


def eval_tasks(mask_on):
    """The iou types scored per test dataset: boxes, and masks with MODEL.MASK_ON."""
    return ("bbox", "segm") if mask_on else ("bbox",)


def evaluate(meta, predictions, iou_type="bbox"):
    """Dispatch on ``meta["evaluator_type"]`` ("pascal_voc" or "coco"); masks ("segm") are COCO only."""
    kind = meta.get("evaluator_type")
    if kind == "pascal_voc":
        if iou_type != "bbox":
            raise ValueError(f"evaluation: dataset {meta.get('name', '')!r} is PASCAL VOC, which has no masks to "
                             "score; MODEL.MASK_ON needs COCO-format datasets")
        return evaluate_voc(meta, predictions)
    if kind == "coco":
        return evaluate_coco(meta, predictions, iou_type)
    raise ValueError(f"evaluation: unknown evaluator_type {kind!r} in dataset metadata; "
                     "expected 'pascal_voc' or 'coco'")
