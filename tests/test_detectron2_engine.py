"""transfer/detectron2_engine.py with the detectron2 CPU test build (skipped without detectron2): MoCo's R50-C4
config (configs/voc_r50.yaml, shrunk by KEY VALUE opts) trains and evaluates a few iterations on a VOC
folder the test writes; exact resume; --eval-only; converted weights; bad inputs."""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cocord_common.errors import UserError
from cocord_pipeline.synthetic_shapes import SHAPES, write_shapes

pytest.importorskip("detectron2")
pytestmark = pytest.mark.detectron2

from transfer import detectron2_engine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "voc_r50.yaml")


def tiny_opts(voc, out, **extra):
    """configs/voc_r50.yaml (MoCo's R50-C4 + Res5ROIHeadsExtraNorm) at CPU size: same architecture,
    64-px images, few proposals and RoIs, 3 iterations with a checkpoint after the second."""
    opts = {
        "MODEL.DEVICE": "cpu", "MODEL.WEIGHTS": "", "MODEL.RESNETS.NORM": "BN",
        "MODEL.ROI_HEADS.NUM_CLASSES": "3", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "16",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": "64", "MODEL.RPN.PRE_NMS_TOPK_TRAIN": "200",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": "50", "MODEL.RPN.PRE_NMS_TOPK_TEST": "100",
        "MODEL.RPN.POST_NMS_TOPK_TEST": "20", "MODEL.ANCHOR_GENERATOR.SIZES": "[[16, 32, 64]]",
        "INPUT.MIN_SIZE_TRAIN": "(64,)", "INPUT.MAX_SIZE_TRAIN": "96", "INPUT.MIN_SIZE_TEST": "64",
        "INPUT.MAX_SIZE_TEST": "96",
        "DATASETS.REGISTER.shapes_train.TYPE": "voc", "DATASETS.REGISTER.shapes_train.ROOT": str(voc),
        "DATASETS.REGISTER.shapes_train.SPLIT": "train", "DATASETS.REGISTER.shapes_train.CLASSES": str(list(SHAPES)),
        "DATASETS.REGISTER.shapes_test.TYPE": "voc", "DATASETS.REGISTER.shapes_test.ROOT": str(voc),
        "DATASETS.REGISTER.shapes_test.SPLIT": "test", "DATASETS.REGISTER.shapes_test.CLASSES": str(list(SHAPES)),
        "DATASETS.REGISTER.shapes_test.YEAR": "2007",
        "DATASETS.TRAIN": "('shapes_train',)", "DATASETS.TEST": "('shapes_test',)",
        "DATALOADER.NUM_WORKERS": "0", "SOLVER.IMS_PER_BATCH": "2", "SOLVER.BASE_LR": "0.01",
        "SOLVER.MAX_ITER": "3", "SOLVER.STEPS": "(2,)", "SOLVER.WARMUP_ITERS": "1",
        "SOLVER.CHECKPOINT_PERIOD": "2", "TEST.PRECISE_BN.NUM_ITER": "1", "SEED": "3", "OUTPUT_DIR": str(out),
    }
    opts.update(extra)
    return [x for kv in opts.items() for x in kv]


def args(**kw):
    base = dict(config_file=CONFIG, num_gpus=1, num_machines=1, machine_rank=0, dist_url="auto",
                resume=False, eval_only=False, opts=[])
    base.update(kw)
    return argparse.Namespace(**base)


def run_d2(config_file, opts, a):
    """train_net's path: the engine's config loader, then the engine."""
    return detectron2_engine.run(detectron2_engine.load_d2_config(config_file, opts), a)


