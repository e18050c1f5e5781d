#!/usr/bin/env python
"""The whole CoCoRD transfer pipeline in one command: data -> teacher -> students -> conversion ->
detection fine-tuning (VOC- and COCO-format, N trials) -> report.

Every stage runs the project's real stage script as a subprocess:

    data                 tools/embedded_data.py (in-process; skipped with --imagenet)
    teacher              distill/train_imagenet.py --method supervised -a <teacher_arch>
    distill:<method>     distill/train_imagenet.py --method <method> --teacher-weights <teacher>
    convert:<init>       tools/convert_to_d2.py <student_backbone.pth> <init>.pkl --check
    transfer:<ds>:<init> transfer/train_net.py --config-file <cfg> --trials N MODEL.WEIGHTS <init>.pkl
    report               report.md, results.json, plots/*.png (tools/pipeline_report.py)

A stage is skipped when its outputs on disk are complete (final checkpoint + final metrics, the
converted file, every trial's evaluation) and newer than its inputs, so an interrupted run
continues where it stopped; a partly done training stage is resumed from its last checkpoint.
`--only` / `--from-stage` select stages, `--force` re-runs selected stages even when complete.

Layout of --output-dir: data/ (embedded datasets), distill/<teacher|method>/, weights/<init>.pkl,
transfer/<dataset>/<init>/, logs/<stage>.log, timings.json, report.md, results.json, plots/.
"""
import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import yaml

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path[:0] = [TOOLS, REPO]
from cocord_common.checkpoint import write_text_atomic  # noqa: E402
from cocord_common.yaml_config import load_yaml_with_base  # noqa: E402
import embedded_data  # noqa: E402
import pipeline_report  # noqa: E402

GROUPS = ("data", "teacher", "distill", "convert", "transfer", "report")
METHODS = ("supervised", "kd", "crd", "crd+kd", "cocord", "cocord+kd")
CONFIGS = os.path.join(REPO, "configs", "pipeline")
# the keys a pipeline config may hold (anything else is a typo and is refused)
SCHEMA = {
    "data": {"kind": None, "quick": None, "imagenet": None},
    "seed": None,
    "distill": {"arch": None, "teacher_arch": None, "teacher_weights": None, "methods": None,
                "common_args": None, "teacher_args": None, "method_args": None, "method_configs": None,
                "teacher_config": None},
    "transfer": {"engine": None, "trials": None, "random_init": None, "datasets": None, "opts": None},
}


