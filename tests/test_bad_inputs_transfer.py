"""Bad inputs to the transfer stage and the converter (issue 11), one row per input: each is refused
with a message naming the file / key / value and the fix, before anything is trained or written.
Every row fails without its fix; together they keep the classes of issue 11 from coming back."""
import json
import math
import os

import pytest
import torch
import torchvision

from cocord_common.errors import UserError
from cocord_pipeline.synthetic_shapes import write_shapes
from test_transfer_engine import CPU_CFG, tiny_opts
from transfer import convert as conv
from transfer import data as tdata
from transfer import train_net
from transfer.d2_format import save_d2_file, torchvision_to_d2

D2_CFG = os.path.join(os.path.dirname(CPU_CFG), "..", "voc_r50.yaml")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(str(tmp_path_factory.mktemp("shapes")), n_train=6, n_test=4)


class Evil:
    """Unpickling this calls open(marker, "w"): a file that would run code when loaded unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def r18_state_dict():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).state_dict()


# ------------------------------------------------------------------------------------------------
# weights (items 1, 8, 9): rows of (name, engine, writer of MODEL.WEIGHTS, expected message parts)


def _tv_pth(tmp):
    p = tmp / "tv.pth"
    torch.save(r18_state_dict(), p)
    return p


def _pkl_missing_tensor(tmp):
    model = torchvision_to_d2(r18_state_dict()).model
    model.pop("res4.1.conv2.weight")
    p = tmp / "partial.pkl"
    save_d2_file(model, p)
    return p


def _evil_pth(tmp):
    p = tmp / "evil.pth"
    torch.save({"model": Evil(str(tmp / "MARKER"))}, p)
    return p


WEIGHT_ROWS = [
    ("torchvision .pth, detectron2 engine", "detectron2", _tv_pth,
     ["did not provide", "backbone tensor", "torchvision names", "tools/convert_to_d2.py"]),
    ("torchvision .pth, torchvision engine", "torchvision", _tv_pth,
     ["MODEL.WEIGHTS", "tv.pth", "tools/convert_to_d2.py"]),
    (".pkl missing one tensor, torchvision engine", "torchvision", _pkl_missing_tensor,
     ["MODEL.WEIGHTS", "1 missing", "res4.1.conv2.weight", "tools/convert_to_d2.py"]),
    ("missing MODEL.WEIGHTS file, detectron2 engine", "detectron2", lambda tmp: tmp / "nope.pkl",
     ["MODEL.WEIGHTS", "nope.pkl", "does not exist"]),
    ("code in a .pth under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, torchvision engine", "torchvision", _evil_pth,
     ["evil.pth", "refused"]),
    ("code in a .pth under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, detectron2 engine", "detectron2", _evil_pth,
     ["evil.pth", "refused"]),
]


def engine_argv(engine, shapes, out, **over):
    if engine == "torchvision":
        return ["--engine", "torchvision", "--config", CPU_CFG] + tiny_opts(shapes, out, 2, **over)
    pytest.importorskip("detectron2")
    from test_detectron2_engine import tiny_opts as d2_opts
    return ["--engine", "detectron2", "--config", D2_CFG] + d2_opts(
        shapes, out, **{k.replace("__", "."): str(v) for k, v in over.items()})


@pytest.mark.parametrize("name,engine,make,parts", WEIGHT_ROWS, ids=[r[0] for r in WEIGHT_ROWS])
def test_bad_weights(shapes, tmp_path, monkeypatch, name, engine, make, parts):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    if engine == "detectron2":  # MoCo's R50-C4 config: an R50 weights file is what it needs
        pytest.importorskip("detectron2")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        train_net.main(engine_argv(engine, shapes, out, MODEL__WEIGHTS=make(tmp_path)))
    for part in parts:
        assert part in str(e.value), (name, str(e.value))
    assert "weights_only=False" not in str(e.value)
    assert not (tmp_path / "MARKER").exists(), "loading ran code from the file"
    assert not (out / "config.yaml").exists(), "config.yaml written although the run could not start"
    assert not any(n.startswith("model_") for n in (os.listdir(out) if out.is_dir() else []))


# ------------------------------------------------------------------------------------------------
# COCO annotations (item 4): rows of (name, edit of the JSON, expected message parts)


def _edit_coco(root, edit):
    path = os.path.join(root, "annotations", "instances_train.json")
    with open(path) as f:
        d = json.load(f)
    edit(d)
    bad = os.path.join(root, "annotations", "bad.json")
    with open(bad, "w") as f:
        json.dump(d, f)  # NaN / Infinity are written as JSON's NaN / Infinity tokens
    return bad


def _first(d):
    return d["annotations"][0]


COCO_ROWS = [
    ("NaN x", lambda d: _first(d)["bbox"].__setitem__(0, math.nan), ["not finite", "annotation 1"]),
    ("inf width", lambda d: _first(d)["bbox"].__setitem__(2, math.inf), ["not finite", "annotation 1"]),
    ("3-number bbox", lambda d: _first(d).__setitem__("bbox", _first(d)["bbox"][:3]),
     ["annotation 1", "4 numbers"]),
    ("image_id without image", lambda d: _first(d).__setitem__("image_id", 999999),
     ["1 annotation(s)", "image_id", "annotation ids 1"]),
]


@pytest.mark.parametrize("name,edit,parts", COCO_ROWS, ids=[r[0] for r in COCO_ROWS])
def test_bad_coco_annotations(shapes, name, edit, parts):
    bad = _edit_coco(shapes, edit)
    with pytest.raises(ValueError) as e:
        tdata.load_coco(bad, os.path.join(shapes, "JPEGImages"))
    for part in parts + [bad]:
        assert part in str(e.value), (name, str(e.value))


def test_voc_nan_box_is_refused(tmp_path):
    root = write_shapes(str(tmp_path / "voc"), n_train=2, n_test=1)
    xml = os.path.join(root, "Annotations", "00000.xml")
    text = open(xml).read()
    start = text.index("<xmin>") + len("<xmin>")
    open(xml, "w").write(text[:start] + "nan" + text[text.index("</xmin>"):])
    with pytest.raises(ValueError, match="00000.xml.*not finite"):
        tdata.load_voc(root, "train", ["square", "circle", "triangle"])


def test_clip_and_drop_lines_name_the_file_and_annotation(shapes, caplog):
    def edit(d):
        _first(d)["bbox"] = [-5.0, -5.0, 20.0, 20.0]  # clipped
        d["annotations"][1]["bbox"] = [500.0, 500.0, 5.0, 5.0]  # outside: dropped
    bad = _edit_coco(shapes, edit)
    with caplog.at_level("INFO", logger="transfer.data"):
        tdata.load_coco(bad, os.path.join(shapes, "JPEGImages"))
    lines = [r.getMessage() for r in caplog.records]
    assert any(bad in ln and "clipped 1 box" in ln and "annotation 1" in ln for ln in lines), lines
    assert any(bad in ln and "dropped 1 degenerate" in ln and "annotation 2" in ln for ln in lines), lines


# ------------------------------------------------------------------------------------------------
# output folder (items 5, 6) and test images (item 7)


def test_rerun_into_a_folder_holding_a_run_is_refused_before_writing(shapes, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_final.pth")
    (out / "config.yaml").write_text("original\n")
    with pytest.raises(UserError, match="already holds a run.*--resume.*--allow-existing-output"):
        train_net.main(engine_argv("torchvision", shapes, out))
    assert (out / "config.yaml").read_text() == "original\n"
    assert sorted(os.listdir(out)) == ["config.yaml", "last_checkpoint"]


def test_resume_of_a_finished_run_appends_nothing(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last_checkpoint").write_text("model_final.pth")
    line = {"bbox/AP": 1.0, "bbox/AP50": 2.0, "bbox/AP75": 0.5, "iteration": 1}  # MAX_ITER 2
    (out / "metrics.json").write_text(json.dumps({"iteration": 1, "total_loss": 1.0}) + "\n" + json.dumps(line) + "\n")
    before = (out / "metrics.json").read_bytes()
    res = train_net.main(["--resume"] + engine_argv("torchvision", shapes, out))
    assert res == {"bbox/AP": 1.0, "bbox/AP50": 2.0, "bbox/AP75": 0.5}
    assert "holds a finished run" in capsys.readouterr().out
    assert (out / "metrics.json").read_bytes() == before and sorted(os.listdir(out)) == ["last_checkpoint",
                                                                                        "metrics.json"]


def test_resume_drops_a_torn_metrics_line_and_removes_only_our_temp_files(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    whole = json.dumps({"iteration": 0, "total_loss": 1.0}) + "\n"
    (out / "metrics.json").write_text(whole + '{"iteration": 1, "total_lo')
    (out / ".model_final.pth.ab12cd34.tmp").write_bytes(b"x" * 10)  # ours: atomic_write's pattern
    (out / "notes.tmp").write_text("someone else's")
    # the run then stops at a missing weights file: both repairs happen before it starts
    with pytest.raises(UserError):
        train_net.main(["--resume"] + engine_argv("torchvision", shapes, out, MODEL__WEIGHTS=tmp_path / "no.pkl"))
    printed = capsys.readouterr().out  # no checkpoint: train_net drops it (cocord_common.metrics), once
    assert printed.count(f"[train_net] warning: {out / 'metrics.json'}:2: dropped a cut last line") == 1
    assert (out / "metrics.json").read_text() == whole
    assert not (out / ".model_final.pth.ab12cd34.tmp").exists() and (out / "notes.tmp").exists()


def test_every_bad_test_image_is_listed_before_training(tmp_path):
    root = write_shapes(str(tmp_path / "voc"), n_train=4, n_test=3)
    for image_id in ("00004", "00006"):  # the first and last test images
        with open(os.path.join(root, "JPEGImages", image_id + ".jpg"), "wb") as f:
            f.write(b"not a jpeg")
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        train_net.main(engine_argv("torchvision", root, out))
    assert "2 image(s) cannot be read" in str(e.value)
    assert "00004.jpg" in str(e.value) and "00006.jpg" in str(e.value)
    assert not (out / "metrics.json").exists() and not (out / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------
# the error convention (item 8): `train_net.py: error: ...`, exit 2, no traceback; --debug shows it


CLI_ROWS = [
    ("negative BASE_LR", dict(SOLVER__BASE_LR=-0.01), "config SOLVER.BASE_LR = -0.01"),
    ("unknown key", dict(SOLVER__BASE_LRR=0.01), "SOLVER.BASE_LRR"),
]


@pytest.mark.parametrize("name,over,part", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_train_net_user_errors_exit_2_without_traceback(shapes, tmp_path, capsys, name, over, part):
    with pytest.raises(SystemExit) as e:
        train_net.cli(engine_argv("torchvision", shapes, tmp_path / "out", **over))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("train_net.py: error: ") and part in err, err
    assert "Traceback" not in err
    with pytest.raises(UserError):  # --debug: the exception itself (pytest shows its traceback)
        train_net.cli(["--debug"] + engine_argv("torchvision", shapes, tmp_path / "out", **over))


# ------------------------------------------------------------------------------------------------
# the converter (items 8, 9)


def _nan_input(tmp):
    sd = r18_state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp / "in.pth")
    return tmp / "in.pth", tmp / "out.pkl"


def _folder_output(tmp):
    torch.save(r18_state_dict(), tmp / "in.pth")
    (tmp / "out.pkl").mkdir()
    return tmp / "in.pth", tmp / "out.pkl"


def _evil_input(tmp):
    return _evil_pth(tmp), tmp / "out.pkl"


CONVERT_ROWS = [
    ("NaN in a tensor", _nan_input, ["NaN or inf", "res3.0.conv1.weight"]),
    ("output is a folder", _folder_output, ["is a folder"]),
    ("code in the input under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", _evil_input, ["refused"]),
]


@pytest.mark.parametrize("name,make,parts", CONVERT_ROWS, ids=[r[0] for r in CONVERT_ROWS])
def test_converter_refusals_exit_2(tmp_path, capsys, monkeypatch, name, make, parts):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    src, out = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        conv.main([str(src), str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("convert_to_d2.py: error: "), err
    for part in parts + ["nothing written"]:
        assert part in err, (name, err)
    assert "Traceback" not in err and "weights_only=False" not in err
    assert not (tmp_path / "MARKER").exists()
    assert not out.is_file()
