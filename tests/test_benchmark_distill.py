"""tools/benchmark_distill.py: a tiny sweep prints, per batch, the steps, the passes and every part of
CoCoRD's bookkeeping, and writes them to --json with ratios that add up. Timings are not asserted."""
import importlib.util
import json

import pytest

from conftest import REPO

# a script, not a module of an installed package: loaded from its file
_spec = importlib.util.spec_from_file_location("benchmark_distill", REPO / "tools" / "benchmark_distill.py")
benchmark_distill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark_distill)

TINY = ["-a", "resnet18", "--teacher-arch", "resnet18", "--image-size", "32", "--num-classes", "5",
        "--iters", "1", "--warmup", "0", "--queue-size", "16", "--proj-dim", "8", "--proj-hidden-dim", "8",
        "--pred-dim", "4", "--crd-feat-dim", "4", "--crd-nce-k", "4"]
PARTS = ["heads", "predictor", "EMA", "queue", "losses", "optimizer", "unattributed"]


def test_tiny_sweep_reports_every_part(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = benchmark_distill.main(TINY + ["-b", "2", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert sorted(report["batches"]) == ["2", "3"] and report["image_size"] == 32
    for batch in ("2", "3"):
        assert f"\nbatch {batch}\n" in printed
        res = report["batches"][batch]
        for clock in ("wall", "cpu"):
            times = res[clock]
            for k in ("supervised step (1 view)", "KD step (1 view)", "CoCoRD step (3 views)",
                      "unavoidable passes alone (CoCoRD)"):
                assert times[k] > 0, k
            split = res["split"][clock]
            assert list(split["parts_pct"]) == PARTS
            ref = times["unavoidable passes alone (CoCoRD)"]
            # bookkeeping = step - passes, in % of the passes; the parts (with the remainder) add up to it
            assert split["bookkeeping_pct"] == pytest.approx(100 * (times["CoCoRD step (3 views)"] - ref) / ref)
            assert sum(split["parts_pct"].values()) == pytest.approx(split["bookkeeping_pct"])
            for part in PARTS[:-1]:
                assert split["parts_pct"][part] == pytest.approx(100 * times[f"part: {part}"] / ref)
    assert "summary, CPU clock" in printed and "memory for ImageNet" in printed
    # the memory line uses the real buffers: a queue of 16 x 8 fp32 plus its int64 write pointer
    assert report["memory"]["queue_mib"] == pytest.approx((16 * 8 * 4 + 8) / 2**20)


def test_default_sweep_and_bad_batch():
    assert benchmark_distill.parse_args(["--device", "cpu"]).batch_sizes == [8, 32, 64]
    assert benchmark_distill.parse_args(["--device", "cuda"]).batch_sizes == [8, 32, 64, 128, 256]
    with pytest.raises(SystemExit):
        benchmark_distill.parse_args(["-b", "1"])
