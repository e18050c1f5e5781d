"""`run_pipeline.py --cifar`: the CIFAR benchmark as pipeline stages (cocord_pipeline/cifar.py, cifar_report.py).

Fast tests build plans and reports on hand-written run folders; one slow test runs the real
distill/train_cifar.py stages on a tiny CIFAR-format folder it writes (teacher + 3 methods), reruns
(everything skipped) and resumes a cut distill stage."""
import json
import math
import os
import re

import numpy as np
import pytest
import yaml

from cocord_common.errors import UserError
from cocord_pipeline import cifar, cifar_report, cli, embedded_data
from conftest import REPO, shared_path
from distill.cifar_data import write_cifar100

CONFIGS = REPO / "configs" / "pipeline"
EVERY_METHOD = ["supervised", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "crd", "crd+kd",
                "cocord", "cocord+kd"]


def _cifar_folder(root, per_class=2, classes=10):
    rng = np.random.default_rng(0)
    n = per_class * classes
    labels = [i % classes for i in range(n)]
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    write_cifar100(root, images, labels, images, labels, fine_label_names=[f"c{i}" for i in range(classes)])
    return str(root)


def _paper_file(tmp_path, kd_value=12.5):
    """A small paper-tables file in the shared format: one same-family pair, three rows."""
    path = tmp_path / "paper.json"
    path.write_text(json.dumps({"cifar100_top1": {
        "same_family": {"pairs": ["resnet110->resnet32", "resnet56->resnet20"],
                        "rows": {"Teacher": [74.0, 72.5], "Student": [71.0, 69.5], "KD": [73.0, kd_value]}},
        "notes": "test"}}))
    return str(path)


def _plan(tmp_path, **kw):
    data = _cifar_folder(tmp_path / "data")
    cfg_path = str(CONFIGS / "cifar.yaml")
    return cifar.CifarPlan(cifar.load_cifar_config(cfg_path), cfg_path, str(tmp_path / "out"), data, **kw)


# ------------------------------------------------------------------------------------ configs and plans
def test_shipped_configs():
    full = cifar.load_cifar_config(str(CONFIGS / "cifar.yaml"))
    assert full["methods"] == EVERY_METHOD and full["pairs"] == ["all"] and full["trials"] == 3
    assert full["common_args"] == []  # the recipe is train_cifar.py's defaults
    tiny = cifar.load_cifar_config(str(CONFIGS / "cifar_tiny.yaml"))
    assert tiny["pairs"] == ["resnet20->resnet8"] and tiny["embedded"] == {"train_per_class": 20, "test_per_class": 30}
    assert tiny["methods"] == ["supervised", "kd", "cocord"]


def test_plan_of_two_pairs_sharing_a_student(tmp_path):
    plan = _plan(tmp_path, pairs=["resnet56->resnet20", "resnet110-resnet20"], methods=["supervised", "kd"], trials=2)
    assert [s.name for s in plan.stages] == [
        "teacher:resnet56", "teacher:resnet110",
        "distill:resnet20:supervised:t0", "distill:resnet56-resnet20:kd:t0", "distill:resnet110-resnet20:kd:t0",
        "distill:resnet20:supervised:t1", "distill:resnet56-resnet20:kd:t1", "distill:resnet110-resnet20:kd:t1",
        "report"]
    out = str(tmp_path / "out")
    kd = plan.commands["distill:resnet56-resnet20:kd:t1"]
    teacher = os.path.join(out, "teachers", "resnet56", "student_backbone.pth")
    assert kd[2:] == [str(tmp_path / "data"), "-a", "resnet20", "--method", "kd", "--seed", "1",
                      "--output-dir", os.path.join(out, "pairs", "resnet56-resnet20", "kd", "trial1"),
                      "--teacher-arch", "resnet56", "--teacher-weights", teacher,
                      "--kd-T", "4.0", "--w-ce", "0.1", "--w-kd", "0.9"]
    assert plan.commands["teacher:resnet56"][2:] == [
        str(tmp_path / "data"), "-a", "resnet56", "--method", "supervised", "--seed", "0",
        "--output-dir", os.path.join(out, "teachers", "resnet56")]
    # the Student row is one run per trial, listed under both pairs
    sup = os.path.join(out, "students", "resnet20", "supervised", "trial0")
    assert plan.runs["resnet56->resnet20"]["supervised"][0] == plan.runs["resnet110->resnet20"]["supervised"][0] == sup
    assert plan.select(only=["teacher"]) == plan.stages[:2]