def metrics_lines(out):
    return [json.loads(x) for x in (out / "metrics.json").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-iteration training run shared by the tests below."""
    base = tmp_path_factory.mktemp("d2")
    voc = write_shapes(base / "voc", n_train=6, n_test=2)
    out = base / "run_a"
    res = run_d2(CONFIG, tiny_opts(voc, out), args())
    return voc, out, res


@pytest.mark.slow
def test_trains_evaluates_and_writes_detectron2_outputs(trained):
    voc, out, res = trained
    assert res["iteration"] == 3
    for k in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        assert np.isfinite(res[k]) and 0 <= res[k] <= 100
    for name in ("config.yaml", "log.txt", "metrics.json", "model_0000001.pth", "model_final.pth", "last_checkpoint"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    lines = metrics_lines(out)
    train_lines = [x for x in lines if "total_loss" in x]
    assert train_lines and all(np.isfinite(x["total_loss"]) for x in train_lines)
    eval_line = [x for x in lines if "bbox/AP" in x][-1]
    assert eval_line["iteration"] == 3 and eval_line["bbox/AP50"] == pytest.approx(res["bbox/AP50"])
    # checkpoints hold plain data (weights_only) and the model has MoCo's extra norm after res5
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    norm = ckpt["model"]["roi_heads.res5.norm.weight"]
    assert norm.shape == (2048,)
    assert "roi_heads.res5.norm.running_var" in ckpt["model"]
    assert "loader_seed" in ckpt["trainer"] and "rng" in ckpt["trainer"]
    assert "Res5ROIHeadsExtraNorm" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_resume_is_exact(trained, tmp_path):
    voc, out_a, _ = trained
    out_b = tmp_path / "run_b"
    out_b.mkdir()
    shutil.copy(out_a / "model_0000001.pth", out_b / "model_0000001.pth")
    (out_b / "last_checkpoint").write_text("model_0000001.pth")
    run_d2(CONFIG, tiny_opts(voc, out_b), args(resume=True))
    log = (out_b / "log.txt").read_text()
    assert "Starting training from iteration 2" in log
    a = torch.load(out_a / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(out_b / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed run differs in {diff[:5]}"


@pytest.mark.slow
def test_eval_only_reproduces_the_final_evaluation(trained, tmp_path):
    voc, out_a, res_a = trained
    out_c = tmp_path / "eval"
    res = run_d2(CONFIG, tiny_opts(voc, out_c, **{"MODEL.WEIGHTS": str(out_a / "model_final.pth")}),
                        args(eval_only=True))
    for k in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        assert res[k] == pytest.approx(res_a[k], abs=1e-9)
    assert res["iteration"] == 3
    assert [x for x in metrics_lines(out_c) if "bbox/AP" in x][-1]["bbox/AP"] == pytest.approx(res_a["bbox/AP"])


def test_converted_backbone_loads_into_the_c4_model(tmp_path):
    """tools/convert_to_d2.py's format: every trunk tensor lands (res5 in the RoI head), values equal."""
    import torchvision
    from detectron2.modeling import build_model
    from transfer.d2_format import save_d2_file, torchvision_to_d2

    voc = write_shapes(tmp_path / "voc", n_train=1, n_test=1)
    tv = torchvision.models.resnet50()
    pkl = tmp_path / "r50.pkl"
    save_d2_file(torchvision_to_d2(tv.state_dict()).model, pkl)
    cfg = detectron2_engine.load_d2_config(CONFIG, tiny_opts(voc, tmp_path / "o"))
    model = build_model(cfg)
    detectron2_engine.Checkpointer(model).load(str(pkl))
    assert torch.equal(model.backbone.stem.conv1.weight, tv.conv1.weight)
    assert torch.equal(model.backbone.res4[5].conv3.norm.running_var, tv.layer3[5].bn3.running_var)
    assert torch.equal(model.roi_heads.res5[2].conv2.weight, tv.layer4[2].conv2.weight)
    assert isinstance(model.roi_heads.res5.norm, torch.nn.BatchNorm2d)
    # an R18 file does not fit the R50 model: refused, naming the missing backbone tensors
    r18 = tmp_path / "r18.pkl"
    save_d2_file(torchvision_to_d2(torchvision.models.resnet18().state_dict()).model, r18)
    with pytest.raises((ValueError, RuntimeError), match="backbone|shape"):
        detectron2_engine.Checkpointer(build_model(cfg)).load(str(r18))


def test_bad_inputs_are_reported_before_building_anything(tmp_path):
    voc = write_shapes(tmp_path / "voc", n_train=1, n_test=1)
    out = tmp_path / "o"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_d2(CONFIG, tiny_opts(voc, out, **{"DATASETS.REGISTER.shapes_test.ROOT": str(tmp_path / "nowhere")}),
               args())
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {CONFIG}\nMODEL:\n  RESNET:\n    DEPTH: 50\n")
    with pytest.raises(KeyError, match="RESNET"):
        run_d2(str(bad), tiny_opts(voc, out), args())
    with pytest.raises(KeyError, match="FOLDER"):
        run_d2(CONFIG, tiny_opts(voc, out, **{"DATASETS.REGISTER.shapes_train.FOLDER": "x"}), args())
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="MODEL.DEVICE cpu"):
            run_d2(CONFIG, tiny_opts(voc, out, **{"MODEL.DEVICE": "cuda"}), args())
    with pytest.raises(ValueError, match="SOLVER.STEPS"):
        run_d2(CONFIG, tiny_opts(voc, out, **{"SOLVER.STEPS": "(3,)"}), args())
    assert not (out / "model_final.pth").exists()


def test_process_layouts_detectron2_cannot_run_are_refused(tmp_path, monkeypatch):
    """detectron2 0.6 starts several processes on GPUs only, with its own launcher (which creates its
    per-machine process group): CPU multi-process runs and torchrun-started processes are refused."""
    voc = write_shapes(tmp_path / "voc", n_train=1, n_test=1)
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="--num-gpus 2 .*GPUs only.*--engine torchvision"):
        run_d2(CONFIG, tiny_opts(voc, out), args(num_gpus=2))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="without torchrun"):
        run_d2(CONFIG, tiny_opts(voc, out), args())
    assert not out.exists()


def test_register_keys_are_checked_in_the_file(tmp_path):
    cfg = tmp_path / "reg.yaml"
    cfg.write_text(f"_BASE_: {CONFIG}\nDATASETS:\n  REGISTER:\n    x:\n      PATH: /data\n")
    with pytest.raises(KeyError, match=r"reg\.yaml: unknown config key 'DATASETS.REGISTER.x.PATH'"):
        detectron2_engine.load_d2_config(str(cfg))


def test_converted_r18_loads_into_the_cpu_fpn_config(tmp_path):
    """TRANSFER's CPU config (R18-FPN, basic blocks) under detectron2: the converted trunk fills bottom_up."""
    import torchvision
    from detectron2.modeling import build_model
    from transfer.d2_format import save_d2_file, torchvision_to_d2

    tv = torchvision.models.resnet18()
    pkl = tmp_path / "r18.pkl"
    save_d2_file(torchvision_to_d2(tv.state_dict()).model, pkl)
    cfg = detectron2_engine.load_d2_config(str(REPO / "configs" / "cpu" / "voc_bccd_r18_fpn.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    detectron2_engine.Checkpointer(model).load(str(pkl))
    assert torch.equal(model.backbone.bottom_up.stem.conv1.weight, tv.conv1.weight)
    assert torch.equal(model.backbone.bottom_up.res5[1].conv2.weight, tv.layer4[1].conv2.weight)
