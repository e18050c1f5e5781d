"""Transfer datasets (VOC XML / COCO JSON) in detectron2's standard format, and the data loaders.

Dataset dicts: {file_name, height, width, image_id, annotations: [{bbox [x0,y0,x1,y1] (XYXY_ABS),
bbox_mode 0, category_id (0-based contiguous), iscrowd, and with MODEL.MASK_ON (COCO) id and segmentation
(polygons as detectron2 keeps them, see transfer/masks.py)}]}. VOC corners follow detectron2's
pascal_voc.py: the XML's 1-based xmin/ymin get -1. Boxes reaching outside the image are clipped to it
(detectron2's mapper does the same per iteration); boxes that are empty after clipping are dropped and
counted in the log, as are VOC boxes written with xmax <= xmin or ymax <= ymin. Everything else malformed (bad XML, unknown class, missing file, size mismatch,
unreadable image) raises naming the file.

Names: detectron2's builtins (voc_2007_trainval, voc_2012_trainval, voc_2007_test, coco_2017_train,
coco_2017_val, ...) under $DETECTRON2_DATASETS (default ./datasets), plus `DATASETS.REGISTER.<name>`
entries of the config (TYPE voc: ROOT, ANNOTATION_DIR / IMAGE_DIR (folders under ROOT, default
Annotations / JPEGImages; each image's extension is found), SPLIT (ROOT/ImageSets/Main/<SPLIT>.txt) or
SPLIT_FILE, CLASSES (not given: the sorted <name>s of every annotation file), YEAR (default 2012; 2007
selects the 11-point metric); TYPE coco: IMAGE_ROOT, JSON_FILE, CLASSES (not given: the categories)).
`<name>_train` / `<name>_test`, when not registered themselves, are a seeded split of `<name>`'s images
(TEST_FRACTION, SPLIT_SEED) that `resolve_datasets` makes and writes under OUTPUT_DIR/splits.

Loaders: training is an endless, deterministic stream. The batch of iteration i is a pure function of
(seed, i): image indices come from seeded epoch permutations (+ optional aspect-ratio grouping,
computed on metadata only), and each image's augmentation draws from a generator seeded by
(seed, i, slot). That makes `--resume` replay exactly the batches an uninterrupted run would see.
"""
import contextlib
import hashlib
import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image, ImageOps

from cocord_common.checkpoint import write_text_atomic
from cocord_common.errors import UserError
from transfer.config import list_value, problem_list

from transfer.masks import instance_polygons, is_polygon_list, valid_polygons

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

VOC_ANNOTATION_DIR, VOC_IMAGE_DIR = "Annotations", "JPEGImages"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # compared lower-case
SPLIT_PARTS = ("train", "test")  # <name>_train / <name>_test: a split made of <name>
DEFAULT_TEST_FRACTION, DEFAULT_SPLIT_SEED = 0.2, 0


def name_list(value):
    """A list of names as the config holds it: a YAML list (the command line's lists are parsed by
    transfer.config.list_value when merged; a string, as a YAML file may give it, goes through that same
    parser) -> [str]. None -> []."""
    if value is None:
        return []
    return [str(x) for x in (list_value(value) if isinstance(value, str) else value)]


def _datasets_root():
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


# ----------------------------------------------------------------------------------------------
# metadata


def get_metadata(name, cfg=None):
    """Metadata dict of dataset `name` (see I5); reads no annotation file except COCO's JSON
    categories and, for a VOC entry without CLASSES, the <name>s of its annotation files. Unknown name ->
    KeyError listing what is known."""
    reg = _registered(cfg)
    if name in reg:
        e = reg[name]
        kind = str(e.get("TYPE", "")).lower()
        if kind == "voc":
            return _voc_meta(name, e)
        if kind == "coco":
            return _registered_coco_meta(name, e)
        raise ValueError(f"config DATASETS.REGISTER.{name}.TYPE = {e.get('TYPE')!r}; use 'voc' or 'coco'")
    root = _datasets_root()
    if name in _BUILTIN_VOC:
        d, split, year = _BUILTIN_VOC[name]
        return _voc_layout({"name": name, "evaluator_type": "pascal_voc", "dirname": os.path.join(root, d),
                            "split": split, "year": year, "thing_classes": list(VOC_CLASSES)})
    if name in _BUILTIN_COCO:
        img, js = _BUILTIN_COCO[name]
        return _coco_meta(name, os.path.join(root, img), os.path.join(root, js))
    made = split_base(name, reg)
    hint = (f"; '{made[0]}' is split into {made[0]}_train / {made[0]}_test by transfer/train_net.py "
            "(transfer.data.resolve_datasets)") if made else ""
    raise KeyError(f"dataset '{name}' is neither a builtin ({', '.join(BUILTIN_NAMES)}) nor declared under "
                   f"DATASETS.REGISTER in the config (registered: {sorted(reg) or 'none'}){hint}")


