"""Transfer datasets (VOC XML / COCO JSON) in detectron2's standard format, and the data loaders.

Dataset dicts: {file_name, height, width, image_id, annotations: [{bbox [x0,y0,x1,y1] (XYXY_ABS),
bbox_mode 0, category_id (0-based contiguous), iscrowd}]}. VOC corners follow detectron2's
pascal_voc.py: the XML's 1-based xmin/ymin get -1. Boxes reaching outside the image are clipped to it
(detectron2's mapper does the same per iteration); boxes that are empty after clipping are dropped and
counted in the log, as are VOC boxes written with xmax <= xmin or ymax <= ymin. Everything else malformed (bad XML, unknown class, missing file, size mismatch,
unreadable image) raises naming the file.

Names: detectron2's builtins (voc_2007_trainval, voc_2012_trainval, voc_2007_test, coco_2017_train,
coco_2017_val, ...) under $DETECTRON2_DATASETS (default ./datasets), plus `DATASETS.REGISTER.<name>`
entries of the config (TYPE voc: ROOT, SPLIT, CLASSES ([] = the 20 VOC classes), YEAR (default 2012;
2007 selects the 11-point metric); TYPE coco: IMAGE_ROOT, JSON_FILE).

Loaders: training is an endless, deterministic stream. The batch of iteration i is a pure function of
(seed, i): image indices come from seeded epoch permutations (+ optional aspect-ratio grouping,
computed on metadata only), and each image's augmentation draws from a generator seeded by
(seed, i, slot). That makes `--resume` replay exactly the batches an uninterrupted run would see.
"""
import contextlib
import io
import logging
import os
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")

_BUILTIN_VOC = {f"voc_{y}_{s}": (f"VOC{y}", s, y) for y in (2007, 2012) for s in ("train", "val", "trainval")}
_BUILTIN_VOC["voc_2007_test"] = ("VOC2007", "test", 2007)
_BUILTIN_COCO = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
    "coco_2014_train": ("coco/train2014", "coco/annotations/instances_train2014.json"),
    "coco_2014_val": ("coco/val2014", "coco/annotations/instances_val2014.json"),
}
BUILTIN_NAMES = tuple(sorted(_BUILTIN_VOC) + sorted(_BUILTIN_COCO))


def _datasets_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


# ----------------------------------------------------------------------------------------------
# metadata


def get_metadata(name, cfg=None):
    """Metadata dict of dataset `name` (see I5); does not read annotation files except COCO's JSON
    categories. Unknown name -> KeyError listing what is known."""
    reg = _registered(cfg)
    if name in reg:
        e = reg[name]
        kind = str(e.get("TYPE", "")).lower()
        if kind == "voc":
            for k in ("ROOT", "SPLIT"):
                if not e.get(k):
                    raise ValueError(f"config DATASETS.REGISTER.{name}.{k} is required for TYPE voc")
            classes = tuple(e.get("CLASSES") or VOC_CLASSES)
            if len(set(classes)) != len(classes):
                raise ValueError(f"config DATASETS.REGISTER.{name}.CLASSES has duplicates: {list(classes)}")
            return {"name": name, "evaluator_type": "pascal_voc", "dirname": os.path.expanduser(str(e["ROOT"])),
                    "split": str(e["SPLIT"]), "year": int(e.get("YEAR", 2012) or 2012),
                    "thing_classes": list(classes)}
        if kind == "coco":
            for k in ("IMAGE_ROOT", "JSON_FILE"):
                if not e.get(k):
                    raise ValueError(f"config DATASETS.REGISTER.{name}.{k} is required for TYPE coco")
            return _coco_meta(name, os.path.expanduser(str(e["IMAGE_ROOT"])),
                              os.path.expanduser(str(e["JSON_FILE"])))
        raise ValueError(f"config DATASETS.REGISTER.{name}.TYPE = {e.get('TYPE')!r}; use 'voc' or 'coco'")
    root = _datasets_root()
    if name in _BUILTIN_VOC:
        d, split, year = _BUILTIN_VOC[name]
        return {"name": name, "evaluator_type": "pascal_voc", "dirname": os.path.join(root, d), "split": split,
                "year": year, "thing_classes": list(VOC_CLASSES)}
    if name in _BUILTIN_COCO:
        img, js = _BUILTIN_COCO[name]
        return _coco_meta(name, os.path.join(root, img), os.path.join(root, js))
    raise KeyError(f"dataset '{name}' is neither a builtin ({', '.join(BUILTIN_NAMES)}) nor declared under "
                   f"DATASETS.REGISTER in the config (registered: {sorted(reg) or 'none'})")


