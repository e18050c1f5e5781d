"""distill/train_imagenet.py end to end on tiny data (CPU): every method, outputs, exact resume,
config files, teacher loading and the errors users meet."""
import glob
import json
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import yaml

from conftest import REPO
from distill import train_imagenet
from cocord_common.checkpoint import load_checkpoint
from cocord_common.errors import UserError
from distill.data import ImageError
from distill.methods import METHODS
from distill.models import build_resnet
from test_distill_data import make_image_folder

# Tiny everything: 32 px crops, small heads / queue / CRD negatives, batch 4, no workers.
TINY = ["--crop-size", "32", "--val-resize", "36", "-j", "0", "-b", "4", "--print-freq", "1",
        "--queue-size", "10", "--proj-dim", "32", "--proj-hidden-dim", "32", "--pred-dim", "16",
        "--crd-nce-k", "6", "--crd-feat-dim", "16"]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data root with 3 classes x 4 train / 2 val images, resnet18 teacher weights for 3 classes)."""
    root = tmp_path_factory.mktemp("tiny")
    data = make_image_folder(root / "data")
    torch.manual_seed(0)
    teacher = str(root / "teacher_r18.pth")
    torch.save(build_resnet("resnet18", 3).state_dict(), teacher)
    return data, teacher


def run(data, out, *extra, teacher=None, method="cocord"):
    argv = [data, "-a", "resnet18", "--method", method, "--output-dir", str(out)] + TINY + list(extra)
    if method != "supervised":
        argv += ["--teacher-arch", "resnet18", "--teacher-weights", teacher]
    return train_imagenet.main(argv)


def check_outputs(out, method, epochs, init_epochs=0):
    """The files of a finished run; metrics lines: `init_epochs` initialisation lines (epoch 0,
    init_epoch k) then one per main epoch. Returns (main-epoch lines, last checkpoint)."""
    out = str(out)
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "student_backbone.pth", "last_checkpoint"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert glob.glob(os.path.join(out, "tb", "events.out.tfevents.*"))
    lines = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [(m["epoch"], m.get("init_epoch")) for m in lines[:init_epochs]] == [(0, k + 1) for k in range(init_epochs)]
    lines = lines[init_epochs:]
    assert [m["epoch"] for m in lines] == list(range(1, epochs + 1))
    assert not any("init_epoch" in m for m in lines)
    for key in ("epoch", "lr", "train/loss", "val/top1", "val/top5", "images_per_sec", "time"):
        assert key in lines[-1], key
    terms = [k for k in lines[-1] if k.startswith("train/") and k != "train/loss"]
    assert terms and abs(sum(lines[-1][k] for k in terms) - lines[-1]["train/loss"]) < 1e-4
    with open(os.path.join(out, "last_checkpoint")) as f:
        name = f.read().strip()
    assert name == f"checkpoint_{epochs:04d}.pth"
    ckpt = load_checkpoint(os.path.join(out, name))  # weights_only=True
    for key in ("arch", "method", "epoch", "step", "config", "student", "slow_student", "method_state",
                "optimizer", "scheduler", "scaler", "rng"):
        assert key in ckpt, key
    assert ckpt["arch"] == "resnet18" and ckpt["method"] == method and ckpt["epoch"] == epochs
    assert ckpt["config"]["method"] == method and len(ckpt["rng"]) == 1
    backbone = torch.load(os.path.join(out, "student_backbone.pth"), weights_only=True)
    model = build_resnet("resnet18", 3)
    model.load_state_dict(backbone)  # plain torchvision layout incl. fc
    assert all(torch.equal(backbone[k], ckpt["student"][k]) for k in backbone)
    if method.startswith("cocord"):
        slow = ckpt["slow_student"]
        assert slow is not None and not any(k.startswith("fc.") for k in slow)
        assert set(slow) == {k for k in backbone if not k.startswith("fc.")}
    else:
        assert ckpt["slow_student"] is None
    log = open(os.path.join(out, "log.txt")).read()
    assert "img/s" in log and "eta" in log
    return lines, ckpt


TWO_STAGE = ("ab", "ft")  # an initialisation stage (--init-epochs) before the main epochs


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_tiny_run_writes_every_output(tiny, tmp_path, method):
    data, teacher = tiny
    init = ["--init-epochs", "1"] if method in TWO_STAGE else []
    metrics = run(data, tmp_path, "--epochs", "1", "--max-steps-per-epoch", "2", *init, teacher=teacher, method=method)
    lines, ckpt = check_outputs(tmp_path, method, 1, init_epochs=len(init) // 2)
    assert metrics == lines[-1] and ckpt["step"] == 2 * (1 + len(init) // 2)
    cfg = yaml.safe_load(open(tmp_path / "config.yaml"))
    assert cfg["lr"] == pytest.approx(0.1 * 4 / 256) and cfg["method"] == method
    assert ckpt["config"]["world_size"] == 1
    # the saved config is a valid --config file that reproduces the run's flags
    again = train_imagenet.parse_args(["--config", str(tmp_path / "config.yaml")])
    assert vars(again) == dict(cfg, config=str(tmp_path / "config.yaml"))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_channels_last(tiny, tmp_path, amp):
    data, teacher = tiny
    method = "cocord" if amp == "bf16" else "supervised"  # fp16 is slow on CPU: the cheap method
    run(data, tmp_path, "--epochs", "1", "--max-steps-per-epoch", "2", "--amp", amp, "--channels-last",
        "--resume", "auto", teacher=teacher, method=method)
    _, ckpt = check_outputs(tmp_path, method, 1)
    if amp == "fp16":  # the GradScaler state is checkpointed (its scale dropped after inf grads or not)
        assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    else:
        assert ckpt["scaler"] is None
    assert "no last_checkpoint" in open(tmp_path / "log.txt").read()  # --resume auto, fresh start


def _tensors_equal(a, b, path=""):
    """Recursively compare nested state (dicts/lists/tensors/numbers) exactly."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cocord", "crd"])  # crd draws its negatives from the global RNG
