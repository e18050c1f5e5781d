"""Issue 11: on resume both transfer engines reconcile metrics.json with the checkpoint, as distillation
does with metrics.jsonl (cocord_common.metrics.reconcile_jsonl): a cut last line is dropped with a
warning, lines written after the checkpoint are dropped, and lines the checkpoint carries
("metrics_lines") that the file lost are restored exactly."""
import json
import os
import shutil

import pytest
import torch

from cocord_common import metrics
from cocord_common.metrics import reconcile_jsonl, reconcile_transfer_metrics


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_lines(path, records, torn=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


# --- the shared function, on hand-written files -------------------------------------------------------
def test_reconcile_restores_a_lost_middle_line_at_its_place_and_drops_the_rest(tmp_path):
    path = tmp_path / "metrics.json"
    a, b, c = {"iteration": 1, "loss": 1.5}, {"iteration": 1, "bbox/AP": 20.0}, {"iteration": 3, "loss": 0.5}
    later = {"iteration": 5, "loss": 0.25}
    write_lines(path, [a, c, later], torn='{"iteration": 7, "lo')  # b lost; `later` after the checkpoint
    log = []
    rows = reconcile_transfer_metrics(str(tmp_path), [a, b, c], 3, log.append)
    assert rows == lines(path) == [a, b, c]
    assert any("metrics.json:4: dropped a cut last line" in m and m.startswith("warning") for m in log)
    assert any("dropped 1 line(s) after iteration 3" in m for m in log)
    assert any(m == f"warning: {path} had no line for iteration 3; restored it from the checkpoint" for m in log)


def refuse_writes(monkeypatch):
    """Make every way cocord_common.metrics changes a file raise."""
    def refuse(*args):
        raise AssertionError(f"the file was written: {args[0]}")
    monkeypatch.setattr(metrics, "_rewrite_jsonl", refuse)
    monkeypatch.setattr(metrics, "_truncate_cut_line", refuse)


def test_reconcile_leaves_an_agreeing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    a = {"iteration": 1, "loss": 1.0}
    path.write_text(json.dumps(a, indent=None) + "\n")
    refuse_writes(monkeypatch)
    log = []
    assert reconcile_transfer_metrics(str(tmp_path), [a], 1, log.append) == [a]
    assert log == []


def test_reconcile_counts_lines_without_an_iteration_apart(tmp_path):
    path = tmp_path / "metrics.json"
    a, later = {"iteration": 1, "loss": 1.0}, {"iteration": 4, "loss": 0.5}
    write_lines(path, [a, {"note": "by hand"}, {"iteration": "2"}, later])
    log = []
    assert reconcile_transfer_metrics(str(tmp_path), [a], 1, log.append) == [a] == lines(path)
    assert sum("dropped 2 line(s) without the position a run writes" in m for m in log) == 1
    assert any(m.startswith("warning") and '{"note": "by hand"}' in m for m in log)
    assert sum("dropped 1 line(s) after iteration 1" in m for m in log) == 1


def test_reconcile_rewrites_atomically_unless_asked_in_place(tmp_path):
    """A writer holding the file open (detectron2's JSONWriter) keeps writing to it only in place."""
    a, later = {"iteration": 1, "loss": 1.0}, {"iteration": 4, "loss": 0.5}
    path = tmp_path / "metrics.json"
    for in_place in (False, True):
        write_lines(path, [a, later])
        with open(path, "a") as held:
            reconcile_transfer_metrics(str(tmp_path), [a], 1, lambda m: None, in_place=in_place)
            assert lines(path) == [a]
            assert (os.fstat(held.fileno()).st_ino == os.stat(path).st_ino) == in_place


def test_reconcile_from_an_old_checkpoint_drops_only_a_cut_line(tmp_path, monkeypatch):
    """A checkpoint written before checkpoints carried lines (None): the file stays as it was but for a
    cut last line, cut off in place (never rewritten), and the log says why."""
    path = tmp_path / "metrics.json"
    a, later = {"iteration": 1, "loss": 1.0}, {"iteration": 4, "loss": 0.5}
    write_lines(path, [a, {"note": 1}, later], torn='{"iteration": 5, "lo')
    monkeypatch.setattr(metrics, "_rewrite_jsonl", lambda *a: pytest.fail("rewritten"))
    log = []
    assert reconcile_transfer_metrics(str(tmp_path), None, 1, log.append) == [a, {"note": 1}, later]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in [a, {"note": 1}, later])
    assert [m.split(": ", 2)[1] for m in log[:1]] == [f"{path}:4"]
    assert "dropped a cut last line" in log[0]
    assert log[1] == (f"{path}: the checkpoint of iteration 1 carries no metrics lines (written before checkpoints "
                      "did), so no line is dropped or restored (a cut last line aside)")


# --- train_net on --resume: the engine reconciles when there is a checkpoint; before the first one --------
def test_resume_before_the_first_checkpoint_drops_a_cut_line_once(tmp_path, capsys, monkeypatch):
    from argparse import Namespace
    from transfer import train_net
    a = {"iteration": 19, "loss": 1.0}
    write_lines(tmp_path / "metrics.json", [a], torn='{"iteration": 39, "lo')
    resume = Namespace(eval_only=False, resume=True, allow_existing_output=False)
    assert train_net.prepare_output_dir(str(tmp_path), 100, resume) is None
    assert (tmp_path / "metrics.json").read_text() == json.dumps(a) + "\n"
    out = capsys.readouterr().out
    assert out.count("dropped a cut last line") == 1 and out.startswith("[train_net] warning: ")
    # with a checkpoint the file is the engine's to reconcile: train_net leaves it alone
    write_lines(tmp_path / "metrics.json", [a], torn='{"iteration": 39, "lo')
    (tmp_path / "last_checkpoint").write_text("model_0000019.pth")
    refuse_writes(monkeypatch)
    assert train_net.prepare_output_dir(str(tmp_path), 100, resume) is None
    assert capsys.readouterr().out == ""