def _registered(cfg):
    if cfg is None:
        return {}
    return dict(cfg.DATASETS.REGISTER)


def _coco_meta(name, image_root, json_file):
    meta = {"name": name, "evaluator_type": "coco", "image_root": image_root, "json_file": json_file}
    if os.path.isfile(json_file):
        cats = _load_coco_api(json_file).loadCats(_load_coco_api(json_file).getCatIds())
        cats = sorted(cats, key=lambda c: c["id"])
        meta["thing_classes"] = [c["name"] for c in cats]
        meta["thing_dataset_id_to_contiguous_id"] = {c["id"]: i for i, c in enumerate(cats)}
    return meta


_COCO_CACHE = {}


def _load_coco_api(json_file):
    from pycocotools.coco import COCO
    key = (json_file, os.path.getmtime(json_file))
    if key not in _COCO_CACHE:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                _COCO_CACHE[key] = COCO(json_file)
        except Exception as e:
            raise ValueError(f"{json_file}: not a valid COCO instances JSON ({type(e).__name__}: {e})") from e
    return _COCO_CACHE[key]


def check_dataset_files(name, cfg=None):
    """Raise FileNotFoundError naming the first expected path of `name` that does not exist.

    Called for every train/test dataset before the model is built."""
    meta = get_metadata(name, cfg)
    if meta["evaluator_type"] == "pascal_voc":
        d = meta["dirname"]
        paths = [d, os.path.join(d, "Annotations"), os.path.join(d, "JPEGImages"),
                 os.path.join(d, "ImageSets", "Main", meta["split"] + ".txt")]
    else:
        paths = [meta["json_file"], meta["image_root"]]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"dataset '{name}': expected {p}, which does not exist "
                                    f"(DETECTRON2_DATASETS={_datasets_root()!r}; for registered datasets check "
                                    f"DATASETS.REGISTER.{name})")
    return meta


def _image_files(meta):
    """Every image file a dataset lists (VOC: the split file's ids; COCO: the JSON's images)."""
    if meta["evaluator_type"] == "pascal_voc":
        split_file = os.path.join(meta["dirname"], "ImageSets", "Main", meta["split"] + ".txt")
        with open(split_file, encoding="utf-8") as f:
            return [os.path.join(meta["dirname"], "JPEGImages", x.strip() + ".jpg") for x in f if x.strip()]
    api = _load_coco_api(meta["json_file"])
    return [os.path.join(meta["image_root"], api.imgs[i].get("file_name", "")) for i in sorted(api.imgs)]


def check_images(name, cfg=None):
    """Open every image of dataset `name` (its header: format, size) so that a missing or unreadable one
    is reported before training, not at the evaluation after it. One error lists every bad file."""
    bad = []
    for path in _image_files(check_dataset_files(name, cfg)):
        try:
            with Image.open(path) as im:
                w, h = im.size
            if w <= 0 or h <= 0:
                raise ValueError(f"size {w}x{h}")
        except Exception as e:  # PIL raises several types for a damaged header
            bad.append(f"{path} ({type(e).__name__}: {e})")
    if bad:
        raise ValueError(f"dataset '{name}': {len(bad)} image(s) cannot be read: " + "; ".join(bad[:20])
                         + (" ..." if len(bad) > 20 else "") + "; replace or remove them")


# ----------------------------------------------------------------------------------------------
# dataset dicts


def get_dataset_dicts(name, cfg=None):
    """List of detectron2-format dicts for `name` (see module docstring)."""
    meta = check_dataset_files(name, cfg)
    if meta["evaluator_type"] == "pascal_voc":
        return load_voc(meta["dirname"], meta["split"], meta["thing_classes"])
    return load_coco(meta["json_file"], meta["image_root"])


def _clip_or_drop(box, w, h):
    """Clip XYXY to the image; None when the result is empty (degenerate)."""
    x0, y0, x1, y1 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(w)), min(box[3], float(h))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1, y1]


def _xml_int(tree, path, file):
    node = tree.find(path)
    try:
        return int(float(node.text))
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"{file}: missing or non-numeric <{path}>") from None