def test_pair_groups_and_every_method(tmp_path):
    plan = _plan(tmp_path, pairs=["different"], methods=["all"])
    assert [p["key"] for p in plan.pairs] == ["vgg13->MobileNetV2", "ResNet50->MobileNetV2", "ResNet50->vgg8",
                                              "resnet32x4->ShuffleV1", "resnet32x4->ShuffleV2", "wrn_40_2->ShuffleV1"]
    assert plan.methods == EVERY_METHOD
    assert sum(s.name.startswith("teacher:") for s in plan.stages) == 4
    # every method maps to the paper's row of its name (cifar_pairs.yaml paper_rows)
    assert [cifar.paper_row(m) for m in EVERY_METHOD] == [
        "Student", "KD", "FitNet", "AT", "SP", "CC", "VID", "RKD", "PKT", "AB", "FT", "CRD", "CRD+KD", "CoCoRD",
        "CoCoRD+KD"]


def test_given_teachers(tmp_path):
    ckpt = tmp_path / "r56.pth"
    ckpt.write_bytes(b"x")
    plan = _plan(tmp_path, pairs=["resnet56->resnet20"], methods=["kd"], trials=1,
                 teacher_weights=[f"resnet56={ckpt}"])
    assert [s.name for s in plan.stages] == ["distill:resnet56-resnet20:kd:t0", "report"]
    kd = plan.stages[0]
    assert kd.argv[kd.argv.index("--teacher-weights") + 1] == str(ckpt) and str(ckpt) in kd.inputs
    with pytest.raises(UserError, match=r"teacher file .*missing\.pth does not exist"):
        _plan(tmp_path, pairs=["resnet56->resnet20"], teacher_weights=[f"resnet56={tmp_path / 'missing.pth'}"])
    with pytest.raises(UserError, match="no selected pair has teacher 'vgg13'"):
        _plan(tmp_path, pairs=["resnet56->resnet20"], teacher_weights=[f"vgg13={ckpt}"])
    with pytest.raises(UserError, match="write ARCH=FILE"):
        _plan(tmp_path, pairs=["resnet56->resnet20"], teacher_weights=[str(ckpt)])
    # the config's mapping, with a placeholder
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"_BASE_: {CONFIGS / 'cifar.yaml'}\nteacher_weights: {{resnet56: '{{out}}/../r56.pth'}}\n")
    plan = cifar.CifarPlan(cifar.load_cifar_config(str(cfg_path)), str(cfg_path), str(tmp_path / "out"),
                           str(tmp_path / "data"), pairs=["resnet56->resnet20"], methods=["kd"])
    assert plan.teachers == {"resnet56": str(ckpt)}


def _config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"_BASE_: {CONFIGS / 'cifar.yaml'}\n" + text)
    return cifar.load_cifar_config(str(path)), str(path)


@pytest.mark.parametrize("key,match", [("pairs", "no pairs selected"), ("methods", "no methods selected")])
def test_an_empty_list_in_the_config_selects_nothing(tmp_path, key, match):
    """`pairs: []` is an error, not every pair; an absent or null key is the default (all)."""
    data = _cifar_folder(tmp_path / "data")
    cfg, path = _config(tmp_path, f"{key}: []\n")
    with pytest.raises(UserError, match=re.escape(f"{path}: {key}: {match}")):
        cifar.CifarPlan(cfg, path, str(tmp_path / "out"), data)
    cfg, path = _config(tmp_path, f"{key}: null\n")
    plan = cifar.CifarPlan(cfg, path, str(tmp_path / "out"), data)
    assert len(plan.pairs) == 13 and len(plan.methods) == 15


