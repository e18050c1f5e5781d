"""The CIFAR benchmark's report (`run_pipeline.py --cifar`): report.md, results.json, plots/.

Every measured number is read from the runs' own `metrics.jsonl` (the final epoch's `val/top1`, mean ±
sample std over the trials that finished); the paper's numbers from its tables file (`cifar100_top1`
of ../shared/reference/paper_tables.json, or --paper-tables), by the pair's `paper_key` and the
method's paper row (configs/distill/cifar_pairs.yaml). A cell gets a paper value only where both pair
and method are the paper's; an absent tables file is a note, never an error.
"""
import json
import os

import matplotlib
import yaml

from cocord_common.checkpoint import write_text_atomic
from cocord_common.metrics import mean_std
from cocord_pipeline.cifar import benchmark_table, paper_row
from cocord_pipeline.layout import read_json
from cocord_pipeline.report import classification_result, load_paper_tables, non_finite_to_none, timing_lines

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TABLE = "cifar100_top1"


def paper_cifar_values(desc):
    """({(paper pair key, paper row): top-1}, file, note) from the paper's tables; {} with a note when
    the file is absent or holds no CIFAR table."""
    tables, file, note = load_paper_tables(desc.get("paper_tables"))
    if tables is None:
        return {}, file, note
    cifar = tables.get(TABLE) if isinstance(tables, dict) else None
    if not isinstance(cifar, dict):
        return {}, file, f"The paper's numbers are not shown: {file} has no '{TABLE}' table."
    values = {}
    for family, table in cifar.items():
        if family == "notes":
            continue
        if not isinstance(table, dict) or not isinstance(table.get("pairs"), list) \
                or not isinstance(table.get("rows"), dict):
            raise ValueError(f"{file}: {TABLE}.{family} must be a mapping with 'pairs' (a list) and 'rows'")
        for row, numbers in table["rows"].items():
            for pair, v in zip(table["pairs"], numbers or []):
                if v is not None:
                    values[(pair, row)] = float(v)
    return values, file, None


def run_result(folder, stage):
    """report.classification_result of one run (final top-1, source, curves of the main schedule), or
    None while the run is not complete (its stage's check, from the files)."""
    if stage is None or not stage.check()[0]:
        return None
    return classification_result(folder)


def _cell(plan, pair, method, paper):
    runs = [run_result(f, plan.stage_of(f)) for f in plan.runs[pair["key"]][method]]
    done = [r for r in runs if r]
    row = paper_row(method)
    p = paper.get((pair["paper_key"], row)) if pair["paper_key"] and row else None
    cell = {"pair": pair["key"], "teacher": pair["teacher"], "student": pair["student"],
            "paper_pair": pair["paper_key"], "family": pair["family"], "method": method, "paper_row": row,
            "trials": [r["top1"] for r in done], "sources": [r["source"] for r in done],
            "final_train_loss": [r["curve"]["train/loss"][-1] for r in done], "top1": None, "paper": p, "delta": None,
            "missing": len(runs) - len(done)}
    if done:
        m, s = mean_std(cell["trials"])
        cell["top1"] = {"mean": m, "std": s, "n": len(done)}
        if p is not None:
            cell["delta"] = m - p
    return cell, [r["curve"] if r else None for r in runs]


def _teacher(plan, arch, paper_keys, paper):
    t = plan.describe()["teachers"][arch]
    res = run_result(t["dir"], plan.stage_of(t["dir"])) if t["dir"] else None
    return {"arch": arch, "given": t["given"], "top1": res["top1"] if res else None,
            "source": res["source"] if res else None,
            "paper": {k: paper.get((k, "Teacher")) for k in paper_keys if (k, "Teacher") in paper}}


def collect(plan, paper):
    """results.json's cells and teachers; curves per pair (not saved in JSON: they are in the files)."""
    cells, curves, teachers = [], {}, {}
    for pair in plan.pairs:
        for m in plan.methods:
            cell, c = _cell(plan, pair, m, paper)
            cells.append(cell)
            curves.setdefault(pair["key"], {})[m] = c
    for arch in plan.teachers:
        keys = [p["paper_key"] for p in plan.pairs if p["teacher"] == arch and p["paper_key"]]
        teachers[arch] = _teacher(plan, arch, keys, paper)
    return cells, curves, teachers


# ---------------------------------------------------------------------------------------- plots
def _slug(pair_key):
    return pair_key.replace("->", "-")


