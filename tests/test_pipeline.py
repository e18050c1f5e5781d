"""cocord_pipeline (tools/run_pipeline.py): configs, stage selection, completeness from outputs, the report.

These run in seconds on hand-written output files in the stage scripts' formats (I3, I7); the
end-to-end run of the real stage scripts is tests/test_pipeline_e2e.py.
"""
import json
import os
import time

import pytest
import yaml

from cocord_pipeline import cli, config, report, stages
from cocord_pipeline.runner import Runner, StageFailed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = os.path.join(REPO, "configs", "pipeline")


def _cfg(name="quick.yaml"):
    return config.load_pipeline_config(os.path.join(CONFIGS, name))


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["embedded.yaml", "quick.yaml", "real.yaml", "real_r18.yaml"])
def test_shipped_configs_load_and_validate(name):
    cfg = _cfg(name)
    config.validate_config(cfg, name)
    for ds in cfg["transfer"]["datasets"].values():
        assert os.path.isfile(os.path.join(REPO, ds["config"])), ds["config"]
    for f in (cfg["distill"].get("method_configs") or {}).values():
        assert os.path.isfile(os.path.join(REPO, f)), f


def test_base_merge():
    quick, emb = _cfg("quick.yaml"), _cfg("embedded.yaml")
    assert quick["data"]["quick"] is True and emb["data"]["quick"] is False
    assert quick["distill"]["methods"] == emb["distill"]["methods"]  # inherited
    assert quick["transfer"]["datasets"] == emb["transfer"]["datasets"]
    r18 = _cfg("real_r18.yaml")
    assert (r18["distill"]["arch"], r18["distill"]["teacher_arch"]) == ("resnet18", "resnet34")
    assert r18["transfer"]["trials"] == 5 and r18["distill"]["teacher_weights"] == "IMAGENET1K_V1"  # inherited


def test_unknown_key_is_refused(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("_BASE_: " + os.path.join(CONFIGS, "quick.yaml") + "\ndistill:\n  epochz: 3\n")
    with pytest.raises(ValueError, match=r"unknown key 'distill.epochz'"):
        config.load_pipeline_config(str(p))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["distill"].update(methods=["kd", "dino"]), "unknown method 'dino'"),
    (lambda c: c["transfer"].update(trials=0), "transfer.trials must be an integer >= 1"),
    (lambda c: c["transfer"].update(engine="mmdet"), "transfer.engine"),
    (lambda c: c["transfer"]["datasets"]["voc"].update(opts=["SOLVER.MAX_ITER"]), "KEY VALUE pairs"),
])
def test_bad_values_are_refused(edit, match):
    cfg = _cfg()
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        config.validate_config(cfg, "quick.yaml")


def test_cli_switches(tmp_path):
    args = cli.parse_args(["--quick", "--trials", "3", "--cocord-kd"])
    cfg, path = cli.resolve_config(args)
    assert path.endswith("quick.yaml") and cfg["transfer"]["trials"] == 3
    assert cfg["distill"]["methods"][-1] == "cocord+kd"
    # the real protocol: --imagenet switches to the paper's configs
    (tmp_path / "train").mkdir()
    cfg, path = cli.resolve_config(cli.parse_args(["--imagenet", str(tmp_path)]))
    assert path.endswith("real.yaml") and cfg["data"] == {"kind": "imagenet", "imagenet": str(tmp_path)}
    pipe = stages.Plan(cfg, path, str(tmp_path / "out"))
    names = [s.name for s in pipe.stages]
    assert "data" not in names and "teacher" not in names  # pre-trained torchvision teacher
    kd = next(s for s in pipe.stages if s.name == "distill:kd")
    assert kd is not None
    with pytest.raises(FileNotFoundError, match="--imagenet"):
        cli.resolve_config(cli.parse_args(["--imagenet", str(tmp_path / "nope")]))


