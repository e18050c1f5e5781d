#!/usr/bin/env python
"""Speed of the two transfer engines on the same config: seconds per training iteration and per
evaluated image, torchvision engine vs detectron2 engine (when detectron2 is importable), printed
side by side with their ratio (goal: torchvision / detectron2 <= 1).

    python tools/benchmark_transfer.py                                   # small CPU config (BCCD, R18-FPN)
    python tools/benchmark_transfer.py --config configs/voc_r50.yaml --synthetic MODEL.DEVICE cpu ...
    python tools/benchmark_transfer.py --iters 20 --eval-images 20 SOLVER.IMS_PER_BATCH 2

How it measures (the same way for both engines):
  * training: each engine's own `run()` trains --iters iterations (no evaluation, no PreciseBN, no
    periodic checkpoint) and reports the median step time (data loading + forward + backward +
    optimizer step) in its metrics.json "time" field, over every step for both engines (detectron2's
    IterationTimer, which normally skips its first 3 steps, is told not to, here only);
  * evaluation: each engine's model (random init) and its own test loader (same DATALOADER.NUM_WORKERS)
    run over the first --eval-images images of DATASETS.TEST[0], after one untimed warm-up image; wall
    time per image, data loading included.
`--synthetic` replaces the config's datasets by a small VOC folder of coloured shapes
(cocord_pipeline/synthetic_shapes.py) written to a temporary directory (for machines without ../shared). Both
engines run in this process one after the other; on a busy machine rerun with --repeat to see the spread.
"""
import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cocord_pipeline.synthetic_shapes import SHAPES, register_opts, write_shapes

REPO = Path(__file__).resolve().parents[1]

DEFAULT_CONFIG = "configs/cpu/voc_bccd_r18_fpn.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "--config-file", dest="config", default=DEFAULT_CONFIG,
                   help=f"transfer config YAML (default: {DEFAULT_CONFIG})")
    p.add_argument("--iters", type=int, default=5, help="training iterations per engine (default 5, at least 2)")
    p.add_argument("--eval-images", type=int, default=20, help="timed test images per engine (default 20)")
    p.add_argument("--engines", default="torchvision,detectron2",
                   help="comma-separated subset of torchvision,detectron2 (default: both)")
    p.add_argument("--repeat", type=int, default=1, help="measure each engine this many times, alternating")
    p.add_argument("--synthetic", action="store_true",
                   help="train/test on a generated VOC folder of rectangles instead of the config's datasets")
    p.add_argument("--output-dir", default="", help="where runs write (default: a temporary directory)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, as for train_net.py")
    a = p.parse_args(argv)
    if a.iters < 2 or a.eval_images < 1 or a.repeat < 1:
        p.error("--iters must be >= 2, --eval-images >= 1 and --repeat >= 1")
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = sorted(set(a.engines) - {"torchvision", "detectron2"})
    if bad:
        p.error(f"--engines: unknown engine(s) {bad}; choose from torchvision, detectron2")
    if len(a.opts) % 2:
        p.error(f"overrides must be KEY VALUE pairs, got {a.opts}")
    return a


def synthetic_opts(root, n_test):
    """Write cocord_pipeline.synthetic_shapes's shapes (16 train images, `n_test` test images, 320 px) to `root`;
    returns the config overrides that train and test on it."""
    write_shapes(root, n_train=16, n_test=n_test, size=320)
    return (register_opts("bench_train", root, "train") + register_opts("bench_test", root, "test")
            + ["DATASETS.TRAIN", "('bench_train',)", "DATASETS.TEST", "('bench_test',)",
               "MODEL.ROI_HEADS.NUM_CLASSES", str(len(SHAPES))])


def train_opts(iters, out):
    """Training only: no evaluation, PreciseBN or intermediate checkpoint; metrics written at the end."""
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({iters - 1},)", "SOLVER.CHECKPOINT_PERIOD",
            str(10 ** 9), "TEST.EVAL_PERIOD", "0", "TEST.PRECISE_BN.ENABLED", "False", "DATASETS.TEST", "()",
            "OUTPUT_DIR", str(out), "SEED", "0"]


def median_step_time(out):
    """The last metrics.json 'time' (each engine's median seconds per training step)."""
    times = [json.loads(x)["time"] for x in (Path(out) / "metrics.json").read_text().splitlines()
             if x.strip() and "time" in json.loads(x)]
    if not times:
        raise RuntimeError(f"{out}/metrics.json has no 'time' field; did training run?")
    return float(times[-1])


def _timed_loop(items, step):
    """Seconds per item over `items` (an iterator), after one untimed warm-up item."""
    it = iter(items)
    step(next(it))
    n, t0 = 0, time.perf_counter()
    for x in it:
        step(x)
        n += 1
    return (time.perf_counter() - t0) / max(n, 1)


