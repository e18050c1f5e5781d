"""`run_pipeline.py --cifar DATA`: the paper's CIFAR-100 tables as pipeline stages (the runner,
completeness checks, logs and flags of the transfer pipeline; only the stages differ).

    data                          the embedded digits in CIFAR format (`--cifar embedded` only)
    teacher:<arch>                distill/train_cifar.py --method supervised -a <arch> (not for given teachers)
    distill:<student>:supervised:t<k>         the "Student" row, trial k (shared by every pair with that student)
    distill:<teacher>-<student>:<method>:t<k> a distilled student, trial k (seed = seed + k)
    report                        report.md, results.json, plots/ (cocord_pipeline/cifar_report.py)

The pairs, the paper's row of each method and the methods' CIFAR flags come from one table,
configs/distill/cifar_pairs.yaml; the recipe is train_cifar.py's defaults. Pipeline configs
(configs/pipeline/cifar*.yaml) choose pairs, methods, trials, given teachers and extra flags.
"""
import functools
import os
import re
import sys

from cocord_common.errors import UserError
from cocord_common.yaml_config import load_yaml_with_base, read_yaml_mapping
from cocord_pipeline import embedded_data, layout
from cocord_pipeline.config import CONFIGS, REPO, substitute, words
from cocord_pipeline.stages import Stage, StagePlan, distill_state, flag_value, run_distill
from distill.cifar_data import cifar100_folder
from distill.methods import METHODS
from distill.models import ALL_ARCHS, CIFAR_ARCHS
from distill.train_cifar import CIFAR_DEFAULTS

PAIRS_FILE = os.path.join(REPO, "configs", "distill", "cifar_pairs.yaml")
EMBEDDED = "embedded"  # `--cifar embedded`: the digits written in CIFAR format by the data stage
DEFAULT_CONFIG = os.path.join(CONFIGS, "cifar.yaml")
TINY_CONFIG = os.path.join(CONFIGS, "cifar_tiny.yaml")
GROUPS = ("data", "teacher", "distill", "report")
PAIR_GROUPS = ("all", "same", "different")  # --pairs words naming several of the paper's pairs
SCHEMA = {"seed": None, "trials": None, "pairs": None, "methods": None, "teacher_weights": None,
          "common_args": None, "teacher_args": None, "method_args": None,
          "embedded": {"train_per_class": None, "test_per_class": None}}


def _check_schema(d, path):
    for k, v in d.items():
        if k not in SCHEMA:
            raise UserError(f"{path}: unknown key '{k}' for a CIFAR pipeline config; allowed: {sorted(SCHEMA)} "
                            "(a transfer pipeline config is not run with --cifar)")
        if isinstance(SCHEMA[k], dict):
            if not isinstance(v, dict) or set(v) - set(SCHEMA[k]):
                raise UserError(f"{path}: '{k}' must be a mapping with keys from {sorted(SCHEMA[k])}, got {v!r}")


def load_cifar_config(path):
    """A CIFAR pipeline config (`_BASE_` merged underneath), unknown keys refused."""
    if not os.path.isfile(path):
        raise UserError(f"pipeline config {path} does not exist (see {CONFIGS}/cifar*.yaml)")
    return load_yaml_with_base(path, check=_check_schema, what="CIFAR pipeline config")


@functools.lru_cache(maxsize=1)
def benchmark_table():
    """configs/distill/cifar_pairs.yaml: pairs, the paper's row of each method, method flags."""
    return read_yaml_mapping(PAIRS_FILE, "CIFAR pairs table")


def paper_row(method):
    """The paper's row name of a --method (the one mapping: cifar_pairs.yaml `paper_rows`)."""
    return benchmark_table()["paper_rows"].get(method)


# ---------------------------------------------------------------------------------------- selection
def _pair(teacher, student, table_entry=None):
    e = table_entry or {}
    return {"key": f"{teacher}->{student}", "teacher": teacher, "student": student,
            "paper_key": e.get("paper_key"), "paper_name": e.get("paper"), "family": e.get("family")}


