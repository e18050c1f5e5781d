"""Metrics files: one JSON object per line (distillation `metrics.jsonl`, transfer `metrics.json`).
One writer, one reader, one rule for "the final evaluation line", and the mean ± std of trials."""
import json
import math
import os

DISTILL_METRICS_FILE = "metrics.jsonl"  # one line per epoch
TRANSFER_METRICS_FILE = "metrics.json"  # detectron2's name, JSON lines: training lines and evaluation lines

from cocord_common.errors import UserError

# A transfer metrics line is an evaluation line when one of its keys is this one or ends with "/" + it (both
# engines write `bbox/AP` for one test dataset and `<dataset>/bbox/AP` for several).
EVAL_KEY = "bbox/AP"


def append_jsonl(path, record):
    """Append `record` as one line (floats for numpy / tensor scalars) and flush it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, on_torn="error"):
    """The records of `path` ([] when it does not exist). A line that is not JSON (cut by a crash) raises
    ValueError naming the file and line when on_torn="error", and is skipped when on_torn="skip"."""
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if on_torn == "skip":
                    continue
                raise UserError(f"{path}:{n}: not a JSON line ({e}); the run that wrote it was cut") from e
    return rows


def read_jsonl_torn_tail(path):
    """(records, torn) of `path`: a last line that is not JSON is what a crash mid-append leaves, so it
    is left out and returned as `torn` (its 1-based line number and text), else torn is None. A bad
    line before the last one is damage a crash cannot cause: ValueError naming the file and line."""
    if not os.path.isfile(path):
        return [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, ln.strip()) for n, ln in enumerate(f, 1) if ln.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                return rows, (n, line)
            raise UserError(f"{path}:{n}: not a JSON line ({e}), and not the last line, so not a cut "
                             "append; repair or delete that line") from e
    return rows, None


def is_eval_line(record, key=EVAL_KEY):
    return any(k == key or k.endswith("/" + key) for k in record)


def eval_lines(rows, key=EVAL_KEY):
    """The evaluation lines among `rows`, in file order."""
    return [r for r in rows if is_eval_line(r, key)]


def final_eval_line(path, key=EVAL_KEY, on_torn="error"):
    """The last line of `path` holding `key`, or None."""
    found = eval_lines(read_jsonl(path, on_torn), key)
    return found[-1] if found else None


def mean_std(values):
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    values = list(values)
    n = len(values)
    if not n:
        raise ValueError("mean_std of no values")
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s
