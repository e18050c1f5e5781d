"""tools/benchmark_transfer.py runs both engines (detectron2 when importable) on a generated VOC folder
and prints/writes per-engine times and the torchvision / detectron2 ratios. Times are not asserted."""
import importlib.util
import json
import logging
import math
import os

import pytest

from conftest import REPO

# a script, not a module of an installed package: loaded from its file
_spec = importlib.util.spec_from_file_location("benchmark_transfer", REPO / "tools" / "benchmark_transfer.py")
benchmark_transfer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_transfer)


@pytest.mark.slow
def test_benchmark_prints_times_and_ratios(tmp_path, capsys):
    try:
        import detectron2  # noqa: F401
        engines = ["torchvision", "detectron2"]
    except ImportError:
        engines = ["torchvision"]
    out_json = tmp_path / "bench.json"
    cwd = os.getcwd()
    med, ratios = benchmark_transfer.main([
        "--synthetic", "--iters", "2", "--eval-images", "2", "--engines", ",".join(engines),
        "--output-dir", str(tmp_path / "runs"), "--json", str(out_json),
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"])
    printed = capsys.readouterr().out
    assert os.getcwd() == cwd and not logging.root.manager.disable  # the process is left as found
    assert sorted(med) == sorted(engines)
    for e in engines:
        assert all(math.isfinite(v) and v > 0 for v in med[e].values()), med
        assert f"[{e}] run 0: train" in printed
    saved = json.loads(out_json.read_text())
    assert saved["median"] == med and saved["eval_images"] == 2
    assert all(len(saved["runs"][e]["eval_s_per_image"]) == 1 for e in engines)
    if len(engines) == 2:
        assert "tv / d2" in printed
        assert ratios["eval_s_per_image"] == pytest.approx(
            med["torchvision"]["eval_s_per_image"] / med["detectron2"]["eval_s_per_image"])