def select_pairs(spec, where):
    """The pairs `spec` names (a list of words: all | same | different | TEACHER->STUDENT | TEACHER-STUDENT),
    the paper's in its order, de-duplicated. A pair outside the paper's 13 is allowed (any two zoo
    models); it simply has no paper value."""
    table = benchmark_table()["pairs"]
    known = {f"{p['teacher']}->{p['student']}": p for p in table}
    spec = [spec] if isinstance(spec, str) else list(spec or [])
    if not spec:
        raise UserError(f"{where}: no pairs selected; name pairs as TEACHER->STUDENT, or {'|'.join(PAIR_GROUPS)}")
    chosen = []
    for word in spec:
        word = str(word)
        if word in PAIR_GROUPS:
            chosen += [_pair(p["teacher"], p["student"], p) for p in table if word in ("all", p["family"])]
            continue
        m = re.fullmatch(r"\s*(\w+)\s*(?:->|-)\s*(\w+)\s*", word)
        if not m:
            raise UserError(f"{where}: '{word}' is not a pair; write TEACHER->STUDENT (quoted in a shell) or "
                            f"TEACHER-STUDENT, or one of {'|'.join(PAIR_GROUPS)}; the paper's: {list(known)}")
        for arch in m.groups():
            if arch not in ALL_ARCHS:
                raise UserError(f"{where}: unknown model '{arch}' in pair '{word}'; the CIFAR zoo has "
                                f"{', '.join(CIFAR_ARCHS)}")
        key = f"{m.group(1)}->{m.group(2)}"
        chosen.append(_pair(m.group(1), m.group(2), known.get(key)))
    unique = {}
    for p in chosen:
        unique.setdefault(p["key"], p)
    return list(unique.values())


def select_methods(spec, where):
    """The methods `spec` names (`all`: supervised then the paper's row order), each of distill/methods."""
    spec = [spec] if isinstance(spec, str) else list(spec or [])
    every = ["supervised"] + list(benchmark_table()["methods"])
    chosen = []
    for m in spec:
        if m == "all":
            chosen += every
        elif m in METHODS:
            chosen.append(m)
        else:
            raise UserError(f"{where}: unknown method '{m}'; choose from {', '.join(METHODS)} (or all)")
    if not chosen:
        raise UserError(f"{where}: no methods selected")
    return list(dict.fromkeys(chosen))


def given_teachers(cfg_map, cli_words, pairs, cfg_path, mapping):
    """arch -> absolute teacher file, from the config's `teacher_weights` mapping and `--teacher-weights
    ARCH=FILE` words (these win). Each arch must be a model, each file must exist; a `--teacher-weights`
    arch no selected pair uses is refused (a config may list teachers of pairs not selected now)."""
    if not isinstance(cfg_map or {}, dict):
        raise UserError(f"{cfg_path}: teacher_weights must map a teacher arch to a file, got {cfg_map!r}")
    entries = [(a, f, f"{cfg_path}: teacher_weights.{a}") for a, f in (cfg_map or {}).items()]
    used = {p["teacher"] for p in pairs}
    for w in cli_words or []:
        arch, sep, file = w.partition("=")
        if not sep or not arch or not file:
            raise UserError(f"--teacher-weights {w}: write ARCH=FILE, e.g. "
                            "resnet32x4=resnet32x4_vanilla/ckpt_epoch_240.pth")
        if arch not in used:
            raise UserError(f"--teacher-weights {w}: no selected pair has teacher '{arch}' "
                            f"(selected teachers: {', '.join(sorted(used))})")
        entries.append((arch, file, f"--teacher-weights {w}"))
    given = {}
    for arch, file, where in entries:
        if arch not in ALL_ARCHS:
            raise UserError(f"{where}: unknown model '{arch}'; the CIFAR zoo has {', '.join(CIFAR_ARCHS)}")
        path = os.path.abspath(os.path.expanduser(substitute(str(file), mapping)))
        if not os.path.isfile(path):
            raise UserError(f"{where}: teacher file {path} does not exist (a published CIFAR teacher "
                            "checkpoint {'model': state_dict, ...}, or a student_backbone.pth of this project)")
        given[arch] = path
    return given


