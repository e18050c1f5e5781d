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


def reconcile_jsonl(path, saved, position, where, log, describe, key=None, in_place=False):
    """Make the JSON-lines metrics file `path` agree with the checkpoint a run resumes from (the source
    of truth), as both stages do on resume:
      * a last line cut by a kill mid-append is dropped, with a warning;
      * lines position() rejects (None: no line a run writes) are dropped, with a warning of their own;
      * lines after the checkpoint (position(r) > where: written by a run that died before its next
        checkpoint; the resumed run writes them again) are dropped;
      * lines the checkpoint carries (`saved`, in file order) that the file lacks (a kill between the
        checkpoint and the append, or a deleted line) are restored at their place, with a warning.
    `key(r)` says which lines are the same line (default: the whole record); `describe` names the
    checkpoint's position in messages. The file is rewritten only when something changed: atomically
    (temp file + rename), or with in_place=True through the same file (for a writer that already holds it
    open for appending; only safe when `saved` holds every line up to the checkpoint, so that a kill
    mid-rewrite loses nothing the next resume cannot restore). Returns the records the file holds now."""
    key = key or canonical_line
    rows, torn = read_jsonl_torn_tail(path)
    if torn is not None:
        log(_cut_line_warning(path, torn))
    placed = [r for r in rows if _position_or_none(position, r) is not None]
    if len(placed) < len(rows):
        odd = [json.dumps(r, default=float)[:60] for r in rows if _position_or_none(position, r) is None]
        log(f"warning: {path}: dropped {len(odd)} line(s) without the position a run writes (not lines of this "
            f"run), first {odd[0]!r}")
    kept = [r for r in placed if position(r) <= where]
    if len(kept) < len(placed):
        log(f"{path}: dropped {len(placed) - len(kept)} line(s) after {describe}, written after the checkpoint")
    merged, restored = _restore_saved(kept, saved, key, position)
    if restored:
        log(f"warning: {path} had no line{'s' if restored > 1 else ''} for {describe}"
            f"{f' ({restored} lines)' if restored > 1 else ''}; restored {'them' if restored > 1 else 'it'} "
            f"from the checkpoint")
    if torn is not None or merged != rows:
        _rewrite_jsonl(path, merged, in_place)
    return merged


def drop_cut_last_line(path, log):
    """Cut a last line left by a kill mid-append off `path` (a warning says so), so that appends follow
    whole lines; nothing else changes. By truncation: safe while a writer holds the file open for
    appending, and a kill during it loses no whole line. Returns the records the file holds now."""
    rows, torn = read_jsonl_torn_tail(path)
    if torn is not None:
        log(_cut_line_warning(path, torn))
        _truncate_cut_line(path)
    return rows


def _cut_line_warning(path, torn):
    return f"warning: {path}:{torn[0]}: dropped a cut last line (an append interrupted by a kill): {torn[1][:60]!r}"


def _truncate_cut_line(path):
    """Truncate `path` before its last non-blank line (the cut one)."""
    with open(path, "rb") as f:
        data = f.read().rstrip()
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def _rewrite_jsonl(path, records, in_place):
    """Write `records` as the whole of `path`: atomically, or through the same file when `in_place`."""
    text = "".join(json.dumps(r, default=float) + "\n" for r in records)
    if not in_place:
        from cocord_common.checkpoint import write_text_atomic  # checkpoint imports torch: only when needed
        write_text_atomic(path, text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def line_iteration(record):
    """The integer "iteration" of a transfer metrics line, else None (not a line of a training run)."""
    it = record.get("iteration")
    return it if isinstance(it, int) and not isinstance(it, bool) else None


def transfer_lines_for_checkpoint(output_dir, iteration):
    """What a transfer checkpoint at `iteration` carries: the lines metrics.json holds then, up to it
    (a cut last line left out), so that a resume can restore any of them (reconcile_transfer_metrics)."""
    rows, _ = read_jsonl_torn_tail(os.path.join(output_dir, TRANSFER_METRICS_FILE))
    return [r for r in rows if line_iteration(r) is not None and line_iteration(r) <= iteration]


def reconcile_transfer_metrics(output_dir, saved, iteration, log, in_place=False):
    """reconcile_jsonl for a transfer run resuming from its checkpoint at `iteration` that carries the
    lines `saved`; in_place=True for detectron2, whose JSONWriter opens metrics.json before the resume
    (safe there: its checkpoints carry every line up to them). A checkpoint written before checkpoints
    carried lines (`saved` None) cannot tell which lines are right: only a cut last line is dropped (as
    resumes did before), and the log says so."""
    path = os.path.join(output_dir, TRANSFER_METRICS_FILE)
    if saved is None:
        rows = drop_cut_last_line(path, log)
        log(f"{path}: the checkpoint of iteration {iteration} carries no metrics lines (written before "
            "checkpoints did), so no line is dropped or restored (a cut last line aside)")
        return rows
    return reconcile_jsonl(path, saved, line_iteration, iteration, log, f"iteration {iteration}", in_place=in_place)


def canonical_line(record):
    """A record as the file holds it (JSON, keys sorted): equal for a line and its checkpoint copy."""
    return json.dumps(record, default=float, sort_keys=True)


def _position_or_none(position, record):
    try:
        return position(record)
    except (KeyError, TypeError, ValueError):
        return None


def _restore_saved(kept, saved, key, position):
    """(kept with the lines of `saved` it lacks inserted, number inserted). Both lists are in file order:
    a missing line goes right after the previous saved line, or, for the first, before the first kept
    line at a later position (at the end when there is none)."""
    out, keys = list(kept), [key(r) for r in kept]
    present, at, restored = set(keys), None, 0
    for record in saved:
        k = key(record)
        if k in present:
            try:
                at = keys.index(k, at or 0) + 1
            except ValueError:  # out of order in the file: found before the previous saved line
                at = keys.index(k) + 1
            continue
        if at is None:
            at = next((i for i, r in enumerate(out) if position(r) > position(record)), len(out))
        out.insert(at, record)
        keys.insert(at, k)
        at += 1
        restored += 1
    return out, restored


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
