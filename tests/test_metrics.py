"""cocord_common/metrics.py: the one metrics reader/writer and the rule for "the final evaluation line"."""
import json

import pytest

from cocord_common.metrics import append_jsonl, final_eval_line, mean_std, read_jsonl


def test_final_eval_line_rule_covers_one_and_several_test_datasets(tmp_path):
    path = tmp_path / "metrics.json"
    append_jsonl(path, {"iteration": 9, "total_loss": 1.5})
    append_jsonl(path, {"iteration": 10, "bbox/AP": 12.5, "bbox/AP50": 30.0})
    append_jsonl(path, {"iteration": 19, "total_loss": 0.9})
    assert final_eval_line(path)["iteration"] == 10
    append_jsonl(path, {"iteration": 20, "voc_test/bbox/AP": 14.0, "coco_val/bbox/AP": 9.0})
    assert final_eval_line(path)["iteration"] == 20
    append_jsonl(path, {"iteration": 21, "xbbox/AP": 1.0})  # only a whole path component counts
    assert final_eval_line(path)["iteration"] == 20
    assert final_eval_line(tmp_path / "absent.json") is None


def test_torn_line_is_named_or_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"epoch": 1, "val/top1": 50.0}) + "\n" + '{"epoch": 2, "val/to')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_jsonl(path)
    assert read_jsonl(path, on_torn="skip") == [{"epoch": 1, "val/top1": 50.0}]


def test_mean_std_is_the_sample_standard_deviation():
    assert mean_std([2.0, 4.0, 9.0]) == (5.0, pytest.approx(13.0 ** 0.5))  # squares 9+1+16 = 26, / (3-1) = 13
    assert mean_std([3.5]) == (3.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