def config_int(value, cfg_path, key):
    """A whole number of the config (an int, or a string of one as on a command line); anything else
    (1.5, true, "x") is an error naming the file and key rather than truncated or a bare int() error."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    raise UserError(f"{cfg_path}: {key} must be an integer, got {value!r}")


def _configured(cli_value, cfg, key):
    """The command line's value, else the config's (an empty list stays empty: an error later), else `all`."""
    if cli_value is not None:
        return cli_value
    return cfg[key] if cfg.get(key) is not None else "all"


def _args_list(value, where):
    if not isinstance(value or [], list):
        raise UserError(f"{where} must be a list of command-line words, got {value!r}")
    return value or []


def method_flag_words(method):
    """cifar_pairs.yaml's `method_flags` of `method` as command-line words (--kd-T 4.0 ...)."""
    out = []
    for flag, value in (benchmark_table()["method_flags"].get(method) or {}).items():
        out += [f"--{flag}", str(value)]
    return out


# ---------------------------------------------------------------------------------------- the plan
def _embedded_built(root, spec):
    ok = embedded_data.digits_cifar_complete(root, **spec)
    return ok, "manifest and files match the spec" if ok else "not built"


def _write_embedded(root, spec, stage, runner):
    m = embedded_data.write_digits_cifar(root, **spec)
    runner.log(f"    | wrote {m['counts']} digits in CIFAR format to {root}")