@pytest.mark.parametrize("flags,pair,distill_cfg,voc_cfg", [
    ([], ("resnet101", "resnet50"), "r101_r50_cocord.yaml", "voc_r50.yaml"),  # the paper's transfer setting
    (["--config", os.path.join(CONFIGS, "real_r18.yaml")], ("resnet34", "resnet18"), "r34_r18_cocord.yaml",
     "voc_r18_fpn.yaml"),
])
def test_real_protocol_commands(tmp_path, flags, pair, distill_cfg, voc_cfg):
    (tmp_path / "train").mkdir()
    cfg, path = cli.resolve_config(cli.parse_args(["--imagenet", str(tmp_path)] + flags))
    pipe = stages.Plan(cfg, path, str(tmp_path / "out"))
    argv = pipe.commands["distill:cocord"]
    assert argv[2] == str(tmp_path) and "--config" in argv
    assert argv[argv.index("-a") + 1] == pair[1]
    assert argv[argv.index("--teacher-arch") + 1] == pair[0]
    assert argv[argv.index("--config") + 1].endswith("configs/distill/" + distill_cfg)
    assert argv[argv.index("--teacher-weights") + 1] == "IMAGENET1K_V1"
    t = pipe.commands["transfer:voc:cocord"]
    assert t[t.index("--config-file") + 1].endswith("configs/" + voc_cfg)
    assert t[t.index("MODEL.WEIGHTS") + 1].endswith("weights/cocord.pkl")
    assert t[t.index("--trials") + 1] == "5"
    r = pipe.commands["transfer:coco:random"]
    assert r[r.index("MODEL.WEIGHTS") + 1] == ""


# ------------------------------------------------------------------------------------ selection
def _pipe(tmp_path, name="quick.yaml"):
    return stages.Plan(_cfg(name), name, str(tmp_path / "out"))


def _run(plan, **kw):
    Runner(plan, log=lambda *a: None).run(**kw)


def test_stage_graph_and_selection(tmp_path):
    pipe = _pipe(tmp_path)
    names = [s.name for s in pipe.stages]
    assert names[:3] == ["data", "teacher", "distill:supervised"]
    assert {"convert:cocord", "transfer:voc:random", "transfer:coco:crd"} <= set(names)
    assert names[-1] == "report"
    assert [s.name for s in pipe.select(only=["convert"])] == [f"convert:{m}" for m in
                                                               ("supervised", "kd", "crd", "cocord")]
    assert [s.name for s in pipe.select(only=["distill:kd", "report"])] == ["distill:kd", "report"]
    sel = pipe.select(from_stage="transfer")
    assert sel[0].name == "transfer:voc:random" and sel[-1].name == "report"
    with pytest.raises(ValueError, match="no such stage or group"):
        pipe.select(only=["distil"])
    with pytest.raises(ValueError, match="no such stage or group"):
        pipe.select(from_stage="nope")


def test_missing_input_names_its_producer(tmp_path):
    pipe = _pipe(tmp_path)
    with pytest.raises(StageFailed, match=r"run stage 'distill:kd' first"):
        _run(pipe, only=["convert:kd"])


# ------------------------------------------------------------------------------------ completeness
def _fake_distill(folder, epochs, top1=50.0, final=True):
    """Files a finished distill run leaves (I3 layout); contents do not matter to the driver."""
    os.makedirs(folder, exist_ok=True)
    done = epochs if final else epochs - 1
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for e in range(1, done + 1):
            f.write(json.dumps({"epoch": e, "lr": 0.1, "train/loss": 3.0 - e * 0.1,
                                "val/top1": top1 + e, "val/top5": 90.0 + e}) + "\n")
    for e in range(max(done - 1, 1), done + 1):
        open(os.path.join(folder, f"checkpoint_{e:04d}.pth"), "wb").close()
    with open(os.path.join(folder, "last_checkpoint"), "w") as f:
        f.write(f"checkpoint_{done:04d}.pth")
    open(os.path.join(folder, "student_backbone.pth"), "wb").close()
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump({"epochs": epochs}, f)


def _fake_transfer(folder, trials, aps):
    for k in range(trials):
        t = folder if trials == 1 else os.path.join(folder, f"trial{k}")
        os.makedirs(t, exist_ok=True)
        ap = aps[k]
        with open(os.path.join(t, "metrics.json"), "w") as f:
            for it in (9, 19):
                f.write(json.dumps({"iteration": it, "total_loss": 2.0 - it / 20, "lr": 0.01}) + "\n")
            f.write(json.dumps({"iteration": 19, "bbox/AP": ap, "bbox/AP50": ap + 20,
                                "bbox/AP75": ap - 5}) + "\n")
        open(os.path.join(t, "model_final.pth"), "wb").close()
    if trials > 1:
        with open(os.path.join(folder, "trials_summary.json"), "w") as f:
            json.dump({"trials": aps}, f)