# ----------------------------------------------------------------------------------------------------
# torchvision engine
# ----------------------------------------------------------------------------------------------------
def bench_torchvision(config, opts, iters, n_eval, out):
    from transfer import data as tdata
    from transfer import torchvision_engine as engine
    from transfer.config import load_config
    from transfer.modeling import build_model

    cfg = load_config(config, opts + train_opts(iters, out))
    engine.run(cfg, argparse.Namespace(eval_only=False, resume=False))
    train = median_step_time(out)

    cfg = load_config(config, opts + ["OUTPUT_DIR", str(out)])
    device = engine.resolve_device(cfg)
    name = cfg.DATASETS.TEST[0]
    dicts = tdata.get_dataset_dicts(name, cfg)[: n_eval + 1]
    model = build_model(cfg).to(device).eval()
    loader = tdata.build_test_loader(cfg, dicts)
    with torch.no_grad():
        per_image = _timed_loop(loader, lambda batch: model(batch))
    return train, per_image


# ----------------------------------------------------------------------------------------------------
# detectron2 engine
# ----------------------------------------------------------------------------------------------------
def bench_detectron2(config, opts, iters, n_eval, out):
    from detectron2.data import DatasetMapper, build_detection_test_loader
    from detectron2.modeling import build_model

    from transfer import detectron2_engine

    from detectron2.engine import hooks

    args = argparse.Namespace(config_file=config, num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto",
                              resume=False, eval_only=False, opts=[])
    timer_init = hooks.IterationTimer.__init__
    # time every step, as the torchvision engine's median does (detectron2 skips its first 3 by default)
    hooks.IterationTimer.__init__ = lambda self, warmup_iter=3: timer_init(self, warmup_iter=0)
    try:
        detectron2_engine.run(detectron2_engine.load_d2_config(config, opts + train_opts(iters, out)), args)
    finally:
        hooks.IterationTimer.__init__ = timer_init
    train = median_step_time(out)

    cfg = detectron2_engine.load_d2_config(config, opts + ["OUTPUT_DIR", str(out)])
    detectron2_engine.register_datasets(cfg)
    from transfer import data as tdata
    name = cfg.DATASETS.TEST[0]
    dicts = tdata.get_dataset_dicts(name, cfg)[: n_eval + 1]
    model = build_model(cfg).eval()
    # detectron2's own test loader and test-time pipeline, with the workers the torchvision engine gets
    loader = build_detection_test_loader(dicts, mapper=DatasetMapper(cfg, is_train=False),
                                         num_workers=cfg.DATALOADER.NUM_WORKERS)
    with torch.no_grad():
        per_image = _timed_loop(loader, lambda batch: model(batch))
    return train, per_image


def main(argv=None):
    a = parse_args(argv)
    cwd = os.getcwd()
    os.chdir(REPO)  # configs name ../shared relative to the repository root
    logging.disable(logging.INFO)  # the engines' logs would drown the table (errors still show)
    try:
        return _measure(a)
    finally:
        logging.disable(logging.NOTSET)
        os.chdir(cwd)


def _measure(a):
    tmp = tempfile.TemporaryDirectory(prefix="bench_transfer_")
    base = Path(a.output_dir or tmp.name)
    opts = list(a.opts)
    if a.synthetic:
        opts = synthetic_opts(base / "synthetic_shapes", n_test=a.eval_images + 1) + opts
    engines = list(a.engines)
    if "detectron2" in engines:
        try:
            import detectron2  # noqa: F401
        except ImportError:
            print("detectron2 is not importable: timing the torchvision engine only", flush=True)
            engines.remove("detectron2")
    fns = {"torchvision": bench_torchvision, "detectron2": bench_detectron2}
    results = {e: {"train_s_per_iter": [], "eval_s_per_image": []} for e in engines}
    print(f"config {a.config}  +{' '.join(opts) if opts else ' no overrides'}\n"
          f"{a.iters} training iterations and {a.eval_images} test images per engine, {a.repeat} repeat(s), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for r in range(a.repeat):
        for e in (engines if r % 2 == 0 else engines[::-1]):
            t0 = time.perf_counter()
            train, per_image = fns[e](a.config, opts, a.iters, a.eval_images, base / f"{e}_{r}")
            results[e]["train_s_per_iter"].append(train)
            results[e]["eval_s_per_image"].append(per_image)
            print(f"  [{e}] run {r}: train {train:.3f} s/iter, eval {per_image:.3f} s/image "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    med = {e: {k: statistics.median(v) for k, v in d.items()} for e, d in results.items()}
    print(f"\n{'engine':<14}{'train s/iter':>14}{'eval s/image':>14}")
    for e in engines:
        print(f"{e:<14}{med[e]['train_s_per_iter']:>14.3f}{med[e]['eval_s_per_image']:>14.3f}")
    ratios = {}
    if "torchvision" in med and "detectron2" in med:
        ratios = {k: med["torchvision"][k] / med["detectron2"][k] for k in ("train_s_per_iter", "eval_s_per_image")}
        print(f"{'tv / d2':<14}{ratios['train_s_per_iter']:>14.2f}{ratios['eval_s_per_image']:>14.2f}"
              "   (<= 1: the torchvision engine is no slower)")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": a.config, "opts": opts, "iters": a.iters,
                                            "eval_images": a.eval_images, "runs": results, "median": med,
                                            "ratio_tv_over_d2": ratios}, indent=2))
    tmp.cleanup()
    return med, ratios


if __name__ == "__main__":
    main()
