"""distill/train_cifar.py end to end on a tiny CIFAR-format folder the test writes (CPU, no download):
the CIFAR recipe as defaults, methods on same- and cross-family zoo pairs, the published teacher
checkpoint format, the initialisation stage's LR, exact resume, and the data errors."""
import json
import os
import urllib.request

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from cocord_common.checkpoint import load_checkpoint
from cocord_common.errors import run_main
from distill import train_cifar
from distill.cifar_data import write_cifar100
from distill.models import build_model
from test_train_imagenet import _tensors_equal

CLASSES = 10
# tiny heads / queue / CRD negatives, batch 8, no workers, progress every step
TINY = ["-j", "0", "-b", "8", "--print-freq", "1", "--queue-size", "16", "--proj-dim", "32",
        "--proj-hidden-dim", "32", "--pred-dim", "16", "--crd-nce-k", "6", "--crd-feat-dim", "16"]


def published_checkpoint(path, arch, seed):
    """A teacher file in the layout CRD/RepDistiller publish: {'model', 'epoch', 'accuracy', 'optimizer'}."""
    torch.manual_seed(seed)
    model = build_model(arch, CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.save({"model": model.state_dict(), "epoch": 240, "accuracy": torch.tensor(73.5),
                "optimizer": opt.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """(data root with 10 classes x 4 train / 1 test images, {arch: published-format teacher file})."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (4 * CLASSES, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (CLASSES, 32, 32, 3), dtype=np.uint8)
    write_cifar100(root / "data", train, [i % CLASSES for i in range(4 * CLASSES)], test, list(range(CLASSES)),
                   fine_label_names=[f"c{i}" for i in range(CLASSES)])
    teachers = {arch: published_checkpoint(root / f"{arch}.pth", arch, seed)
                for seed, arch in enumerate(("resnet20", "vgg8"))}
    return str(root / "data"), teachers


def run(cifar, out, method, student, teacher=None, *extra):
    data, teachers = cifar
    argv = [data, "-a", student, "--method", method, "--output-dir", str(out)] + TINY + list(extra)
    if teacher is not None:
        argv += ["--teacher-arch", teacher, "--teacher-weights", teachers[teacher]]
    return train_cifar.main(argv)


def lines_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_defaults_are_the_cifar_recipe_of_cifar_pairs_yaml():
    args = train_cifar.parse_args(["DATA"])
    assert (args.epochs, args.batch_size, args.momentum, args.wd, args.schedule) == (240, 64, 0.9, 5e-4,
                                                                                     [150, 180, 210])
    assert args.queue_size == 2048 and args.lr is None and args.arch == "resnet8x4"
    # the same values as the benchmark's table (recipe, small-student LR, CoCoRD's CIFAR queue)
    with open(REPO / "configs" / "distill" / "cifar_pairs.yaml", encoding="utf-8") as f:
        table = yaml.safe_load(f)
    recipe = table["recipe"]
    assert (recipe["epochs"], recipe["batch-size"], recipe["momentum"], recipe["wd"], recipe["schedule"]) == \
           (args.epochs, args.batch_size, args.momentum, args.wd, args.schedule)
    assert train_cifar.default_lr(args) == recipe["lr"] == 0.05
    for student in table["small_student_lr"]["students"]:
        assert train_cifar.default_lr(train_cifar.parse_args(["DATA", "-a", student])) == 0.01
    for method in ("cocord", "cocord+kd"):
        assert table["method_flags"][method]["queue-size"] == args.queue_size
    # the other CIFAR method values the table states equal the flags' defaults
    for method, flags in table["method_flags"].items():
        for flag, value in flags.items():
            if flag not in ("queue-size", "w-ce", "w-kd"):
                assert getattr(args, flag.replace("-", "_")) == value, (method, flag)


# (method, teacher, student): same- and cross-family zoo pairs; MobileNetV2 students take lr 0.01
CASES = [("supervised", None, "resnet8"), ("kd", "resnet20", "resnet8"), ("cocord", "vgg8", "MobileNetV2"),
         ("crd", "resnet20", "resnet8"), ("at", "vgg8", "MobileNetV2"), ("fitnet", "resnet20", "resnet8")]


@pytest.mark.parametrize("method,teacher,student", CASES)
def test_methods_train_on_zoo_pairs_with_published_teacher_files(cifar, tmp_path, method, teacher, student):
    final = run(cifar, tmp_path, method, student, teacher, "--epochs", "1", "--max-steps-per-epoch", "2")
    lines = lines_of(tmp_path)
    assert [m["epoch"] for m in lines] == [1] and final == lines[-1] and lines[0]["step"] == 2
    assert lines[0]["lr"] == pytest.approx(0.01 if student == "MobileNetV2" else 0.05)
    assert 0 <= lines[0]["val/top1"] <= lines[0]["val/top5"] <= 100
    terms = [k for k in lines[0] if k.startswith("train/") and k != "train/loss"]
    assert abs(sum(lines[0][k] for k in terms) - lines[0]["train/loss"]) < 1e-4
    ckpt = load_checkpoint(str(tmp_path / "checkpoint_0001.pth"))
    assert (ckpt["arch"], ckpt["method"], ckpt["epoch"]) == (student, method, 1)
    backbone = torch.load(tmp_path / "student_backbone.pth", weights_only=True)
    build_model(student, CLASSES).load_state_dict(backbone)  # the zoo's own layout
    cfg = yaml.safe_load(open(tmp_path / "config.yaml"))
    assert cfg["epochs"] == 1 and cfg["batch_size"] == 8 and cfg["lr"] == lines[0]["lr"]
    assert "train: 40 images, 10 classes" in open(tmp_path / "log.txt").read()


def test_ft_initialisation_stage_uses_repdistillers_lr_for_cifar_resnets(cifar, tmp_path):
    run(cifar, tmp_path, "ft", "resnet8", "vgg8", "--epochs", "1", "--init-epochs", "1", "--max-steps-per-epoch", "1")
    lines = lines_of(tmp_path)
    assert [(m["epoch"], m.get("init_epoch"), m["lr"]) for m in lines] == [(0, 1, 0.01), (1, None, 0.05)]


@pytest.mark.slow
def test_interrupted_and_resumed_cifar_run_is_bit_exact(cifar, tmp_path):
    flags = ["--epochs", "2", "--max-steps-per-epoch", "2", "--seed", "3", "--keep-checkpoints", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(cifar, full, "crd", "resnet8", "resnet20", *flags)  # CRD draws its negatives from the global RNG
    os.makedirs(part)
    torch.save(load_checkpoint(str(full / "checkpoint_0001.pth")), part / "checkpoint_0001.pth")
    (part / "last_checkpoint").write_text("checkpoint_0001.pth")
    (part / "metrics.jsonl").write_text(open(full / "metrics.jsonl").readline())
    torch.manual_seed(123)
    run(cifar, part, "crd", "resnet8", "resnet20", *flags, "--resume", "auto")
    a, b = (load_checkpoint(str(d / "checkpoint_0002.pth")) for d in (full, part))
    for key in ("student", "method_state", "optimizer", "scheduler", "rng"):
        _tensors_equal(a[key], b[key], key)
    assert [m["epoch"] for m in lines_of(part)] == [1, 2]


def cli(argv, capsys):
    """(exit status, stderr) of the CLI run through the project's error convention."""
    with pytest.raises(SystemExit) as e:
        run_main(train_cifar.main, [str(a) for a in argv], prog="train_cifar.py")
    return e.value.code, capsys.readouterr().err


def test_missing_data_says_which_folder_to_create_or_download(tmp_path, capsys):
    code, err = cli([tmp_path / "none", "--method", "supervised", "-a", "resnet8", "--output-dir", tmp_path / "o"],
                    capsys)
    assert code == 2 and err.startswith("train_cifar.py: error: CIFAR-100 not found: ")
    assert f"{tmp_path / 'none' / 'cifar-100-python'} must hold the files train, test, meta" in err
    assert "--download" in err


def test_download_offline_is_a_clear_error_and_fetches_nothing(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, err = cli([tmp_path / "data", "--download", "--method", "supervised", "-a", "resnet8",
                     "--output-dir", tmp_path / "o"], capsys)
    assert code == 2 and "cannot download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in err
    assert f"create {tmp_path / 'data' / 'cifar-100-python'} from a copy of the archive" in err
    assert not os.path.exists(tmp_path / "data" / "cifar-100-python.tar.gz")


def test_teacher_with_other_classes_names_the_classifier(cifar, tmp_path, capsys):
    data, _ = cifar
    torch.manual_seed(0)
    wrong = tmp_path / "vgg8_100.pth"
    torch.save({"model": build_model("vgg8", 100).state_dict(), "epoch": 240}, wrong)
    code, err = cli([data, "--method", "kd", "-a", "resnet8", "--teacher-arch", "vgg8", "--teacher-weights", wrong,
                     "--output-dir", tmp_path / "o"] + TINY, capsys)
    assert code == 2 and "does not fit a CIFAR zoo vgg8 with 10 classes" in err
    assert "its classifier has 100 classes but the data has 10" in err


def test_unknown_arch_lists_the_zoo(tmp_path, capsys):
    code, err = cli([tmp_path, "--method", "supervised", "-a", "resnet9"], capsys)
    assert code == 2 and "unknown --arch 'resnet9'" in err and "resnet8x4" in err and "ShuffleV2" in err
