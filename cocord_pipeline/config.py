"""Pipeline configs (configs/pipeline/*.yaml): read with `_BASE_`, refuse unknown keys and bad values,
fill in the placeholders `{data}` (the embedded data folder), `{out}` (--output-dir) and `{repo}`."""
import os
import re

from cocord_common.yaml_config import load_yaml_with_base
from distill.methods import METHODS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "pipeline")
# the keys a pipeline config may hold (anything else is a typo and is refused)
SCHEMA = {
    "data": {"kind": None, "quick": None, "imagenet": None},
    "seed": None,
    "distill": {"arch": None, "teacher_arch": None, "teacher_weights": None, "methods": None,
                "common_args": None, "teacher_args": None, "method_args": None, "method_configs": None,
                "teacher_config": None},
    "transfer": {"engine": None, "trials": None, "random_init": None, "datasets": None, "opts": None},
}
ENGINES = ("auto", "detectron2", "torchvision")


def _check_schema(d, schema, path, prefix=""):
    for k, v in d.items():
        if k not in schema:
            raise ValueError(f"{path}: unknown key '{prefix}{k}'; allowed here: {sorted(schema)}")
        if isinstance(schema[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"{path}: '{prefix}{k}' must be a mapping, got {v!r}")
            _check_schema(v, schema[k], path, prefix + k + ".")


def load_pipeline_config(path):
    """Read a pipeline YAML; `_BASE_: other.yaml` (relative to the file) is merged underneath."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pipeline config {path} does not exist (see {CONFIGS} for the shipped ones)")
    return load_yaml_with_base(path, check=lambda d, p: _check_schema(d, SCHEMA, p), what="pipeline config")


def validate_config(cfg, path):
    """Raise ValueError naming `path` and the key for the first missing key or bad value."""
    def need(cond, msg):
        if not cond:
            raise ValueError(f"{path}: {msg}")
    methods = tuple(METHODS)  # the distill stage's own table: what train_imagenet.py --method accepts
    dc, tc = cfg.get("distill", {}), cfg.get("transfer", {})
    for k in ("arch", "teacher_arch", "methods", "common_args"):
        need(k in dc, f"missing key distill.{k}")
    for m in dc["methods"]:
        need(m in methods, f"distill.methods: unknown method '{m}'; choose from {methods}")
    for k in ("method_args", "method_configs"):
        for m in dc.get(k) or {}:
            need(m in methods, f"distill.{k}: unknown method '{m}'; choose from {methods}")
    for k in ("common_args", "teacher_args"):
        need(isinstance(dc.get(k, []), list), f"distill.{k} must be a list of command-line words")
    for k in ("engine", "trials", "datasets"):
        need(k in tc, f"missing key transfer.{k}")
    need(isinstance(tc["trials"], int) and tc["trials"] >= 1, f"transfer.trials must be an integer >= 1, "
         f"got {tc['trials']!r}")
    need(tc["engine"] in ENGINES, f"transfer.engine must be {'|'.join(ENGINES)}, got {tc['engine']!r}")
    need(isinstance(tc["datasets"], dict) and tc["datasets"], "transfer.datasets must name at least one dataset")
    for name, ds in tc["datasets"].items():
        need(re.fullmatch(r"[A-Za-z0-9_]+", name), f"transfer.datasets: name '{name}' must be [A-Za-z0-9_]+")
        need(isinstance(ds, dict) and "config" in ds, f"transfer.datasets.{name} needs a 'config' file")
        unknown = set(ds) - {"config", "opts", "label"}
        need(not unknown, f"transfer.datasets.{name}: unknown keys {sorted(unknown)}")
        need(len(ds.get("opts") or []) % 2 == 0, f"transfer.datasets.{name}.opts must be KEY VALUE pairs")
    need(len(tc.get("opts") or []) % 2 == 0, "transfer.opts must be KEY VALUE pairs")


def substitute(value, mapping):
    """`value` with every `{key}` of `mapping` replaced, in strings, lists and mappings at any depth."""
    if isinstance(value, str):
        for k, v in mapping.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, mapping) for k, v in value.items()}
    return value


def words(values, mapping):
    """Command-line words from a YAML list (numbers become strings), placeholders filled in."""
    return [str(substitute(v, mapping)) for v in (values or [])]


def repo_path(path):
    """A config's file path: absolute as given, else relative to the repository root."""
    return path if os.path.isabs(path) else os.path.join(REPO, path)
