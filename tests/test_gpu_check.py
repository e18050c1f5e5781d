"""tools/gpu_check.py: `--smoke` runs every section (distillation steps under each precision / layout,
DDP queues and exact resume under torchrun with gloo, the loader, both transfer engines) on CPU and
writes one JSON of the documented structure. Timings are not asserted."""
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO

# a script, not a module of an installed package: loaded from its file
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_max_abs_diff_of_nested_checkpoint_values():
    a = {"w": torch.tensor([1.0, 2.0]), "rng": torch.tensor([1, 2], dtype=torch.uint8), "n": [3, {"x": 0.5}]}
    assert gpu_check.max_abs_diff(a, a) == 0.0
    b = {"w": torch.tensor([1.0, 2.25]), "rng": a["rng"].clone(), "n": [3, {"x": 0.5}]}
    assert gpu_check.max_abs_diff(a, b) == 0.25
    for changed in ({"rng": torch.tensor([1, 3], dtype=torch.uint8)}, {"n": [4, {"x": 0.5}]},
                    {"w": torch.tensor([1.0])}, {"extra": 1}):
        assert gpu_check.max_abs_diff(a, dict(a, **changed)) == math.inf, changed


def test_workers_needed_is_the_ceiling_of_step_rate_over_best_worker_rate():
    report = {"sections": {
        "loader": {"status": "ok", "results": {"per_workers": {
            "0": {"images_per_s_per_worker": 999.0}, "1": {"images_per_s_per_worker": 30.0},
            "2": {"images_per_s_per_worker": 40.0}}}},
        "distill": {"status": "ok", "results": {"a->b": {"cocord": {
            "fp32": {"images_per_s": 100.0}, "bf16": {"images_per_s": 410.0}, "fp16": {"error": "x"}}}}}}}
    # best CoCoRD rate 410 img/s, best per-worker rate 40 img/s (0 workers is the main process): 11 workers
    assert gpu_check.workers_needed(report) == {"a->b": {"cocord_images_per_s": 410.0, "workers": 11}}
    report["sections"]["loader"]["status"] = "error"
    assert gpu_check.workers_needed(report) is None


def test_bad_arguments_name_the_flag(tmp_path):
    for argv, words in ((["--smoke", "--sections", "distill,gpu"], "--sections"),
                        (["--smoke", "--voc", str(tmp_path)], "--voc-classes"),
                        (["--smoke", "--images", str(tmp_path / "none")], "--images")):
        r = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), *argv],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)


@pytest.mark.slow
def test_smoke_runs_every_section(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--smoke", "--json", str(out),
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(r.stdout) == report  # the same JSON on stdout
    assert report["profile"] == "smoke" and report["device"] == "cpu"
    for name in ("distill", "ddp", "loader", "transfer"):
        assert report["sections"][name]["status"] == "ok", (name, report["sections"][name].get("traceback"))

    distill = report["sections"]["distill"]["results"]
    layouts = {"fp32", "fp32+channels_last", "bf16+channels_last", "fp16+channels_last"}
    for method in ("supervised", "kd", "crd", "cocord"):
        cases = distill["resnet18->resnet18"][method]
        assert set(cases) == layouts
        for fig in cases.values():
            assert fig["images_per_s"] > 0 and fig["step_s"] > 0 and fig["passes_s"] > 0
            assert fig["ratio_to_passes"] == pytest.approx(fig["step_s"] / fig["passes_s"])
            assert fig["peak_memory_mib"] is None  # CPU

    ddp = report["sections"]["ddp"]["results"]
    assert ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert ddp["queues"]["identical"] and ddp["queues"]["max_abs_diff_to_rank0"] == [0.0, 0.0]
    # 2 steps x 2 ranks x 2 keys per rank, queue of 64
    assert ddp["queues"]["queue_ptr"] == [8, 8] and ddp["queues"]["queue_shape"] == [64, 32]
    assert ddp["resume"]["steps"] == 4 and ddp["resume"]["bit_exact"]

    loader = report["sections"]["loader"]["results"]
    assert loader["views"] == 3 and set(loader["per_workers"]) == {"0", "1"}
    assert all(v["images_per_s"] > 0 for v in loader["per_workers"].values())
    assert set(report["workers_needed_per_gpu"]) == {"resnet18->resnet18"}

    transfer = report["sections"]["transfer"]["results"]
    for engine in transfer["engines"]:
        fp32 = transfer["bench"][engine]["fp32"]
        assert fp32["train_s_per_iter"] > 0 and fp32["eval_images_per_s"] > 0, fp32
        assert "skipped" in transfer["bench"][engine]["amp"]  # AMP needs CUDA
        for norm in ("SyncBN", "naiveSyncBN"):  # figures, or why this engine / CPU cannot run it; no crash
            case = transfer["ddp"][engine][norm]
            assert "error" not in case, case
            if not set(case) & {"unsupported", "skipped"}:
                assert case["world_size"] == 2 and case["train_s_per_iter"] > 0, case
