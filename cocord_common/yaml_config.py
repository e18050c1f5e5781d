"""Reading YAML config files with clear errors: the one reader behind `train_imagenet.py --config`,
the transfer configs (transfer/config.py) and the pipeline configs (tools/run_pipeline.py).

Every error names the file; `_BASE_` chains (detectron2's convention: a path, or a list of paths,
relative to the file that names them; bases merged first, the file's own keys on top) are followed
with cycle detection. `flag_value_from_yaml` checks a value read for an argparse flag (`--config` of
train_imagenet.py) against that flag's type, as the command line would check it.
"""
import argparse
import os

import yaml

from cocord_common.errors import UserError

BASE_KEY = "_BASE_"


def read_yaml_mapping(path, what="config file"):
    """The top-level mapping of YAML file `path` ({} for an empty file). `what` says in errors which
    kind of file was expected (e.g. "--config", "pipeline config")."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise IsADirectoryError(f"{what} {path} is a folder; give the YAML file inside it")
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UserError(f"{what} {path} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise UserError(f"{what} {path} is not a text file ({e}); give a YAML file") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping at the top level, got {type(data).__name__}")
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
        raise UserError(f"{path}: {BASE_KEY} cycle through {list(_seen)}")
    data = read_yaml_mapping(path, what)
    bases = data.pop(BASE_KEY, None)
    if check is not None:
        check(data, path)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise UserError(f"{path}: {BASE_KEY} must be a file path or a list of them, got {bases!r}")
    merged = {}
    for base in bases:
        base_path = os.path.expanduser(base)
        if not os.path.isabs(base_path):
            base_path = os.path.join(os.path.dirname(path), base_path)
        deep_merge(merged, load_yaml_with_base(base_path, check, what, _seen + (path,)))
    return deep_merge(merged, data)


# ------------------------------------------------------------------ YAML values for argparse flags
def flag_value_from_yaml(action, value, path, key):
    """`value` (as YAML parsed it) for the argparse option `action`, checked the way the command line
    would check it, or a UserError naming file, key, value and the expected type.

    Booleans (store_true / store_false) take only YAML's unquoted true / false: the string "false"
    is refused rather than read as a true value. Typed options take a value of that type or a string
    the type converts, as on the command line (an int option refuses 1.5 rather than truncating it).
    List options (nargs * or +) take a list, or a single value as a one-element list, as
    `--flag 30` gives [30] on the command line. null is accepted where the default is None (unset).
    """
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise _bad_value(path, key, value, "true or false (an unquoted YAML boolean)")
        return value
    if value is None and action.default is None:
        return None
    if action.nargs in ("*", "+"):
        items = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not items:
            raise _bad_value(path, key, value, f"a non-empty list of {_type_name(action.type, plural=True)}")
        return [_scalar_for(action, v, path, key, value, list_of=True) for v in items]
    return _scalar_for(action, value, path, key, value)


def _scalar_for(action, item, path, key, whole, list_of=False):
    kind = action.type or str
    expected = f"a list of {_type_name(kind, plural=True)}" if list_of else _type_name(kind)
    if isinstance(item, bool) and kind is str:
        raise _bad_value(path, key, whole, expected + " (YAML reads unquoted on/off/yes/no/true/false as "
                         "booleans: quote the word, e.g. 'off')")
    if isinstance(item, bool) or isinstance(item, (list, dict)) or item is None:
        raise _bad_value(path, key, whole, expected)
    if kind is int and not isinstance(item, (int, str)):
        raise _bad_value(path, key, whole, expected)  # 1.5 is not silently truncated to 1
    if kind is str and not isinstance(item, str):
        raise _bad_value(path, key, whole, expected + " (quote it)")
    if kind is float and isinstance(item, int):
        item = float(item)
    try:
        value = kind(item) if isinstance(item, str) or kind is not type(item) else item
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise _bad_value(path, key, whole, expected) from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"--config {path}: key '{key}' is {item!r}, expected one of {list(action.choices)}")
    return value


def _type_name(kind, plural=False):
    names = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
    default = (f"a {getattr(kind, '__name__', 'value')}", f"{getattr(kind, '__name__', 'value')} values")
    return names.get(kind or str, default)[plural]


def _bad_value(path, key, value, expected):
    return UserError(f"--config {path}: key '{key}' is {value!r} ({type(value).__name__}), expected "
                     f"{expected}; fix that line of the file")
