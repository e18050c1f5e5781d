"""Packaging: the console entry points setup.py declares resolve to callables, the installed ones match
setup.py, and the thin scripts under tools/ run from any folder without sys.path patching."""
import ast
import importlib
import importlib.metadata
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the documented commands (README / docs), each the CLI of one stage or of the pipeline
COMMANDS = {"cocord-distill-imagenet", "cocord-distill-cifar", "cocord-convert", "cocord-transfer", "cocord-pipeline"}


def _setup_kwargs():
    """The keyword arguments of the setup() call in setup.py, read without running it."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: k.value for k in call.keywords}


def _console_scripts():
    """name -> "module:function" from setup.py's entry_points."""
    entry_points = ast.literal_eval(_setup_kwargs()["entry_points"])
    pairs = [line.split("=") for line in entry_points["console_scripts"]]
    return {name.strip(): target.strip() for name, target in pairs}


def test_setup_declares_the_documented_commands():
    assert set(_console_scripts()) == COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_entry_point_resolves_to_a_callable(name):
    module, _, attr = _console_scripts()[name].partition(":")
    assert module and attr, f"setup.py: {name} must be 'module:function'"
    assert callable(getattr(importlib.import_module(module), attr)), f"{name}: {module}.{attr} is not callable"


def test_installed_entry_points_match_setup_py():
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.dist is not None and ep.dist.name == "cocord-transfer"}
    assert installed == _console_scripts(), \
        f"the install is older than setup.py: run `{sys.executable} -m pip install -e . --no-deps`"


def test_setup_packages_every_top_level_package():
    """find_packages' include list names every folder of ours with an __init__.py (a package left out
    would import from a checkout but not from an install)."""
    include = ast.literal_eval(_setup_kwargs()["packages"].keywords[0].value)
    ours = sorted(d for d in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, d, "__init__.py"))
                  and d != "tests")
    assert ours and all(d in include and f"{d}.*" in include for d in ours), (ours, include)


@pytest.mark.parametrize("script", ["tools/run_pipeline.py", "tools/embedded_data.py", "tools/pipeline_report.py"])
def test_thin_scripts_run_from_any_folder(script, tmp_path):
    p = subprocess.run([sys.executable, os.path.join(REPO, script), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("usage: " + os.path.basename(script)), p.stderr


def test_pipeline_command_exit_status(tmp_path):
    """The installed `cocord-pipeline` follows the error convention: a bad config is `cocord-pipeline: error: …`,
    exit status 2."""
    exe = os.path.join(os.path.dirname(sys.executable), "cocord-pipeline")
    if not os.path.isfile(exe):
        pytest.skip(f"{exe} not installed (pip install -e .)")
    bad = subprocess.run([exe, "--config", str(tmp_path / "none.yaml")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.yaml does not exist" in bad.stderr, bad.stderr
    assert bad.stderr.startswith("cocord-pipeline: error: ") and "Traceback" not in bad.stderr, bad.stderr


def test_no_product_file_patches_sys_path():
    """The package is installed (pip install -e .): no product file edits sys.path to find it."""
    offenders = []
    for top in ("cocord_common", "cocord_pipeline", "distill", "transfer", "tools"):
        for dirpath, _dirs, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    tree = ast.parse(open(path).read(), path)
                    if any(isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", "") == "sys"
                           for n in ast.walk(tree)):
                        offenders.append(os.path.relpath(path, REPO))
    assert not offenders, f"these files use sys.path: {offenders}"