def plot_pair_bars(cells, path):
    """Measured top-1 per method (bar: mean, error bar: std, dots: trials), the paper's value as a red bar."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(cells) + 2) + 2.5, 4))  # + the legend beside
    labelled = set()

    def label(name):  # one legend entry per kind
        first = name not in labelled
        labelled.add(name)
        return name if first else None
    for i, c in enumerate(cells):
        if c["top1"]:
            ref = c["method"] in REFERENCE_STYLES  # Student and KD in grey: the bars to beat
            ax.bar(i, c["top1"]["mean"], 0.7, yerr=c["top1"]["std"] if c["top1"]["n"] > 1 else None, capsize=3,
                   color="0.55" if ref else "C0",
                   label=label("Student / KD (measured)" if ref else "measured (mean over trials; dots: trials)"))
            ax.scatter([i] * len(c["trials"]), c["trials"], s=10, color="k", zorder=3)
        else:
            ax.text(i, 0, "not run", rotation=90, ha="center", va="bottom", fontsize=8, color="0.4")
        if c["paper"] is not None:
            ax.hlines(c["paper"], i - 0.4, i + 0.4, colors="C3", linewidth=2.5, zorder=4, label=label("paper"))
    ax.set_xticks(range(len(cells)))
    ax.set_xlim(-0.6, len(cells) - 0.4)
    ax.set_xticklabels([c["method"] for c in cells], rotation=35, ha="right")
    ax.set(title=f"{cells[0]['pair']}: test top-1 per method", ylabel="top-1 (%)")
    ax.grid(axis="y", alpha=0.3)
    if labelled:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside: never over a bar
    fig.savefig(path, dpi=110, bbox_inches="tight")  # room for the legend beside the axes
    plt.close(fig)


# the two references every method is read against: black, solid (Student) and dashed (KD)
REFERENCE_STYLES = {"supervised": dict(color="k", linestyle="-", linewidth=2.2),
                    "kd": dict(color="k", linestyle="--", linewidth=2.2)}


def _method_style(i, method):
    """A distinct colour per method (tab20's dark shades first), the references in black."""
    if method in REFERENCE_STYLES:
        return dict(REFERENCE_STYLES[method])
    return dict(color=plt.get_cmap("tab20")((2 * i) % 20 + (2 * i) // 20 % 2))


def plot_pair_curves(pair_key, curves, path):
    """Training loss and test top-1 per epoch of every method (trial 0 opaque, other trials faint)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (method, runs) in enumerate(curves.items()):
        for k, c in enumerate(runs):
            if not c:
                continue
            style = dict(_method_style(i, method), alpha=1.0 if k == 0 else 0.35, marker="o", markersize=2.5)
            axes[0].plot(c["epoch"], c["train/loss"], label=method if k == 0 else None, **style)
            axes[1].plot(c["epoch"], c["val/top1"], label=method if k == 0 else None, **style)
    axes[0].set(title=f"{pair_key}: training loss (total, weighted)", xlabel="epoch", ylabel="loss", yscale="log")
    axes[1].set(title=f"{pair_key}: test top-1", xlabel="epoch", ylabel="top-1 (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(plan, cells, curves):
    plots_dir = os.path.join(plan.out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    plots = {}
    for pair in plan.pairs:
        key = pair["key"]
        plots[f"bars:{key}"] = os.path.join(plots_dir, f"cifar_top1_{_slug(key)}.png")
        plot_pair_bars([c for c in cells if c["pair"] == key], plots[f"bars:{key}"])
        plots[f"curves:{key}"] = os.path.join(plots_dir, f"cifar_curves_{_slug(key)}.png")
        plot_pair_curves(key, curves[key], plots[f"curves:{key}"])
    return plots


# ---------------------------------------------------------------------------------------- report.md
def _num(x, fmt=".2f", sign=False):
    if x is None:
        return "—"
    return f"{x:+{fmt}}" if sign else f"{x:{fmt}}"


def _measured(cell):
    t = cell["top1"]
    if not t:
        return "not run yet"
    text = f"{t['mean']:.2f} ± {t['std']:.2f}" if t["n"] > 1 else f"{t['mean']:.2f}"
    return text + (f" ({cell['missing']} trial(s) not done)" if cell["missing"] else "")


def _pair_heading(pair):
    if pair["paper_key"]:
        return (f"## {pair['key']} (the paper's \"{pair['paper_name']}\", {pair['family']} family)", "")
    return (f"## {pair['key']}", f"Not one of the paper's 13 pairs: **no paper value exists for {pair['key']}**.")


def _teacher_line(t):
    where = f"given, `{t['given']}`" if t["given"] else (
        f"trained here, test top-1 {_num(t['top1'])}" if t["top1"] is not None else "trained here, not done yet")
    paper = "; ".join(f"paper {v:.2f} ({k})" for k, v in t["paper"].items())
    return f"Teacher **{t['arch']}**: {where}" + (f" ({paper})" if paper else "") + "."


def _pair_lines(pair, cells, teacher, plots, out):
    head, note = _pair_heading(pair)
    L = [head, ""] + ([note, ""] if note else [])
    if teacher:
        L += [_teacher_line(teacher), ""]
    ref = {c["method"]: c["top1"]["mean"] for c in cells if c["top1"]}
    L += ["| method | paper row | top-1 (%) measured | paper | Δ vs paper | Δ vs Student | Δ vs KD "
          "| final train loss |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        mean = c["top1"]["mean"] if c["top1"] else None
        vs = [None if mean is None or m not in ref or m == c["method"] else mean - ref[m] for m in ("supervised", "kd")]
        losses = [x for x in c["final_train_loss"] if x is not None]
        L.append(f"| `{c['method']}` | {c['paper_row'] or '—'} | {_measured(c)} | {_num(c['paper'])} | "
                 f"{_num(c['delta'], sign=True)} | {_num(vs[0], sign=True)} | {_num(vs[1], sign=True)} | "
                 f"{_num(sum(losses) / len(losses) if losses else None, '.3f')} |")
    L += ["", f"![top-1 per method, {pair['key']}]({os.path.relpath(plots['bars:' + pair['key']], out)})", "",
          f"![training curves, {pair['key']}]({os.path.relpath(plots['curves:' + pair['key']], out)})", ""]
    return L


SCALE_NOTE_EMBEDDED = """\
## Scale

These runs used the **embedded digits in CIFAR format** (10 classes, a few hundred 32x32 images, short
schedules on a CPU): they show that every stage and method runs end to end and how each method's loss
and accuracy move against the student trained alone (Student) and KD under the same budget. They say
nothing about the paper's CIFAR-100 numbers; where a pair and method are the paper's, its value and the
delta are shown anyway, for orientation only.
"""


def report_markdown(plan, desc, cells, teachers, plots, paper, paper_file, paper_note, timings):
    L = ["# CoCoRD CIFAR benchmark report", "",
         f"Data: `{desc['data']}`{' (the embedded digits, written by the data stage)' if desc['embedded'] else ''}. "
         f"{desc['trials']} trial{'s' if desc['trials'] > 1 else ''} per cell (seed + k); top-1 is the final "
         "epoch's test accuracy, mean ± sample std over the finished trials. Δ vs paper = measured mean − paper; "
         "Δ vs Student / KD = this method's mean − that method's mean on the same pair. "
         f"Pipeline config: `{os.path.relpath(desc['config_path'])}`.", ""]
    L += [paper_note if paper_note else
          f"Paper values: `{paper_file}` ({TABLE}), by the pair's paper key and the method's paper row "
          "(configs/distill/cifar_pairs.yaml `paper_rows`); only where both are the paper's.", ""]
    ours = set(benchmark_table()["paper_rows"].values()) | {"Teacher"}
    others = sorted({row for _, row in paper} - ours)
    if others:
        L += [f"The paper's rows {', '.join(others)} have no method in distill/methods and are not run.", ""]
    for pair in plan.pairs:
        L += _pair_lines(pair, [c for c in cells if c["pair"] == pair["key"]], teachers.get(pair["teacher"]),
                         plots, plan.out)
    L += timing_lines(timings, plan.out)
    if desc["embedded"]:
        L.append(SCALE_NOTE_EMBEDDED)
    L += ["## Settings", "", "```yaml", yaml.safe_dump(desc["config"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(L)


def write_report(plan):
    """Write report.md, results.json and plots/ under the plan's output folder; returns their paths."""
    desc = plan.describe()
    paper, paper_file, paper_note = paper_cifar_values(desc)
    cells, curves, teachers = collect(plan, paper)
    plots = write_plots(plan, cells, curves)
    timings = read_json(desc["timings"], {})
    results = {"trials": desc["trials"], "std": "sample standard deviation (ddof=1) over finished trials",
               "config": desc["config_path"], "data": desc["data"], "embedded": desc["embedded"],
               "paper": {"file": paper_file, "table": TABLE, "note": paper_note},
               "pairs": desc["pairs"], "methods": desc["methods"], "teachers": teachers, "cells": cells,
               "plots": {k: os.path.relpath(v, plan.out) for k, v in plots.items()}, "timings_s": timings}
    path = os.path.join(plan.out, "results.json")
    write_text_atomic(path, json.dumps(non_finite_to_none(results), indent=1, allow_nan=False))
    report = os.path.join(plan.out, "report.md")
    write_text_atomic(report, report_markdown(plan, desc, cells, teachers, plots, paper, paper_file, paper_note,
                                                   timings))
    return {"report": report, "results": path, "plots": plots}
