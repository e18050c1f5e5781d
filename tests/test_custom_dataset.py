"""Your own dataset in one step (issue 14, point 5): a VOC folder with other folder names, mixed image
extensions and no ImageSets, or a COCO JSON, trained from one transfer/train_net.py command: the split
is made (seeded, written under OUTPUT_DIR/splits), the classes are read from the annotations,
MODEL.ROI_HEADS.NUM_CLASSES follows them, comma lists work on the command line, and one error lists
every problem found."""
import hashlib
import json
import os
import shutil
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from cocord_common.errors import UserError
from cocord_pipeline.synthetic_shapes import voc_xml
from conftest import shared_path
from transfer import data as tdata
from transfer import train_net
from transfer.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CFG = os.path.join(REPO, "configs", "cpu", "voc_bccd_r18_fpn.yaml")  # NUM_CLASSES 3 (BCCD's)
N_IMAGES, N_PNG = 16, 4


@pytest.fixture(scope="module")
def custom_voc(tmp_path_factory):
    """16 BCCD images as `mine/images/*.{jpg,png}` + `mine/annotations/*.xml`, no ImageSets, the
    Platelets objects removed (so 2 classes where the config says 3)."""
    bccd = shared_path("data", "voc_bccd")
    root = tmp_path_factory.mktemp("custom") / "mine"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    ids = sorted(f[:-4] for f in os.listdir(bccd / "Annotations"))[:N_IMAGES]
    for k, fid in enumerate(ids):
        if k < N_PNG:
            Image.open(bccd / "JPEGImages" / f"{fid}.jpg").save(root / "images" / f"{fid}.png")
        else:
            shutil.copy(bccd / "JPEGImages" / f"{fid}.jpg", root / "images" / f"{fid}.jpg")
        tree = ET.parse(bccd / "Annotations" / f"{fid}.xml")
        for obj in tree.getroot().findall("object"):
            if obj.find("name").text.strip() == "Platelets":
                tree.getroot().remove(obj)
        tree.write(root / "annotations" / f"{fid}.xml")
    return root, ids


def object_names(annotation_dir):
    """The set of object <name>s of every XML file, parsed here independently of transfer.data."""
    names = set()
    for f in os.listdir(annotation_dir):
        for obj in ET.parse(os.path.join(annotation_dir, f)).getroot().iter("object"):
            names.add(obj.find("name").text.strip())
    return names


def mine_opts(root, out, **over):
    """The one command's overrides: register `mine` (other folder names, no split) and use its split."""
    opts = {"DATASETS.REGISTER.mine.TYPE": "voc", "DATASETS.REGISTER.mine.ROOT": str(root),
            "DATASETS.REGISTER.mine.ANNOTATION_DIR": "annotations", "DATASETS.REGISTER.mine.IMAGE_DIR": "images",
            "DATASETS.REGISTER.mine.TEST_FRACTION": "0.25", "DATASETS.TRAIN": "mine_train",
            "DATASETS.TEST": "mine_test", "OUTPUT_DIR": str(out)}
    opts.update({k.replace("__", "."): str(v) for k, v in over.items()})
    return [x for kv in opts.items() for x in kv]


def tiny(max_iter):
    """Tiny sizes (written as comma lists: no Python-literal quoting)."""
    return ["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
            "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
            "INPUT.MIN_SIZE_TRAIN", "80,96", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
            "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "1000", "SOLVER.WARMUP_ITERS", "2",
            "SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.PRECISE_BN.NUM_ITER", "1", "SEED", "1"]


def expected_split(ids, fraction, seed):
    """The documented rule, straight-line: rank by sha256("<seed>:<id>"), the first round(n * f) test."""
    keyed = sorted((hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(), i) for i in ids)
    n_test = max(1, min(len(ids) - 1, round(len(ids) * fraction)))
    test = sorted(i for _, i in keyed[:n_test])
    return sorted(set(ids) - set(test)), test


def read_lines(path):
    with open(path) as f:
        return [x.strip() for x in f if x.strip()]


def resolve(root, out, **over):
    cfg = load_config(CPU_CFG, mine_opts(root, out, **over))
    return tdata.resolve_datasets(cfg)


