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


# --methods mode (issue 13): one step of every method side by side, ratio to the supervised step
TINY_METHODS = ["--iters", "1", "--warmup", "0", "-b", "2", "--num-samples", "6", "--queue-size", "16",
                "--proj-dim", "8", "--proj-hidden-dim", "8", "--pred-dim", "4", "--crd-feat-dim", "4",
                "--crd-nce-k", "4", "--cc-feat-dim", "4"]


def every_method_row():
    """Every METHODS name once, the two-stage ab and ft twice (main stage, then init stage)."""
    from distill.methods import METHODS
    rows = []
    for name in METHODS:
        rows += [f"{name} (main stage)", f"{name} (init stage)"] if name in ("ab", "ft") else [name]
    return rows


# every method on the tiny ImageNet pair; the CIFAR pair with a short list (the reference is added first)
@pytest.mark.parametrize("pair,methods,rows", [
    (["-a", "resnet18", "--teacher-arch", "resnet18", "--image-size", "32", "--num-classes", "3"], ["all"], None),
    (["--cifar", "-a", "resnet8", "--teacher-arch", "resnet8", "--num-classes", "3"], ["kd", "ab"],
     ["supervised", "kd", "ab (main stage)", "ab (init stage)"]),
], ids=["imagenet", "cifar"])
def test_methods_mode_times_every_method_against_supervised(pair, methods, rows, tmp_path, capsys):
    out = tmp_path / "methods.json"
    report = benchmark_distill.main(pair + TINY_METHODS + ["--methods"] + methods + ["--json", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["mode"] == "methods" and report["image_size"] == 32
    res = report["batches"]["2"]
    rows = rows or every_method_row()
    assert list(res["cpu_ms"]) == rows and list(res["ratio_wall"]) == rows
    assert list(res["views"]) == rows and res["views"]["supervised"] == 1
    if "cocord" in rows:
        assert res["views"]["cocord"] == 3
    for clock in ("wall", "cpu"):
        assert res[f"ratio_{clock}"]["supervised"] == 1.0
        for row in rows:
            assert res[f"{clock}_ms"][row] > 0
            assert res[f"ratio_{clock}"][row] == pytest.approx(res[f"{clock}_ms"][row] / res[f"{clock}_ms"]["supervised"])
    # one printed line per row: name, views, wall ms, ratio, cpu ms, ratio
    table = {line[:22].strip(): line[22:].split() for line in printed if line[:22].strip() in rows}
    assert list(table) == rows
    assert table["supervised"][2] == "1.00" and table["supervised"][4] == "1.00"
    for row in rows:
        assert len(table[row]) == 5 and float(table[row][2]) == pytest.approx(res["ratio_wall"][row], abs=0.005)


def test_methods_mode_flags():
    args = benchmark_distill.parse_args(["--methods", "kd", "cocord", "kd", "--device", "cpu"])
    assert args.methods == ["supervised", "kd", "cocord"]  # the reference first, duplicates dropped
    assert (args.arch, args.teacher_arch, args.image_size, args.num_samples) == ("resnet18", "resnet34", 64, 1281167)
    cifar = benchmark_distill.parse_args(["--methods", "all", "--cifar"])
    assert (cifar.arch, cifar.teacher_arch, cifar.image_size, cifar.num_classes, cifar.queue_size,
            cifar.num_samples) == ("resnet8x4", "resnet32x4", 32, 100, 2048, 50000)
    for bad in (["--methods", "nope"], ["--cifar"], ["-a", "resnet8"], ["--methods", "all", "-b", "8", "--num-samples", "4"]):
        with pytest.raises(SystemExit):
            benchmark_distill.parse_args(bad)


def test_num_samples_without_methods_is_an_error(capsys):
    """The sweep has no CRD bank: a --num-samples there would be silently ignored."""
    with pytest.raises(SystemExit) as e:
        benchmark_distill.parse_args(["--num-samples", "1000", "--device", "cpu"])
    assert e.value.code == 2
    assert "--num-samples sizes CRD's memory banks in --methods mode" in capsys.readouterr().err
    assert benchmark_distill.parse_args(["--device", "cpu"]).num_samples is None
