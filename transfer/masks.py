"""Instance masks for Mask R-CNN (C4), reproducing detectron2 0.6 step by step:

    load    COCO polygons, each a flat [x0, y0, x1, y1, ...] list; polygons with an odd length or fewer
            than 3 points are dropped, and an annotation left with none is dropped (load_coco_json)
    augment the image's resize (x * new_w / w, y * new_h / h) then flip (x -> new_w - x), in float64
            (ResizeTransform / HFlipTransform.apply_coords on polygons)
    targets per foreground proposal: the matched object's polygons shifted to the proposal box,
            scaled by side / max(box side, 0.1), rasterised by pycocotools into side x side
            (PolygonMasks.crop_and_resize; side = the head's output, 14 for C4)
    loss    mean BCE-with-logits between each proposal's ground-truth-class mask logits and its
            target (mask_rcnn_loss)
    infer   sigmoid of the predicted class's logits, pasted into the image by grid_sample over the
            detection box and thresholded at 0.5 (paste_masks_in_image); COCO RLE for evaluation
            (COCOEvaluator's instances_to_coco_json)
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

GPU_MEM_LIMIT = 1024 ** 3  # bytes of float masks pasted at once on a GPU (detectron2's mask_ops)


# ----------------------------------------------------------------------------------------------
# annotations


def is_polygon_list(segmentation):
    """Whether a list `segmentation` is COCO's polygon form, a list of polygons each a list of numbers
    (a flat [x0, y0, ...] list, a common mistake, is not)."""
    return all(isinstance(p, (list, tuple)) and all(isinstance(v, (int, float)) for v in p) for p in segmentation)


def valid_polygons(segmentation):
    """The polygons of a COCO polygon segmentation that pycocotools can rasterise (even length, at
    least 3 points), as detectron2's loader keeps them."""
    return [p for p in segmentation if len(p) % 2 == 0 and len(p) >= 6]


def transform_polygons(polygons, size_in, size_out, flip):
    """Polygons (lists of floats) of an image of size_in (h, w) resized to size_out (h, w), then
    flipped when `flip` is "horizontal" or "vertical" -> list of float64 arrays."""
    (h0, w0), (h, w) = size_in, size_out
    out = []
    for p in polygons:
        xy = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        xy[:, 0] = xy[:, 0] * (w * 1.0 / w0)
        xy[:, 1] = xy[:, 1] * (h * 1.0 / h0)
        if flip == "horizontal":
            xy[:, 0] = w - xy[:, 0]
        elif flip == "vertical":
            xy[:, 1] = h - xy[:, 1]
        out.append(xy.reshape(-1))
    return out


def require_mask_datasets(cfg, metas):
    """MODEL.MASK_ON needs datasets with masks: COCO format (`metas`: name -> transfer.data metadata)."""
    no_masks = [n for n, m in metas.items() if m["evaluator_type"] != "coco"]
    if cfg.MODEL.MASK_ON and no_masks:
        raise ValueError(f"config MODEL.MASK_ON is True but datasets {no_masks} are PASCAL VOC, which has no masks; "
                         "use COCO-format datasets with polygon segmentations, or set MODEL.MASK_ON False")


def _polygon_problems(annos):
    """(missing, rle): the non-crowd annotations of `annos` with no segmentation, and with an RLE one
    (detectron2's default "polygon" mask format refuses those too)."""
    annos = [a for a in annos if not a.get("iscrowd", 0)]
    return [a for a in annos if "segmentation" not in a], [a for a in annos if isinstance(a.get("segmentation"), dict)]


def require_polygons(dicts, json_file):
    """MODEL.MASK_ON: refuse, before any model is built, training dicts (transfer.data.load_coco's, with
    masks) of `json_file` where a non-crowd object has no polygon segmentation."""
    missing, rle = [], []
    for d in dicts:
        m, r = _polygon_problems(d["annotations"])
        missing += m
        rle += r
    if missing or rle:
        ids = [a.get("id") for a in missing + rle][:5]
        raise ValueError(f"{json_file}: MODEL.MASK_ON needs a polygon 'segmentation' for every non-crowd object; "
                         f"{len(missing)} have none and {len(rle)} an RLE (annotation ids {ids}"
                         f"{' ...' if len(missing) + len(rle) > 5 else ''}); add polygons, or set MODEL.MASK_ON "
                         "False to train boxes only")


def instance_polygons(annos, keep, file_name, size_in, size_out, flip):
    """The transformed polygons of the kept (`keep`: bools) annotations of one training image. A backstop
    to require_polygons: an object without polygons raises naming the image."""
    missing, rle = _polygon_problems(annos)
    if rle or missing:
        raise ValueError(f"{file_name}: MODEL.MASK_ON needs a polygon 'segmentation' for every non-crowd object; "
                         f"{len(missing)} have none and {len(rle)} an RLE (set MODEL.MASK_ON False to train boxes "
                         "only)")
    return [transform_polygons(a["segmentation"], size_in, size_out, flip) for a, k in zip(annos, keep) if k]


# ----------------------------------------------------------------------------------------------
# training targets and loss


def polygons_to_bitmask(polygons, height, width):
    """bool [height, width] of the union of `polygons` (float64 arrays), by pycocotools."""
    from pycocotools import mask as mask_util
    if not polygons:  # pycocotools cannot encode an empty polygon list
        return np.zeros((height, width), dtype=bool)
    rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    return mask_util.decode(rle).astype(bool)


