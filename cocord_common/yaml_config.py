"""Reading YAML config files with clear errors: the one reader behind `train_imagenet.py --config`,
the transfer configs (transfer/config.py) and the pipeline configs (tools/run_pipeline.py).

Every error names the file; `_BASE_` chains (detectron2's convention: a path, or a list of paths,
relative to the file that names them; bases merged first, the file's own keys on top) are followed
with cycle detection.
"""
import os

import yaml

BASE_KEY = "_BASE_"


def read_yaml_mapping(path, what="config file"):
    """The top-level mapping of YAML file `path` ({} for an empty file). `what` says in errors which
    kind of file was expected (e.g. "--config", "pipeline config")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{what} {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(dst, src):
    """Merge mapping `src` into `dst` in place: nested mappings merge, anything else replaces."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def load_yaml_with_base(path, check=None, what="config file", _seen=()):
    """`path`'s mapping merged over its `_BASE_` chain. `check(data, path)`, when given, validates
    each file's own keys (without `_BASE_`) before anything is merged, so errors name the file at fault."""
    path = os.path.abspath(os.path.expanduser(path))
    if path in _seen:
        raise ValueError(f"{path}: {BASE_KEY} cycle through {list(_seen)}")
    data = read_yaml_mapping(path, what)
    bases = data.pop(BASE_KEY, None)
    if check is not None:
        check(data, path)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ValueError(f"{path}: {BASE_KEY} must be a file path or a list of them, got {bases!r}")
    merged = {}
    for base in bases:
        base_path = os.path.expanduser(base)
        if not os.path.isabs(base_path):
            base_path = os.path.join(os.path.dirname(path), base_path)
        deep_merge(merged, load_yaml_with_base(base_path, check, what, _seen + (path,)))
    return deep_merge(merged, data)