def _path(value):
    return os.path.expanduser(str(value))


def _voc_layout(meta, annotation_dir=VOC_ANNOTATION_DIR, image_dir=VOC_IMAGE_DIR, split_file=None):
    """`meta` plus the paths the loader and the evaluator read: annotation_dir, image_dir (folders under
    dirname, or absolute) and split_file (default dirname/ImageSets/Main/<split>.txt)."""
    d = meta["dirname"]
    meta["annotation_dir"] = os.path.join(d, _path(annotation_dir))
    meta["image_dir"] = os.path.join(d, _path(image_dir))
    meta["split_file"] = split_file or (os.path.join(d, "ImageSets", "Main", meta["split"] + ".txt")
                                        if meta["split"] else None)
    return meta


def _voc_meta(name, e):
    """Metadata of a registered VOC entry; without SPLIT / SPLIT_FILE its split_file is None (the entry
    can only be split, see split_base; check_dataset_files refuses it as a dataset of its own)."""
    if not e.get("ROOT"):
        raise ValueError(f"config DATASETS.REGISTER.{name}.ROOT is required for TYPE voc (the dataset folder)")
    split_file = _path(e["SPLIT_FILE"]) if e.get("SPLIT_FILE") else None
    split = str(e.get("SPLIT") or (os.path.splitext(os.path.basename(split_file))[0] if split_file else ""))
    meta = _voc_layout({"name": name, "evaluator_type": "pascal_voc", "dirname": _path(e["ROOT"]), "split": split,
                        "year": int(e.get("YEAR", 2012) or 2012)},
                       e.get("ANNOTATION_DIR") or VOC_ANNOTATION_DIR, e.get("IMAGE_DIR") or VOC_IMAGE_DIR, split_file)
    classes = name_list(e.get("CLASSES"))
    if not classes and os.path.isdir(meta["annotation_dir"]):  # else check_dataset_files names the folder
        try:
            classes = voc_classes_in(meta["annotation_dir"])
        except ValueError as err:
            raise ValueError(f"dataset '{name}' (DATASETS.REGISTER.{name}.CLASSES not given): {err}") from None
    if len(set(classes)) != len(classes):
        raise ValueError(f"config DATASETS.REGISTER.{name}.CLASSES has duplicates: {classes}")
    meta["thing_classes"] = classes or None
    return meta


_VOC_CLASSES_CACHE = {}


def voc_classes_in(annotation_dir):
    """The sorted set of object <name>s of every .xml file in `annotation_dir` (one error lists every
    file that cannot be read; none at all is an error naming the folder). Cached by the folder and each
    file's name, size and mtime: resolving a config asks several times, and a changed file is read again."""
    files = sorted(f for f in os.listdir(annotation_dir) if f.lower().endswith(".xml"))
    if not files:
        raise ValueError(f"{annotation_dir} holds no .xml annotation files; point ANNOTATION_DIR at the folder "
                         "of VOC XML files")
    stats = [os.stat(os.path.join(annotation_dir, f)) for f in files]
    key = (os.path.abspath(annotation_dir), tuple((f, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)))
    if key not in _VOC_CLASSES_CACHE:
        _VOC_CLASSES_CACHE[key] = _read_voc_classes(annotation_dir, files)
    return list(_VOC_CLASSES_CACHE[key])


