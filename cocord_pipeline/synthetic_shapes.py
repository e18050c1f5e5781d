"""A small detection dataset of coloured shapes, written in a second in both PASCAL VOC and COCO format.

Used where real data may be absent: the tests and `tools/benchmark_transfer.py --synthetic`. Also home
of `voc_xml`, the one VOC annotation writer, and of `coco_annotation`, the one COCO box record (the
embedded digits use both).

Layout written under ROOT (what transfer/data.py and detectron2 read); both formats describe the same
images and boxes:

    Annotations/<id>.xml   JPEGImages/<id>.jpg   ImageSets/Main/{train,test}.txt      (VOC)
    annotations/instances_{train,test}.json  (COCO; images are JPEGImages/, category ids 1..3)

Images are `size`x`size` noisy grey canvases with 1-3 non-overlapping squares, circles or triangles
of random colour, so a detector has to learn shape, not colour. Deterministic given the seed.
"""
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle")


def voc_xml(image_id, width, height, objects, folder="VOC"):
    """VOC annotation text. `objects`: (class name, (xmin, ymin, xmax, ymax), difficult) with VOC's
    1-based inclusive pixel coordinates (detectron2's loader subtracts 1 from xmin/ymin)."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = f"{image_id}.jpg"
    sz = ET.SubElement(ann, "size")
    for tag, v in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(v)
    ET.SubElement(ann, "segmented").text = "0"
    for name, box, difficult in objects:
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(difficult)
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(ann)
    return ET.tostring(ann, encoding="unicode") + "\n"


def coco_annotation(ann_id, image_id, category_id, box):
    """COCO instance record of `box` = continuous (x0, y0, x1, y1) pixels (the one COCO box writer)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x0, y0, w, h],
            "area": float(w * h), "iscrowd": 0}


def _draw_shapes(rng, size):
    """One canvas and its objects (VOC boxes, see voc_xml)."""
    img = Image.fromarray(rng.randint(60, 140, size=(size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects, placed = [], []
    for _ in range(rng.randint(1, 4)):
        for _try in range(20):
            s = rng.randint(size // 5, size // 2.5)
            x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
            if all(x0 + s <= a or a + t <= x0 or y0 + s <= b or b + t <= y0 for a, b, t in placed):
                break
        else:
            continue  # no free spot: fewer objects on this canvas
        placed.append((x0, y0, s))
        k = rng.randint(3)
        color = tuple(int(c) for c in rng.randint(0, 256, 3))
        x1, y1 = x0 + s - 1, y0 + s - 1
        if k == 0:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        elif k == 1:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=color)
        objects.append((SHAPES[k], (x0 + 1, y0 + 1, x1 + 1, y1 + 1), 0))
    return img, objects


def write_shapes(root, n_train=48, n_test=16, size=96, seed=0):
    """Write the dataset (splits `train`, `test`; classes SHAPES) under `root`; returns `root`."""
    rng = np.random.RandomState(seed)
    for d in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main"), "annotations"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    splits = {"train": [], "test": []}
    coco = {split: {"images": [], "annotations": [], "categories": [
        {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]} for split in splits}
    for i in range(n_train + n_test):
        image_id = f"{i:05d}"
        split = "train" if i < n_train else "test"
        img, objects = _draw_shapes(rng, size)
        img.save(os.path.join(root, "JPEGImages", image_id + ".jpg"), quality=95)
        with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
            f.write(voc_xml(image_id, size, size, objects, folder="shapes"))
        splits[split].append(image_id)
        coco[split]["images"].append({"id": i + 1, "file_name": image_id + ".jpg", "width": size, "height": size})
        anns = coco[split]["annotations"]
        for name, (x0, y0, x1, y1), _ in objects:
            # VOC's 1-based inclusive box -> continuous coordinates (the same box once loaded)
            anns.append(coco_annotation(len(anns) + 1, i + 1, SHAPES.index(name) + 1, (x0 - 1, y0 - 1, x1, y1)))
    for name, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", name + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
        with open(os.path.join(root, "annotations", f"instances_{name}.json"), "w") as f:
            json.dump(coco[name], f)
    return root


def register_opts(name, root, split, classes=SHAPES, year=2012, fmt="voc"):
    """`KEY VALUE` overrides that register `root`'s `split` as dataset `name` (DATASETS.REGISTER), read
    as VOC (`classes` in that order, `year` picks the metric) or as COCO (`fmt="coco"`)."""
    reg = f"DATASETS.REGISTER.{name}."
    if fmt == "coco":
        return [reg + "TYPE", "coco", reg + "IMAGE_ROOT", os.path.join(str(root), "JPEGImages"),
                reg + "JSON_FILE", os.path.join(str(root), "annotations", f"instances_{split}.json")]
    return [reg + "TYPE", "voc", reg + "ROOT", str(root), reg + "SPLIT", split, reg + "CLASSES", str(list(classes)),
            reg + "YEAR", str(year)]
