"""Run what is ready: the pipeline's small scheduler.

Stages run in their listed order, up to `jobs` at once when their inputs allow (a stage waits for the
stages producing its inputs); completeness is checked when a stage's turn comes, so complete stages
are skipped and an interrupted run continues where it stopped. Each command runs as a subprocess in
its own process group with its output in logs/<stage>.log; on a failure or Ctrl-C the other running
stages are stopped (they resume from their checkpoints next time).
"""
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time

from cocord_common.errors import UserError
from cocord_pipeline import layout
from cocord_pipeline.config import REPO


RESUMABLE_GROUPS = ("teacher", "distill", "transfer")  # their scripts write last_checkpoint and take --resume


def nothing_to_resume(stage):
    """An incomplete training stage whose folder holds no `last_checkpoint` (anywhere below it: transfer
    trials have their own): killed before its first checkpoint, so there is nothing to continue."""
    if stage.group not in RESUMABLE_GROUPS or not stage.out_dir or not os.path.isdir(stage.out_dir):
        return False
    return not any("last_checkpoint" in files for _, _, files in os.walk(stage.out_dir))


class StageFailed(RuntimeError):
    pass


class _RunState:
    """Book-keeping of one `Runner.run`: what waits, runs, finished, and the first failure."""

    def __init__(self, chosen, deps):
        self.pending, self.deps, self.total = list(chosen), deps, len(chosen)
        self.index = {s.name: i for i, s in enumerate(chosen, 1)}
        self.running, self.finished, self.ran = {}, set(), []
        self.done = queue.Queue()  # (stage, error or None, seconds) from the worker threads
        self.failure = None
        self.t0 = time.time()

    def head(self, stage):
        return f"[{self.index[stage.name]}/{self.total}] {stage.name}"

    def ready(self, stage):
        return self.deps[stage.name] <= self.finished


