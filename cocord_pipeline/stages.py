"""Which stages the pipeline has, the command each runs, and when each is complete.

    data                 cocord_pipeline.embedded_data (in-process; absent with --imagenet)
    teacher              distill/train_imagenet.py --method supervised -a <teacher_arch>
    distill:<method>     distill/train_imagenet.py --method <method> --teacher-weights <teacher>
    convert:<init>       tools/convert_to_d2.py <student_backbone.pth> <init>.pkl --check
    transfer:<ds>:<init> transfer/train_net.py --config-file <cfg> --trials N MODEL.WEIGHTS <init>.pkl
    report               report.md, results.json, plots/*.png (cocord_pipeline.report; in-process)

Completeness is judged from the files on disk only (final checkpoint + final metrics, the converted
file, every trial's evaluation; I3, I7), so an interrupted run continues where it stopped. A stage's
`run(stage, runner)` starts its command through the runner (runner.py), which owns the processes.
"""
import dataclasses
import functools
import json
import os
import re
import sys

import yaml

from cocord_common.errors import UserError
from cocord_common.metrics import eval_lines, final_eval_line, read_jsonl, TRANSFER_METRICS_FILE
from cocord_pipeline import embedded_data, layout, report
from cocord_pipeline.config import REPO, repo_path, substitute, words

GROUPS = ("data", "teacher", "distill", "convert", "transfer", "report")


class Stage:
    """One unit of work. `check()` -> (complete, reason) from the outputs on disk; `inputs` are files
    earlier stages produce (a stage is stale when one is newer than its `stamp` output); `argv` is the
    command of a fresh (non-resumed) run, None for in-process stages. A `summary` stage (the report)
    comes after every other selected stage and is always regenerated."""

    def __init__(self, name, group, check, run, inputs=(), stamp=None, out_dir=None, argv=None, summary=False):
        self.name, self.group, self.check, self.run = name, group, check, run
        self.inputs, self.stamp, self.out_dir = list(inputs), stamp, out_dir
        self.argv, self.summary = argv, summary
        self.stale = False

    def status(self):
        """(complete, reason); sets `self.stale` when complete but older than an input."""
        self.stale = False
        complete, reason = self.check()
        if complete and self.stamp:
            t = _mtime(self.stamp)
            newer = [p for p in self.inputs if _mtime(p) is not None and t is not None and _mtime(p) > t]
            if newer:
                self.stale = True
                return False, f"stale: {newer[0]} is newer than {self.stamp}"
        return complete, reason


def _mtime(path):
    return os.path.getmtime(path) if os.path.exists(path) else None


# ---------------------------------------------------------------------------------------- completeness
def distill_state(folder, epochs):
    """(complete, reason) of a distill output folder, judged from its files (I3). `epochs` None: read
    from the run's own config.yaml."""
    backbone = os.path.join(folder, "student_backbone.pth")
    cfg_path = os.path.join(folder, "config.yaml")
    if epochs is None and os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            epochs = (yaml.safe_load(f) or {}).get("epochs")
    if epochs is None:
        return False, "not started"
    ckpt = os.path.join(folder, f"checkpoint_{int(epochs):04d}.pth")
    # a line cut by a crash is skipped: the stage is then judged incomplete by what is missing
    rows = eval_lines(read_jsonl(os.path.join(folder, "metrics.jsonl"), on_torn="skip"), key="val/top1")
    done = max((int(r["epoch"]) for r in rows), default=None)
    if not os.path.isfile(ckpt) or not os.path.isfile(backbone):
        have = sorted(f for f in os.listdir(folder) if f.startswith("checkpoint_")) if os.path.isdir(folder) else []
        return False, f"no {os.path.basename(ckpt)} yet (have {have[-1] if have else 'none'})"
    # metrics.jsonl's `epoch` is the number of completed epochs (1-based, as the checkpoints)
    if done is None or done < int(epochs):
        return False, f"metrics.jsonl has no final-epoch validation (last epoch {done})"
    return True, f"{epochs} epochs, final top-1 {rows[-1]['val/top1']:.2f}"