def test_reconcile_with_a_position_key_keeps_the_files_line(tmp_path):
    """Distillation's use: one saved line per checkpoint, the same line when at the same epoch."""
    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"epoch": 1, "x": 1.0}, {"epoch": 2, "x": 2.5}])
    pos = lambda r: r["epoch"]  # noqa: E731
    rows = reconcile_jsonl(str(path), [{"epoch": 2, "x": 2.0}], pos, 2, print, "epoch 2", key=pos)
    assert rows == [{"epoch": 1, "x": 1.0}, {"epoch": 2, "x": 2.5}]
    rows = reconcile_jsonl(str(path), [{"epoch": 3, "x": 3.0}], pos, 3, print, "epoch 3", key=pos)
    assert rows[-1] == {"epoch": 3, "x": 3.0} and len(lines(path)) == 3


# --- the torchvision engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_run(tmp_path_factory):
    """A 4-iteration run: eval and checkpoint at iteration 1 (the checkpoint carries the eval line),
    then the final training and eval lines at iteration 3."""
    from cocord_pipeline.synthetic_shapes import write_shapes
    from test_transfer_engine import run, tiny_opts
    base = tmp_path_factory.mktemp("tv")
    root = write_shapes(str(base / "shapes"), n_train=8, n_test=4)
    opts = dict(TEST__PRECISE_BN__ENABLED=False, SOLVER__WARMUP_ITERS=2, SOLVER__CHECKPOINT_PERIOD=2,
                TEST__EVAL_PERIOD=2)
    out = base / "full"
    run(tiny_opts(root, out, 4, **opts))
    return root, opts, out


@pytest.mark.slow
def test_torchvision_resume_restores_a_lost_line_and_drops_a_torn_one(torchvision_run, tmp_path, capsys):
    from test_transfer_engine import run, tiny_opts
    root, opts, full = torchvision_run
    rows = lines(full / "metrics.json")
    assert [(r["iteration"], "bbox/AP" in r) for r in rows] == [(1, True), (3, False), (3, True)]
    ck = torch.load(full / "model_0000001.pth", weights_only=True)
    assert ck["metrics_lines"] == rows[:1]  # the eval at the checkpoint's iteration comes before it
    # killed after the checkpoint of iteration 1: its eval line lost, a later line cut mid-append
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "model_final.pth").unlink()
    (part / "last_checkpoint").write_text("model_0000001.pth")
    write_lines(part / "metrics.json", [], torn='{"iteration": 3, "total_lo')
    run(["--resume"] + tiny_opts(root, part, 4, **opts))
    resumed = lines(part / "metrics.json")
    assert resumed[0] == rows[0]  # restored exactly
    assert [(r["iteration"], "bbox/AP" in r) for r in resumed] == [(1, True), (3, False), (3, True)]
    assert resumed[2] == rows[2]  # and the resumed run goes on exactly
    log = (part / "log.txt").read_text()
    printed = capsys.readouterr()
    assert log.count("dropped a cut last line") == 1  # the engine's reconcile, in log.txt ...
    assert (printed.out + printed.err).count("dropped a cut last line") == 1  # ... echoed once, nothing else
    assert "had no line for iteration 1; restored it from the checkpoint" in log


# --- the detectron2 engine ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.detectron2
def test_detectron2_resume_restores_a_lost_line_and_drops_a_torn_one(torchvision_run, tmp_path, monkeypatch):
    pytest.importorskip("detectron2")
    from detectron2.engine import hooks
    from test_detectron2_engine import args, run_d2
    from test_transfer_engine import CPU_CFG, tiny_opts
    root = torchvision_run[0]
    # the small R18-FPN CPU config (seconds, unlike the C4 one), a checkpoint after iteration 1, and a
    # metrics line every iteration (detectron2 writes every 20) so that the checkpoint carries lines
    opts = dict(TEST__PRECISE_BN__ENABLED=False, SOLVER__CHECKPOINT_PERIOD=2, MODEL__DEVICE="cpu")
    writer = hooks.PeriodicWriter
    monkeypatch.setattr(hooks, "PeriodicWriter", lambda writers, period=20: writer(writers, period=1))
    full = tmp_path / "full"
    run_d2(CPU_CFG, tiny_opts(root, full, 3, **opts), args())
    rows = lines(full / "metrics.json")
    ck = torch.load(full / "model_0000001.pth", weights_only=True)
    carried = ck["trainer"]["metrics_lines"]
    assert [r["iteration"] for r in carried] == [0, 1] and carried == rows[:2]
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "model_final.pth").unlink()
    (part / "last_checkpoint").write_text("model_0000001.pth")
    # the line of iteration 1 lost, the later ones written (after the checkpoint), then a cut line
    write_lines(part / "metrics.json", [rows[0]] + rows[2:], torn='{"iteration": 2, "total_lo')
    run_d2(CPU_CFG, tiny_opts(root, part, 3, **opts), args(resume=True))
    resumed = lines(part / "metrics.json")
    assert resumed[:2] == rows[:2]  # restored exactly
    assert [r["iteration"] for r in resumed] == [r["iteration"] for r in rows]  # nothing twice
    assert resumed[-1] == rows[-1]  # the final evaluation, as the uninterrupted run's
    log = (part / "log.txt").read_text()
    assert "dropped a cut last line" in log
    assert "dropped 2 line(s) after iteration 1" in log
    assert "had no line for iteration 1; restored it from the checkpoint" in log
