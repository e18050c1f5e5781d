"""cocord_common/yaml_config.py: the one YAML reader of the three config kinds (distillation --config,
transfer configs, pipeline configs) — `_BASE_` merging and errors that name the file."""
import os

import pytest
from cocord_pipeline.config import load_pipeline_config

from distill import train_imagenet
from cocord_common.yaml_config import deep_merge, load_yaml_with_base, read_yaml_mapping
from transfer.config import load_config


def test_base_chain_merges_bases_first_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("x: 1\nn: {p: 1, q: 1}\n")
    (tmp_path / "sub" / "b.yaml").write_text("_BASE_: ../a.yaml\nn: {q: 2}\ny: [1, 2]\n")
    (tmp_path / "c.yaml").write_text("y: 3\n")
    (tmp_path / "sub" / "top.yaml").write_text("_BASE_: [b.yaml, ../c.yaml]\nn: {r: 3}\n")
    assert load_yaml_with_base(str(tmp_path / "sub" / "top.yaml")) == {"x": 1, "n": {"p": 1, "q": 2, "r": 3}, "y": 3}
    assert deep_merge({"a": {"b": 1}, "c": 1}, {"a": {"d": 2}, "c": {"e": 3}}) == {"a": {"b": 1, "d": 2}, "c": {"e": 3}}


def test_check_sees_each_file_without_base(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "b.yaml").write_text("_BASE_: a.yaml\ny: 2\n")
    seen = []
    load_yaml_with_base(str(tmp_path / "b.yaml"), check=lambda d, p: seen.append((os.path.basename(p), d)))
    assert seen == [("b.yaml", {"y": 2}), ("a.yaml", {"x": 1})]


@pytest.mark.parametrize("text,match", [
    ("a: [1, 2\n", r"bad\.yaml is not valid YAML"),
    ("- 1\n- 2\n", r"bad\.yaml must hold a mapping at the top level, got list"),
    ("_BASE_: 3\n", r"bad\.yaml: _BASE_ must be a file path or a list of them, got 3"),
    ("_BASE_: missing.yaml\n", r"missing\.yaml does not exist"),
    ("_BASE_: bad.yaml\n", r"bad\.yaml: _BASE_ cycle"),
])
def test_bad_files_are_named(tmp_path, text, match):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_yaml_with_base(str(tmp_path / "bad.yaml"))


def test_empty_file_is_an_empty_mapping(tmp_path):
    (tmp_path / "e.yaml").write_text("# nothing\n")
    assert read_yaml_mapping(str(tmp_path / "e.yaml")) == {}


def test_each_config_kind_reports_invalid_yaml_with_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match=r"--config .*bad\.yaml is not valid YAML"):
        train_imagenet.parse_args(["data", "--config", str(bad)])
    with pytest.raises(ValueError, match=r"config file .*bad\.yaml is not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ValueError, match=r"pipeline config .*bad\.yaml is not valid YAML"):
        load_pipeline_config(str(bad))
    bad.write_text("- kd\n")
    with pytest.raises(ValueError, match=r"--config .*bad\.yaml must hold a mapping"):
        train_imagenet.parse_args(["data", "--config", str(bad)])