def _read_voc_classes(annotation_dir, files):
    names, bad = set(), []
    for f in files:
        try:
            root = ET.parse(os.path.join(annotation_dir, f)).getroot()
        except ET.ParseError as err:
            bad.append(f"{f} ({err})")
            continue
        for obj in root.findall("object"):
            node = obj.find("name")
            if node is not None and node.text and node.text.strip():
                names.add(node.text.strip())
    if bad:
        raise ValueError(f"{annotation_dir}: {len(bad)} annotation file(s) are malformed XML: {_some(bad, 10)}")
    if not names:
        raise ValueError(f"{annotation_dir}: none of its {len(files)} .xml annotation files has an <object> with "
                         "a <name>, so there are no classes to learn; annotate the objects, or give the classes as "
                         "CLASSES")
    return sorted(names)


def _registered_coco_meta(name, e):
    key = f"config DATASETS.REGISTER.{name}"
    missing = [k for k in ("IMAGE_ROOT", "JSON_FILE") if not e.get(k)]
    if missing:
        raise ValueError("; ".join(f"{key}.{k} is required for TYPE coco" for k in missing))
    meta = _coco_meta(name, _path(e["IMAGE_ROOT"]), _path(e["JSON_FILE"]))
    given = name_list(e.get("CLASSES"))
    if given and "thing_classes" in meta and given != meta["thing_classes"]:
        raise ValueError(f"{key}.CLASSES {given} differs from the categories of {meta['json_file']} "
                         f"{meta['thing_classes']} (sorted by id); leave CLASSES out to use the categories")
    return meta


def _registered(cfg):
    if cfg is None:
        return {}
    return dict(cfg.DATASETS.REGISTER)


def _coco_meta(name, image_root, json_file):
    meta = {"name": name, "evaluator_type": "coco", "image_root": image_root, "json_file": json_file}
    if os.path.isfile(json_file):
        cats = _load_coco_api(json_file).loadCats(_load_coco_api(json_file).getCatIds())
        cats = sorted(cats, key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"dataset '{name}': {json_file} lists no categories, so there are no classes to "
                             "learn; a COCO instances JSON names its classes under 'categories' "
                             "([{\"id\": 1, \"name\": \"cat\"}, ...])")
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


def _expected_paths(meta):
    """(path, the REGISTER key that sets it) for every file / folder dataset `meta` needs; the children
    of a missing VOC root are left out (the root is the problem)."""
    if meta["evaluator_type"] != "pascal_voc":
        return [(meta["json_file"], "JSON_FILE"), (meta["image_root"], "IMAGE_ROOT")]
    if not os.path.isdir(meta["dirname"]):
        return [(meta["dirname"], "ROOT")]
    paths = [(meta["annotation_dir"], "ANNOTATION_DIR"), (meta["image_dir"], "IMAGE_DIR")]
    if meta["split_file"]:
        paths.append((meta["split_file"], "SPLIT" if meta["split_file"] == os.path.join(
            meta["dirname"], "ImageSets", "Main", meta["split"] + ".txt") else "SPLIT_FILE"))
    return paths


def _path_problems(name, meta, builtin, need_split=True):
    """One exception per problem with the paths of dataset `name`: FileNotFoundError for each expected
    path that does not exist, naming the key that sets it (or $DETECTRON2_DATASETS for a builtin), and,
    with `need_split`, ValueError for a VOC entry without a split file (one only a made split can use).
    The one check of a dataset's paths: check_dataset_files, resolve_datasets and its made splits."""
    problems = []
    for path, key in _expected_paths(meta):
        if os.path.exists(path):
            continue
        if builtin:
            hint = f"DETECTRON2_DATASETS={_datasets_root()!r}"
        elif key == "SPLIT":
            hint = (f"set by DATASETS.REGISTER.{name}.ROOT and .SPLIT; without a split file, leave SPLIT out and "
                    f"use {name}_train / {name}_test, a split made by transfer/train_net.py")
        elif key in ("ANNOTATION_DIR", "IMAGE_DIR"):
            default = VOC_ANNOTATION_DIR if key == "ANNOTATION_DIR" else VOC_IMAGE_DIR
            hint = f"set by DATASETS.REGISTER.{name}.{key}, a folder under ROOT, default {default!r}"
        else:
            hint = f"set by DATASETS.REGISTER.{name}.{key}"
        problems.append(FileNotFoundError(f"dataset '{name}': expected {path}, which does not exist ({hint})"))
    if need_split and meta["evaluator_type"] == "pascal_voc" and not meta["split_file"]:
        problems.append(ValueError(_no_split_message(name)))
    return problems


