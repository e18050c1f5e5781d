"""tools/run_pipeline.py: configs, stage selection, completeness from outputs, the report.

These run in seconds on hand-written output files in the stage scripts' formats (I3, I7); the
end-to-end run of the real stage scripts is tests/test_pipeline_e2e.py.
"""
import json
import os
import sys
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import pipeline_report  # noqa: E402
import run_pipeline as rp  # noqa: E402

CONFIGS = os.path.join(REPO, "configs", "pipeline")


def _cfg(name="quick.yaml"):
    return rp.load_pipeline_config(os.path.join(CONFIGS, name))


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["embedded.yaml", "quick.yaml", "real.yaml", "real_r50.yaml"])
def test_shipped_configs_load_and_validate(name):
    cfg = _cfg(name)
    rp.validate_config(cfg, name)
    for ds in cfg["transfer"]["datasets"].values():
        assert os.path.isfile(os.path.join(REPO, ds["config"])), ds["config"]
    for f in (cfg["distill"].get("method_configs") or {}).values():
        assert os.path.isfile(os.path.join(REPO, f)), f


def test_base_merge():
    quick, emb = _cfg("quick.yaml"), _cfg("embedded.yaml")
    assert quick["data"]["quick"] is True and emb["data"]["quick"] is False
    assert quick["distill"]["methods"] == emb["distill"]["methods"]  # inherited
    assert quick["transfer"]["datasets"] == emb["transfer"]["datasets"]
    r50 = _cfg("real_r50.yaml")
    assert r50["distill"]["arch"] == "resnet50" and r50["transfer"]["trials"] == 5