@pytest.mark.parametrize("text,message", [
    ("trials: three\n", "trials must be an integer, got 'three'"),
    ("trials: 1.5\n", "trials must be an integer, got 1.5"),
    ("seed: true\n", "seed must be an integer, got True"),
    ("embedded: {train_per_class: 2x, test_per_class: 3}\n", "embedded.train_per_class must be an integer, got '2x'"),
])
def test_a_number_of_the_config_that_is_no_integer_names_file_and_key(tmp_path, text, message):
    cfg, path = _config(tmp_path, text)
    with pytest.raises(UserError) as e:
        cifar.CifarPlan(cfg, path, str(tmp_path / "out"), "embedded", pairs=["resnet56->resnet20"], methods=["kd"])
    assert str(e.value) == f"{path}: {message}"
    cfg, path = _config(tmp_path, "seed: '7'\ntrials: 2\n")  # a quoted number is read as on a command line
    plan = cifar.CifarPlan(cfg, path, str(tmp_path / "out"), "embedded", pairs=["resnet56->resnet20"], methods=["kd"])
    assert (plan.seed, plan.trials) == (7, 2)


@pytest.mark.parametrize("argv,match", [
    (["--pairs", "resnet56->resnet21"], "unknown model 'resnet21' in pair 'resnet56->resnet21'"),
    (["--pairs", "resnet56"], "'resnet56' is not a pair"),
    (["--methods", "kd", "dino"], "unknown method 'dino'"),
    (["--teacher-weights", "resnet56=/nonexistent/t.pth"], "teacher file /nonexistent/t.pth does not exist"),
    (["--trials", "0"], "must be >= 1"),
])
def test_bad_inputs_are_user_errors(tmp_path, capsys, argv, match):
    data = _cifar_folder(tmp_path / "data")
    with pytest.raises(SystemExit) as e:
        cli.main(["--cifar", data, "--output-dir", str(tmp_path / "out"), "--pairs", "resnet56->resnet20", "--list"]
                 + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and match in err and "Traceback" not in err, err


def test_data_without_cifar_folder_and_misplaced_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--cifar", str(tmp_path), "--list"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--cifar {tmp_path}: CIFAR-100 not found: {tmp_path}/cifar-100-python must hold " \
        "the files train, test, meta" in err and "tar xzf" in err and "download_cifar100" in err
    with pytest.raises(SystemExit):
        cli.parse_args(["--methods", "kd"])
    assert "--methods belongs to the CIFAR benchmark: add --cifar DATA" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--cifar", "embedded", "--quick"])


def test_cifar_runs_default_to_their_own_output_folder():
    """The CIFAR benchmark never writes into the transfer pipeline's (the demo's) default folder."""
    assert cli.parse_args(["--cifar", "embedded"]).output_dir == "output/cifar"
    assert cli.parse_args([]).output_dir == "output/pipeline"
    assert cli.parse_args(["--cifar", "embedded", "--output-dir", "x"]).output_dir == "x"


def _zscore_rows(a):
    a = a - a.mean(1, keepdims=True)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_embedded_digits_are_what_docs_cifar_md_says(tmp_path):
    """docs/cifar.md: 20 train / 30 test MNIST digits per class (10 classes), padded to 32x32, bright
    coloured ink on a dark coloured background with Gaussian noise (sigma 10); the seed decides which."""
    from distill.cifar_data import load_cifar_pickle
    root = tmp_path / "d"
    manifest = embedded_data.write_digits_cifar(str(root))  # the defaults the docs name
    assert manifest["counts"] == {"train": 200, "test": 300}
    assert json.loads((root / "cifar_digits.json").read_text()) == manifest
    assert load_cifar_pickle(root / "cifar-100-python" / "meta")["fine_label_names"] == [str(d) for d in range(10)]
    mnist, mnist_labels = embedded_data.load_mnist_5k()
    padded = np.pad(mnist, ((0, 0), (2, 2), (2, 2))).astype(np.float64) / 255  # 1: ink, 0: background
    sources = {}
    for split, per_class in (("train", 20), ("test", 30)):
        content = load_cifar_pickle(root / "cifar-100-python" / split)
        images = content["data"].reshape(-1, 3, 32, 32).astype(np.float64)
        labels = np.array(content["fine_labels"])
        assert content["data"].dtype == np.uint8 and np.bincount(labels).tolist() == [per_class] * 10
        # each image is one MNIST digit: the best-correlated padded digit (grey level), of the same label
        corr = _zscore_rows(images.mean(1).reshape(len(images), -1)) @ _zscore_rows(padded.reshape(len(padded), -1)).T
        best = corr.argmax(1)
        assert corr.max(1).min() > 0.95 and (mnist_labels[best] == labels).all()
        sources[split] = best
        ink, background = padded[best] >= 0.9, padded[best] == 0
        per_channel = [np.stack([(images[:, c] * m).sum((1, 2)) / m.sum((1, 2)) for c in range(3)], 1)
                       for m in (ink, background)]
        assert (per_channel[0] > 140).all() and (per_channel[1] < 85).all()  # ink 160..255, background 0..80
        assert np.median(np.ptp(per_channel[0], 1)) > 10  # coloured: the channels differ
        noise = [images[i, c][background[i]].std() for i in range(len(images)) for c in range(3)
                 if per_channel[1][i, c] > 30]  # away from the clip at 0
        assert 9.5 < np.median(noise) < 10.5
    every = np.concatenate([sources["train"], sources["test"]])
    assert len(set(every.tolist())) == 500  # no digit twice, train and test disjoint
    # the seed decides the digits: the same seed writes the same bytes, another seed other digits
    again, other = tmp_path / "again", tmp_path / "other"
    embedded_data.write_digits_cifar(str(again))
    embedded_data.write_digits_cifar(str(other), seed=1)
    for split in ("train", "test"):
        assert (again / "cifar-100-python" / split).read_bytes() == (root / "cifar-100-python" / split).read_bytes()
    assert (other / "cifar-100-python" / "train").read_bytes() != (root / "cifar-100-python" / "train").read_bytes()


def test_embedded_digits_in_cifar_format(tmp_path):
    from distill.cifar_data import CifarTestSet, CifarTrainSet
    root = str(tmp_path / "d")
    m = embedded_data.write_digits_cifar(root, train_per_class=3, test_per_class=2, seed=1)
    assert m["counts"] == {"train": 30, "test": 20}
    train, test = CifarTrainSet(root), CifarTestSet(root)
    assert len(train) == 30 and len(test) == 20 and train.classes == [str(d) for d in range(10)]
    assert sorted(np.bincount(train.targets).tolist()) == [3] * 10  # three digits of each class
    assert embedded_data.digits_cifar_complete(root, 3, 2, 1)
    assert not embedded_data.digits_cifar_complete(root, 3, 2, 0)  # another seed: rebuilt


# ------------------------------------------------------------------------------------ the report
def _fake_run(folder, top1s, epochs=240):
    """A finished train_cifar.py folder (cifar.yaml: 240 epochs): the files stages.distill_state looks at,
    an eval line for each of the last epochs."""
    os.makedirs(folder, exist_ok=True)
    for name in (f"checkpoint_{epochs:04d}.pth", "student_backbone.pth"):
        open(os.path.join(folder, name), "w").close()
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for e, t in enumerate(top1s, epochs - len(top1s) + 1):
            f.write(json.dumps({"epoch": e, "train/loss": 3.0 / e, "val/top1": t}) + "\n")


def test_report_puts_the_paper_beside_each_cell(tmp_path):
    paper = _paper_file(tmp_path, kd_value=70.25)
    plan = _plan(tmp_path, pairs=["resnet56->resnet20", "resnet20->resnet8"], methods=["supervised", "kd", "sp"],
                 trials=2, paper_tables=paper)
    for pair in ("resnet56->resnet20", "resnet20->resnet8"):
        for m, finals in (("supervised", [60.0, 62.0]), ("kd", [70.0, 71.0])):
            for k, v in enumerate(finals):
                _fake_run(plan.runs[pair][m][k], [10.0, v])
    _fake_run(os.path.join(plan.out, "teachers", "resnet56"), [50.0, 72.0])
    cifar_report.write_report(plan)
    res = json.loads(open(os.path.join(plan.out, "results.json")).read())
    cells = {(c["pair"], c["method"]): c for c in res["cells"]}
    kd = cells[("resnet56->resnet20", "kd")]
    assert kd["trials"] == [70.0, 71.0] and kd["paper"] == 70.25 and kd["paper_row"] == "KD"
    assert kd["top1"]["mean"] == 70.5 and abs(kd["top1"]["std"] - math.sqrt(0.5)) < 1e-12
    assert abs(kd["delta"] - 0.25) < 1e-12  # 70.5 - 70.25
    assert cells[("resnet56->resnet20", "supervised")]["paper"] == 69.5
    assert cells[("resnet56->resnet20", "sp")]["top1"] is None  # not run: no paper row in the file either
    assert cells[("resnet56->resnet20", "sp")]["missing"] == 2
    other = cells[("resnet20->resnet8", "kd")]
    assert other["paper"] is None and other["delta"] is None and other["top1"]["mean"] == 70.5
    assert res["teachers"]["resnet56"]["top1"] == 72.0 and res["teachers"]["resnet56"]["paper"] == {
        "resnet56->resnet20": 72.5}
    md = open(os.path.join(plan.out, "report.md")).read()
    assert "| `kd` | KD | 70.50 ± 0.71 | 70.25 | +0.25 | +9.50 | — |" in md  # vs Student: 70.5 - 61.0
    assert "no paper value exists for resnet20->resnet8" in md
    assert "The paper's rows" not in md  # every row of this small file is one of ours
    for key in ("resnet56-resnet20", "resnet20-resnet8"):
        for kind in ("top1", "curves"):
            assert os.path.getsize(os.path.join(plan.out, "plots", f"cifar_{kind}_{key}.png")) > 0


def test_report_without_paper_tables_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr("cocord_pipeline.report.DEFAULT_PAPER_TABLES", str(tmp_path / "absent.json"))
    plan = _plan(tmp_path, pairs=["resnet56->resnet20"], methods=["kd"])
    _fake_run(plan.runs["resnet56->resnet20"]["kd"][0], [1.0, 2.0])
    cifar_report.write_report(plan)
    md = open(os.path.join(plan.out, "report.md")).read()
    assert f"The paper's numbers are not shown: {tmp_path / 'absent.json'} is absent" in md
    res = json.loads(open(os.path.join(plan.out, "results.json")).read())
    assert all(c["paper"] is None for c in res["cells"])


def test_report_leaves_out_initialisation_epochs_and_writes_infinity_as_null(tmp_path):
    plan = _plan(tmp_path, pairs=["resnet56->resnet20"], methods=["ab"], trials=2)
    first, second = plan.runs["resnet56->resnet20"]["ab"]
    _fake_run(first, [30.0, 40.0])
    with open(os.path.join(first, "metrics.jsonl")) as f:
        main = f.read()
    with open(os.path.join(first, "metrics.jsonl"), "w") as f:  # ab's initialisation epochs come first
        for k in (1, 2):
            f.write(json.dumps({"epoch": 0, "init_epoch": k, "train/loss": 9.0, "val/top1": 99.0}) + "\n")
        f.write(main)
    _fake_run(second, [50.0])
    with open(os.path.join(second, "metrics.jsonl"), "w") as f:  # a diverged run: an infinite loss
        f.write(json.dumps({"epoch": 240, "train/loss": float("inf"), "val/top1": 50.0}) + "\n")
    res = cifar_report.write_report(plan)
    with open(res["results"]) as f:
        cell = json.load(f)["cells"][0]  # strict JSON: Infinity would not parse
    assert cell["trials"] == [40.0, 50.0] and cell["final_train_loss"] == [3.0 / 240, None]
    assert cifar_report.run_result(first, plan.stage_of(first))["curve"] == {
        "epoch": [239, 240], "val/top1": [30.0, 40.0], "train/loss": [3.0 / 239, 3.0 / 240]}
    # a run cut in its initialisation stage is not done (its stage's check), not a crash of the report
    # (report.classification_result, which reads it, has a clear error for it: tests/test_pipeline.py)
    with open(os.path.join(second, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"epoch": 0, "init_epoch": 1, "val/top1": 5.0}) + "\n")
    with open(cifar_report.write_report(plan)["results"]) as f:
        cell = json.load(f)["cells"][0]
    assert cell["trials"] == [40.0] and cell["missing"] == 1


