"""Where the pipeline's stages write under its output folder (--output-dir), and the driver's own
JSON files there:

    data/                      embedded datasets          logs/<stage>.log   every stage's output
    distill/<teacher|name>/    distillation runs          timings.json       seconds per stage
    weights/<name>.pkl         converted students         runs.json          one entry per invocation
    transfer/<ds>/<init>/      fine-tuning (trial{k}/ inside when trials > 1)
    report.md, results.json, plots/

The CIFAR benchmark (`--cifar`, cocord_pipeline/cifar.py) writes instead:

    data/cifar-100-python/     the embedded digits in CIFAR format (`--cifar embedded` only)
    teachers/<arch>/           teachers trained here (--method supervised)
    students/<arch>/supervised/trial{k}/       the "Student" row (no teacher: shared by every pair)
    pairs/<teacher>-<student>/<student_name(method)>/trial{k}/   the distilled students (crd+kd -> crd_kd)
"""
import json
import os

from cocord_common.checkpoint import write_text_atomic


def student_name(method):
    """Folder and table name of a method's student ("crd+kd" -> "crd_kd")."""
    return method.replace("+", "_")


def data_dir(out):
    return os.path.join(out, "data")


def distill_dir(out, name):
    return os.path.join(out, "distill", name)


def cifar_teacher_dir(out, arch):
    return os.path.join(out, "teachers", arch)


def cifar_run_dir(out, teacher, student, method, trial):
    """A CIFAR student's folder; `supervised` runs need no teacher, so every pair shares them."""
    if method == "supervised":
        return os.path.join(out, "students", student, "supervised", f"trial{trial}")
    return os.path.join(out, "pairs", f"{teacher}-{student}", student_name(method), f"trial{trial}")


def weights_file(out, name):
    return os.path.join(out, "weights", f"{name}.pkl")


def transfer_dir(out, dataset, init):
    return os.path.join(out, "transfer", dataset, init)


def trial_dir(folder, k, trials):
    """Where trial k of a `train_net.py --trials N` run lives (I7: N=1 writes OUTPUT_DIR itself)."""
    return folder if trials == 1 else os.path.join(folder, f"trial{k}")


def log_file(out, stage_name):
    return os.path.join(out, "logs", stage_name.replace(":", "_").replace("+", "_") + ".log")


def timings_file(out):
    return os.path.join(out, "timings.json")


def runs_file(out):
    return os.path.join(out, "runs.json")


def read_json(path, default):
    """The JSON document at `path`, or `default` when there is no such file."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return default


def write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=1))