def transfer_state(folder, trials):
    """(complete, reason) of a `train_net.py --trials N` output folder (I7)."""
    evals = []
    for k in range(trials):
        tdir = layout.trial_dir(folder, k, trials)
        last = final_eval_line(os.path.join(tdir, TRANSFER_METRICS_FILE), on_torn="skip")
        if not os.path.isfile(os.path.join(tdir, "model_final.pth")):
            return False, f"trial {k} has no model_final.pth yet"
        if last is None:
            return False, f"trial {k} has no evaluation in metrics.json yet"
        evals.append(last["bbox/AP"])
    if trials > 1 and not os.path.isfile(os.path.join(folder, "trials_summary.json")):
        return False, "no trials_summary.json yet"
    return True, "AP " + ", ".join(f"{a:.1f}" for a in evals)


def transfer_stamp(folder, trials):
    """The file whose time says when a transfer stage finished."""
    return os.path.join(folder, "trials_summary.json" if trials > 1 else "model_final.pth")


def prune_intermediate_checkpoints(folder, trials):
    """Delete the periodic model_XXXXXXX.pth of every trial that finished (last_checkpoint names
    model_final.pth): they only serve resumption and are most of a run's disk use. Returns bytes freed."""
    freed = 0
    for k in range(trials):
        tdir = layout.trial_dir(folder, k, trials)
        try:
            with open(os.path.join(tdir, "last_checkpoint")) as f:
                if f.read().strip() != "model_final.pth":
                    continue
        except FileNotFoundError:
            continue
        for name in os.listdir(tdir):
            if re.fullmatch(r"model_\d{7}\.pth", name):
                path = os.path.join(tdir, name)
                freed += os.path.getsize(path)
                os.remove(path)
    return freed


def flag_value(args, flag):
    """Value following `flag` in a list of command-line words (last one wins), else None."""
    val = None
    for i, a in enumerate(args[:-1]):
        if a == flag:
            val = args[i + 1]
    return val


# ---------------------------------------------------------------------------------------- actions
# what each kind of stage does when its turn comes: `runner` gives `log` and `run_command(stage, argv)`
def _build_data(data_dir, spec, stage, runner):
    m = embedded_data.build(data_dir, spec)
    runner.log(f"    | wrote {json.dumps(m['counts'])}")


def run_distill(stage, runner):
    """A distill stage's action (both pipelines): its command, `--resume auto` when a run was cut."""
    last = os.path.join(stage.out_dir, "last_checkpoint")
    argv = stage.argv
    if os.path.isfile(last):
        with open(last) as f:
            runner.log(f"    resuming from {f.read().strip()}")
        argv = argv + ["--resume", "auto"]
    runner.run_command(stage, argv)


def _run_convert(stage, runner):
    os.makedirs(os.path.dirname(stage.stamp), exist_ok=True)
    runner.run_command(stage, stage.argv)


def _run_transfer(trials, stage, runner):
    folder, argv = stage.out_dir, stage.argv
    if any(os.path.isfile(os.path.join(layout.trial_dir(folder, k, trials), "last_checkpoint"))
           for k in range(trials)):
        runner.log("    resuming the trials from their last checkpoints")
        argv = argv[:2] + ["--resume"] + argv[2:]
    runner.run_command(stage, argv)
    freed = prune_intermediate_checkpoints(folder, trials)
    if freed:
        runner.log(f"    | removed intermediate checkpoints of finished trials ({freed / 2**20:.0f} MiB)")


def _converted(pkl):
    return os.path.isfile(pkl), "converted" if os.path.isfile(pkl) else "not converted"


def _embedded_data_built(data_dir, spec):
    ok = embedded_data.is_complete(data_dir, spec)
    return ok, "manifest and files match the spec" if ok else "not built"


# ---------------------------------------------------------------------------------------- the plan
class StagePlan:
    """What runner.Runner needs of a plan: `out`, `stages` in run order, `timings_path`, `runs_path`,
    stage selection and producers. Plan (below) is the transfer pipeline's, cifar.CifarPlan the CIFAR
    benchmark's."""
    stages = ()
    groups = GROUPS

    @property
    def commands(self):
        """Stage name -> the command of a fresh (non-resumed) run of that stage."""
        return {s.name: s.argv for s in self.stages if s.argv is not None}

    def select(self, only=None, from_stage=None):
        """The stages `--only` / `--from-stage` pick (stage names or groups), in run order."""
        names = [s.name for s in self.stages]
        chosen = list(self.stages)
        if from_stage:
            idx = next((i for i, s in enumerate(self.stages) if from_stage in (s.group, s.name)), None)
            if idx is None:
                raise UserError(f"--from-stage {from_stage}: no such stage or group; groups {self.groups}, stages {names}")
            chosen = self.stages[idx:]
        if only:
            unknown = [o for o in only if not any(o in (s.group, s.name) for s in self.stages)]
            if unknown:
                raise UserError(f"--only {' '.join(unknown)}: no such stage or group; groups {self.groups}, "
                                 f"stages {names}")
            chosen = [s for s in chosen if s.group in only or s.name in only]
        return chosen

    def producer(self, path):
        """Name of the stage that writes `path`."""
        for s in self.stages:
            if s.stamp and (path == s.stamp or (s.out_dir and path.startswith(s.out_dir + os.sep))):
                return s.name
        return "(outside the pipeline)"