# ---------------------------------------------------------------------------------------- config
def _check_schema(d, schema, path, prefix=""):
    for k, v in d.items():
        if k not in schema:
            raise ValueError(f"{path}: unknown key '{prefix}{k}'; allowed here: {sorted(schema)}")
        if isinstance(schema[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"{path}: '{prefix}{k}' must be a mapping, got {v!r}")
            _check_schema(v, schema[k], path, prefix + k + ".")


def load_pipeline_config(path):
    """Read a pipeline YAML; `_BASE_: other.yaml` (relative to the file) is merged underneath."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pipeline config {path} does not exist (see {CONFIGS} for the shipped ones)")
    return load_yaml_with_base(path, check=lambda d, p: _check_schema(d, SCHEMA, p), what="pipeline config")


def validate_config(cfg, path):
    def need(cond, msg):
        if not cond:
            raise ValueError(f"{path}: {msg}")
    dc, tc = cfg.get("distill", {}), cfg.get("transfer", {})
    for k in ("arch", "teacher_arch", "methods", "common_args"):
        need(k in dc, f"missing key distill.{k}")
    for m in dc["methods"]:
        need(m in METHODS, f"distill.methods: unknown method '{m}'; choose from {METHODS}")
    for k in ("method_args", "method_configs"):
        for m in dc.get(k) or {}:
            need(m in METHODS, f"distill.{k}: unknown method '{m}'; choose from {METHODS}")
    for k in ("common_args", "teacher_args"):
        need(isinstance(dc.get(k, []), list), f"distill.{k} must be a list of command-line words")
    for k in ("engine", "trials", "datasets"):
        need(k in tc, f"missing key transfer.{k}")
    need(isinstance(tc["trials"], int) and tc["trials"] >= 1, f"transfer.trials must be an integer >= 1, "
         f"got {tc['trials']!r}")
    need(tc["engine"] in ("auto", "detectron2", "torchvision"),
         f"transfer.engine must be auto|detectron2|torchvision, got {tc['engine']!r}")
    need(isinstance(tc["datasets"], dict) and tc["datasets"], "transfer.datasets must name at least one dataset")
    for name, ds in tc["datasets"].items():
        need(re.fullmatch(r"[A-Za-z0-9_]+", name), f"transfer.datasets: name '{name}' must be [A-Za-z0-9_]+")
        need(isinstance(ds, dict) and "config" in ds, f"transfer.datasets.{name} needs a 'config' file")
        unknown = set(ds) - {"config", "opts", "label"}
        need(not unknown, f"transfer.datasets.{name}: unknown keys {sorted(unknown)}")
        need(len(ds.get("opts") or []) % 2 == 0, f"transfer.datasets.{name}.opts must be KEY VALUE pairs")
    need(len(tc.get("opts") or []) % 2 == 0, "transfer.opts must be KEY VALUE pairs")


def _words(values, mapping):
    """Command-line words from a YAML list (numbers become strings), placeholders filled in."""
    return [str(_subst(v, mapping)) for v in (values or [])]


def _subst(value, mapping):
    if isinstance(value, str):
        for k, v in mapping.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_subst(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, mapping) for k, v in value.items()}
    return value


def _flag_value(args, flag):
    """Value following `flag` in a list of command-line words (last one wins), else None."""
    val = None
    for i, a in enumerate(args[:-1]):
        if a == flag:
            val = args[i + 1]
    return val


# ---------------------------------------------------------------------------------------- checks
def _mtime(path):
    return os.path.getmtime(path) if os.path.exists(path) else None


def _read_jsonl(path):
    rows = []
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a crash: the stage is judged incomplete elsewhere
    return rows


def distill_state(folder, epochs):
    """(complete, reason) of a distill output folder, judged from its files (I3)."""
    backbone = os.path.join(folder, "student_backbone.pth")
    cfg_path = os.path.join(folder, "config.yaml")
    if epochs is None and os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            epochs = (yaml.safe_load(f) or {}).get("epochs")
    if epochs is None:
        return False, "not started"
    ckpt = os.path.join(folder, f"checkpoint_{int(epochs):04d}.pth")
    rows = [r for r in _read_jsonl(os.path.join(folder, "metrics.jsonl")) if "val/top1" in r]
    done = max((int(r["epoch"]) for r in rows), default=None)
    if not os.path.isfile(ckpt) or not os.path.isfile(backbone):
        have = sorted(f for f in os.listdir(folder) if f.startswith("checkpoint_")) if os.path.isdir(folder) else []
        return False, f"no {os.path.basename(ckpt)} yet (have {have[-1] if have else 'none'})"
    if done is None or done < _final_epoch_label(rows, epochs):
        return False, f"metrics.jsonl has no final-epoch validation (last epoch {done})"
    return True, f"{epochs} epochs, final top-1 {rows[-1]['val/top1']:.2f}"


def _final_epoch_label(rows, epochs):
    """metrics.jsonl's `epoch` is the number of completed epochs (1-based, as the checkpoints)."""
    return int(epochs)


def trial_dir(folder, k, trials):
    """Where trial k of a `train_net.py --trials N` run lives (I7: N=1 writes OUTPUT_DIR itself)."""
    return folder if trials == 1 else os.path.join(folder, f"trial{k}")


def transfer_state(folder, trials):
    """(complete, reason) of a `train_net.py --trials N` output folder (I7)."""
    evals = []
    for k in range(trials):
        tdir = trial_dir(folder, k, trials)
        rows = [r for r in _read_jsonl(os.path.join(tdir, "metrics.json")) if "bbox/AP" in r]
        if not os.path.isfile(os.path.join(tdir, "model_final.pth")):
            return False, f"trial {k} has no model_final.pth yet"
        if not rows:
            return False, f"trial {k} has no evaluation in metrics.json yet"
        evals.append(rows[-1]["bbox/AP"])
    if trials > 1 and not os.path.isfile(os.path.join(folder, "trials_summary.json")):
        return False, "no trials_summary.json yet"
    return True, "AP " + ", ".join(f"{a:.1f}" for a in evals)


def prune_intermediate_checkpoints(folder, trials):
    """Delete the periodic model_XXXXXXX.pth of every trial that finished (last_checkpoint names
    model_final.pth): they only serve resumption and are most of a run's disk use. Returns bytes freed."""
    freed = 0
    for k in range(trials):
        tdir = trial_dir(folder, k, trials)
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


def transfer_stamp(folder, trials):
    """The file whose time says when a transfer stage finished."""
    return os.path.join(folder, "trials_summary.json" if trials > 1 else "model_final.pth")


# ---------------------------------------------------------------------------------------- stages
class Stage:
    """One unit of work. `check()` -> (complete, reason) from the outputs on disk; `inputs` are
    files earlier stages produce (a stage is stale when one is newer than its `stamp` output)."""

    def __init__(self, name, group, check, run, inputs=(), stamp=None, out_dir=None):
        self.name, self.group, self.check, self.run = name, group, check, run
        self.inputs, self.stamp, self.out_dir = list(inputs), stamp, out_dir

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


class Pipeline:
    def __init__(self, cfg, cfg_path, out, python=sys.executable, log=print, stream=True, jobs=1, threads=None):
        self.cfg, self.cfg_path, self.out = cfg, cfg_path, os.path.abspath(out)
        self.python, self.log, self.stream = python, log, stream
        self.jobs, self.threads = jobs, threads
        self._procs, self._lock = [], threading.Lock()
        self.runs_path = os.path.join(self.out, "runs.json")
        self.data_dir = os.path.join(self.out, "data")
        self.timings_path = os.path.join(self.out, "timings.json")
        self.stages = self._build()

    # ---- helpers
    def _script(self, *parts):
        return os.path.join(REPO, *parts)

    def _run_cmd(self, stage, argv, env=None):
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        log_path = os.path.join(self.out, "logs", stage.name.replace(":", "_").replace("+", "_") + ".log")
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONUNBUFFERED"] = "1"
        if self.threads:
            # one OpenMP/MKL pool per stage: pools larger than the free cores spin and crawl
            full_env["OMP_NUM_THREADS"] = full_env["MKL_NUM_THREADS"] = str(self.threads)
        full_env.update(env or {})
        prefix = f"    [{stage.name}] | " if self.jobs > 1 else "    | "
        with open(log_path, "a") as logf:
            logf.write(f"\n$ {' '.join(_quote(a) for a in argv)}\n")
            logf.flush()
            proc = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    start_new_session=True)  # its own group: we stop it and its workers
            with self._lock:
                self._procs.append(proc)
            tail = []
            try:
                for line in proc.stdout:
                    logf.write(line)
                    tail = (tail + [line.rstrip()])[-25:]
                    if self.stream:
                        self.log(prefix + line.rstrip())
                rc = proc.wait()
            finally:
                with self._lock:
                    self._procs.remove(proc)
        if rc != 0:
            shown = "\n".join(tail) if not self.stream else "(output above)"
            if rc < 0:
                raise StageFailed(f"stage {stage.name} was stopped (signal {-rc}); log: {log_path}")
            raise StageFailed(f"stage {stage.name} failed (exit code {rc}); command:\n  "
                              f"{' '.join(_quote(a) for a in argv)}\nfull log: {log_path}\n{shown}")

    # ---- stage graph
    def _build(self):
        cfg, out = self.cfg, self.out
        dc, tc = cfg["distill"], cfg["transfer"]
        seed = int(cfg.get("seed", 0))
        mapping = {"data": self.data_dir, "out": out, "repo": REPO}
        stages = []
        self.commands = {}  # stage name -> argv of a fresh (non-resumed) run, for --list and tests

        # 1. data
        data_cfg = cfg.get("data", {})
        if data_cfg.get("kind", "embedded") == "embedded":
            spec = embedded_data.QUICK_SPEC if data_cfg.get("quick") else embedded_data.EmbeddedSpec()
            import dataclasses
            spec = dataclasses.replace(spec, seed=seed)
            cls_dir = os.path.join(self.data_dir, "classification")

            def check_data():
                ok = embedded_data.is_complete(self.data_dir, spec)
                return ok, "manifest and files match the spec" if ok else "not built"

            def run_data(stage):
                m = embedded_data.build(self.data_dir, spec)
                self.log(f"    | wrote {json.dumps(m['counts'])}")
            stages.append(Stage("data", "data", check_data, run_data,
                                stamp=os.path.join(self.data_dir, embedded_data.MANIFEST)))
            data_inputs = [os.path.join(self.data_dir, embedded_data.MANIFEST)]
        else:
            cls_dir = data_cfg.get("imagenet")
            if not cls_dir or not os.path.isdir(os.path.join(cls_dir, "train")):
                raise FileNotFoundError(f"data.imagenet: {cls_dir!r} must be a folder holding train/ and "
                                        "val/ ImageFolder trees (pass --imagenet DIR)")
            data_inputs = []

        common = _words(dc.get("common_args"), mapping)
        epochs_of = {}

        def distill_cmd(name, method, arch, extra, config_file, teacher_weights):
            folder = os.path.join(out, "distill", name)
            argv = [self.python, self._script("distill", "train_imagenet.py"), cls_dir, "-a", arch,
                    "--method", method, "--seed", str(seed), "--output-dir", folder]
            if config_file:
                argv += ["--config", os.path.join(REPO, config_file) if not os.path.isabs(config_file)
                         else config_file]
            if teacher_weights:
                argv += ["--teacher-arch", dc["teacher_arch"], "--teacher-weights", teacher_weights]
            argv += common + extra
            ep = _flag_value(argv, "--epochs")
            epochs_of[name] = int(ep) if ep is not None else None
            return folder, argv

        def add_distill(name, group, method, arch, extra, config_file, teacher_weights, inputs):
            folder, argv = distill_cmd(name, method, arch, extra, config_file, teacher_weights)
            self.commands[name if group == "teacher" else f"distill:{name}"] = argv
            backbone = os.path.join(folder, "student_backbone.pth")

            def run(stage):
                if os.path.isfile(os.path.join(folder, "last_checkpoint")):
                    self.log(f"    resuming from {open(os.path.join(folder, 'last_checkpoint')).read().strip()}")
                    argv_run = argv + ["--resume", "auto"]
                else:
                    argv_run = argv
                self._run_cmd(stage, argv_run)
            stages.append(Stage(name if group == "teacher" else f"distill:{name}", group,
                                lambda: distill_state(folder, epochs_of[name]), run, inputs=inputs,
                                stamp=backbone, out_dir=folder))
            return backbone

        # 2. teacher
        teacher_weights = dc.get("teacher_weights") or ""
        if not teacher_weights:
            teacher_weights = add_distill("teacher", "teacher", "supervised", dc["teacher_arch"],
                                          _words(dc.get("teacher_args"), mapping),
                                          dc.get("teacher_config"), None, data_inputs)
            teacher_inputs = [teacher_weights]
        else:
            teacher_weights = _subst(teacher_weights, mapping)
            teacher_inputs = [teacher_weights] if os.path.sep in teacher_weights else []
        self.teacher_weights = teacher_weights

        # 3. students
        backbones = {}
        for m in dc["methods"]:
            name = m.replace("+", "_")
            extra = _words((dc.get("method_args") or {}).get(m), mapping)
            cfg_file = (dc.get("method_configs") or {}).get(m)
            tw = None if m == "supervised" else teacher_weights
            backbones[name] = add_distill(name, "distill", m, dc["arch"], extra, cfg_file, tw,
                                          data_inputs + ([] if m == "supervised" else teacher_inputs))

        # 4. conversion
        weights = {}
        for name, backbone in backbones.items():
            pkl = os.path.join(out, "weights", f"{name}.pkl")
            weights[name] = pkl

            def check_pkl(pkl=pkl):
                return (os.path.isfile(pkl), "converted" if os.path.isfile(pkl) else "not converted")

            argv = [self.python, self._script("tools", "convert_to_d2.py"), backbone, pkl, "--check"]
            self.commands[f"convert:{name}"] = argv

            def run_convert(stage, argv=argv, pkl=pkl):
                os.makedirs(os.path.dirname(pkl), exist_ok=True)
                self._run_cmd(stage, argv)
            stages.append(Stage(f"convert:{name}", "convert", check_pkl, run_convert, inputs=[backbone],
                                stamp=pkl))

        # 5. transfer: every init on every dataset
        inits = (["random"] if tc.get("random_init", True) else []) + list(weights)
        trials = int(tc["trials"])
        for ds, dcfg in tc["datasets"].items():
            config_file = dcfg["config"] if os.path.isabs(dcfg["config"]) else os.path.join(REPO, dcfg["config"])
            opts = _words(dcfg.get("opts"), mapping) + _words(tc.get("opts"), mapping)
            for init in inits:
                folder = os.path.join(out, "transfer", ds, init)
                pkl = weights.get(init, "")
                argv = [self.python, self._script("transfer", "train_net.py"), "--config-file", config_file,
                        "--engine", tc["engine"], "--trials", str(trials),
                        "OUTPUT_DIR", folder, "MODEL.WEIGHTS", pkl, "SEED", str(seed)] + opts
                self.commands[f"transfer:{ds}:{init}"] = argv

                def run_transfer(stage, argv=argv, folder=folder):
                    if any(os.path.isfile(os.path.join(trial_dir(folder, k, trials), "last_checkpoint"))
                           for k in range(trials)):
                        self.log("    resuming the trials from their last checkpoints")
                        argv = argv[:2] + ["--resume"] + argv[2:]
                    self._run_cmd(stage, argv)
                    freed = prune_intermediate_checkpoints(folder, trials)
                    if freed:
                        self.log(f"    | removed intermediate checkpoints of finished trials ({freed / 2**20:.0f} MiB)")
                stages.append(Stage(f"transfer:{ds}:{init}", "transfer",
                                    lambda folder=folder: transfer_state(folder, trials), run_transfer,
                                    inputs=([pkl] if pkl else []) + data_inputs + [config_file],
                                    stamp=transfer_stamp(folder, trials), out_dir=folder))
        self.inits, self.weights, self.backbones = inits, weights, backbones

        # 6. report: always rewritten (cheap) from the files the stages left
        def run_report(stage):
            res = pipeline_report.write_report(self.out, self.describe(), log=self.log)
            self.log(f"    | wrote {res['report']}")
        stages.append(Stage("report", "report", lambda: (False, "always regenerated"), run_report))
        return stages

    def describe(self):
        """What the report needs to find every run's files."""
        dc, tc = self.cfg["distill"], self.cfg["transfer"]
        return {
            "config_path": self.cfg_path, "config": self.cfg,
            "arch": dc["arch"], "teacher_arch": dc["teacher_arch"],
            "teacher_dir": os.path.join(self.out, "distill", "teacher") if not dc.get("teacher_weights") else None,
            "teacher_weights": self.teacher_weights,
            "students": {m.replace("+", "_"): {"method": m, "dir": os.path.join(self.out, "distill", m.replace("+", "_"))}
                         for m in dc["methods"]},
            "inits": self.inits, "datasets": list(tc["datasets"]), "trials": int(tc["trials"]),
            "transfer_dirs": {ds: {i: os.path.join(self.out, "transfer", ds, i) for i in self.inits}
                              for ds in tc["datasets"]},
            "timings": self.timings_path, "embedded": self.cfg.get("data", {}).get("kind", "embedded") == "embedded",
            "quick": bool(self.cfg.get("data", {}).get("quick")),
        }

    # ---- selection and execution
    def select(self, only=None, from_stage=None):
        names = [s.name for s in self.stages]
        chosen = list(self.stages)
        if from_stage:
            idx = next((i for i, s in enumerate(self.stages) if from_stage in (s.group, s.name)), None)
            if idx is None:
                raise ValueError(f"--from-stage {from_stage}: no such stage or group; groups {GROUPS}, stages {names}")
            chosen = self.stages[idx:]
        if only:
            unknown = [o for o in only if not any(o in (s.group, s.name) for s in self.stages)]
            if unknown:
                raise ValueError(f"--only {' '.join(unknown)}: no such stage or group; groups {GROUPS}, "
                                 f"stages {names}")
            chosen = [s for s in chosen if s.group in only or s.name in only]
        return chosen

    def run(self, only=None, from_stage=None, force=False, stop_after=None):
        """Run the selected stages; up to `jobs` at once when their inputs allow (each stage waits
        for the stages producing its inputs). Completeness is checked when a stage's turn comes."""
        jobs = self.jobs
        chosen = self.select(only, from_stage)
        if stop_after:
            last = [i for i, s in enumerate(chosen) if stop_after in (s.name, s.group)]
            if not last:
                raise ValueError(f"--stop-after {stop_after}: not among the selected stages "
                                 f"{[s.name for s in chosen]}")
            chosen = chosen[:last[-1] + 1]
        names = {s.name for s in chosen}
        for i, s in enumerate(chosen, 1):
            s.deps = names - {s.name} if s.group == "report" else \
                {self._producer(p) for p in s.inputs} & names
            s.index = i
        timings = _load_json(self.timings_path, {})
        total, t_all = len(chosen), time.time()
        self.log(f"pipeline: {total} stages, up to {jobs} at a time, output in {self.out}")
        pending, running, finished, ran = list(chosen), {}, set(), []
        done_q = queue.Queue()
        failure = None

        def worker(stage):
            t0 = time.time()
            try:
                stage.run(stage)
                if stage.group != "report":
                    ok, why = stage.status()
                    if not ok:
                        raise StageFailed(f"stage {stage.name} exited cleanly but its outputs are incomplete: {why}")
                done_q.put((stage, None, time.time() - t0))
            except BaseException as e:  # reported to the main thread, which decides
                done_q.put((stage, e, time.time() - t0))

        try:
            while pending or running:
                for stage in list(pending):
                    if failure is not None or len(running) >= jobs:
                        break
                    if not stage.deps <= finished:
                        if jobs == 1:
                            break  # keep the listed order when running one at a time
                        continue
                    pending.remove(stage)
                    head = f"[{stage.index}/{total}] {stage.name}"
                    complete, reason = stage.status()
                    if complete and not force:
                        self.log(f"{head}: skipped, complete ({reason})")
                        finished.add(stage.name)
                        continue
                    # a stale stage must not resume its old run: it starts afresh, like --force
                    if (force or stage.stale) and stage.out_dir and os.path.isdir(stage.out_dir):
                        prev = stage.out_dir.rstrip("/") + ".prev"
                        shutil.rmtree(prev, ignore_errors=True)
                        os.replace(stage.out_dir, prev)  # keep the last result beside it, never merge two runs
                        self.log(f"{head}: moved the previous output to {prev}")
                    missing = [p for p in stage.inputs if not os.path.exists(p)]
                    if missing:
                        failure = StageFailed(
                            f"{stage.name} needs {missing[0]}, which does not exist; run stage "
                            f"'{self._producer(missing[0])}' first (drop --only/--from-stage, or add it to --only)")
                        break
                    self.log(f"{head}: running ({reason})  [elapsed {_fmt(time.time() - t_all)}]")
                    th = threading.Thread(target=worker, args=(stage,), daemon=True)
                    running[stage.name] = th
                    th.start()
                if not running:
                    if failure is not None or not pending:
                        break
                    if jobs > 1 and all(not s.deps <= finished for s in pending):
                        raise StageFailed(f"stages {[s.name for s in pending]} wait for stages that did not run")
                    continue
                stage, err, dt = done_q.get()
                running.pop(stage.name).join()
                head = f"[{stage.index}/{total}] {stage.name}"
                if err is not None:
                    if failure is None:
                        failure = err
                    self._stop_children()  # the others resume from their checkpoints next time
                    continue
                finished.add(stage.name)
                ran.append(stage.name)
                if stage.group != "report":
                    timings[stage.name] = dt
                    _write_json(self.timings_path, timings)
                self.log(f"{head}: done in {_fmt(dt)}")
        except BaseException:
            self._stop_children()
            raise
        if failure is not None:
            raise failure
        wall = time.time() - t_all
        runs = _load_json(self.runs_path, [])
        runs.append({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(wall, 1), "jobs": jobs,
                     "threads": self.threads or os.environ.get("OMP_NUM_THREADS"), "stages": total,
                     "ran": ran})
        _write_json(self.runs_path, runs)
        self.log(f"pipeline finished in {_fmt(wall)}")

    def _stop_children(self):
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def _producer(self, path):
        for s in self.stages:
            if s.stamp and (path == s.stamp or (s.out_dir and path.startswith(s.out_dir + os.sep))):
                return s.name
        return "(outside the pipeline)"