def test_the_real_paper_tables_reach_every_paper_cell(tmp_path):
    path = shared_path("reference", "paper_tables.json")
    with open(path) as f:
        same = json.load(f)["cifar100_top1"]["same_family"]
    i = same["pairs"].index("resnet32x4->resnet8x4")
    expected = {"cocord+kd": same["rows"]["CoCoRD+KD"][i], "crd": same["rows"]["CRD"][i],
                "supervised": same["rows"]["Student"][i]}
    values, file, note = cifar_report.paper_cifar_values({"paper_tables": str(path)})
    assert note is None
    for m, v in expected.items():
        assert values[("resnet32x4->resnet8x4", cifar.paper_row(m))] == v
    # rows without a method of ours are named in the report
    plan = _plan(tmp_path, pairs=["resnet32x4->resnet8x4"], methods=["kd"], trials=1, paper_tables=str(path))
    cifar_report.write_report(plan)
    assert "The paper's rows LCKT, WCoRD have no method in distill/methods" in open(
        os.path.join(plan.out, "report.md")).read()


# ------------------------------------------------------------------------------------ the real stages
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar_pipeline")
    data = _cifar_folder(tmp / "data")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "_BASE_": str(CONFIGS / "cifar_tiny.yaml"),
        "common_args": ["-b", 10, "--epochs", 2, "-j", 0, "--print-freq", 100, "--queue-size", 10,
                        "--crd-nce-k", 10, "--proj-dim", 16, "--proj-hidden-dim", 16, "--pred-dim", 8]}))
    paper = _paper_file(tmp, kd_value=12.5)
    argv = ["--cifar", data, "--config", str(cfg), "--output-dir", str(tmp / "out"), "--pairs", "resnet56->resnet20",
            "--methods", "supervised", "kd", "cocord", "--paper-tables", paper, "--quiet", "--jobs", "2",
            "--threads", "1"]
    return tmp / "out", argv