class Plan(StagePlan):
    """Every stage of one pipeline config, in run order, with its command and completeness check."""

    def __init__(self, cfg, cfg_path, out, python=sys.executable, paper_tables=None):
        self.cfg, self.cfg_path, self.out = cfg, cfg_path, os.path.abspath(out)
        self.python = python
        self.paper_tables = paper_tables  # the report's paper tables file; None: its default
        self.data_dir = layout.data_dir(self.out)
        self.timings_path = layout.timings_file(self.out)
        self.runs_path = layout.runs_file(self.out)
        self.seed = int(cfg.get("seed", 0))
        self.mapping = {"data": self.data_dir, "out": self.out, "repo": REPO}
        self.stages = []
        cls_dir, data_inputs = self._add_data()
        self.teacher_weights, teacher_inputs = self._add_teacher(cls_dir, data_inputs)
        backbones = self._add_students(cls_dir, data_inputs, teacher_inputs)
        self.weights = self._add_conversions(backbones)
        self.inits = (["random"] if cfg["transfer"].get("random_init", True) else []) + list(self.weights)
        self._add_transfers(data_inputs)
        self.stages.append(Stage("report", "report", lambda: (False, "always regenerated"), self._write_report,
                                 summary=True))

    # ---- building the stages, in run order
    def _add_data(self):
        """The embedded data stage (when the config asks for it); returns (classification folder, the
        files the later stages read from it)."""
        data_cfg = self.cfg.get("data", {})
        if data_cfg.get("kind", "embedded") != "embedded":
            cls_dir = data_cfg.get("imagenet")
            if not cls_dir or not os.path.isdir(os.path.join(cls_dir, "train")):
                raise FileNotFoundError(f"data.imagenet: {cls_dir!r} must be a folder holding train/ and "
                                        "val/ ImageFolder trees (pass --imagenet DIR)")
            return cls_dir, []
        spec = embedded_data.QUICK_SPEC if data_cfg.get("quick") else embedded_data.EmbeddedSpec()
        spec = dataclasses.replace(spec, seed=self.seed)
        manifest = os.path.join(self.data_dir, embedded_data.MANIFEST)
        self.stages.append(Stage("data", "data", functools.partial(_embedded_data_built, self.data_dir, spec),
                                 functools.partial(_build_data, self.data_dir, spec), stamp=manifest))
        return os.path.join(self.data_dir, "classification"), [manifest]

    def _add_distill(self, name, group, method, arch, extra, config_file, teacher_weights, cls_dir, inputs):
        """One run of distill/train_imagenet.py; returns the student backbone file it writes."""
        dc = self.cfg["distill"]
        folder = layout.distill_dir(self.out, name)
        argv = [self.python, os.path.join(REPO, "distill", "train_imagenet.py"), cls_dir, "-a", arch,
                "--method", method, "--seed", str(self.seed), "--output-dir", folder]
        if config_file:
            argv += ["--config", repo_path(config_file)]
        if teacher_weights:
            argv += ["--teacher-arch", dc["teacher_arch"], "--teacher-weights", teacher_weights]
        argv += words(dc.get("common_args"), self.mapping) + extra
        epochs = flag_value(argv, "--epochs")
        epochs = int(epochs) if epochs is not None else None
        backbone = os.path.join(folder, "student_backbone.pth")
        self.stages.append(Stage(name if group == "teacher" else f"distill:{name}", group,
                                 functools.partial(distill_state, folder, epochs), run_distill,
                                 inputs=inputs, stamp=backbone, out_dir=folder, argv=argv))
        return backbone

    def _add_teacher(self, cls_dir, data_inputs):
        """The teacher: trained here (stage 'teacher') unless distill.teacher_weights names one.
        Returns (teacher weights, the files a student waits for)."""
        dc = self.cfg["distill"]
        given = dc.get("teacher_weights") or ""
        if given:
            given = substitute(given, self.mapping)
            return given, [given] if os.path.sep in given else []  # else a torchvision weights name
        backbone = self._add_distill("teacher", "teacher", "supervised", dc["teacher_arch"],
                                     words(dc.get("teacher_args"), self.mapping), dc.get("teacher_config"),
                                     None, cls_dir, data_inputs)
        return backbone, [backbone]

    def _add_students(self, cls_dir, data_inputs, teacher_inputs):
        """One distill stage per method; returns student name -> backbone file."""
        dc = self.cfg["distill"]
        backbones = {}
        for m in dc["methods"]:
            name = layout.student_name(m)
            extra = words((dc.get("method_args") or {}).get(m), self.mapping)
            cfg_file = (dc.get("method_configs") or {}).get(m)
            tw = None if m == "supervised" else self.teacher_weights
            backbones[name] = self._add_distill(name, "distill", m, dc["arch"], extra, cfg_file, tw, cls_dir,
                                                data_inputs + ([] if m == "supervised" else teacher_inputs))
        return backbones

    def _add_conversions(self, backbones):
        """One tools/convert_to_d2.py run per student; returns student name -> converted .pkl."""
        weights = {}
        for name, backbone in backbones.items():
            pkl = weights[name] = layout.weights_file(self.out, name)
            argv = [self.python, os.path.join(REPO, "tools", "convert_to_d2.py"), backbone, pkl, "--check"]
            self.stages.append(Stage(f"convert:{name}", "convert", functools.partial(_converted, pkl),
                                     _run_convert, inputs=[backbone], stamp=pkl, argv=argv))
        return weights

    def _add_transfers(self, data_inputs):
        """Every initialisation fine-tuned on every dataset (transfer/train_net.py --trials N)."""
        tc = self.cfg["transfer"]
        trials = int(tc["trials"])
        for ds, dcfg in tc["datasets"].items():
            config_file = repo_path(dcfg["config"])
            opts = words(dcfg.get("opts"), self.mapping) + words(tc.get("opts"), self.mapping)
            for init in self.inits:
                folder = layout.transfer_dir(self.out, ds, init)
                pkl = self.weights.get(init, "")
                argv = [self.python, os.path.join(REPO, "transfer", "train_net.py"), "--config-file", config_file,
                        "--engine", tc["engine"], "--trials", str(trials),
                        "OUTPUT_DIR", folder, "MODEL.WEIGHTS", pkl, "SEED", str(self.seed)] + opts
                self.stages.append(Stage(f"transfer:{ds}:{init}", "transfer",
                                         functools.partial(transfer_state, folder, trials),
                                         functools.partial(_run_transfer, trials),
                                         inputs=([pkl] if pkl else []) + data_inputs + [config_file],
                                         stamp=transfer_stamp(folder, trials), out_dir=folder, argv=argv))

    def _write_report(self, stage, runner):
        """The report: always rewritten (cheap) from the files the stages left."""
        res = report.write_report(self.out, self.describe())
        runner.log(f"    | wrote {res['report']}")

    # ---- queries
    def describe(self):
        """What the report needs to find every run's files."""
        dc, tc = self.cfg["distill"], self.cfg["transfer"]
        data_cfg = self.cfg.get("data", {})
        students = {layout.student_name(m): m for m in dc["methods"]}
        return {
            "config_path": self.cfg_path, "config": self.cfg,
            "arch": dc["arch"], "teacher_arch": dc["teacher_arch"],
            "teacher_dir": layout.distill_dir(self.out, "teacher") if not dc.get("teacher_weights") else None,
            "teacher_weights": self.teacher_weights,
            "students": {name: {"method": m, "dir": layout.distill_dir(self.out, name)} for name, m in students.items()},
            "inits": self.inits, "datasets": list(tc["datasets"]), "trials": int(tc["trials"]),
            "transfer_dirs": {ds: {i: layout.transfer_dir(self.out, ds, i) for i in self.inits}
                              for ds in tc["datasets"]},
            "timings": self.timings_path, "embedded": data_cfg.get("kind", "embedded") == "embedded",
            "quick": bool(data_cfg.get("quick")), "paper_tables": self.paper_tables,
        }