def test_distill_state_from_files(tmp_path):
    d = str(tmp_path / "run")
    assert stages.distill_state(d, 3) == (False, "no checkpoint_0003.pth yet (have none)")
    _fake_distill(d, 3, final=False)
    ok, why = stages.distill_state(d, 3)
    assert not ok and "checkpoint_0002.pth" in why
    _fake_distill(d, 3)
    assert stages.distill_state(d, 3)[0]
    assert stages.distill_state(d, None)[0]  # epochs read from the run's own config.yaml
    assert not stages.distill_state(d, 5)[0]  # asked for more epochs than were run
    # a final checkpoint without the final metrics line (crash between the two writes)
    lines = open(os.path.join(d, "metrics.jsonl")).read().splitlines()[:-1]
    open(os.path.join(d, "metrics.jsonl"), "w").write("\n".join(lines) + "\n")
    ok, why = stages.distill_state(d, 3)
    assert not ok and "final-epoch" in why


def test_transfer_state_from_files(tmp_path):
    d = str(tmp_path / "t")
    _fake_transfer(d, 2, [10.0, 12.0])
    assert stages.transfer_state(d, 2) == (True, "AP 10.0, 12.0")
    os.remove(os.path.join(d, "trial1", "model_final.pth"))
    assert stages.transfer_state(d, 2) == (False, "trial 1 has no model_final.pth yet")
    single = str(tmp_path / "s")
    _fake_transfer(single, 1, [7.0])
    assert stages.transfer_state(single, 1)[0]


def test_prune_intermediate_checkpoints_of_finished_trials_only(tmp_path):
    d = str(tmp_path / "t")
    for k, last in ((0, "model_final.pth"), (1, "model_0000009.pth")):  # trial 1 was cut after iteration 9
        t = os.path.join(d, f"trial{k}")
        os.makedirs(t)
        for name in ("model_0000004.pth", "model_0000009.pth", "model_final.pth", "metrics.json"):
            with open(os.path.join(t, name), "wb") as f:
                f.write(b"x" * 100)
        with open(os.path.join(t, "last_checkpoint"), "w") as f:
            f.write(last)
    assert stages.prune_intermediate_checkpoints(d, 2) == 200
    assert sorted(os.listdir(os.path.join(d, "trial0"))) == ["last_checkpoint", "metrics.json", "model_final.pth"]
    assert len(os.listdir(os.path.join(d, "trial1"))) == 5  # its resume still needs model_0000009.pth
    assert stages.prune_intermediate_checkpoints(str(tmp_path / "absent"), 1) == 0


def test_complete_stages_are_skipped_and_stale_ones_rerun(tmp_path):
    pipe = _pipe(tmp_path)
    out = pipe.out
    _fake_distill(os.path.join(out, "distill", "teacher"), 1)
    _fake_distill(os.path.join(out, "distill", "kd"), 1)
    ran = []
    for s in pipe.stages:
        s.run = (lambda s: (lambda stage, runner: ran.append(s.name)))(s)
    teacher = next(s for s in pipe.stages if s.name == "teacher")
    kd = next(s for s in pipe.stages if s.name == "distill:kd")
    teacher.inputs = []  # the embedded data is not built in this test
    kd.inputs = [p for p in kd.inputs if "manifest" not in p]
    _run(pipe, only=["teacher", "distill:kd"])
    assert ran == []  # both complete
    # the teacher was re-trained after the student: the student is stale
    future = time.time() + 5
    os.utime(os.path.join(out, "distill", "teacher", "student_backbone.pth"), (future, future))
    ok, why = kd.status()
    assert not ok and why.startswith("stale")
    with pytest.raises(StageFailed, match="outputs are incomplete"):
        _run(pipe, only=["teacher", "distill:kd"])  # our fake run writes nothing
    assert ran == ["distill:kd"]
    # ... afresh: the stale run was moved aside, never resumed
    assert os.path.isdir(os.path.join(out, "distill", "kd.prev"))
    # --force re-runs a complete stage and keeps its previous output beside it
    ran.clear()
    with pytest.raises(StageFailed):
        _run(pipe, only=["teacher"], force=True)
    assert ran == ["teacher"] and os.path.isdir(os.path.join(out, "distill", "teacher.prev"))