def test_interrupted_and_resumed_run_is_bit_exact(tiny, tmp_path, method):
    """Train 2 epochs straight; separately restart a fresh process state from the epoch-1
    checkpoint with --resume auto: final weights, heads, queue / banks, optimizer all identical."""
    data, teacher = tiny
    flags = ["--epochs", "2", "--cos", "--max-steps-per-epoch", "2", "--seed", "5"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(data, full, *flags, teacher=teacher, method=method)
    # the "interrupted" run: its output dir holds only what existed after epoch 1
    os.makedirs(part)
    ck1 = load_checkpoint(str(full / "checkpoint_0001.pth"))
    torch.save(ck1, part / "checkpoint_0001.pth")
    (part / "last_checkpoint").write_text("checkpoint_0001.pth")
    with open(part / "metrics.jsonl", "w") as f:  # plus a stale line of a run that died before saving
        f.write(open(full / "metrics.jsonl").readline())
        f.write(json.dumps({"epoch": 2, "stale": True}) + "\n")
    torch.manual_seed(999)  # scramble the global RNG: resume must restore it
    run(data, part, *flags, "--resume", "auto", teacher=teacher, method=method)
    a = load_checkpoint(str(full / "checkpoint_0002.pth"))
    b = load_checkpoint(str(part / "checkpoint_0002.pth"))
    assert a["step"] == b["step"] == 4
    for key in ("student", "slow_student", "method_state", "optimizer", "scheduler", "rng"):
        _tensors_equal(a[key], b[key], key)
    if method == "cocord":  # the queue really moved and wrapped (K=10, 4 keys per step, 4 steps)
        assert int(a["method_state"]["queue_ptr"]) == 16 % 10
    # and the replay was not trivially equal: epoch 2 changed the weights
    assert not torch.equal(a["student"]["conv1.weight"], ck1["student"]["conv1.weight"])
    lines = [json.loads(ln) for ln in open(part / "metrics.jsonl")]
    assert [m["epoch"] for m in lines] == [1, 2] and "stale" not in lines[1]
    assert "resumed from" in open(part / "log.txt").read()
    # a different epoch-2 LR would have shown up in the weights; check the cosine value is logged
    assert lines[1]["lr"] == pytest.approx(0.1 * 4 / 256 * 0.5)


@pytest.mark.slow
def test_tiny_run_on_imagenet_sample100(shared, tmp_path):
    """The 100 real ImageNet JPEGs (grayscale ones included): train/ and a val/ of symlinks."""
    src = shared("data", "imagenet_sample100", "train")
    data = tmp_path / "data"
    classes = sorted(os.listdir(src))
    assert len(classes) == 100
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(data / split / c)
            for f in os.listdir(src / c):
                os.symlink(src / c / f, data / split / c / f)
    torch.manual_seed(0)
    teacher = str(tmp_path / "teacher.pth")
    torch.save(build_resnet("resnet18", 100).state_dict(), teacher)
    out = tmp_path / "out"
    argv = [str(data), "-a", "resnet18", "--teacher-arch", "resnet18", "--teacher-weights", teacher,
            "--method", "cocord", "--output-dir", str(out), "--epochs", "1", "--max-steps-per-epoch", "2",
            "--crop-size", "32", "--val-resize", "40", "-b", "8", "-j", "2", "--queue-size", "32",
            "--proj-dim", "32", "--proj-hidden-dim", "32", "--pred-dim", "16"]
    metrics = train_imagenet.main(argv)
    assert 0 <= metrics["val/top1"] <= metrics["val/top5"] <= 100
    ckpt = load_checkpoint(str(out / "checkpoint_0001.pth"))
    assert ckpt["student"]["fc.weight"].shape == (100, 512)
    assert os.path.isfile(out / "student_backbone.pth") and glob.glob(str(out / "tb" / "events.*"))
    assert "val: 100 images" in open(out / "log.txt").read()


def test_config_file_sets_defaults_and_cli_wins(tiny, tmp_path):
    data, teacher = tiny
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"method": "kd", "teacher-arch": "resnet18", "teacher_weights": teacher,
                                   "epochs": 7, "lr": 0.5, "schedule": [2, 4], "w-kd": 0.25}))
    args = train_imagenet.parse_args([data, "--config", str(cfg), "--lr", "0.01"])
    assert (args.method, args.epochs, args.lr, args.schedule, args.w_kd) == ("kd", 7, 0.01, [2, 4], 0.25)
    assert args.teacher_weights == teacher
    out = tmp_path / "out"
    train_imagenet.main([data, "--config", str(cfg), "--epochs", "1", "--max-steps-per-epoch", "1",
                         "--output-dir", str(out)] + TINY)
    saved = yaml.safe_load(open(out / "config.yaml"))
    assert saved["method"] == "kd" and saved["epochs"] == 1 and saved["lr"] == 0.5 and saved["w_kd"] == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key 'epochz'.*epochs"):
        train_imagenet.parse_args([data, "--config", str(bad)])
    bad.write_text("amp: fp8\n")
    with pytest.raises(ValueError, match=r"key 'amp' is 'fp8', expected one of"):
        train_imagenet.parse_args([data, "--config", str(bad)])