def _final(folder):
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return rows[-1]


@pytest.mark.slow
def test_tiny_run_reports_reruns_and_resumes(tiny_run, capsys):
    out, argv = tiny_run
    assert cli.main(argv) == 0
    res = json.loads(open(out / "results.json").read())
    kd_dir = out / "pairs" / "resnet56-resnet20" / "kd" / "trial0"
    final = _final(kd_dir)
    kd = next(c for c in res["cells"] if c["method"] == "kd")
    assert kd["trials"] == [final["val/top1"]] and kd["paper"] == 12.5
    assert abs(kd["delta"] - (final["val/top1"] - 12.5)) < 1e-9
    assert [c["method"] for c in res["cells"]] == ["supervised", "kd", "cocord"]
    assert res["teachers"]["resnet56"]["top1"] == _final(out / "teachers" / "resnet56")["val/top1"]
    capsys.readouterr()

    # a rerun skips every stage but the report
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("skipped, complete") == 4
    assert json.loads(open(out / "runs.json").read())[-1]["ran"] == ["report"]

    # cut the kd run after its first epoch: the next run resumes it and ends where it ended
    os.remove(kd_dir / "checkpoint_0002.pth")
    (kd_dir / "last_checkpoint").write_text("checkpoint_0001.pth")
    lines = open(kd_dir / "metrics.jsonl").read().splitlines()
    (kd_dir / "metrics.jsonl").write_text("\n".join(lines[:1]) + "\n")
    assert cli.main(argv) == 0
    log = capsys.readouterr().out
    assert "distill:resnet56-resnet20:kd:t0: running" in log and "resuming from checkpoint_0001.pth" in log
    assert json.loads(open(out / "runs.json").read())[-1]["ran"] == ["distill:resnet56-resnet20:kd:t0", "report"]
    resumed = _final(kd_dir)
    assert resumed["epoch"] == 2 and resumed["train/loss"] == final["train/loss"]
    assert resumed["val/top1"] == final["val/top1"]