# ------------------------------------------------------------------------------------ report
def _fake_outputs(out):
    """Every output file of a finished quick.yaml run (2 epochs, 2 trials) with known numbers."""
    _fake_distill(os.path.join(out, "distill", "teacher"), 2, top1=80.0)
    aps = {"random": [1.0, 3.0], "supervised": [10.0, 11.0], "kd": [12.0, 12.0], "crd": [13.0, 15.0],
           "cocord": [20.0, 24.0]}
    for i, m in enumerate(("supervised", "kd", "crd", "cocord")):
        _fake_distill(os.path.join(out, "distill", m), 2, top1=60.0 + i)
    for ds in ("voc", "coco"):
        for init, a in aps.items():
            _fake_transfer(os.path.join(out, "transfer", ds, init), 2, [x + (ds == "coco") for x in a])


# the CoCoRD row of _fake_outputs: top-1 60+3+2, AP mean/std of (20, 24) on voc and (21, 25) on coco
COCORD_ROW = ("| CoCoRD (resnet18) | 65.00 | 92.00 | 22.0 ± 2.8 | 42.0 ± 2.8 | 17.0 ± 2.8 |"
              " 23.0 ± 2.8 | 43.0 ± 2.8 | 18.0 ± 2.8 |")


def test_report_numbers_come_from_metrics_files(tmp_path):
    pipe = _pipe(tmp_path)
    out = pipe.out
    _fake_outputs(out)
    res = report.write_report(out, pipe.describe())
    results = json.load(open(res["results"]))
    rows = {r["init"]: r for r in results["rows"]}
    assert rows["teacher"]["classification"]["top1"] == 82.0
    assert rows["cocord"]["classification"]["top1"] == 65.0
    assert "classification" not in rows["random"]
    assert rows["cocord"]["detection"]["voc"]["AP"]["mean"] == pytest.approx(22.0)
    assert rows["cocord"]["detection"]["voc"]["AP"]["std"] == pytest.approx(2.8284271, rel=1e-6)
    assert rows["crd"]["detection"]["coco"]["AP50"]["mean"] == pytest.approx(35.0)
    assert rows["kd"]["detection"]["voc"]["sources"][1].endswith("transfer/voc/kd/trial1/metrics.json")
    md = open(res["report"]).read()
    assert COCORD_ROW in md
    assert "| Random init | — | — | 2.0 ± 1.4 |" in md
    assert "4/4 pre-trained backbones beat random init" in md
    assert "cannot" in md  # says what the small scale cannot show
    for p in res["plots"].values():
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a cut metrics line is an error naming the file, not a silently wrong table
    with open(os.path.join(out, "transfer", "voc", "kd", "trial0", "metrics.json"), "a") as f:
        f.write('{"iteration": 3, "bbox/AP"')
    with pytest.raises(ValueError, match=r"kd/trial0/metrics.json:4: not a JSON line"):
        report.write_report(out, pipe.describe())


def test_classification_result_reads_the_main_schedule_only(tmp_path):
    """ab / ft write their initialisation epochs (`init_epoch`, epoch 0) before the main ones."""
    path = tmp_path / "metrics.jsonl"
    init = [{"epoch": 0, "init_epoch": k, "train/loss": 5.0, "val/top1": 90.0} for k in (1, 2)]
    main = [{"epoch": e, "train/loss": 1.0 / e, "val/top1": 10.0 * e, "val/top5": 20.0 * e} for e in (1, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in init + main))
    res = report.classification_result(str(tmp_path))
    assert (res["top1"], res["top5"], res["epoch"]) == (20.0, 40.0, 2)
    assert res["curve"] == {"epoch": [1, 2], "val/top1": [10.0, 20.0], "train/loss": [1.0, 0.5]}
    path.write_text("".join(json.dumps(r) + "\n" for r in init))  # cut before its main schedule
    with pytest.raises(ValueError, match=f"{path} has no epoch with val/top1; re-run that distill stage"):
        report.classification_result(str(tmp_path))


def test_results_json_holds_no_non_finite_number():
    nested = {"a": [1.5, float("nan"), {"b": float("inf")}], "c": -float("inf"), "d": 2, "e": "x", "f": None}
    cleaned = report.non_finite_to_none(nested)
    assert cleaned == {"a": [1.5, None, {"b": None}], "c": None, "d": 2, "e": "x", "f": None}
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == cleaned