def check_dataset_files(name, cfg=None):
    """Raise naming every expected path of `name` that does not exist (FileNotFoundError) and a VOC
    entry without a split (ValueError). Called for every train/test dataset before the model is built."""
    meta = get_metadata(name, cfg)
    problems = _path_problems(name, meta, builtin=name not in _registered(cfg))
    if problems:
        raise _one_error(problems, f"dataset '{name}'")
    return meta


def _no_split_message(name):
    return (f"config DATASETS.REGISTER.{name} gives neither SPLIT (ROOT/ImageSets/Main/<SPLIT>.txt) nor SPLIT_FILE "
            f"(a file of image ids); give one, or use {name}_train / {name}_test in DATASETS.TRAIN / TEST (a split "
            "of all its annotation files that transfer/train_net.py makes)")


def read_split_ids(split_file):
    with open(split_file, encoding="utf-8") as f:
        return [x.strip() for x in f if x.strip()]


def voc_image_files(image_dir, fileids):
    """(paths, problems): the image of each id, the one file in `image_dir` named <id> plus an image
    extension (IMAGE_EXTENSIONS, any case); an id with none or several is a problem naming it."""
    found = {}
    for f in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in IMAGE_EXTENSIONS:
            found.setdefault(stem, []).append(f)
    paths, problems = [], []
    for fid in fileids:
        files = found.get(fid, [])
        if len(files) > 1:
            problems.append(f"{len(files)} images for '{fid}' in {image_dir}: {', '.join(files)}; keep one")
        elif not files:
            problems.append(f"no image for '{fid}': {os.path.join(image_dir, fid + '.jpg')} not found, nor another "
                            f"extension of {list(IMAGE_EXTENSIONS)}")
        paths.append(os.path.join(image_dir, files[0]) if len(files) == 1 else None)
    return paths, problems


def _image_files(meta):
    """Every image file a dataset lists (VOC: the split file's ids; COCO: the JSON's images), and the
    problems found matching VOC ids to files."""
    if meta["evaluator_type"] == "pascal_voc":
        return voc_image_files(meta["image_dir"], read_split_ids(meta["split_file"]))
    api = _load_coco_api(meta["json_file"])
    return [os.path.join(meta["image_root"], api.imgs[i].get("file_name", "")) for i in sorted(api.imgs)], []


def check_images(name, cfg=None):
    """Open every image of dataset `name` (its header: format, size) so that a missing or unreadable one
    is reported before training, not at the evaluation after it. One error lists every bad file."""
    paths, bad = _image_files(check_dataset_files(name, cfg))
    for path in paths:
        if path is None:  # a problem of voc_image_files, already in `bad`
            continue
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
# one step from a folder to a run: made splits, classes and NUM_CLASSES from the data


def split_base(name, reg):
    """(base, part) when `name` is `<base>_train` / `<base>_test` of a registered `base` and is neither
    registered itself nor a builtin name (a `coco_2017` entry leaves coco_2017_train the builtin): a
    split made of base's images. Else None."""
    if name in reg or name in BUILTIN_NAMES:
        return None
    for part in SPLIT_PARTS:
        base = name[:-len(part) - 1]
        if name.endswith("_" + part) and base in reg:
            return base, part
    return None