def test_split_classes_and_num_classes_are_derived(custom_voc, tmp_path):
    root, ids = custom_voc
    cfg, notes = resolve(root, tmp_path / "a")
    train = read_lines(tmp_path / "a" / "splits" / "mine_train.txt")
    test = read_lines(tmp_path / "a" / "splits" / "mine_test.txt")
    assert (train, test) == expected_split(ids, 0.25, 0) and len(test) == 4
    assert not set(train) & set(test) and sorted(train + test) == ids
    names = sorted(object_names(root / "annotations"))
    assert names == ["RBC", "WBC"]
    assert list(cfg.DATASETS.REGISTER.mine_train.CLASSES) == names  # written into the run's config
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 2  # the config file's 3 follows the classes
    assert any("mine_train 12 / mine_test 4" in n and "mine_train.txt" in n for n in notes)
    assert any(str(names) in n for n in notes) and any("NUM_CLASSES 3 (config file) -> 2" in n for n in notes)
    meta = tdata.get_metadata("mine_test", cfg)
    dicts = tdata.get_dataset_dicts("mine_train", cfg)
    assert meta["thing_classes"] == names and meta["annotation_dir"] == str(root / "annotations")
    png = {f"{i}.png" for i in ids[:N_PNG]}
    assert {os.path.basename(d["file_name"]) for d in dicts} >= png & {f"{i}.png" for i in train}
    # the same seed gives the same files; another seed another test set; --resume keeps the run's files
    _, _ = resolve(root, tmp_path / "b")
    assert read_lines(tmp_path / "b" / "splits" / "mine_test.txt") == test
    resolve(root, tmp_path / "c", DATASETS__REGISTER__mine__SPLIT_SEED=7)
    other = read_lines(tmp_path / "c" / "splits" / "mine_test.txt")
    assert other == expected_split(ids, 0.25, 7)[1] and other != test
    (tmp_path / "b" / "splits" / "mine_test.txt").write_text(ids[0] + "\n")
    cfg_b = load_config(CPU_CFG, mine_opts(root, tmp_path / "b"))
    tdata.resolve_datasets(cfg_b, reuse_splits=True)
    assert read_lines(tmp_path / "b" / "splits" / "mine_test.txt") == [ids[0]]


def test_comma_lists_on_the_command_line(tmp_path):
    cfg = load_config(None, ["DATASETS.TRAIN", "a_train,b_train", "DATASETS.TEST", "a_test",
                             "DATASETS.REGISTER.a.CLASSES", "cat,dog", "DATASETS.REGISTER.b.CLASSES", "[cat, dog]",
                             "INPUT.MIN_SIZE_TRAIN", "160,176", "DATASETS.REGISTER.a.TYPE", "voc",
                             "DATASETS.REGISTER.a.ROOT", str(tmp_path), "DATASETS.REGISTER.a.SPLIT", "x"],
                      validate_cfg=False)
    assert cfg.DATASETS.TRAIN == ("a_train", "b_train") and cfg.DATASETS.TEST == ("a_test",)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (160, 176)
    assert tdata.name_list(cfg.DATASETS.REGISTER.a.CLASSES) == ["cat", "dog"]
    assert tdata.name_list(cfg.DATASETS.REGISTER.b.CLASSES) == ["cat", "dog"]
    assert tdata.get_metadata("a", cfg)["thing_classes"] == ["cat", "dog"]
    # a literal still works as before
    cfg = load_config(None, ["DATASETS.TRAIN", "('a_train',)", "INPUT.MIN_SIZE_TRAIN", "(160,)"], validate_cfg=False)
    assert cfg.DATASETS.TRAIN == ("a_train",) and cfg.INPUT.MIN_SIZE_TRAIN == (160,)
    # brackets as a shell passes them unquoted, and stray quotes, for list keys and CLASSES alike
    cfg = load_config(None, ["DATASETS.TRAIN", "[a_train, b_train]", "DATASETS.TEST", "(a_test)",
                             "INPUT.MIN_SIZE_TRAIN", "[160, 176]", "DATASETS.REGISTER.c.CLASSES", "[cat, 'dog']",
                             "DATASETS.REGISTER.d.CLASSES", "['cat', \"dog\"]", "DATASETS.REGISTER.e.CLASSES", "cat"],
                      validate_cfg=False)
    assert cfg.DATASETS.TRAIN == ("a_train", "b_train") and cfg.DATASETS.TEST == ("a_test",)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (160, 176)
    assert [list(cfg.DATASETS.REGISTER[n].CLASSES) for n in "cde"] == [["cat", "dog"], ["cat", "dog"], ["cat"]]


