"""The whole CoCoRD transfer pipeline in one command: data -> teacher -> students -> conversion ->
detection fine-tuning (VOC- and COCO-format, N trials) -> report (`cocord-pipeline`, or
`python tools/run_pipeline.py`).

Every stage runs the project's real stage script as a subprocess (list in stages.py). A stage is
skipped when its outputs on disk are complete and newer than its inputs, so an interrupted run
continues where it stopped; a partly done training stage is resumed from its last checkpoint.
`--only` / `--from-stage` select stages, `--force` re-runs selected stages even when complete.
Layout of --output-dir: see layout.py. `--cifar DATA` runs the CIFAR benchmark's stages (cifar.py)
with the same runner and flags.
"""
import argparse
import os
import sys

from cocord_common.errors import input_checks, run_main
from cocord_pipeline import cifar, report
from cocord_pipeline.config import CONFIGS, load_pipeline_config, validate_config
from cocord_pipeline.runner import Runner, StageFailed
from cocord_pipeline.stages import GROUPS, Plan


def _add_config_flags(p):
    """The flags that choose the output folder and the pipeline config (shared with the report's CLI)."""
    p.add_argument("--output-dir", default=None, help="where every stage writes (default: output/pipeline; "
                   "output/cifar with --cifar, so the two never share a folder)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a couple of minutes; what the tests run)")
    p.add_argument("--config", default=None, help="pipeline config YAML (default: configs/pipeline/"
                   "embedded.yaml, quick.yaml with --quick, real.yaml with --imagenet: the paper's ResNet-101 -> "
                   "ResNet-50 with R50-C4; configs/pipeline/real_r18.yaml for ResNet-34 -> ResNet-18)")
    p.add_argument("--imagenet", metavar="DIR", default=None,
                   help="real protocol: distil on this ImageNet folder (train/, val/) and fine-tune on the builtin "
                        "VOC/COCO under $DETECTRON2_DATASETS with the paper's configs")
    p.add_argument("--cifar", metavar="DATA", default=None,
                   help="the paper's CIFAR-100 tables instead: teachers, then every pair x method x trial with "
                        "distill/train_cifar.py on DATA/cifar-100-python; 'embedded': the embedded digits in CIFAR "
                        "format (default config configs/pipeline/cifar_tiny.yaml; cifar.yaml, the paper's recipe, "
                        "with a DATA folder). See docs/cifar.md")
    p.add_argument("--paper-tables", metavar="FILE", default=None,
                   help="the paper's tables (JSON) the report compares with (default: "
                        "../shared/reference/paper_tables.json beside the repository; absent: a note)")


def _add_override_flags(p):
    """The flags that change the chosen config (shared with the report's CLI)."""
    p.add_argument("--trials", type=int, default=None, help="override transfer.trials (with --cifar: the "
                   "config's trials, runs per pair x method)")
    p.add_argument("--cocord-kd", action="store_true", help="also distil and transfer the cocord+kd student")
    p.add_argument("--pairs", nargs="+", metavar="PAIR", default=None,
                   help="--cifar: TEACHER->STUDENT (quoted) or TEACHER-STUDENT pairs, or all | same | different "
                        "(the paper's; default: the config's)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", default=None,
                   help="--cifar: methods of distill/methods (supervised is the Student row), or all "
                        "(default: the config's)")
    p.add_argument("--teacher-weights", action="append", metavar="ARCH=FILE", default=None,
                   help="--cifar: take this teacher instead of training it (a published {'model': ...} "
                        "checkpoint or a student_backbone.pth); repeat per teacher")


