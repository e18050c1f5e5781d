"""transfer/data.py: VOC/COCO loading in detectron2's format, clear errors, augmentation, batching."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from cocord_pipeline.synthetic_shapes import SHAPES, register_opts, voc_xml

from transfer import data as tdata
from transfer.config import load_config

def _tiny_voc(tmp_path, objects, fileid="a", w=40, h=30):
    root = tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 20, 30)).save(root / "JPEGImages" / f"{fileid}.jpg")
    (root / "Annotations" / f"{fileid}.xml").write_text(voc_xml(fileid, w, h, objects))
    (root / "ImageSets" / "Main" / "train.txt").write_text(fileid + "\n")
    return root


def _cfg(root, classes=SHAPES):
    return load_config(None, register_opts("t", root, "train", classes) + ["MODEL.DEVICE", "cpu"],
                       validate_cfg=False)


def test_voc_loader_matches_detectron2_conventions(tmp_path, caplog):
    root = _tiny_voc(tmp_path, [("circle", (1, 1, 10, 20), 0), ("square", (5, 5, 5, 9), 0),  # degenerate
                                ("triangle", (30, 2, 45, 12), 1)])  # reaches outside: clipped to 40
    with caplog.at_level(logging.INFO, logger="transfer.data"):
        dicts = tdata.get_dataset_dicts("t", _cfg(root))
    assert len(dicts) == 1
    d = dicts[0]
    assert (d["image_id"], d["height"], d["width"]) == ("a", 30, 40)
    assert d["file_name"] == str(root / "JPEGImages" / "a.jpg")
    annos = d["annotations"]
    assert [a["category_id"] for a in annos] == [1, 2]
    assert annos[0]["bbox"] == [0.0, 0.0, 10.0, 20.0]  # xmin/ymin - 1, as detectron2
    assert annos[1]["bbox"] == [29.0, 1.0, 40.0, 12.0]
    assert all(a["bbox_mode"] == 0 and a["iscrowd"] == 0 for a in annos)
    assert "dropped 1 degenerate box" in caplog.text
    meta = tdata.get_metadata("t", _cfg(root))
    assert meta["evaluator_type"] == "pascal_voc" and meta["split"] == "train" and meta["year"] == 2012
    assert meta["thing_classes"] == list(SHAPES)


def test_voc_bad_inputs_name_the_file(tmp_path):
    root = _tiny_voc(tmp_path, [("dog", (1, 1, 10, 10), 0)])
    with pytest.raises(ValueError, match=r"a\.xml.*unknown class 'dog'"):
        tdata.get_dataset_dicts("t", _cfg(root))
    (root / "Annotations" / "a.xml").write_text("<annotation><size>")
    with pytest.raises(ValueError, match=r"a\.xml: malformed XML"):
        tdata.get_dataset_dicts("t", _cfg(root))
    (root / "Annotations" / "a.xml").write_text(voc_xml("a", 40, 30, [("circle", (1, 1, "x", 5), 0)]))
    with pytest.raises(ValueError, match=r"a\.xml.*non-numeric <bndbox>"):
        tdata.get_dataset_dicts("t", _cfg(root))
    (root / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.jpg not found"):
        tdata.get_dataset_dicts("t", _cfg(root))
    with pytest.raises(FileNotFoundError, match="expected .*nowhere"):
        tdata.check_dataset_files("t", _cfg(tmp_path / "nowhere"))
    with pytest.raises(KeyError, match="neither a builtin"):
        tdata.get_metadata("nope", _cfg(root))


def test_unreadable_image_and_size_mismatch_name_the_file(tmp_path):
    root = _tiny_voc(tmp_path, [("circle", (1, 1, 10, 10), 0)])
    d = tdata.get_dataset_dicts("t", _cfg(root))[0]
    mapper = tdata.Mapper(_cfg(root), is_train=True)
    bad = dict(d, width=41)
    with pytest.raises(ValueError, match=r"a\.jpg: image is 40x30 but its annotation says 41x30"):
        mapper(bad)
    (root / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*a\.jpg"):
        mapper(d)


def test_builtin_names_resolve_under_detectron2_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    m = tdata.get_metadata("voc_2007_test")
    assert m["dirname"] == str(tmp_path / "VOC2007") and m["split"] == "test" and m["year"] == 2007
    assert len(m["thing_classes"]) == 20
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "VOC2012")):
        tdata.check_dataset_files("voc_2012_trainval")
    m = tdata.get_metadata("coco_2017_val")
    assert m["json_file"] == str(tmp_path / "coco/annotations/instances_val2017.json")


def test_coco_loader(shared):
    root = shared("data", "coco_tiny")
    cfg = load_config(None, ["DATASETS.REGISTER.c.TYPE", "coco", "DATASETS.REGISTER.c.IMAGE_ROOT",
                             str(root / "train2017"), "DATASETS.REGISTER.c.JSON_FILE",
                             str(root / "annotations" / "instances_train2017.json")], validate_cfg=False)
    dicts = tdata.get_dataset_dicts("c", cfg)
    meta = tdata.get_metadata("c", cfg)
    assert len(dicts) == 50 and len(meta["thing_classes"]) == 80 and meta["evaluator_type"] == "coco"
    annos = [a for d in dicts for a in d["annotations"]]
    assert any(a["iscrowd"] for a in annos)
    assert all(0 <= a["category_id"] < 80 and a["bbox"][2] > a["bbox"][0] for a in annos)
    kept = tdata.filter_empty(dicts)
    assert 0 < len(kept) < len(dicts)
    assert all(any(not a["iscrowd"] for a in d["annotations"]) for d in kept)


def test_resize_and_flip_follow_detectron2(tmp_path):
    assert tdata.shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert tdata.shortest_edge_size(100, 1000, 800, 1333) == (133, 1333)
    root = _tiny_voc(tmp_path, [("circle", (1, 1, 10, 20), 0)])
    d = tdata.get_dataset_dicts("t", _cfg(root))[0]
    cfg = load_config(None, register_opts("t", root, "train") + ["INPUT.MIN_SIZE_TRAIN", "(60,)",
                                                                  "INPUT.MAX_SIZE_TRAIN", "1000"],
                      validate_cfg=False)
    mapper = tdata.Mapper(cfg, is_train=True)
    seen = set()
    for s in range(20):
        out = mapper(d, torch.Generator().manual_seed(s))
        assert out["image"].shape == (3, 60, 80) and out["image"].dtype == torch.uint8
        box = out["instances"]["boxes"][0].tolist()
        seen.add(tuple(round(v, 3) for v in box))
    assert seen == {(0.0, 0.0, 20.0, 40.0), (60.0, 0.0, 80.0, 40.0)}  # both flips happen


def test_train_stream_is_deterministic_and_grouped():
    dicts = [{"width": 10 if i % 3 else 5, "height": 8} for i in range(30)]
    a = tdata.train_batch_indices(dicts, 4, 20, seed=3, aspect_grouping=True)
    b = tdata.train_batch_indices(dicts, 4, 20, seed=3, aspect_grouping=True, start_iter=7)
    assert a.shape == (20, 4) and np.array_equal(a[7:], b)
    for row in a:  # every batch holds one aspect class
        assert len({dicts[i]["width"] > dicts[i]["height"] for i in row}) == 1
    c = tdata.train_batch_indices(dicts, 4, 20, seed=4, aspect_grouping=False)
    assert not np.array_equal(a, c)
    # the first epoch of the ungrouped stream is a permutation
    assert sorted(c[:7].reshape(-1)[:28].tolist()) == sorted(set(c[:7].reshape(-1)[:28].tolist()))


def test_synthetic_shapes_read_the_same_as_voc_and_as_coco(tmp_path):
    """cocord_pipeline/synthetic_shapes.py writes one dataset in both formats: both loaders see the same boxes/classes."""
    from cocord_pipeline.synthetic_shapes import write_shapes
    root = write_shapes(str(tmp_path / "s"), n_train=5, n_test=3)
    voc = tdata.load_voc(root, "test", SHAPES)
    coco = tdata.load_coco(os.path.join(root, "annotations", "instances_test.json"), os.path.join(root, "JPEGImages"))
    assert len(voc) == len(coco) == 3
    for v, c in zip(voc, coco):
        assert v["file_name"] == c["file_name"] and (v["height"], v["width"]) == (c["height"], c["width"])
        key = lambda a: (a["bbox"], a["category_id"])  # noqa: E731
        assert sorted(map(key, v["annotations"])) == sorted(map(key, c["annotations"])) and v["annotations"]


@pytest.mark.parametrize("fmt,red_channel,zero_channel", [("RGB", 0, 2), ("BGR", 2, 0)])
def test_input_format_sets_the_channel_order(tmp_path, fmt, red_channel, zero_channel):
    """A pure-red image comes out of the mapper with 255 in channel 0 under INPUT.FORMAT RGB and in
    channel 2 under BGR (the detector's PIXEL_MEAN/STD are given in that order)."""
    root = _tiny_voc(tmp_path, [("circle", (1, 1, 10, 20), 0)])
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "JPEGImages" / "a.jpg", quality=100)
    cfg = load_config(None, register_opts("t", root, "train") + ["INPUT.FORMAT", fmt], validate_cfg=False)
    d = tdata.get_dataset_dicts("t", cfg)[0]
    for is_train in (True, False):
        img = tdata.Mapper(cfg, is_train)(d, torch.Generator().manual_seed(0))["image"].float()
        assert (img[red_channel] >= 250).all() and (img[1] <= 5).all() and (img[zero_channel] <= 5).all(), \
            (fmt, is_train, img.mean(dim=(1, 2)))