def test_one_error_lists_every_problem(custom_voc, tmp_path, monkeypatch):
    root, ids = custom_voc
    with pytest.raises(KeyError) as bad_keys:
        load_config(CPU_CFG, ["SOLVER.MAX_ITERS", "3", "DATASETS.REGISTER.mine.FOLDER", "x", "MODEL.RESNET.X", "1"])
    for key in ("SOLVER.MAX_ITERS", "DATASETS.REGISTER.mine.FOLDER", "MODEL.RESNET.X"):
        assert key in str(bad_keys.value)
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    Image.new("RGB", (8, 8)).save(broken / "images" / f"{ids[5]}.png")  # beside its .jpg: two matches
    os.remove(broken / "images" / f"{ids[6]}.jpg")  # no match
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    opts = mine_opts(broken, tmp_path / "out", DATASETS__TEST="mine_test,other,voc_2007_test")
    opts += ["DATASETS.REGISTER.other.TYPE", "voc", "DATASETS.REGISTER.other.ROOT", str(broken),
             "DATASETS.REGISTER.other.IMAGE_DIR", "pictures", "DATASETS.REGISTER.other.SPLIT_FILE",
             str(tmp_path / "nope.txt")]
    with pytest.raises(ValueError) as err:
        tdata.resolve_datasets(load_config(CPU_CFG, opts))
    text = str(err.value)
    assert f"2 images for '{ids[5]}'" in text and f"no image for '{ids[6]}'" in text
    assert str(broken / "pictures") in text and "nope.txt" in text and "IMAGE_DIR" in text
    assert str(tmp_path / "d2" / "VOC2007") in text
    assert text.count("DETECTRON2_DATASETS") == 1  # only for the builtin voc_2007_test
    assert "NUM_CLASSES 20" not in text
    # NUM_CLASSES given on the command line must match the classes read from the annotations
    with pytest.raises(ValueError, match=r"NUM_CLASSES = 3 \(command line\).*2 classes \['RBC', 'WBC'\].*"
                                         r"NUM_CLASSES 2"):
        train_net.main(["--engine", "torchvision", "--config", CPU_CFG, "MODEL.DEVICE", "cpu",
                        "MODEL.ROI_HEADS.NUM_CLASSES", "3"] + mine_opts(root, tmp_path / "n"))


def test_custom_coco_classes_from_categories_and_split(shared, tmp_path):
    coco = shared("data", "coco_tiny")
    with open(coco / "annotations" / "instances_val2017.json") as f:
        data = json.load(f)
    (tmp_path / "labels.json").write_text(json.dumps(data))
    cfg = load_config(CPU_CFG, ["DATASETS.REGISTER.c.TYPE", "coco", "DATASETS.REGISTER.c.IMAGE_ROOT",
                                str(coco / "val2017"), "DATASETS.REGISTER.c.JSON_FILE", str(tmp_path / "labels.json"),
                                "DATASETS.TRAIN", "c_train", "DATASETS.TEST", "c_test", "OUTPUT_DIR", str(tmp_path)])
    cfg, notes = tdata.resolve_datasets(cfg)
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    assert tdata.get_metadata("c_test", cfg)["thing_classes"] == names
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == len(names) == 80
    assert any(str(names[:3])[:-1] in n for n in notes)
    parts = {}
    for part in ("train", "test"):
        with open(tmp_path / "splits" / f"c_{part}.json") as f:
            parts[part] = json.load(f)
    ids = {p: {im["id"] for im in parts[p]["images"]} for p in parts}
    assert ids["test"] == set(int(i) for i in expected_split([str(im["id"]) for im in data["images"]], 0.2, 0)[1])
    assert not ids["train"] & ids["test"] and len(ids["train"] | ids["test"]) == len(data["images"])
    for p in parts:
        assert {a["image_id"] for a in parts[p]["annotations"]} <= ids[p]
    assert sum(len(parts[p]["annotations"]) for p in parts) == len(data["annotations"])