def test_unknown_key_is_refused(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("_BASE_: " + os.path.join(CONFIGS, "quick.yaml") + "\ndistill:\n  epochz: 3\n")
    with pytest.raises(ValueError, match=r"unknown key 'distill.epochz'"):
        rp.load_pipeline_config(str(p))


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
        rp.validate_config(cfg, "quick.yaml")


def test_cli_switches(tmp_path):
    args = rp.parse_args(["--quick", "--trials", "3", "--cocord-kd"])
    cfg, path = rp.resolve_config(args)
    assert path.endswith("quick.yaml") and cfg["transfer"]["trials"] == 3
    assert cfg["distill"]["methods"][-1] == "cocord+kd"
    # the real protocol: --imagenet switches to the paper's configs
    (tmp_path / "train").mkdir()
    cfg, path = rp.resolve_config(rp.parse_args(["--imagenet", str(tmp_path)]))
    assert path.endswith("real.yaml") and cfg["data"] == {"kind": "imagenet", "imagenet": str(tmp_path)}
    pipe = rp.Pipeline(cfg, path, str(tmp_path / "out"))
    names = [s.name for s in pipe.stages]
    assert "data" not in names and "teacher" not in names  # pre-trained torchvision teacher
    kd = next(s for s in pipe.stages if s.name == "distill:kd")
    assert kd is not None
    with pytest.raises(FileNotFoundError, match="--imagenet"):
        rp.resolve_config(rp.parse_args(["--imagenet", str(tmp_path / "nope")]))


def test_real_protocol_commands(tmp_path):
    (tmp_path / "train").mkdir()
    cfg, path = rp.resolve_config(rp.parse_args(["--imagenet", str(tmp_path)]))
    pipe = rp.Pipeline(cfg, path, str(tmp_path / "out"))
    argv = pipe.commands["distill:cocord"]
    assert argv[2] == str(tmp_path) and "--config" in argv
    assert argv[argv.index("--config") + 1].endswith("configs/distill/r34_r18_cocord.yaml")
    assert argv[argv.index("--teacher-weights") + 1] == "IMAGENET1K_V1"
    t = pipe.commands["transfer:voc:cocord"]
    assert t[t.index("--config-file") + 1].endswith("configs/voc_r18_fpn.yaml")
    assert t[t.index("MODEL.WEIGHTS") + 1].endswith("weights/cocord.pkl")
    assert t[t.index("--trials") + 1] == "5"
    r = pipe.commands["transfer:coco:random"]
    assert r[r.index("MODEL.WEIGHTS") + 1] == ""


# ------------------------------------------------------------------------------------ selection
def _pipe(tmp_path, name="quick.yaml"):
    return rp.Pipeline(_cfg(name), name, str(tmp_path / "out"), log=lambda *a: None)


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
    with pytest.raises(rp.StageFailed, match=r"run stage 'distill:kd' first"):
        pipe.run(only=["convert:kd"])


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
    assert rp.distill_state(d, 3) == (False, "no checkpoint_0003.pth yet (have none)")
    _fake_distill(d, 3, final=False)
    ok, why = rp.distill_state(d, 3)
    assert not ok and "checkpoint_0002.pth" in why
    _fake_distill(d, 3)
    assert rp.distill_state(d, 3)[0]
    assert rp.distill_state(d, None)[0]  # epochs read from the run's own config.yaml
    assert not rp.distill_state(d, 5)[0]  # asked for more epochs than were run
    # a final checkpoint without the final metrics line (crash between the two writes)
    lines = open(os.path.join(d, "metrics.jsonl")).read().splitlines()[:-1]
    open(os.path.join(d, "metrics.jsonl"), "w").write("\n".join(lines) + "\n")
    ok, why = rp.distill_state(d, 3)
    assert not ok and "final-epoch" in why


def test_transfer_state_from_files(tmp_path):
    d = str(tmp_path / "t")
    _fake_transfer(d, 2, [10.0, 12.0])
    assert rp.transfer_state(d, 2) == (True, "AP 10.0, 12.0")
    os.remove(os.path.join(d, "trial1", "model_final.pth"))
    assert rp.transfer_state(d, 2) == (False, "trial 1 has no model_final.pth yet")
    single = str(tmp_path / "s")
    _fake_transfer(single, 1, [7.0])
    assert rp.transfer_state(single, 1)[0]


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
    assert rp.prune_intermediate_checkpoints(d, 2) == 200
    assert sorted(os.listdir(os.path.join(d, "trial0"))) == ["last_checkpoint", "metrics.json", "model_final.pth"]
    assert len(os.listdir(os.path.join(d, "trial1"))) == 5  # its resume still needs model_0000009.pth
    assert rp.prune_intermediate_checkpoints(str(tmp_path / "absent"), 1) == 0


def test_complete_stages_are_skipped_and_stale_ones_rerun(tmp_path):
    pipe = _pipe(tmp_path)
    out = pipe.out
    _fake_distill(os.path.join(out, "distill", "teacher"), 1)
    _fake_distill(os.path.join(out, "distill", "kd"), 1)
    ran = []
    for s in pipe.stages:
        s.run = (lambda s: (lambda stage: ran.append(s.name)))(s)
    teacher = next(s for s in pipe.stages if s.name == "teacher")
    kd = next(s for s in pipe.stages if s.name == "distill:kd")
    teacher.inputs = []  # the embedded data is not built in this test
    kd.inputs = [p for p in kd.inputs if "manifest" not in p]
    pipe.run(only=["teacher", "distill:kd"])
    assert ran == []  # both complete
    # the teacher was re-trained after the student: the student is stale
    future = time.time() + 5
    os.utime(os.path.join(out, "distill", "teacher", "student_backbone.pth"), (future, future))
    ok, why = kd.status()
    assert not ok and why.startswith("stale")
    with pytest.raises(rp.StageFailed, match="outputs are incomplete"):
        pipe.run(only=["teacher", "distill:kd"])  # our fake run writes nothing
    assert ran == ["distill:kd"]
    # ... afresh: the stale run was moved aside, never resumed
    assert os.path.isdir(os.path.join(out, "distill", "kd.prev"))
    # --force re-runs a complete stage and keeps its previous output beside it
    ran.clear()
    with pytest.raises(rp.StageFailed):
        pipe.run(only=["teacher"], force=True)
    assert ran == ["teacher"] and os.path.isdir(os.path.join(out, "distill", "teacher.prev"))


# ------------------------------------------------------------------------------------ report
def test_report_numbers_come_from_metrics_files(tmp_path):
    pipe = _pipe(tmp_path)
    out = pipe.out
    _fake_distill(os.path.join(out, "distill", "teacher"), 2, top1=80.0)
    aps = {"random": [1.0, 3.0], "supervised": [10.0, 11.0], "kd": [12.0, 12.0], "crd": [13.0, 15.0],
           "cocord": [20.0, 24.0]}
    for i, m in enumerate(("supervised", "kd", "crd", "cocord")):
        _fake_distill(os.path.join(out, "distill", m), 2, top1=60.0 + i)
    for ds in ("voc", "coco"):
        for init, a in aps.items():
            _fake_transfer(os.path.join(out, "transfer", ds, init), 2, [x + (ds == "coco") for x in a])
    res = pipeline_report.write_report(out, pipe.describe(), log=lambda *a: None)
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
    assert "| CoCoRD (resnet18) | 65.00 | 92.00 | 22.0 ± 2.8 | 42.0 ± 2.8 | 17.0 ± 2.8 |" \
           " 23.0 ± 2.8 | 43.0 ± 2.8 | 18.0 ± 2.8 |" in md
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
        pipeline_report.write_report(out, pipe.describe(), log=lambda *a: None)