def split_ids(ids, test_fraction, seed):
    """(train, test), both sorted: the ids ordered by sha256("<seed>:<id>"), the first
    round(n * test_fraction) (at least 1, at most n - 1) to test. Depends only on the arguments, and
    an id keeps its place in that order when others are added."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{int(seed)}:{i}".encode("utf-8")).hexdigest())
    n_test = min(max(int(round(len(ids) * float(test_fraction))), 1), len(ids) - 1)
    return sorted(ranked[n_test:]), sorted(ranked[:n_test])


def _split_settings(base, e):
    """((TEST_FRACTION, SPLIT_SEED) of entry `base`, [ValueError per bad value])."""
    key = f"config DATASETS.REGISTER.{base}"
    fraction = e.get("TEST_FRACTION", DEFAULT_TEST_FRACTION)
    seed = e.get("SPLIT_SEED", DEFAULT_SPLIT_SEED)
    problems = []
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        problems.append(ValueError(f"{key}.TEST_FRACTION = {fraction!r} must be a number between 0 and 1 "
                                   "(e.g. 0.2)"))
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(ValueError(f"{key}.SPLIT_SEED = {seed!r} must be an integer"))
    return (fraction, seed), problems


def _ids_to_split(meta):
    """The image ids of a registered dataset (`meta`, paths checked; VOC: its split file's, else every
    annotation file's; COCO: the JSON's), a function writing the subset of some of them to a path, and
    that file's extension."""
    if meta["evaluator_type"] == "pascal_voc":
        ids = read_split_ids(meta["split_file"]) if meta["split_file"] else sorted(
            os.path.splitext(f)[0] for f in os.listdir(meta["annotation_dir"]) if f.lower().endswith(".xml"))
        return ids, lambda path, keep: write_text_atomic(path, "".join(i + "\n" for i in keep)), ".txt"
    data = _load_coco_api(meta["json_file"]).dataset

    def write_subset(path, keep):
        keep = set(keep)
        subset = dict(data, images=[im for im in data["images"] if str(im["id"]) in keep],
                      annotations=[a for a in data.get("annotations", []) if str(a.get("image_id")) in keep])
        write_text_atomic(path, json.dumps(subset))
    return [str(im["id"]) for im in data.get("images", [])], write_subset, ".json"


def _reused_split_note(base, files, settings_file, fraction, seed):
    """The note for a split a resumed run keeps; refuses one made with other TEST_FRACTION / SPLIT_SEED
    (its record says; a split made before the record existed is kept as it is)."""
    note = f"split of '{base}': the run's own split files {files['train']}, {files['test']}"
    if not os.path.isfile(settings_file):
        return note + " (made before splits recorded their settings)"
    with open(settings_file, encoding="utf-8") as f:
        made = json.load(f)
    if (made.get("TEST_FRACTION"), made.get("SPLIT_SEED")) != (fraction, seed):
        key = f"DATASETS.REGISTER.{base}"
        raise UserError(
            f"dataset '{base}': this run's split ({files['train']}, {files['test']}) was made with TEST_FRACTION "
            f"{made.get('TEST_FRACTION')}, SPLIT_SEED {made.get('SPLIT_SEED')} ({settings_file}), but the config "
            f"now says TEST_FRACTION {fraction}, SPLIT_SEED {seed}; a resumed or evaluated run keeps its split, so "
            f"choose a new OUTPUT_DIR for the new split, or set {key}.TEST_FRACTION {made.get('TEST_FRACTION')} "
            f"and {key}.SPLIT_SEED {made.get('SPLIT_SEED')} again")
    return note