# train_imagenet.py's recipes, <teacher>_<student>_<method>.yaml (cifar_pairs.yaml is the CIFAR benchmark's table)
@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "distill" / "r*_r*_*.yaml"))))
def test_shipped_configs_are_valid(path):
    args = train_imagenet.parse_args(["/data/imagenet", "--config", path])
    train_imagenet.check_args(args)
    name = os.path.basename(path)
    student, teacher = ("resnet50", "resnet101") if name.startswith("r101_r50") else ("resnet18", "resnet34")
    assert (args.arch, args.teacher_arch, args.batch_size, args.epochs, args.schedule, args.wd, args.momentum) == \
        (student, teacher, 256, 100, [30, 60, 90], 1e-4, 0.9)
    assert args.method == name[:-len(".yaml")].rsplit("_", 1)[1] and args.lr is None  # 0.1 x batch / 256


# ------------------------------------------------------------------------------------ errors
def test_missing_folders(tiny, tmp_path):
    data, teacher = tiny
    with pytest.raises(FileNotFoundError, match=r"nope/train does not exist"):
        run(str(tmp_path / "nope"), tmp_path / "o1", teacher=teacher)
    no_val = tmp_path / "noval"
    os.makedirs(no_val)
    os.symlink(os.path.join(data, "train"), no_val / "train")
    with pytest.raises(FileNotFoundError, match=r"noval/val does not exist.*--no-val"):
        run(str(no_val), tmp_path / "o2", teacher=teacher)
    m = run(str(no_val), tmp_path / "o3", "--no-val", "--epochs", "1", "--max-steps-per-epoch", "1",
            method="supervised")
    assert "val/top1" not in m