def voc_folder(root, objects, n=4):
    """`n` images `img<k>.jpg` (40x30) in `root/images`, each annotated with `objects` in `root/annotations`."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for k in range(n):
        Image.new("RGB", (40, 30)).save(root / "images" / f"img{k}.jpg")
        (root / "annotations" / f"img{k}.xml").write_text(voc_xml(f"img{k}", 40, 30, objects))
    return root


def test_no_classes_is_an_error_naming_the_dataset_and_its_source(tmp_path):
    root = voc_folder(tmp_path / "mine", [])  # annotation files without any <object>
    with pytest.raises(ValueError) as err:
        resolve(root, tmp_path / "out")
    text = str(err.value)
    assert "dataset 'mine'" in text and str(root / "annotations") in text and "4 .xml annotation files" in text
    assert "no classes" in text and "CLASSES" in text
    images = [{"id": k, "file_name": f"img{k}.jpg", "height": 30, "width": 40} for k in range(4)]
    (tmp_path / "c.json").write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    cfg = load_config(CPU_CFG, ["DATASETS.REGISTER.c.TYPE", "coco", "DATASETS.REGISTER.c.IMAGE_ROOT",
                                str(root / "images"), "DATASETS.REGISTER.c.JSON_FILE", str(tmp_path / "c.json"),
                                "DATASETS.TRAIN", "c_train", "DATASETS.TEST", "c_test", "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(ValueError) as err:
        tdata.resolve_datasets(cfg)
    assert f"dataset 'c': {tmp_path / 'c.json'} lists no categories" in str(err.value)  # not NUM_CLASSES 0


def test_voc_classes_are_read_once_until_a_file_changes(tmp_path, monkeypatch):
    root = voc_folder(tmp_path / "mine", [("cat", (1, 1, 10, 10), 0)], n=3)
    parsed, parse = [], ET.parse
    monkeypatch.setattr(ET, "parse", lambda path: parsed.append(path) or parse(path))
    cfg, _ = resolve(root, tmp_path / "out")
    assert cfg.DATASETS.REGISTER.mine_train.CLASSES == ["cat"]
    assert len(parsed) == 3  # one parse per annotation file, though resolving asks several times
    (root / "annotations" / "img0.xml").write_text(voc_xml("img0", 40, 30, [("horse", (1, 1, 10, 10), 0)]))
    assert tdata.voc_classes_in(str(root / "annotations")) == ["cat", "horse"]
    assert len(parsed) == 6


def test_builtin_names_are_never_split_names(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    root = voc_folder(tmp_path / "mine", [("cat", (1, 1, 10, 10), 0)])
    out = tmp_path / "out"
    cfg = load_config(CPU_CFG, ["DATASETS.REGISTER.voc_2007.TYPE", "voc", "DATASETS.REGISTER.voc_2007.ROOT", str(root),
                                "DATASETS.REGISTER.voc_2007.ANNOTATION_DIR", "annotations",
                                "DATASETS.REGISTER.voc_2007.IMAGE_DIR", "images", "DATASETS.TRAIN", "voc_2007_test",
                                "DATASETS.TEST", "voc_2007_test", "OUTPUT_DIR", str(out)])
    with pytest.raises(FileNotFoundError) as err:  # the builtin VOC2007 test set, absent here
        tdata.resolve_datasets(cfg)
    assert str(tmp_path / "d2" / "VOC2007") in str(err.value) and not (out / "splits").exists()
    assert tdata.split_base("coco_2017_train", {"coco_2017": {}}) is None
    assert tdata.split_base("coco_2018_train", {"coco_2018": {}}) == ("coco_2018", "train")


def test_bad_split_settings_are_listed_together(tmp_path):
    root = voc_folder(tmp_path / "mine", [("cat", (1, 1, 10, 10), 0)])
    for fraction, shown in (("0", "0"), ("1.5", "1.5"), ("abc", "'abc'"), ("True", "True")):
        with pytest.raises(ValueError, match=rf"DATASETS.REGISTER.mine.TEST_FRACTION = {shown} must be a number "
                                             r"between 0 and 1"):
            resolve(root, tmp_path / "out", DATASETS__REGISTER__mine__TEST_FRACTION=fraction)
    with pytest.raises(ValueError) as err:
        resolve(root, tmp_path / "out", DATASETS__REGISTER__mine__TEST_FRACTION="-0.1",
                DATASETS__REGISTER__mine__SPLIT_SEED="1.5")
    text = str(err.value)
    assert text.startswith("2 problems") and "TEST_FRACTION = -0.1" in text
    assert "SPLIT_SEED = 1.5 must be an integer" in text
    assert not (tmp_path / "out" / "splits").exists()


def test_a_kept_split_refuses_other_split_settings(tmp_path):
    root = voc_folder(tmp_path / "mine", [("cat", (1, 1, 10, 10), 0)], n=8)
    out = tmp_path / "out"
    resolve(root, out)  # TEST_FRACTION 0.25 (mine_opts), SPLIT_SEED 0
    with open(out / "splits" / "mine_split_settings.json") as f:
        assert json.load(f) == {"TEST_FRACTION": 0.25, "SPLIT_SEED": 0}
    test = read_lines(out / "splits" / "mine_test.txt")
    _, notes = tdata.resolve_datasets(load_config(CPU_CFG, mine_opts(root, out)), reuse_splits=True)
    assert any("the run's own split files" in n for n in notes)
    with pytest.raises(UserError) as err:
        train_net.main(["--engine", "torchvision", "--config", CPU_CFG, "--resume", "MODEL.DEVICE", "cpu"]
                       + mine_opts(root, out, DATASETS__REGISTER__mine__SPLIT_SEED=7))
    text = str(err.value)
    assert "made with TEST_FRACTION 0.25, SPLIT_SEED 0" in text and "now says TEST_FRACTION 0.25, SPLIT_SEED 7" in text
    assert "new OUTPUT_DIR" in text and "DATASETS.REGISTER.mine.SPLIT_SEED 0" in text
    assert read_lines(out / "splits" / "mine_test.txt") == test
    # a fresh run (no reuse) makes the split anew with the new settings, and records them
    resolve(root, out, DATASETS__REGISTER__mine__SPLIT_SEED=7)
    with open(out / "splits" / "mine_split_settings.json") as f:
        assert json.load(f) == {"TEST_FRACTION": 0.25, "SPLIT_SEED": 7}


@pytest.mark.slow
def test_one_command_trains_and_evaluates(custom_voc, tmp_path, capsys):
    root, ids = custom_voc
    out = tmp_path / "run"
    res = train_net.main(["--engine", "torchvision", "--config", CPU_CFG, "MODEL.DEVICE", "cpu"]
                         + mine_opts(root, out) + tiny(3))
    assert {"bbox/AP", "bbox/AP50", "bbox/AP75"} <= set(res)
    printed = capsys.readouterr().out
    assert "split of 'mine'" in printed and "['RBC', 'WBC']" in printed and "-> 2" in printed
    assert (out / "splits" / "mine_train.txt").is_file() and (out / "model_final.pth").is_file()
    written = load_config(str(out / "config.yaml"), validate_cfg=False)  # the run's config says what it used
    assert written.MODEL.ROI_HEADS.NUM_CLASSES == 2
    assert written.DATASETS.REGISTER.mine_test.SPLIT_FILE == str(out / "splits" / "mine_test.txt")


@pytest.mark.slow
@pytest.mark.detectron2
def test_one_command_in_the_detectron2_engine(custom_voc, tmp_path):
    pytest.importorskip("detectron2")
    root, ids = custom_voc
    out = tmp_path / "d2"
    res = train_net.main(["--engine", "detectron2", "--config", CPU_CFG, "MODEL.DEVICE", "cpu"]
                         + mine_opts(root, out) + tiny(2))
    assert {"bbox/AP", "bbox/AP50", "bbox/AP75"} <= set(res)
    from detectron2.data import DatasetCatalog, MetadataCatalog  # registered by the engine from transfer.data
    test = expected_split(ids, 0.25, 0)[1]
    assert read_lines(out / "splits" / "mine_test.txt") == test
    assert [d["image_id"] for d in DatasetCatalog.get("mine_test")] == test
    assert MetadataCatalog.get("mine_train").thing_classes == ["RBC", "WBC"]