def _make_split(base, meta, settings, cfg, reuse):
    """Register `<base>_train` / `<base>_test` in `cfg` (defrosted): the seeded split of base's images
    (split_ids with `settings` = (TEST_FRACTION, SPLIT_SEED)), written to
    OUTPUT_DIR/splits/<base>_{train,test}.txt (VOC ids) or .json (COCO subsets), the settings recorded
    in <base>_split_settings.json beside them. `reuse` (--resume, --eval-only) keeps split files the run
    already has (made with the same settings). Returns a note for the log."""
    reg = cfg.DATASETS.REGISTER
    entry = dict(reg[base])
    fraction, seed = settings
    ids, write, ext = _ids_to_split(meta)
    if len(ids) < 2:
        raise ValueError(f"dataset '{base}' has {len(ids)} image(s); a train/test split needs at least 2")
    folder = os.path.join(cfg.OUTPUT_DIR, "splits")
    files = {part: os.path.join(folder, f"{base}_{part}{ext}") for part in SPLIT_PARTS}
    settings_file = os.path.join(folder, f"{base}_split_settings.json")
    if reuse and all(os.path.isfile(f) for f in files.values()):
        note = _reused_split_note(base, files, settings_file, fraction, seed)
    else:
        train, test = split_ids(ids, fraction, seed)
        os.makedirs(folder, exist_ok=True)
        for part, keep in zip(SPLIT_PARTS, (train, test)):
            write(files[part], keep)
        write_text_atomic(settings_file, json.dumps({"TEST_FRACTION": fraction, "SPLIT_SEED": seed}) + "\n")
        note = (f"split of '{base}' ({len(ids)} images, TEST_FRACTION {fraction}, SPLIT_SEED {seed}): "
                f"{base}_train {len(train)} / {base}_test {len(test)} images, written to {files['train']} and "
                f"{files['test']}")
    file_key = "SPLIT_FILE" if str(entry.get("TYPE", "")).lower() == "voc" else "JSON_FILE"
    for part in SPLIT_PARTS:
        made = {k: v for k, v in entry.items() if k not in ("SPLIT", "TEST_FRACTION", "SPLIT_SEED")}
        made[file_key] = files[part]
        reg[f"{base}_{part}"] = type(reg)(made)
    return note


def _make_splits(cfg, names, reuse, notes, problems):
    """_make_split for every base a name of `names` is a split of; problems (bad settings, paths) are
    appended to `problems`."""
    reg = cfg.DATASETS.REGISTER
    for base in dict.fromkeys(made[0] for made in map(lambda n: split_base(n, reg), names) if made):
        meta, found = _checked_metadata(base, cfg, need_split=False)
        settings, bad_settings = _split_settings(base, reg[base])
        found += bad_settings
        problems += found
        if found:
            continue
        try:
            notes.append(_make_split(base, meta, settings, cfg, reuse))
        except (ValueError, OSError) as e:
            problems.append(e)


def _one_error(problems, what="the datasets"):
    """One exception for every problem found: FileNotFoundError when all are missing paths."""
    messages = [e.args[0] if isinstance(e, KeyError) and e.args else str(e) for e in problems]
    text = problem_list(messages, what)
    return (FileNotFoundError if all(isinstance(e, FileNotFoundError) for e in problems) else ValueError)(text)


def _checked_metadata(name, cfg, need_split=True):
    """(metadata or None, [exception per problem]) of dataset `name`: its metadata's own refusals, or
    _path_problems'. None when there is any problem."""
    try:
        meta = get_metadata(name, cfg)
    except (ValueError, KeyError, OSError) as e:
        return None, [e]
    problems = _path_problems(name, meta, name not in _registered(cfg), need_split)
    return (None if problems else meta), problems


def _dataset_problems(name, cfg):
    """(metadata or None, [exception per problem]) of dataset `name`: _checked_metadata's problems, and
    every VOC id without exactly one image file."""
    meta, problems = _checked_metadata(name, cfg)
    if meta is None or meta["evaluator_type"] != "pascal_voc":
        return meta, problems
    _, unmatched = voc_image_files(meta["image_dir"], read_split_ids(meta["split_file"]))
    for u in unmatched[:10]:
        problems.append((FileNotFoundError if "not found" in u else ValueError)(f"dataset '{name}': {u}"))
    if len(unmatched) > 10:
        problems.append(FileNotFoundError(f"dataset '{name}': {len(unmatched) - 10} more image(s) of "
                                          f"{meta['split_file']} without exactly one file"))
    return meta, problems