def test_unreadable_image_stops_with_its_name(tmp_path):
    data = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, odd_modes=False)
    for c in range(2):  # every sample broken, so the first batch hits one whatever the order
        for p in glob.glob(os.path.join(data, "train", f"class_{c}", "*.JPEG")):
            with open(p, "wb") as f:
                f.write(b"\xff\xd8 truncated")
    # found by the check before training, all of them in one error
    with pytest.raises(ImageError, match=r"4 of 8 image files cannot be read \(--file-check header\):\n"
                                         r"  .*class_0/img_0\.JPEG: "):
        run(data, tmp_path / "o", "--epochs", "1", method="supervised")
    assert not os.path.exists(tmp_path / "o" / "config.yaml")  # the run never started
    # without the check, the data loader meets one of them in the first batch
    with pytest.raises(ImageError, match=r"cannot read image .*class_\d/img_\d\.JPEG"):
        run(data, tmp_path / "o2", "--epochs", "1", "--file-check", "off", method="supervised")


def test_mismatched_teacher_checkpoint(tiny, tmp_path):
    data, teacher = tiny
    argv = [data, "--method", "kd", "--output-dir", str(tmp_path / "o")] + TINY
    with pytest.raises(ValueError, match=r"teacher_r18\.pth does not fit a torchvision resnet34 .*missing keys"):
        train_imagenet.main(argv + ["--teacher-arch", "resnet34", "--teacher-weights", teacher])
    with pytest.raises(ValueError, match=r"teacher_r18\.pth does not fit a torchvision resnet50 .*shape mismatches"):
        train_imagenet.main(argv + ["--teacher-arch", "resnet50", "--teacher-weights", teacher])
    # right arch, wrong classifier: the fc of a 5-class teacher cannot serve 3-class data
    five = str(tmp_path / "five.pth")
    torch.save({"module." + k: v for k, v in build_resnet("resnet18", 5).state_dict().items()}, five)
    with pytest.raises(ValueError, match=r"five\.pth does not fit .*classifier has 5 classes but the data has 3"):
        train_imagenet.main(argv + ["--teacher-arch", "resnet18", "--teacher-weights", five])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"--teacher-weights: refusing to load .*garbage\.pth"):
        train_imagenet.main(argv + ["--teacher-arch", "resnet18", "--teacher-weights", str(garbage)])
    with pytest.raises(FileNotFoundError, match=r"no such file, and not a torchvision weights name.*IMAGENET1K_V1"):
        train_imagenet.main(argv + ["--teacher-arch", "resnet18", "--teacher-weights", "missing.pth"])
    with pytest.raises(ValueError, match=r"needs a teacher"):
        train_imagenet.main(argv + ["--teacher-arch", "resnet18"])