def _rasterize_in_box(polygons, box, side):
    """The part of the object inside `box` (float32 numpy [4]) as a side x side bool mask. The
    arithmetic is detectron2's (a float32 box, float64 polygons), so targets match bit for bit."""
    w, h = box[2] - box[0], box[3] - box[1]
    polygons = copy.deepcopy(polygons)
    for p in polygons:
        p[0::2] = p[0::2] - box[0]
        p[1::2] = p[1::2] - box[1]
    ratio_h = side / max(h, 0.1)  # max(): a degenerate box would divide by ~0
    ratio_w = side / max(w, 0.1)
    for p in polygons:
        if ratio_h == ratio_w:
            p *= ratio_h
        else:
            p[0::2] *= ratio_w
            p[1::2] *= ratio_h
    return torch.from_numpy(polygons_to_bitmask(polygons, side, side))


def crop_and_resize(polygons_per_object, boxes, side):
    """bool [R, side, side]: object i's polygons (list of float64 arrays) rasterised within boxes[i]."""
    device = boxes.device
    boxes = boxes.detach().to("cpu", torch.float32).numpy()
    if len(boxes) == 0:
        return torch.empty(0, side, side, dtype=torch.bool, device=device)
    return torch.stack([_rasterize_in_box(p, b, side) for p, b in zip(polygons_per_object, boxes)]).to(device)


def mask_targets(proposals, matched_idxs, labels, targets, side):
    """(targets bool [F, side, side], classes [F] 1-based) of the foreground proposals of every image,
    in proposal order: each one's matched object's polygons cropped to the proposal."""
    masks, classes = [], []
    for boxes, matched, lab, t in zip(proposals, matched_idxs, labels, targets):
        fg = torch.where(lab > 0)[0]
        if len(fg) == 0:
            continue
        polygons = t["polygons"]
        masks.append(crop_and_resize([polygons[int(i)] for i in matched[fg]], boxes[fg], side))
        classes.append(lab[fg])
    if not masks:
        return None, None
    return torch.cat(masks), torch.cat(classes)


def class_channel(mask_logits, classes):
    """[N, side, side]: each mask's channel of 0-based `classes` (the only channel when class-agnostic)."""
    if mask_logits.shape[1] == 1:
        return mask_logits[:, 0]
    return mask_logits[torch.arange(len(mask_logits), device=mask_logits.device), classes]


def mask_loss(mask_logits, gt_masks, gt_classes):
    """Mean BCE between the logits of each mask's ground-truth class (1-based `gt_classes`) and its
    target. No foreground: 0 that still reaches the head."""
    if gt_masks is None or len(gt_masks) == 0:
        return mask_logits.sum() * 0
    logits = class_channel(mask_logits, gt_classes - 1)
    return F.binary_cross_entropy_with_logits(logits.float(), gt_masks.to(torch.float32), reduction="mean")


def select_class_probs(mask_logits, classes):
    """sigmoid of each detection's class channel (0-based `classes`) -> [N, side, side]."""
    return class_channel(mask_logits, classes).sigmoid()


# ----------------------------------------------------------------------------------------------
# inference


def _paste(masks, boxes, img_h, img_w, skip_empty):
    """grid_sample of masks [N,1,M,M] over boxes [N,4] into the image (or, with skip_empty, into the
    region around all boxes; returns that region's slices too)."""
    if skip_empty:
        x0_int, y0_int = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
        x1_int = torch.clamp(boxes[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
        y1_int = torch.clamp(boxes[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
    else:
        x0_int, y0_int, x1_int, y1_int = 0, 0, img_w, img_h
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    n = masks.shape[0]
    img_y = torch.arange(y0_int, y1_int, device=masks.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, device=masks.device, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1  # [N, h]: pixel centres in the box's [-1, 1] frame
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    if not masks.dtype.is_floating_point:
        masks = masks.float()
    pasted = F.grid_sample(masks, grid.to(masks.dtype), align_corners=False)[:, 0]
    return pasted, ((slice(y0_int, y1_int), slice(x0_int, x1_int)) if skip_empty else ())


def paste_masks_in_image(masks, boxes, image_shape, threshold=0.5):
    """bool [N, H, W]: soft masks [N, M, M] placed on their boxes [N, 4] (XYXY, image coordinates) in
    an image of `image_shape` (H, W), thresholded (>=). On CPU mask by mask within its box's
    surroundings, on GPU in chunks of ~1 GiB over the whole image (detectron2's two paths)."""
    n = len(masks)
    img_h, img_w = int(image_shape[0]), int(image_shape[1])
    if n == 0:
        return torch.zeros((0, img_h, img_w), dtype=torch.bool, device=masks.device)
    cpu = boxes.device.type == "cpu"
    chunks = n if cpu else int(np.ceil(n * img_h * img_w * 4 / GPU_MEM_LIMIT))
    out = torch.zeros(n, img_h, img_w, device=boxes.device, dtype=torch.bool)
    for inds in torch.chunk(torch.arange(n, device=boxes.device), chunks):
        pasted, region = _paste(masks[inds, None, :, :], boxes[inds], img_h, img_w, skip_empty=cpu)
        out[(inds,) + region] = pasted >= threshold
    return out


def encode_rles(masks):
    """COCO RLEs ({"size": [H, W], "counts": str}) of bool masks [N, H, W] (tensor or array)."""
    from pycocotools import mask as mask_util
    if hasattr(masks, "detach"):
        masks = masks.detach().cpu().numpy()
    rles = []
    for m in masks:
        rle = mask_util.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0]
        rle["counts"] = rle["counts"].decode("utf-8")
        rles.append(rle)
    return rles