def load_voc(dirname, split, class_names):
    """detectron2's load_voc_instances, plus clipping, degenerate-box dropping and clear errors."""
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    with open(split_file, encoding="utf-8") as f:
        fileids = [x.strip() for x in f if x.strip()]
    if not fileids:
        raise ValueError(f"{split_file} lists no images")
    class_ids = {c: i for i, c in enumerate(class_names)}
    dicts, dropped, clipped = [], [], []  # annotation files with a dropped / clipped box
    for fileid in fileids:
        anno_file = os.path.join(dirname, "Annotations", fileid + ".xml")
        jpeg_file = os.path.join(dirname, "JPEGImages", fileid + ".jpg")
        if not os.path.isfile(anno_file):
            raise FileNotFoundError(f"{anno_file} not found (listed in {split_file})")
        if not os.path.isfile(jpeg_file):
            raise FileNotFoundError(f"{jpeg_file} not found (listed in {split_file})")
        try:
            tree = ET.parse(anno_file)
        except ET.ParseError as e:
            raise ValueError(f"{anno_file}: malformed XML ({e})") from None
        w, h = _xml_int(tree, "size/width", anno_file), _xml_int(tree, "size/height", anno_file)
        if w <= 0 or h <= 0:
            raise ValueError(f"{anno_file}: image size {w}x{h} is not positive")
        annos = []
        for obj in tree.findall("object"):
            name_node = obj.find("name")
            cls = name_node.text.strip() if name_node is not None and name_node.text else None
            if cls not in class_ids:
                raise ValueError(f"{anno_file}: unknown class {cls!r}; the dataset's classes are {list(class_names)} "
                                 f"(set DATASETS.REGISTER.<name>.CLASSES)")
            bb = obj.find("bndbox")
            try:
                box = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                raise ValueError(f"{anno_file}: object {cls!r} has a missing or non-numeric <bndbox>") from None
            if not all(np.isfinite(box)):
                raise ValueError(f"{anno_file}: object {cls!r} has a <bndbox> that is not finite ({box}); fix or "
                                 "remove that object")
            if box[2] <= box[0] or box[3] <= box[1]:  # zero-area as written: a labelling slip
                dropped.append(anno_file)
                continue
            box[0] -= 1.0  # 1-based pixel indices -> 0-based coordinates, as detectron2
            box[1] -= 1.0
            fixed = _clip_or_drop(box, w, h)
            if fixed is None:
                dropped.append(anno_file)
                continue
            if fixed != box:
                clipped.append(anno_file)
            annos.append({"bbox": fixed, "bbox_mode": 0, "category_id": class_ids[cls], "iscrowd": 0})
        dicts.append({"file_name": jpeg_file, "image_id": fileid, "height": h, "width": w, "annotations": annos})
    _log_fixes(split_file, dropped, clipped)
    return dicts


def _some(where, n=5):
    """The first `n` distinct entries of `where`, for a log line."""
    seen = list(dict.fromkeys(where))
    return ", ".join(map(str, seen[:n])) + (f" and {len(seen) - n} more" if len(seen) > n else "")


def _log_fixes(dataset_file, dropped, clipped):
    """One log line per kind of fix; `dropped` / `clipped` list where each box was (an annotation file,
    or a COCO annotation id) and the line names the dataset file and the first of them."""
    if dropped:
        logger.warning(f"{dataset_file}: dropped {len(dropped)} degenerate box(es) (zero area as written, or "
                       f"empty after clipping to the image): {_some(dropped)}")
    if clipped:
        logger.info(f"{dataset_file}: clipped {len(clipped)} box(es) reaching outside their image: {_some(clipped)}")


def _check_coco_annotations(api, json_file):
    """Refuse annotations that cannot be trained on as written: a bbox that is not 4 finite numbers, or
    an image_id with no image entry (pycocotools would silently leave those out)."""
    orphans = []
    for a in api.dataset.get("annotations", []):
        if a.get("ignore", 0):
            continue
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{json_file}: annotation {a.get('id')} has bbox {bbox!r}; a COCO bbox is 4 numbers "
                             "[x, y, width, height]")
        try:
            values = [float(v) for v in bbox]
        except (TypeError, ValueError):
            raise ValueError(f"{json_file}: annotation {a.get('id')} has a non-numeric bbox {bbox!r}") from None
        if not all(np.isfinite(values)):
            raise ValueError(f"{json_file}: annotation {a.get('id')} has a bbox that is not finite ({bbox!r}); "
                             "fix or remove that annotation")
        if a.get("image_id") not in api.imgs:
            orphans.append(a.get("id"))
    if orphans:
        raise ValueError(f"{json_file}: {len(orphans)} annotation(s) name an image_id with no entry in 'images' "
                         f"(annotation ids {_some(orphans, 10)}); add the images or remove those annotations")