def test_teacher_files_of_every_kind_are_read(tmp_path):
    """Plain (with or without DDP's module.), pytorch/examples' {'state_dict', 'arch'}, and files holding
    no state dict; read by cocord_common.weights, errors prefixed with the flag."""
    sd = build_resnet("resnet18", 3).state_dict()
    files = {"plain.pth": sd, "ddp.pth": {"module." + k: v for k, v in sd.items()},
             "examples.pth": {"state_dict": {"module." + k: v for k, v in sd.items()}, "arch": "resnet18", "epoch": 9}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        got, source = train_imagenet.read_teacher_state(str(tmp_path / name), "resnet18", print)
        assert source == str(tmp_path / name) and got.keys() == sd.keys(), name
        assert all(torch.equal(got[k], sd[k]) for k in sd), name
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match=r"--teacher-weights: .*empty\.pth is neither .* state dict of tensors"):
        train_imagenet.read_teacher_state(str(tmp_path / "empty.pth"), "resnet18", print)


def test_teacher_from_checkpoints_of_this_script(tiny, tmp_path):
    """A previous stage's checkpoint (uses its `student`) and student_backbone.pth both load as teacher."""
    data, teacher = tiny
    first = tmp_path / "stage1"
    run(data, first, "--epochs", "1", "--max-steps-per-epoch", "1", method="supervised")
    for src in ("checkpoint_0001.pth", "student_backbone.pth"):
        run(data, tmp_path / src, "--epochs", "1", "--max-steps-per-epoch", "1", method="kd",
            teacher=str(first / src))
    with pytest.raises(ValueError, match=r"checkpoint of a resnet18 student, but --teacher-arch is resnet34"):
        train_imagenet.main([data, "--method", "kd", "--teacher-arch", "resnet34", "--teacher-weights",
                             str(first / "checkpoint_0001.pth"), "--output-dir", str(tmp_path / "x")] + TINY)


def test_torchvision_weights_name_offline_error(tiny, tmp_path, monkeypatch):
    """Offline, a torchvision weights name fails with a message saying so and how to pass a file."""
    data, _ = tiny
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached download

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"downloading https://.*resnet18.* failed .*Offline\? .*local path"):
        train_imagenet.main([data, "--method", "kd", "--teacher-arch", "resnet18", "--teacher-weights",
                             "IMAGENET1K_V1", "--output-dir", str(tmp_path / "o")] + TINY)


def test_bad_arguments(tiny, tmp_path):
    data, teacher = tiny
    with pytest.raises(ValueError, match=r"unknown --arch 'resnet19'; choose one of resnet18"):
        run(data, tmp_path / "o", "-a", "resnet19", teacher=teacher)
    with pytest.raises(ValueError, match=r"unknown --method 'moco'"):
        run(data, tmp_path / "o", teacher=teacher, method="moco")
    with pytest.raises(ValueError, match=r"supervised trains without a teacher"):
        run(data, tmp_path / "o", "--teacher-weights", teacher, method="supervised")
    with pytest.raises(ValueError, match=r"fewer than one global batch"):
        run(data, tmp_path / "o", "-b", "64", method="supervised")
    with pytest.raises(ValueError, match=r"--resume .* trained with method='supervised'"):
        first = tmp_path / "s"
        run(data, first, "--epochs", "1", "--max-steps-per-epoch", "1", method="supervised")
        run(data, tmp_path / "o4", "--resume", str(first / "checkpoint_0001.pth"), method="kd", teacher=teacher)


def test_non_finite_loss_names_step_and_terms(tiny, tmp_path):
    data, _ = tiny
    sd = build_resnet("resnet18", 3).state_dict()
    sd["layer4.1.conv2.weight"][0] = float("nan")  # teacher keys become NaN -> contrastive loss NaN
    bad = str(tmp_path / "nan_teacher.pth")
    torch.save(sd, bad)
    with pytest.raises(RuntimeError, match=r"non-finite loss at epoch 1 step 1/.*loss=nan.*contrast=nan"):
        run(data, tmp_path / "o", "--epochs", "1", teacher=bad)
    assert not os.path.exists(tmp_path / "o" / "last_checkpoint")


def test_cli_reports_errors_cleanly(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "distill" / "train_imagenet.py"), str(tmp_path),
                        "-a", "resnet19", "--method", "supervised"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2
    assert "error: unknown --arch 'resnet19'" in r.stderr and "Traceback" not in r.stderr