class StageFailed(RuntimeError):
    pass


def _fmt(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _quote(a):
    return a if a and re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"


def _load_json(path, default):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return default


def _write_json(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=1))


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CoCoRD: distil, convert, fine-tune detection, report; "
                                "on the embedded digits by default, the paper's protocol with --imagenet.")
    p.add_argument("--output-dir", default="output/pipeline", help="where every stage writes (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a couple of minutes; what the tests run)")
    p.add_argument("--config", default=None, help="pipeline config YAML (default: configs/pipeline/"
                   "embedded.yaml, quick.yaml with --quick, real.yaml with --imagenet)")
    p.add_argument("--imagenet", metavar="DIR", default=None,
                   help="real protocol: distil on this ImageNet folder (train/, val/) and fine-tune on the builtin "
                        "VOC/COCO under $DETECTRON2_DATASETS with the paper's configs")
    p.add_argument("--only", nargs="+", metavar="STAGE", help=f"run only these stages or groups {GROUPS}")
    p.add_argument("--from-stage", metavar="STAGE", help="start at this stage or group (earlier ones must be complete)")
    p.add_argument("--stop-after", metavar="STAGE", help="stop once this stage or group is done")
    p.add_argument("--force", action="store_true", help="re-run selected stages even when complete "
                   "(their previous output folder is kept as <folder>.prev)")
    p.add_argument("--trials", type=int, default=None, help="override transfer.trials")
    p.add_argument("--cocord-kd", action="store_true", help="also distil and transfer the cocord+kd student")
    p.add_argument("--list", action="store_true", help="print every stage and whether it is complete, then exit")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="stages run at once when their inputs allow (default: 2 on the embedded data with "
                        ">= 2 CPU cores, else 1; one GPU runs one stage at a time)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads per stage process (default: CPU cores // jobs when jobs > 1, "
                        "else the libraries' default)")
    p.add_argument("--quiet", action="store_true", help="show stage lines only (stage output still goes to logs/)")
    args = p.parse_args(argv)
    if args.imagenet and args.quick:
        p.error("--quick selects the embedded data; it cannot be combined with --imagenet")
    for k in ("jobs", "threads"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    cores = os.cpu_count() or 1
    if args.jobs is None:
        args.jobs = 2 if cores >= 2 and not args.imagenet else 1
    if args.threads is None and args.jobs > 1:
        args.threads = max(1, cores // args.jobs)
    return args


def resolve_config(args):
    path = args.config or os.path.join(CONFIGS, "real.yaml" if args.imagenet else
                                       "quick.yaml" if args.quick else "embedded.yaml")
    cfg = load_pipeline_config(path)
    if args.imagenet:
        if not os.path.isdir(args.imagenet):
            raise FileNotFoundError(f"--imagenet {args.imagenet}: no such folder (expected train/ and val/ inside)")
        cfg["data"] = {"kind": "imagenet", "imagenet": os.path.abspath(args.imagenet)}
    if args.trials is not None:
        cfg["transfer"]["trials"] = args.trials
    if args.cocord_kd and "cocord+kd" not in cfg["distill"]["methods"]:
        cfg["distill"]["methods"] = list(cfg["distill"]["methods"]) + ["cocord+kd"]
    validate_config(cfg, path)
    return cfg, path


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, path = resolve_config(args)
        pipe = Pipeline(cfg, path, args.output_dir, stream=not args.quiet, jobs=args.jobs, threads=args.threads)
        if args.list:
            for s in pipe.stages:
                ok, why = s.status()
                print(f"{s.name:32s} {'complete' if ok else 'todo':9s} {why}")
            return 0
        pipe.run(only=args.only, from_stage=args.from_stage, force=args.force, stop_after=args.stop_after)
    except KeyboardInterrupt:
        print("\ninterrupted: completed stages are kept; run the same command again to continue", file=sys.stderr)
        return 130
    except (StageFailed, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