def _parse(p, argv):
    args = p.parse_args(argv)
    if args.imagenet and args.quick:
        p.error("--quick selects the embedded data; it cannot be combined with --imagenet")
    if args.cifar and (args.imagenet or args.quick or args.cocord_kd):
        p.error("--cifar runs the CIFAR benchmark; it cannot be combined with --imagenet, --quick or --cocord-kd "
                "(choose methods with --methods)")
    for flag in ("pairs", "methods", "teacher_weights"):
        if getattr(args, flag) and not args.cifar:
            p.error(f"--{flag.replace('_', '-')} belongs to the CIFAR benchmark: add --cifar DATA")
    if args.output_dir is None:
        args.output_dir = "output/cifar" if args.cifar else "output/pipeline"
    if args.paper_tables and not os.path.isfile(args.paper_tables):  # before hours of stages, not at the report
        p.error(f"--paper-tables {args.paper_tables}: no such file")
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="CoCoRD: distil, convert, fine-tune detection, report; "
                                "on the embedded digits by default, the paper's protocol with --imagenet; "
                                "the paper's CIFAR-100 tables with --cifar.")
    _add_config_flags(p)
    p.add_argument("--only", nargs="+", metavar="STAGE", help=f"run only these stages or groups {GROUPS} "
                   f"(with --cifar: {cifar.GROUPS})")
    p.add_argument("--from-stage", metavar="STAGE", help="start at this stage or group (earlier ones must be complete)")
    p.add_argument("--stop-after", metavar="STAGE", help="stop once this stage or group is done")
    p.add_argument("--force", action="store_true", help="re-run selected stages even when complete "
                   "(their previous output folder is kept as <folder>.prev)")
    _add_override_flags(p)
    p.add_argument("--list", action="store_true", help="print every stage and whether it is complete, then exit")
    p.add_argument("--jobs", "-j", type=int, default=None,
                   help="stages run at once when their inputs allow (default: 2 on the embedded data with "
                        ">= 2 CPU cores, else 1; one GPU runs one stage at a time)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP/MKL threads per stage process (default: CPU cores // jobs when jobs > 1, "
                        "else the libraries' default)")
    p.add_argument("--quiet", action="store_true", help="show stage lines only (stage output still goes to logs/)")
    args = _parse(p, argv)
    for k in ("jobs", "threads"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1, got {getattr(args, k)}")
    cores = os.cpu_count() or 1
    if args.jobs is None:
        on_cpu_data = not args.imagenet and args.cifar in (None, cifar.EMBEDDED)
        args.jobs = 2 if cores >= 2 and on_cpu_data else 1
    if args.threads is None and args.jobs > 1:
        args.threads = max(1, cores // args.jobs)
    return args


def resolve_config(args):
    """The pipeline config the flags select, with their overrides applied and validated; (cfg, path)."""
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


def build_plan(args):
    """The stages the flags select: the CIFAR benchmark's (--cifar) or the transfer pipeline's."""
    if args.cifar:
        path = args.config or (cifar.TINY_CONFIG if args.cifar == cifar.EMBEDDED else cifar.DEFAULT_CONFIG)
        return cifar.CifarPlan(cifar.load_cifar_config(path), path, args.output_dir, args.cifar, pairs=args.pairs,
                               methods=args.methods, trials=args.trials, teacher_weights=args.teacher_weights,
                               paper_tables=args.paper_tables)
    cfg, path = resolve_config(args)
    return Plan(cfg, path, args.output_dir, paper_tables=args.paper_tables)


def main(argv=None):
    """Exit status: 0 done, 2 a bad flag or config (`prog: error: …`, cocord_common/errors.py), 1 a stage
    failed (its command, log file and exit code on stderr), 130 interrupted."""
    return run_main(_main, argv)


def _main(argv):
    args = parse_args(argv)
    with input_checks():
        plan = build_plan(args)
    if args.list:
        width = max([32] + [len(s.name) for s in plan.stages])
        for s in plan.stages:
            ok, why = s.status()
            print(f"{s.name:{width}s} {'complete' if ok else 'todo':9s} {why}")
        return 0
    runner = Runner(plan, stream=not args.quiet, jobs=args.jobs, threads=args.threads)
    try:
        runner.run(only=args.only, from_stage=args.from_stage, force=args.force, stop_after=args.stop_after)
    except KeyboardInterrupt:
        print("\ninterrupted: completed stages are kept; run the same command again to continue", file=sys.stderr)
        return 130
    except StageFailed as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 1
    return 0


def report_main(argv=None):
    """`python tools/pipeline_report.py`: the 'report' stage alone, without running or recording
    anything else. Exit status 0, or 2 with `prog: error: …` (a missing or cut metrics file, a bad flag)."""
    return run_main(_report_main, argv)


def _report_main(argv):
    p = argparse.ArgumentParser(description="Rewrite report.md, results.json and plots/ of a pipeline output "
                                "folder from the files its stages wrote; give the config flags the run was given.")
    _add_config_flags(p)
    _add_override_flags(p)
    args = _parse(p, argv)
    with input_checks():
        plan = build_plan(args)
        if args.cifar:
            from cocord_pipeline import cifar_report
            res = cifar_report.write_report(plan)
        else:
            res = report.write_report(plan.out, plan.describe())
    print(f"wrote {res['report']}")
    return 0