def test_report_cli_rewrites_the_report_alone(tmp_path, capsys):
    """tools/pipeline_report.py (cli.report_main): the report stage from the files, nothing run or recorded."""
    out = tmp_path / "out"
    _fake_outputs(str(out))
    assert cli.report_main(["--quick", "--output-dir", str(out)]) == 0
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
    assert COCORD_ROW in (out / "report.md").read_text()
    assert not (out / "runs.json").exists() and not (out / "logs").exists()
    # a missing run is a user error naming its file: `prog: error: …`, exit status 2
    os.remove(out / "transfer" / "coco" / "crd" / "trial1" / "metrics.json")
    with pytest.raises(SystemExit) as e:
        cli.report_main(["--quick", "--output-dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert ": error: " in err
    assert "crd/trial1/metrics.json is missing; re-run that transfer stage" in err


def test_cut_metrics_line_leaves_the_stage_incomplete(tmp_path):
    """The completeness checks skip a line cut by a crash (the stage is then judged by what is missing),
    where the report refuses it."""
    d = str(tmp_path / "run")
    _fake_distill(d, 3)
    lines = open(os.path.join(d, "metrics.jsonl")).read().splitlines()
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # the final epoch's line cut mid-way
    assert stages.distill_state(d, 3) == (False, "metrics.jsonl has no final-epoch validation (last epoch 2)")
    t = str(tmp_path / "t")
    _fake_transfer(t, 1, [7.0])
    with open(os.path.join(t, "metrics.json"), "a") as f:
        f.write('{"iteration": 29, "bbox/AP": 8')
    assert stages.transfer_state(t, 1) == (True, "AP 7.0")


# ------------------------------------------------------------------------------------ the paper's numbers
def _paper_file(tmp_path):
    """A paper tables file in the shared format, with made-up numbers."""
    tables = {"transfer": {"pair": "resnet101->resnet50 (ImageNet), made up",
                           "columns": ["imagenet_top1", "voc_AP50", "voc_AP", "voc_AP75",
                                       "coco_AP50", "coco_AP", "coco_AP75"],
                           "rows": {"scratch": [None, 60.5, 33.5, 33.25, 44.0, 26.5, 27.75],
                                    "CoCoRD": [77.5, 82.25, 55.0, 61.0, 60.75, 41.0, 44.5]},
                           "notes": "made-up notes"},
              "imagenet": {"pair": "resnet34->resnet18", "metric": "top-1 / top-5 error (%)",
                           "rows": {"CoCoRD": [28.25, 9.5]}}}
    path = tmp_path / "paper_tables.json"
    path.write_text(json.dumps(tables))
    return str(path)


def _real_report(tmp_path, flags):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    args = cli.parse_args(["--imagenet", str(tmp_path / "imagenet"), "--trials", "2"] + flags)
    cfg, path = cli.resolve_config(args)
    pipe = stages.Plan(cfg, path, str(tmp_path / "out"), paper_tables=args.paper_tables)
    _fake_outputs(pipe.out)
    res = report.write_report(pipe.out, pipe.describe())
    return open(res["report"]).read(), json.load(open(res["results"]))


def test_report_puts_the_papers_numbers_beside_each_measured_cell(tmp_path):
    md, results = _real_report(tmp_path, ["--paper-tables", _paper_file(tmp_path)])
    # the paper's transfer table (R101 -> R50, the default of --imagenet) beside every cell it has
    assert ("| CoCoRD (resnet50) | 65.00 (paper 77.50) | 92.00 | 22.0 ± 2.8 (paper 55.0) |"
            " 42.0 ± 2.8 (paper 82.2) | 17.0 ± 2.8 (paper 61.0) | 23.0 ± 2.8 (paper 41.0) |"
            " 43.0 ± 2.8 (paper 60.8) | 18.0 ± 2.8 (paper 44.5) |" in md)
    assert "| Random init | — | — | 2.0 ± 1.4 (paper 33.5) |" in md  # random init = the paper's scratch row
    assert "| KD (resnet50) | 63.00 | 92.00 | 12.0 ± 0.0 |" in md  # no KD row in that table
    assert "made-up notes" in md
    rows = {r["init"]: r for r in results["rows"]}
    assert rows["cocord"]["paper"]["detection"]["coco"]["AP75"] == 44.5 and rows["cocord"]["paper"]["top1"] == 77.5
    assert results["paper"]["scope"] == "cells" and results["paper"]["file"].endswith("paper_tables.json")


def test_report_of_the_r18_setting_shows_the_papers_imagenet_accuracy(tmp_path):
    md, _ = _real_report(tmp_path, ["--config", os.path.join(CONFIGS, "real_r18.yaml"),
                                    "--paper-tables", _paper_file(tmp_path)])
    # error rates 28.25 / 9.5 -> accuracy 71.75 / 90.50; no detection numbers for this pair
    assert "| CoCoRD (resnet18) | 65.00 (paper 71.75) | 92.00 (paper 90.50) | 22.0 ± 2.8 | 42.0 ± 2.8 |" in md


def test_report_without_the_paper_tables_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "DEFAULT_PAPER_TABLES", str(tmp_path / "absent.json"))
    md, results = _real_report(tmp_path, [])
    assert "(paper" not in md and f"{tmp_path / 'absent.json'} is absent" in md
    assert results["paper"]["scope"] is None
    with pytest.raises(SystemExit):  # a file the user names must exist
        cli.parse_args(["--quick", "--paper-tables", str(tmp_path / "nope.json")])


def test_embedded_report_shows_the_paper_apart_as_imagenet_scale(tmp_path):
    pipe = stages.Plan(_cfg(), "quick.yaml", str(tmp_path / "out"), paper_tables=_paper_file(tmp_path))
    _fake_outputs(pipe.out)
    md = open(report.write_report(pipe.out, pipe.describe())["report"]).read()
    assert COCORD_ROW in md  # the measured table is unchanged
    section = md[md.index("## The paper's numbers (ImageNet scale)"):]
    # columns in the order of the measured table: per dataset AP, AP50, AP75
    assert "| CoCoRD | 77.50 | 55.0 | 82.2 | 61.0 | 41.0 | 60.8 | 44.5 |" in section
    assert "| Random init | — | 33.5 | 60.5 | 33.2 | 26.5 | 44.0 | 27.8 |" in section


def test_excluded_classes_in_metrics_reach_the_report_and_break_no_reader(tmp_path):
    pipe = _pipe(tmp_path)
    _fake_outputs(pipe.out)
    folder = os.path.join(pipe.out, "transfer", "voc", "crd")
    path = os.path.join(folder, "trial1", "metrics.json")
    with open(path, "a") as f:  # as the torchvision engine writes it
        f.write(json.dumps({"iteration": 29, "bbox/AP": 14.0, "bbox/AP50": 34.0, "bbox/AP75": 9.0,
                            "bbox/excluded_classes": ["nine", "eight"]}) + "\n")
    assert stages.transfer_state(folder, 2) == (True, "AP 13.0, 14.0")
    from transfer.train_net import final_metrics
    assert final_metrics(os.path.dirname(path)) == {"AP": 14.0, "AP50": 34.0, "AP75": 9.0}
    res = report.write_report(pipe.out, pipe.describe())
    md = open(res["report"]).read()
    assert "- voc, CRD: AP averages the classes with ground truth in the test split; left out (none in it): " \
           "eight, nine" in md
    rows = {r["init"]: r for r in json.load(open(res["results"]))["rows"]}
    assert rows["crd"]["detection"]["voc"]["excluded_classes"] == ["eight", "nine"]
    assert rows["crd"]["detection"]["voc"]["AP"]["mean"] == pytest.approx(13.5)


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path):
    """Its stage script would refuse the used folder without --resume, and there is nothing to resume."""
    from types import SimpleNamespace
    from cocord_pipeline.runner import nothing_to_resume
    folder = tmp_path / "transfer" / "voc" / "kd"
    (folder / "trial0").mkdir(parents=True)
    (folder / "trial0" / "metrics.json").write_text('{"iteration": 19, "total_loss": 1.0}\n')
    stage = SimpleNamespace(group="transfer", out_dir=str(folder))
    assert nothing_to_resume(stage)
    (folder / "trial0" / "last_checkpoint").write_text("model_0000019.pth")
    assert not nothing_to_resume(stage)                     # a checkpoint: resume it
    assert not nothing_to_resume(SimpleNamespace(group="convert", out_dir=str(folder)))
    assert not nothing_to_resume(SimpleNamespace(group="distill", out_dir=str(tmp_path / "absent")))