def load_coco(json_file, image_root):
    """detectron2's load_coco_json for boxes: contiguous ids from sorted category ids; crowd kept
    (the train mapper skips it, the evaluator uses it)."""
    api = _load_coco_api(json_file)
    cat_ids = sorted(api.getCatIds())
    id_map = {c: i for i, c in enumerate(cat_ids)}
    _check_coco_annotations(api, json_file)
    dicts, dropped, clipped = [], [], []  # "annotation <id>" of each dropped / clipped box
    for img_id in sorted(api.imgs):
        img = api.imgs[img_id]
        for k in ("file_name", "height", "width"):
            if k not in img:
                raise ValueError(f"{json_file}: image {img_id} lacks '{k}'")
        w, h = int(img["width"]), int(img["height"])
        annos = []
        for a in api.imgToAnns.get(img_id, []):
            if a.get("ignore", 0):
                continue
            if a["category_id"] not in id_map:
                raise ValueError(f"{json_file}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
            x, y, bw, bh = [float(v) for v in a["bbox"]]
            box = [x, y, x + bw, y + bh]
            fixed = _clip_or_drop(box, w, h)
            if fixed is None:
                dropped.append(f"annotation {a.get('id')}")
                continue
            if fixed != box:
                clipped.append(f"annotation {a.get('id')}")
            annos.append({"bbox": fixed, "bbox_mode": 0, "category_id": id_map[a["category_id"]],
                          "iscrowd": int(a.get("iscrowd", 0))})
        dicts.append({"file_name": os.path.join(image_root, img["file_name"]), "image_id": img_id,
                      "height": h, "width": w, "annotations": annos})
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise FileNotFoundError(f"{json_file}: {len(missing)} image file(s) not found under {image_root}, "
                                f"e.g. {missing[0]}")
    _log_fixes(json_file, dropped, clipped)
    return dicts


def filter_empty(dicts):
    """DATALOADER.FILTER_EMPTY_ANNOTATIONS: keep images with at least one non-crowd box."""
    kept = [d for d in dicts if any(not a.get("iscrowd", 0) for a in d["annotations"])]
    logger.info(f"removed {len(dicts) - len(kept)} image(s) without usable annotations; {len(kept)} left")
    return kept


# ----------------------------------------------------------------------------------------------
# image reading and augmentation (detectron2's ResizeShortestEdge + RandomFlip)


def read_image(path, fmt="RGB"):
    """uint8 tensor [3,H,W] in `fmt` channel order, EXIF-orientation applied like detectron2."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            arr = np.array(im)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if fmt == "BGR":
        arr = arr[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)


def shortest_edge_size(h, w, short, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def _resize(img, newh, neww):
    """Bilinear resize of a uint8 [3,H,W] tensor via PIL (as detectron2's ResizeTransform)."""
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    pil = pil.resize((neww, newh), Image.BILINEAR)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)


class Mapper:
    """dataset dict -> model input dict {image uint8 [3,h,w], height, width (original), image_id,
    instances: {boxes float [N,4], classes long [N]} (training only)}."""

    def __init__(self, cfg, is_train):
        i = cfg.INPUT
        self.is_train = is_train
        self.fmt = i.FORMAT
        if is_train:
            self.sizes, self.max_size, self.sampling = list(i.MIN_SIZE_TRAIN), i.MAX_SIZE_TRAIN, i.MIN_SIZE_TRAIN_SAMPLING
            self.flip = i.RANDOM_FLIP
        else:
            self.sizes, self.max_size, self.sampling, self.flip = [i.MIN_SIZE_TEST], i.MAX_SIZE_TEST, "choice", "none"

    def __call__(self, d, gen=None):
        img = read_image(d["file_name"], self.fmt)
        h0, w0 = img.shape[1:]
        if (h0, w0) != (d["height"], d["width"]):
            raise ValueError(f"{d['file_name']}: image is {w0}x{h0} but its annotation says "
                             f"{d['width']}x{d['height']}")
        if self.sampling == "choice":
            short = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=gen))] if self.is_train \
                else self.sizes[0]
        else:
            short = int(torch.randint(self.sizes[0], self.sizes[1] + 1, (1,), generator=gen))
        out = {"height": h0, "width": w0, "image_id": d["image_id"], "file_name": d["file_name"]}
        if short == 0:  # detectron2: size 0 disables resizing
            newh, neww = h0, w0
        else:
            newh, neww = shortest_edge_size(h0, w0, short, self.max_size)
            img = _resize(img, newh, neww)
        flip = self.flip != "none" and self.is_train and bool(torch.rand(1, generator=gen) < 0.5)
        if flip:
            img = img.flip(-1 if self.flip == "horizontal" else -2)
        out["image"] = img
        if self.is_train:
            annos = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
            boxes = torch.tensor([a["bbox"] for a in annos], dtype=torch.float32).reshape(-1, 4)
            boxes[:, 0::2] *= neww / w0
            boxes[:, 1::2] *= newh / h0
            if flip and self.flip == "horizontal":
                boxes[:, [0, 2]] = neww - boxes[:, [2, 0]]
            elif flip:
                boxes[:, [1, 3]] = newh - boxes[:, [3, 1]]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, neww)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, newh)
            classes = torch.tensor([a["category_id"] for a in annos], dtype=torch.int64)
            keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
            out["instances"] = {"boxes": boxes[keep], "classes": classes[keep]}
        return out