def _resolve_classes(cfg, metas, num_classes_given, notes, problems):
    """Write derived VOC classes into their entries, check that every dataset has the same classes,
    and make MODEL.ROI_HEADS.NUM_CLASSES their number (a value given on the command line must equal it)."""
    reg = cfg.DATASETS.REGISTER
    told = set()
    for n, m in metas.items():
        if n not in reg or name_list(reg[n].get("CLASSES")):
            continue
        source = m.get("annotation_dir") or m["json_file"]
        if source not in told:
            told.add(source)
            how = "the object <name>s of the annotation files in" if "annotation_dir" in m else \
                "the categories (by id) of"
            notes.append(f"classes of '{n}' from {how} {source}: {m['thing_classes']} ({len(m['thing_classes'])})")
        if m["evaluator_type"] == "pascal_voc":
            reg[n]["CLASSES"] = list(m["thing_classes"])  # the config the run writes says what it used
    ref_name, ref = next(iter(metas)), next(iter(metas.values()))["thing_classes"]
    for n, m in metas.items():
        if m["thing_classes"] != ref:
            problems.append(ValueError(f"datasets '{ref_name}' and '{n}' have different classes: {ref} vs "
                                       f"{m['thing_classes']}"))
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if k == len(ref) or problems:
        return
    if num_classes_given:
        problems.append(ValueError(
            f"config MODEL.ROI_HEADS.NUM_CLASSES = {k} (command line), but dataset '{ref_name}' has {len(ref)} "
            f"classes {ref}; set MODEL.ROI_HEADS.NUM_CLASSES {len(ref)} or leave it out (it follows the classes)"))
        return
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(ref)
    notes.append(f"MODEL.ROI_HEADS.NUM_CLASSES {k} (config file) -> {len(ref)}, the number of classes of '{ref_name}'")


def resolve_datasets(cfg, num_classes_given=False, reuse_splits=False):
    """From the datasets a config declares to a config that runs: `<base>_train` / `<base>_test` splits
    made and registered (_make_split), every dataset's files checked and each VOC id matched to one
    image, VOC classes read from the annotations when CLASSES is not given, and
    MODEL.ROI_HEADS.NUM_CLASSES set to the number of classes unless `num_classes_given` (on the command
    line; then it must match). Returns (frozen resolved copy of cfg, notes for the log). One error lists
    every problem found. Both engines get their config through this (transfer/train_net.py)."""
    cfg = cfg.clone()
    cfg.defrost()
    reg = cfg.DATASETS.REGISTER
    names = list(dict.fromkeys(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)))
    notes, problems = [], []
    _make_splits(cfg, names, reuse_splits, notes, problems)
    metas = OrderedDict()
    for n in names:
        if n not in reg and split_base(n, reg):
            continue  # its split could not be made: that problem is listed
        meta, found = _dataset_problems(n, cfg)
        problems += found
        if meta is not None:
            metas[n] = meta
    if metas and not problems:
        _resolve_classes(cfg, metas, num_classes_given, notes, problems)
    if problems:
        raise _one_error(problems)
    cfg.freeze()
    return cfg, notes


# ----------------------------------------------------------------------------------------------
# dataset dicts


def get_dataset_dicts(name, cfg=None):
    """List of detectron2-format dicts for `name` (see module docstring)."""
    meta = check_dataset_files(name, cfg)
    if meta["evaluator_type"] == "pascal_voc":
        return load_voc(meta["dirname"], meta["split"], meta["thing_classes"], meta["split_file"],
                        meta["annotation_dir"], meta["image_dir"])
    return load_coco(meta["json_file"], meta["image_root"], mask_on=bool(cfg is not None and cfg.MODEL.MASK_ON))


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


def load_voc(dirname, split, class_names, split_file=None, annotation_dir=None, image_dir=None):
    """detectron2's load_voc_instances, plus clipping, degenerate-box dropping and clear errors; folder
    names and the split file may differ from VOC's (see _voc_layout), each image's extension is found.
    One error lists every missing annotation file and every id without exactly one image."""
    layout = _voc_layout({"dirname": dirname, "split": split}, annotation_dir or VOC_ANNOTATION_DIR,
                         image_dir or VOC_IMAGE_DIR, split_file)
    split_file = layout["split_file"]
    fileids = read_split_ids(split_file)
    if not fileids:
        raise ValueError(f"{split_file} lists no images")
    class_ids = {c: i for i, c in enumerate(class_names)}
    image_files, problems = voc_image_files(layout["image_dir"], fileids)
    anno_files = [os.path.join(layout["annotation_dir"], fileid + ".xml") for fileid in fileids]
    problems += [f"{a} not found" for a in anno_files if not os.path.isfile(a)]
    if problems:
        error = FileNotFoundError if all("not found" in p for p in problems) else ValueError
        raise error(f"{split_file}: {len(problems)} listed image(s) cannot be used: {_some(problems, 20)}")
    dicts, dropped, clipped = [], [], []  # annotation files with a dropped / clipped box
    for fileid, anno_file, jpeg_file in zip(fileids, anno_files, image_files):
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
                                 "(add it to DATASETS.REGISTER.<name>.CLASSES, or leave CLASSES out to read the "
                                 "classes from the annotations)")
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