class CifarPlan(StagePlan):
    """Every stage of the CIFAR benchmark for the selected pairs x methods x trials, in run order:
    data, the teachers trained here, then for each trial the Student rows and the distilled students."""
    groups = GROUPS

    def __init__(self, cfg, cfg_path, out, data, pairs=None, methods=None, trials=None, teacher_weights=None,
                 python=sys.executable, paper_tables=None):
        self.cfg, self.cfg_path, self.out = cfg, cfg_path, os.path.abspath(out)
        self.python, self.paper_tables = python, paper_tables
        self.timings_path, self.runs_path = layout.timings_file(self.out), layout.runs_file(self.out)
        self.seed = config_int(cfg.get("seed", 0), cfg_path, "seed")
        self.trials = trials if trials is not None else config_int(cfg.get("trials", 1), cfg_path, "trials")
        if self.trials < 1:
            raise UserError(f"--trials / trials in {cfg_path} must be >= 1, got {self.trials}")
        self.pairs = select_pairs(_configured(pairs, cfg, "pairs"),
                                  "--pairs" if pairs is not None else f"{cfg_path}: pairs")
        self.methods = select_methods(_configured(methods, cfg, "methods"),
                                      "--methods" if methods is not None else f"{cfg_path}: methods")
        self.embedded = data == EMBEDDED
        self.data_root = layout.data_dir(self.out) if self.embedded else os.path.abspath(data)
        self.mapping = {"data": self.data_root, "out": self.out, "repo": REPO}
        self.common = words(_args_list(cfg.get("common_args"), f"{cfg_path}: common_args"), self.mapping)
        self.method_args = cfg.get("method_args") or {}
        for m in self.method_args:
            if m not in METHODS:
                raise UserError(f"{cfg_path}: method_args: unknown method '{m}'; choose from {', '.join(METHODS)}")
        self.given = given_teachers(cfg.get("teacher_weights"), teacher_weights, self.pairs, cfg_path, self.mapping)
        self.stages, self.runs = [], {}
        data_inputs = self._add_data()
        self.teachers = self._add_teachers(data_inputs)
        self._add_students(data_inputs)
        self.stages.append(Stage("report", "report", lambda: (False, "always regenerated"), self._write_report,
                                 summary=True))

    def _add_data(self):
        """The embedded data stage, or a check of DATA; returns the files every run reads."""
        if not self.embedded:
            try:
                folder = cifar100_folder(self.data_root)  # names the folder to create when it is missing
            except FileNotFoundError as e:
                raise UserError(f"--cifar {self.data_root}: {e} (--download is distill/train_cifar.py's flag; for the "
                                "pipeline fetch it once with python -c \"from distill.cifar_data import "
                                f"download_cifar100; download_cifar100('{self.data_root}')\")") from e
            return [str(folder / "train")]
        spec = {k: config_int(v, self.cfg_path, f"embedded.{k}") for k, v in (self.cfg.get("embedded") or {}).items()}
        spec["seed"] = self.seed
        manifest = os.path.join(self.data_root, embedded_data.CIFAR_MANIFEST)
        self.stages.append(Stage("data", "data", functools.partial(_embedded_built, self.data_root, spec),
                                 functools.partial(_write_embedded, self.data_root, spec), stamp=manifest))
        return [manifest]

    def _add_run(self, name, group, arch, method, seed, folder, extra, teacher, inputs):
        """One distill/train_cifar.py run; returns its student_backbone.pth."""
        argv = [self.python, os.path.join(REPO, "distill", "train_cifar.py"), self.data_root, "-a", arch,
                "--method", method, "--seed", str(seed), "--output-dir", folder]
        if teacher:
            argv += ["--teacher-arch", teacher, "--teacher-weights", self.teachers[teacher]]
        argv += method_flag_words(method) + self.common + extra
        epochs = int(flag_value(argv, "--epochs") or CIFAR_DEFAULTS["epochs"])
        backbone = os.path.join(folder, "student_backbone.pth")
        self.stages.append(Stage(name, group, functools.partial(distill_state, folder, epochs), run_distill,
                                 inputs=inputs, stamp=backbone, out_dir=folder, argv=argv))
        return backbone

    def _add_teachers(self, data_inputs):
        """arch -> teacher weights: given ones as they are, the others trained here (stage teacher:<arch>)."""
        teachers = {}
        extra = words(_args_list(self.cfg.get("teacher_args"), f"{self.cfg_path}: teacher_args"), self.mapping)
        if all(m == "supervised" for m in self.methods):
            return teachers  # only Student rows: no teacher needed
        for arch in dict.fromkeys(p["teacher"] for p in self.pairs):
            if arch in self.given:
                teachers[arch] = self.given[arch]
                continue
            teachers[arch] = self._add_run(f"teacher:{arch}", "teacher", arch, "supervised", self.seed,
                                           layout.cifar_teacher_dir(self.out, arch), extra, None, data_inputs)
        return teachers

    def _add_students(self, data_inputs):
        """Trial by trial (a first complete table comes early), every pair x method."""
        for k in range(self.trials):
            for pair in self.pairs:
                t, s = pair["teacher"], pair["student"]
                for m in self.methods:
                    folder = layout.cifar_run_dir(self.out, t, s, m, k)
                    self.runs.setdefault(pair["key"], {}).setdefault(m, []).append(folder)
                    if any(st.out_dir == folder for st in self.stages):
                        continue  # a Student row another pair with this student already runs
                    extra = words(_args_list(self.method_args.get(m), f"{self.cfg_path}: method_args.{m}"),
                                  self.mapping)
                    teacher = None if m == "supervised" else t
                    name = f"distill:{s}:supervised:t{k}" if m == "supervised" else f"distill:{t}-{s}:{m}:t{k}"
                    inputs = data_inputs + ([self.teachers[t]] if teacher else [])
                    self._add_run(name, "distill", s, m, self.seed + k, folder, extra, teacher, inputs)

    def _write_report(self, stage, runner):
        from cocord_pipeline import cifar_report  # matplotlib: only when a report is written
        res = cifar_report.write_report(self)
        runner.log(f"    | wrote {res['report']}")

    def stage_of(self, folder):
        return next((s for s in self.stages if s.out_dir == folder), None)

    def describe(self):
        """The report's view of the plan (JSON-friendly)."""
        return {"config_path": self.cfg_path, "config": self.cfg, "data": self.data_root, "embedded": self.embedded,
                "trials": self.trials, "pairs": self.pairs, "methods": self.methods,
                "teachers": {a: {"given": self.given.get(a), "dir": None if a in self.given else
                                 layout.cifar_teacher_dir(self.out, a)} for a in self.teachers},
                "runs": self.runs, "timings": self.timings_path, "paper_tables": self.paper_tables}