# ----------------------------------------------------------------------------------------------
# loaders


def train_batch_indices(dicts, total_batch, num_iters, seed, aspect_grouping, start_iter=0):
    """np.int64 [num_iters - start_iter, total_batch]: dataset indices of each iteration's global batch.

    An endless stream of seeded epoch permutations (detectron2's TrainingSampler); with
    aspect-ratio grouping, images are routed to a 'wide' or 'tall' bucket and a batch is emitted
    when a bucket fills (detectron2's AspectRatioGroupedDataset). Depends only on the arguments."""
    n = len(dicts)
    wide = np.array([d["width"] > d["height"] for d in dicts])
    g = torch.Generator().manual_seed(int(seed))
    out = np.empty((num_iters, total_batch), dtype=np.int64)
    buckets = {True: [], False: []}
    cur, made = [], 0
    while made < num_iters:
        for idx in torch.randperm(n, generator=g).tolist():
            if aspect_grouping:
                b = buckets[bool(wide[idx])]
                b.append(idx)
                if len(b) == total_batch:
                    out[made] = b
                    b.clear()
                    made += 1
            else:
                cur.append(idx)
                if len(cur) == total_batch:
                    out[made] = cur
                    cur = []
                    made += 1
            if made == num_iters:
                break
    return out[start_iter:]


def _seed_for(seed, it, slot):
    return (int(seed) * 1000003 + int(it) * 4099 + int(slot)) % (2 ** 63)


class TrainBatches(torch.utils.data.Dataset):
    """Item k = the list of mapped inputs of this rank's share of iteration start_iter + k."""

    def __init__(self, dicts, mapper, batches, seed, start_iter, rank, world_size):
        self.dicts, self.mapper, self.batches = dicts, mapper, batches
        self.seed, self.start_iter, self.rank, self.world = seed, start_iter, rank, world_size
        self.per_rank = batches.shape[1] // world_size

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        it = self.start_iter + k
        lo = self.rank * self.per_rank
        items = []
        for slot in range(lo, lo + self.per_rank):
            g = torch.Generator().manual_seed(_seed_for(self.seed, it, slot))
            items.append(self.mapper(self.dicts[int(self.batches[k, slot])], g))
        return items


def _collate_list(x):
    return x


def build_train_loader(cfg, dicts, seed, start_iter, num_iters, rank=0, world_size=1, num_workers=None):
    """Iterable of per-rank batches (lists of input dicts) for iterations start_iter..num_iters-1."""
    total = cfg.SOLVER.IMS_PER_BATCH
    if total % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {total} must be divisible by the number of processes {world_size}")
    batches = train_batch_indices(dicts, total, num_iters, seed, cfg.DATALOADER.ASPECT_RATIO_GROUPING, start_iter)
    ds = TrainBatches(dicts, Mapper(cfg, True), batches, seed, start_iter, rank, world_size)
    nw = cfg.DATALOADER.NUM_WORKERS if num_workers is None else num_workers
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=nw,
                                       collate_fn=_collate_list, generator=torch.Generator().manual_seed(int(seed)))


class _TestSet(torch.utils.data.Dataset):
    def __init__(self, dicts, mapper):
        self.dicts, self.mapper = dicts, mapper

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, i):
        return self.mapper(self.dicts[i])


def build_test_loader(cfg, dicts, rank=0, world_size=1):
    """One image per batch (as detectron2); rank r takes a contiguous shard of the images."""
    per = (len(dicts) + world_size - 1) // world_size
    shard = dicts[rank * per:(rank + 1) * per]
    return torch.utils.data.DataLoader(_TestSet(shard, Mapper(cfg, False)), batch_size=1, shuffle=False,
                                       num_workers=cfg.DATALOADER.NUM_WORKERS, collate_fn=_collate_list,
                                       generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