def load_coco(json_file, image_root, mask_on=False):
    """detectron2's load_coco_json: contiguous ids from sorted category ids; crowd kept (the train
    mapper skips it, the evaluator uses it). An object whose polygon list has no valid polygon is
    dropped (as detectron2, masks or not); `mask_on` (MODEL.MASK_ON) keeps each object's segmentation
    and annotation id, refusing a segmentation that is not a list of polygons (ignored for boxes)."""
    api = _load_coco_api(json_file)
    cat_ids = sorted(api.getCatIds())
    id_map = {c: i for i, c in enumerate(cat_ids)}
    _check_coco_annotations(api, json_file)
    dicts, dropped, clipped = [], [], []  # "annotation <id>" of each dropped / clipped box
    no_polygon = []  # "annotation <id>" of each object whose polygons are all degenerate
    malformed = []  # ids of annotations whose list segmentation is not a list of polygons
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
            segm = a.get("segmentation")
            if isinstance(segm, list) and segm and not is_polygon_list(segm):
                malformed.append(a.get("id"))
                segm = None
            elif isinstance(segm, list) and segm:  # detectron2 drops objects with no usable polygon
                segm = valid_polygons(segm)
                if not segm:
                    no_polygon.append(f"annotation {a.get('id')}")
                    continue
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
            if mask_on:  # the id names the object in require_polygons' error
                annos[-1]["id"] = a.get("id")
                if segm:
                    annos[-1]["segmentation"] = segm
        dicts.append({"file_name": os.path.join(image_root, img["file_name"]), "image_id": img_id,
                      "height": h, "width": w, "annotations": annos})
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise FileNotFoundError(f"{json_file}: {len(missing)} image file(s) not found under {image_root}, "
                                f"e.g. {missing[0]}")
    _log_fixes(json_file, dropped, clipped)
    _report_malformed(json_file, malformed, mask_on)
    if no_polygon:
        logger.warning(f"{json_file}: dropped {len(no_polygon)} object(s) whose segmentation has no polygon of "
                       f"3+ points (as detectron2): {_some(no_polygon)}")
    return dicts


def _report_malformed(json_file, ids, mask_on):
    """Segmentations that are lists but not lists of polygons: refused with MODEL.MASK_ON, else ignored."""
    if not ids:
        return
    form = "COCO polygons are a list of flat lists, [[x0, y0, x1, y1, ...], ...]"
    if mask_on:
        raise ValueError(f"{json_file}: {len(ids)} annotation(s) have a 'segmentation' that is not a list of "
                         f"polygons (annotation ids {_some(ids, 10)}); {form}: wrap each flat polygon in a list, "
                         "or set MODEL.MASK_ON False to train boxes only")
    logger.warning(f"{json_file}: ignored the 'segmentation' of {len(ids)} annotation(s) that is not a list of "
                   f"polygons ({form}; annotation ids {_some(ids)}); boxes are unaffected")


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
    instances: {boxes float [N,4], classes long [N], polygons (MODEL.MASK_ON: per object, a list of
    float64 arrays in the resized/flipped image)} (training only)}."""

    def __init__(self, cfg, is_train):
        i = cfg.INPUT
        self.is_train = is_train
        self.fmt = i.FORMAT
        self.mask_on = cfg.MODEL.MASK_ON
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
            if self.mask_on:
                out["instances"]["polygons"] = instance_polygons(
                    annos, keep.tolist(), d["file_name"], (h0, w0), (newh, neww), self.flip if flip else "none")
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
