"""Issue 11, distillation side: one row per bad input a user may give distill/train_imagenet.py, run
through the real entry point (cocord_common.errors.run_main): the exit status, the excerpt the
message must hold, and what must (not) have happened to the output folder. See docs/errors.md."""
import ast
import glob
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from cocord_common.errors import run_main
from distill import train_imagenet
from distill.data import load_rgb
from test_distill_data import make_image_folder

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--crop-size", "32", "--val-resize", "36", "-j", "0", "-b", "4", "--print-freq", "1",
        "--max-steps-per-epoch", "1"]
PROG = "train_imagenet.py"


class Evil:
    """Unpickling this creates the file named `marker` (builtins.open): code run by a loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("bad_inputs") / "data", odd_modes=False)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch supervised run (read-only: rows copy what they change)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli([data, "--method", "supervised", "--epochs", "1", "--output-dir", str(out)] + TINY)[0] == 0
    return out


def cli(argv):
    """(exit status, return value) of the entry point, as the console script runs it."""
    try:
        return 0, run_main(train_imagenet.main, [str(a) for a in argv], prog=PROG)
    except SystemExit as e:
        return e.code, None


def supervised(data, out, *extra):
    return [data, "--method", "supervised", "--epochs", "1", "--output-dir", out] + TINY + list(extra)


def copy_run(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
                g.write(f.read())
    return dst


def write_config(tmp, text):
    path = tmp / "c.yaml"
    path.write_text(text)
    return path


def files_bytes(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if (folder / n).is_file()}


# ------------------------------------------------------------------------------- the rows' set-ups
# each returns the argv; `tmp` is the row's own folder, `ctx` a dict for the row's check
def cfg_row(text):
    return lambda tmp, data, fin, ctx: supervised(data, tmp / "o", "--config", write_config(tmp, text))


def rerun_without_resume(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    ctx["before"] = files_bytes(out)
    return supervised(data, out)


def output_dir_is_a_file(tmp, data, fin, ctx):
    (tmp / "out").write_text("not a folder\n")
    return supervised(data, tmp / "out")


def resume_finished(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    ctx["before"] = files_bytes(out)
    return supervised(data, out, "--resume", "auto")


def resume_auto_without_pointer(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    os.remove(out / "last_checkpoint")
    return supervised(data, out, "--resume", "auto")


def metrics_torn_last_line(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 2, "lr": 0.0')  # a kill mid-append
    return supervised(data, out, "--resume", "auto", "--epochs", "2")


def metrics_line_lost(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    ctx["record"] = json.loads((out / "metrics.jsonl").read_text())
    (out / "metrics.jsonl").write_text("")  # a kill between the checkpoint and the append
    return supervised(data, out, "--resume", "auto")


def metrics_line_lost_old_checkpoint(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    ckpt = torch.load(out / "checkpoint_0001.pth", weights_only=True)
    del ckpt["metrics"]  # as written before checkpoints held their metrics record
    torch.save(ckpt, out / "checkpoint_0001.pth")
    (out / "metrics.jsonl").write_text("")
    return supervised(data, out, "--resume", "auto", "--epochs", "2")


def metrics_bad_middle_line(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    line = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text("{oops\n" + line)
    return supervised(data, out, "--resume", "auto", "--epochs", "2")


def orphan_temp_files(tmp, data, fin, ctx):
    out = tmp / "run"
    os.makedirs(out)
    ours = [".checkpoint_0001.pth.k3j_9x2q.tmp", ".student_backbone.pth.abcdefgh.tmp"]
    theirs = [".notes.txt.tmp", "scratch.tmp", ".model.pth.TOOLONG12.tmp", ".x.pth.abc.tmp"]
    for name in ours + theirs:
        (out / name).write_bytes(b"\0" * 100)
    os.makedirs(out / "sub")
    (out / "sub" / ours[0]).write_bytes(b"\0")  # only the output folder itself is ours to clean
    ctx.update(ours=ours, theirs=theirs)
    return supervised(data, out)


def broken_val_image(tmp, data, fin, ctx):
    root = make_image_folder(tmp / "d", classes=2, train_per_class=2, odd_modes=False)
    for bad in ("val/class_1/img_0.JPEG", "train/class_0/img_1.JPEG"):
        with open(os.path.join(root, bad), "wb") as f:
            f.write(b"GIF89a but not really")
    return supervised(root, tmp / "o")


def skipped_extensions(tmp, data, fin, ctx):
    root = make_image_folder(tmp / "d", classes=2, train_per_class=2, odd_modes=False)
    src = os.path.join(root, "train", "class_0", "img_0.JPEG")
    Image.open(src).save(os.path.join(root, "train", "class_0", "photo.jfif"), "JPEG")
    Image.open(src).convert("P").save(os.path.join(root, "train", "class_1", "anim.gif"))
    for i in range(3):
        (pathlib.Path(root) / "train" / "class_1" / f"phone_{i}.heic").write_bytes(b"\0" * 10)
    (pathlib.Path(root) / "val" / "class_0" / "notes.txt").write_text("x")
    return supervised(root, tmp / "o")


def class_with_no_usable_file(tmp, data, fin, ctx):
    root = make_image_folder(tmp / "d", classes=2, train_per_class=2, odd_modes=False)
    for p in glob.glob(os.path.join(root, "train", "class_1", "*")):
        os.replace(p, p[:-len(".JPEG")] + ".heic")
    return supervised(root, tmp / "o")


def teacher_args(data, out, weights):
    return [data, "--method", "kd", "--teacher-arch", "resnet18", "--teacher-weights", weights, "--epochs", "1",
            "--output-dir", out] + TINY


def teacher_is_a_folder(tmp, data, fin, ctx):
    os.makedirs(tmp / "teacher_dir")
    return teacher_args(data, tmp / "o", tmp / "teacher_dir")


def teacher_is_text(tmp, data, fin, ctx):
    (tmp / "teacher.pth").write_text("these are not weights\n")
    return teacher_args(data, tmp / "o", tmp / "teacher.pth")


def resume_from_damaged_checkpoint(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    whole = (out / "checkpoint_0001.pth").read_bytes()
    (out / "checkpoint_0001.pth").write_bytes(whole[: len(whole) // 3])  # an interrupted copy
    return supervised(data, out, "--resume", "auto", "--epochs", "2")


def config_is_a_folder(tmp, data, fin, ctx):
    os.makedirs(tmp / "cfg")
    return supervised(data, tmp / "o", "--config", tmp / "cfg")


def crafted_teacher_with_torch_override(tmp, data, fin, ctx):
    ctx["marker"] = tmp / "code_ran"
    torch.save({"conv1.weight": Evil(str(ctx["marker"]))}, tmp / "teacher.pth")
    return teacher_args(data, tmp / "o", tmp / "teacher.pth")


def crafted_resume_with_torch_override(tmp, data, fin, ctx):
    out = copy_run(fin, tmp / "run")
    ctx["marker"] = tmp / "code_ran"
    ckpt = torch.load(out / "checkpoint_0001.pth", weights_only=True)
    ckpt["extra"] = Evil(str(ctx["marker"]))
    torch.save(ckpt, out / "checkpoint_0001.pth")
    return supervised(data, out, "--resume", "auto", "--epochs", "2")


# ------------------------------------------------------------------------------- the rows' checks
def check_untouched(tmp, ctx, out, log):
    assert files_bytes(tmp / "run") == ctx["before"]  # config.yaml, metrics, log: not one byte changed


def check_nothing_written(tmp, ctx, out, log):
    assert not (tmp / "o").exists() or not (tmp / "o" / "config.yaml").exists()


def check_torn_line_dropped(tmp, ctx, out, log):
    lines = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert f"{tmp / 'run' / 'metrics.jsonl'}:2: dropped a cut last line" in log


def check_line_restored(tmp, ctx, out, log):
    lines = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [ctx["record"]]
    assert "had no line for epoch 1; restored it from the checkpoint" in out


def check_line_not_restorable(tmp, ctx, out, log):
    assert "has no line for epoch 1, and the checkpoint is older" in log
    lines = [json.loads(ln) for ln in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [2]


def check_orphans(tmp, ctx, out, log):
    left = set(os.listdir(tmp / "run"))
    assert not left & set(ctx["ours"]) and set(ctx["theirs"]) <= left
    assert (tmp / "run" / "sub" / ctx["ours"][0]).exists()
    for name in ctx["ours"]:
        assert f"removed {tmp / 'run' / name} (0.0 MiB), a temp file left by an interrupted write" in log


def check_skipped_reported(tmp, ctx, out, log):
    assert "skipped files without an image extension: 3 .heic (e.g. " in log and "phone_0.heic" in log
    assert "1 .txt (e.g. " in log
    assert "train: 6 images" in log  # 4 JPEG + the .jfif + the .gif


def check_no_code_ran(tmp, ctx, out, log):
    assert not ctx["marker"].exists()


@dataclass
class Row:
    name: str
    item: int                     # the point of issue 11
    setup: Callable
    status: int
    excerpt: Optional[str]        # in stderr (status 2) or stdout (status 0)
    check: Optional[Callable] = None
    env: dict = field(default_factory=dict)


ROWS = [
    Row("config bool as string", 2, cfg_row('cos: "false"\n'), 2,
        "c.yaml: key 'cos' is 'false' (str), expected true or false (an unquoted YAML boolean)", check_nothing_written),
    Row("config no-val as string", 2, cfg_row('no-val: "false"\n'), 2, "key 'no-val' is 'false' (str), expected true"),
    Row("config bool as number", 2, cfg_row('channels-last: 1\n'), 2, "key 'channels-last' is 1 (int), expected true"),
    Row("config int as word", 2, cfg_row("epochs: abc\n"), 2, "key 'epochs' is 'abc' (str), expected an integer"),
    Row("config int as fraction", 2, cfg_row("epochs: 1.5\n"), 2, "key 'epochs' is 1.5 (float), expected an integer"),
    Row("config int as bool", 2, cfg_row("epochs: true\n"), 2, "key 'epochs' is True (bool), expected an integer"),
    Row("config float as word", 2, cfg_row("lr: fast\n"), 2, "key 'lr' is 'fast' (str), expected a number"),
    Row("config list with a word", 2, cfg_row("schedule: [30, soon]\n"), 2,
        "key 'schedule' is [30, 'soon'] (list), expected a list of integers"),
    Row("config list of a mapping", 2, cfg_row("schedule: {a: 1}\n"), 2, "expected a list of integers"),
    Row("config string as number", 2, cfg_row("arch: 18\n"), 2, "key 'arch' is 18 (int), expected a string (quote it)"),
    Row("config unquoted off (YAML's boolean)", 2, cfg_row("amp: off\n"), 2,
        "key 'amp' is False (bool), expected a string (YAML reads unquoted on/off/yes/no/true/false as booleans"),
    Row("config choice", 2, cfg_row("amp: fp8\n"), 2, "key 'amp' is 'fp8', expected one of ['off', 'bf16', 'fp16']"),
    Row("config unknown key", 2, cfg_row("epochz: 3\n"), 2, "unknown key 'epochz'; did you mean epochs?"),
    Row("config is a folder", 8, config_is_a_folder, 2, "--config", None),
    Row("16-bit and odd extensions: skipped ones reported", 3, skipped_extensions, 0, None, check_skipped_reported),
    Row("a class left with no image", 3, class_with_no_usable_file, 2,
        "Found no valid file for the classes class_1"),
    Row("orphan temp files of a killed run", 5, orphan_temp_files, 0, None, check_orphans),
    Row("metrics.jsonl torn last line", 5, metrics_torn_last_line, 0, None, check_torn_line_dropped),
    Row("metrics.jsonl lost the checkpoint's line", 5, metrics_line_lost, 0, "already finished: 1 epochs",
        check_line_restored),
    Row("metrics line lost, checkpoint predates records", 5, metrics_line_lost_old_checkpoint, 0, None,
        check_line_not_restorable),
    Row("metrics.jsonl bad middle line", 5, metrics_bad_middle_line, 2, "metrics.jsonl:1: not a JSON line"),
    Row("rerun into a finished run without --resume", 6, rerun_without_resume, 2,
        "holds another run (checkpoint_0001.pth, last_checkpoint, metrics.jsonl); pass --resume auto",
        check_untouched),
    Row("output dir is a file", 8, output_dir_is_a_file, 2, "out is a file; give a folder"),
    Row("finished run resumed", 6, resume_finished, 0, "already finished: 1 epochs (--epochs 1)", check_untouched),
    Row("resume auto, pointer gone, checkpoints left", 6, resume_auto_without_pointer, 2,
        "has no last_checkpoint but holds checkpoint_0001.pth"),
    Row("bad train and val images", 7, broken_val_image, 2,
        "2 of 8 image files cannot be read (--file-check header):\n  ", check_nothing_written),
    Row("unknown method (a ValueError of the methods table)", 8,
        lambda tmp, data, fin, ctx: supervised(data, tmp / "o", "--method", "moco"), 2, "unknown --method 'moco'"),
    Row("invalid hyper-parameter (checked by build_method)", 8,
        lambda tmp, data, fin, ctx: supervised(data, tmp / "o", "--tau", "-1"), 2, "--tau = -1.0 is invalid"),
    Row("teacher weights are a folder", 8, teacher_is_a_folder, 2, "teacher_dir is a folder; give the weights file"),
    Row("teacher weights are a text file", 8, teacher_is_text, 2, "not a torch file (it is text: it begins with"),
    Row("resume from a damaged checkpoint", 8, resume_from_damaged_checkpoint, 2,
        "checkpoint_0001.pth: a damaged torch file"),
    Row("crafted teacher, torch override set", 9, crafted_teacher_with_torch_override, 2,
        "could run code from the file, so it is refused", check_no_code_ran,
        env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
    Row("crafted checkpoint to resume, torch override set", 9, crafted_resume_with_torch_override, 2,
        "could run code from the file, so it is refused", check_no_code_ran,
        env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"item{r.item}-{r.name}" for r in ROWS])
def test_bad_input(row, data, finished, tmp_path, capsys, monkeypatch):
    for k, v in row.env.items():
        monkeypatch.setenv(k, v)
    ctx = {}
    argv = row.setup(tmp_path, data, finished, ctx)
    capsys.readouterr()
    status, _ = cli(argv)
    out, err = capsys.readouterr()
    assert status == row.status, (out, err)
    assert "Traceback" not in err
    if row.status == 2:
        assert err.startswith(f"{PROG}: error: ") and err.count("\n") >= 1
        assert row.excerpt in err, err
    elif row.excerpt is not None:
        assert row.excerpt in out, out
    logs = [p for p in (tmp_path / "run" / "log.txt", tmp_path / "o" / "log.txt") if p.exists()]
    if row.check is not None:
        row.check(tmp_path, ctx, out, "".join(p.read_text() for p in logs))


def test_finished_run_resumed_twice_adds_no_line(data, finished, tmp_path, capsys):
    """Resumed twice: stdout is the one sentence each time, and the folder stays byte-identical."""
    out = copy_run(finished, tmp_path / "run")
    before = files_bytes(out)
    for _ in range(2):
        capsys.readouterr()
        assert cli(supervised(data, out, "--resume", "auto"))[0] == 0
        assert capsys.readouterr().out.startswith("already finished: 1 epochs")
    assert files_bytes(out) == before


def test_debug_shows_the_traceback_of_a_user_error(data, tmp_path, monkeypatch):
    argv = supervised(data, tmp_path / "o", "--config", write_config(tmp_path, "epochs: abc\n"))
    with pytest.raises(ValueError, match="expected an integer"):
        run_main(train_imagenet.main, [str(a) for a in argv] + ["--debug"], prog=PROG)
    monkeypatch.setenv("COCORD_DEBUG", "1")
    with pytest.raises(ValueError, match="expected an integer"):
        run_main(train_imagenet.main, [str(a) for a in argv], prog=PROG)


# ------------------------------------------------------------------------------- accepted config values
@pytest.mark.parametrize("text, dest, value", [
    ("schedule: 30\n", "schedule", [30]),             # as `--schedule 30` on the command line
    ("schedule: []\n", "schedule", []),               # nargs *: no milestone
    ("schedule: [10, '20']\n", "schedule", [10, 20]),
    ("epochs: '7'\n", "epochs", 7),                   # a quoted number, as the command line gives it
    ("lr: 1\n", "lr", 1.0),
    ("lr: null\n", "lr", None),                       # the default is unset
    ("cos: true\n", "cos", True),
    ("no-val: false\n", "no_val", False),
    ("kd-T: 2\n", "kd_T", 2.0),
])
def test_config_values_accepted(tmp_path, text, dest, value):
    args = train_imagenet.parse_args(["DATA", "--config", str(write_config(tmp_path, text))])
    got = getattr(args, dest)
    assert got == value and type(got) is type(value)


# ------------------------------------------------------------------------------- bit depths
@pytest.mark.parametrize("mode, pixels, fmt, expected", [
    # 16-bit PNG: 65535 is white, 257 * v is v (PIL's own convert clips all three at 255)
    ("I;16", np.array([[0, 257 * 100, 65535]], np.uint16), "PNG", [0, 100, 255]),
    ("I;16", np.array([[300, 1000, 40000]], np.uint16), "PNG", [1, 4, 156]),
    # 32-bit integer TIFF (BitsPerSample 32)
    ("I", np.array([[0, 2 ** 31 - 1, 2 ** 24]], np.int32), "TIFF", [0, 127, 1]),
    # float TIFF with values in [0, 1]
    ("F", np.array([[0.0, 0.5, 1.0]], np.float32), "TIFF", [0, 128, 255]),
])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode, pixels, fmt, expected):
    path = str(tmp_path / f"img.{fmt.lower()}")
    img = Image.fromarray(pixels)
    assert img.mode == mode
    img.save(path, fmt)
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (1, 3, 3)
    assert rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()


def test_eight_bit_images_are_unchanged(tmp_path):
    """The conversion touches only high bit depths: an 8-bit grayscale PNG decodes as PIL's convert."""
    path = str(tmp_path / "g.png")
    Image.fromarray(np.array([[0, 100, 255]], np.uint8), mode="L").save(path)
    assert np.asarray(load_rgb(path))[0, :, 1].tolist() == [0, 100, 255]


# ------------------------------------------------------------------------------- item 9, static
def test_every_torch_load_passes_weights_only_true():
    """No torch.load in distill/ or cocord_common/ may rely on torch's default (an environment variable
    can turn that off): each passes weights_only=True explicitly."""
    calls = []
    for path in sorted(glob.glob(str(REPO / "distill" / "**" / "*.py"), recursive=True)
                       + glob.glob(str(REPO / "cocord_common" / "*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                calls.append((os.path.relpath(path, REPO), node.lineno, ok))
    assert calls and all(ok for *_, ok in calls), calls


def test_the_torch_override_really_runs_code_in_a_plain_load(tmp_path, monkeypatch):
    """The control for the item-9 rows: with the override set, torch.load without weights_only runs
    the crafted file's code, so those rows would fail if our loader left weights_only to the default."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "code_ran"
    torch.save({"x": Evil(str(marker))}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth")
    assert marker.exists()