class Runner:
    """Runs a stages.Plan: `jobs` stages at once at most, `threads` OpenMP/MKL threads per stage process."""

    def __init__(self, plan, log=print, stream=True, jobs=1, threads=None):
        self.plan, self.log, self.stream = plan, log, stream
        self.jobs, self.threads = jobs, threads
        self._procs, self._lock = [], threading.Lock()

    # ---- one command
    def _env(self, env):
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        if self.threads:
            # one OpenMP/MKL pool per stage: pools larger than the free cores spin and crawl
            full_env["OMP_NUM_THREADS"] = full_env["MKL_NUM_THREADS"] = str(self.threads)
        full_env.update(env or {})
        return full_env

    def run_command(self, stage, argv, env=None):
        """Run `argv` from the repository root, its output appended to the stage's log (and shown unless
        quiet); raise StageFailed on a non-zero exit."""
        log_path = layout.log_file(self.plan.out, stage.name)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        prefix = f"    [{stage.name}] | " if self.jobs > 1 else "    | "
        with open(log_path, "a") as logf:
            logf.write(f"\n$ {' '.join(_quote(a) for a in argv)}\n")
            logf.flush()
            proc = subprocess.Popen(argv, cwd=REPO, env=self._env(env), stdout=subprocess.PIPE,
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

    # ---- the schedule
    def _choose(self, only, from_stage, stop_after):
        """The selected stages in order, and stage name -> names of the selected stages it waits for."""
        chosen = self.plan.select(only, from_stage)
        if stop_after:
            last = [i for i, s in enumerate(chosen) if stop_after in (s.name, s.group)]
            if not last:
                raise UserError(f"--stop-after {stop_after}: not among the selected stages "
                                 f"{[s.name for s in chosen]}")
            chosen = chosen[:last[-1] + 1]
        names = {s.name for s in chosen}
        deps = {s.name: names - {s.name} if s.summary else {self.plan.producer(p) for p in s.inputs} & names
                for s in chosen}
        return chosen, deps

    def run(self, only=None, from_stage=None, force=False, stop_after=None):
        """Run the selected stages (see the module doc); `force` re-runs complete ones."""
        st = _RunState(*self._choose(only, from_stage, stop_after))
        timings = layout.read_json(self.plan.timings_path, {})
        self.log(f"pipeline: {st.total} stages, up to {self.jobs} at a time, output in {self.plan.out}")
        try:
            while st.pending or st.running:
                self._start_ready(st, force)
                if not st.running:
                    if st.failure is not None or not st.pending:
                        break
                    if self.jobs > 1 and not any(st.ready(s) for s in st.pending):
                        raise StageFailed(f"stages {[s.name for s in st.pending]} wait for stages that did not run")
                    continue
                self._collect_one(st, timings)
        except BaseException:
            self._stop_children()
            raise
        if st.failure is not None:
            raise st.failure
        self._record_run(st)

    def _start_ready(self, st, force):
        """Start (or skip, when complete) the pending stages whose producers finished, `jobs` at most."""
        for stage in list(st.pending):
            if st.failure is not None or len(st.running) >= self.jobs:
                return
            if not st.ready(stage):
                if self.jobs == 1:
                    return  # keep the listed order when running one at a time
                continue
            st.pending.remove(stage)
            head = st.head(stage)
            complete, reason = stage.status()
            if complete and not force:
                self.log(f"{head}: skipped, complete ({reason})")
                st.finished.add(stage.name)
                continue
            # a stale stage must not resume its old run, and a run killed before its first checkpoint has
            # nothing to resume (its stage script refuses a used folder without --resume): both start afresh
            if (force or stage.stale or nothing_to_resume(stage)) and stage.out_dir and os.path.isdir(stage.out_dir):
                prev = stage.out_dir.rstrip("/") + ".prev"
                shutil.rmtree(prev, ignore_errors=True)
                os.replace(stage.out_dir, prev)  # keep the last result beside it, never merge two runs
                self.log(f"{head}: moved the previous output to {prev}")
            missing = [p for p in stage.inputs if not os.path.exists(p)]
            if missing:
                st.failure = StageFailed(
                    f"{stage.name} needs {missing[0]}, which does not exist; run stage "
                    f"'{self.plan.producer(missing[0])}' first (drop --only/--from-stage, or add it to --only)")
                return
            self.log(f"{head}: running ({reason})  [elapsed {_fmt(time.time() - st.t0)}]")
            th = threading.Thread(target=self._work, args=(stage, st.done), daemon=True)
            st.running[stage.name] = th
            th.start()

    def _work(self, stage, done):
        """A worker thread: run one stage, check its outputs, report to the main thread."""
        t0 = time.time()
        try:
            stage.run(stage, self)
            if not stage.summary:
                ok, why = stage.status()
                if not ok:
                    raise StageFailed(f"stage {stage.name} exited cleanly but its outputs are incomplete: {why}")
            done.put((stage, None, time.time() - t0))
        except BaseException as e:  # reported to the main thread, which decides
            done.put((stage, e, time.time() - t0))

    def _collect_one(self, st, timings):
        """Wait for one running stage to end; on a failure stop the others (they resume next time)."""
        stage, err, dt = st.done.get()
        st.running.pop(stage.name).join()
        if err is not None:
            if st.failure is None:
                st.failure = err
            self._stop_children()
            return
        st.finished.add(stage.name)
        st.ran.append(stage.name)
        if not stage.summary:
            timings[stage.name] = dt
            layout.write_json(self.plan.timings_path, timings)
        self.log(f"{st.head(stage)}: done in {_fmt(dt)}")

    def _record_run(self, st):
        wall = time.time() - st.t0
        runs = layout.read_json(self.plan.runs_path, [])
        runs.append({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(wall, 1), "jobs": self.jobs,
                     "threads": self.threads or os.environ.get("OMP_NUM_THREADS"), "stages": st.total,
                     "ran": st.ran})
        layout.write_json(self.plan.runs_path, runs)
        self.log(f"pipeline finished in {_fmt(wall)}")


def _fmt(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _quote(a):
    return a if a and re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a.replace("'", "'\\''") + "'"
