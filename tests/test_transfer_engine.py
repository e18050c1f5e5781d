"""The torchvision engine end to end through transfer/train_net.py, on data the tests write themselves
(and on ../shared's voc_bccd / coco_tiny when present): training, outputs, exact resume, --eval-only,
--trials, and clear errors for bad inputs."""
import json
import os

import pytest
import torch

from conftest import shared_path
from cocord_common.errors import UserError
from cocord_pipeline.synthetic_shapes import register_opts, write_shapes
from transfer import train_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CFG = os.path.join(REPO, "configs", "cpu", "voc_bccd_r18_fpn.yaml")



@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(str(tmp_path_factory.mktemp("shapes")), n_train=40, n_test=40)


def tiny_opts(root, out, max_iter, fmt="voc", **over):
    """R18-FPN at 96 px with small heads and proposal counts: seconds per run on 2 cores."""
    opts = {
        "DATASETS.TRAIN": "('s_train',)", "DATASETS.TEST": "('s_test',)",
        "MODEL.ROI_HEADS.NUM_CLASSES": "3", "MODEL.FPN.OUT_CHANNELS": "64", "MODEL.ROI_BOX_HEAD.FC_DIM": "128",
        "MODEL.ANCHOR_GENERATOR.SIZES": "[[16],[32],[64],[128],[256]]",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": "300", "MODEL.RPN.POST_NMS_TOPK_TRAIN": "50",
        "MODEL.RPN.PRE_NMS_TOPK_TEST": "200", "MODEL.RPN.POST_NMS_TOPK_TEST": "50",
        "INPUT.MIN_SIZE_TRAIN": "(80, 96)", "INPUT.MAX_SIZE_TRAIN": "160", "INPUT.MIN_SIZE_TEST": "96",
        "INPUT.MAX_SIZE_TEST": "160", "DATALOADER.NUM_WORKERS": "0", "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.BASE_LR": "0.004", "SOLVER.MAX_ITER": str(max_iter), "SOLVER.STEPS": "(1000,)",
        "SOLVER.WARMUP_ITERS": "5", "SOLVER.CHECKPOINT_PERIOD": "1000", "TEST.PRECISE_BN.NUM_ITER": "2",
        "SEED": "1", "OUTPUT_DIR": str(out), "MODEL.WEIGHTS": "",
    }
    opts.update({k.replace("__", "."): str(v) for k, v in over.items()})
    flat = register_opts("s_train", root, "train", fmt=fmt) + register_opts("s_test", root, "test", fmt=fmt)
    for k, v in opts.items():
        flat += [k, v]
    return flat


def run(args):
    return train_net.main(["--engine", "torchvision", "--config", CPU_CFG] + list(args))


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_training_writes_detectron2_outputs_and_loss_falls(shapes, tmp_path):
    out = tmp_path / "run"
    res = run(tiny_opts(shapes, out, 80, SOLVER__CHECKPOINT_PERIOD=20))
    for name in ("config.yaml", "log.txt", "metrics.json", "last_checkpoint", "model_0000019.pth",
                 "model_0000059.pth", "model_final.pth"):
        assert (out / name).is_file(), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out))
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    rows = read_metrics(out)
    train = [r for r in rows if "total_loss" in r]
    assert [r["iteration"] for r in train] == [19, 39, 59, 79]
    # From random init the RoI losses first *rise* (the RPN starts to deliver foreground proposals),
    # so the falling loss checked here is the RPN's; AP gains are checked in test_pretrained_beats_scratch.
    assert train[-1]["loss_rpn_cls"] < 0.5 * train[0]["loss_rpn_cls"]
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "lr", "time"} <= set(train[0])
    ev = [r for r in rows if "bbox/AP" in r]
    assert len(ev) == 1 and ev[0]["iteration"] == 79
    assert res == {k: v for k, v in ev[0].items() if k != "iteration"}
    assert 0.0 < res["bbox/AP50"] <= 100.0 and res["bbox/AP"] <= res["bbox/AP50"]  # it detects something
    ck = torch.load(out / "model_final.pth", weights_only=True)
    assert ck["iteration"] == 79 and ck["seed"] == 1
    cfg_text = (out / "config.yaml").read_text()
    assert "s_train" in cfg_text and "MAX_ITER: 80" in cfg_text


def test_resume_continues_exactly_and_eval_only_reproduces(shapes, tmp_path):
    common = dict(TEST__PRECISE_BN__ENABLED=False, SOLVER__WARMUP_ITERS=2)
    full, part = tmp_path / "full", tmp_path / "part"
    res_full = run(tiny_opts(shapes, full, 6, **common))
    run(tiny_opts(shapes, part, 3, **common))  # "interrupted" after iteration 2
    res_part = run(["--resume"] + tiny_opts(shapes, part, 6, **common))
    a = torch.load(full / "model_final.pth", weights_only=True)
    b = torch.load(part / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert res_full == res_part
    assert "resumed from" in (part / "log.txt").read_text()

    ev = tmp_path / "eval"
    res_eval = run(["--eval-only"] + tiny_opts(shapes, ev, 6, MODEL__WEIGHTS=full / "model_final.pth"))
    assert res_eval == res_full
    assert not (ev / "model_final.pth").exists()


def test_amp_branch_runs_under_cpu_bf16_autocast(shapes, tmp_path, monkeypatch):
    """The engine's AMP branch end to end — autocast around the forward, the GradScaler calls, the scaler
    state in checkpoints, resume — with CPU bf16 autocast standing in for CUDA (no GPU here: only the
    device check in amp_dtype is bypassed)."""
    from transfer import torchvision_engine as engine
    monkeypatch.setattr(engine, "amp_dtype", lambda cfg, device: torch.bfloat16 if cfg.SOLVER.AMP.ENABLED else None)
    common = dict(TEST__PRECISE_BN__ENABLED=False, SOLVER__WARMUP_ITERS=2)
    fp32 = run(tiny_opts(shapes, tmp_path / "fp32", 4, **common))
    amp, part = tmp_path / "amp", tmp_path / "amp_part"
    res = run(tiny_opts(shapes, amp, 4, SOLVER__AMP__ENABLED=True, **common))
    loss = {d: [r["total_loss"] for r in read_metrics(tmp_path / d) if "total_loss" in r][-1] for d in ("fp32", "amp")}
    # autocast was on (bf16 rounding moves the loss) and harmless (same loss to a few per cent)
    assert loss["amp"] != loss["fp32"] and loss["amp"] == pytest.approx(loss["fp32"], rel=0.05), loss
    assert all(v == v for v in res.values()) and set(res) == set(fp32)
    assert "scaler" in torch.load(amp / "model_final.pth", weights_only=True)
    run(tiny_opts(shapes, part, 2, SOLVER__AMP__ENABLED=True, **common))
    assert run(["--resume"] + tiny_opts(shapes, part, 4, SOLVER__AMP__ENABLED=True, **common)) == res


def test_trials_write_summary(shapes, tmp_path):
    out = tmp_path / "trials"
    summary = run(["--trials", "2"] + tiny_opts(shapes, out, 2, TEST__PRECISE_BN__ENABLED=False))
    with open(out / "trials_summary.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(summary))
    assert [t["seed"] for t in saved["trials"]] == [1, 2]
    for k in (0, 1):
        assert (out / f"trial{k}" / "model_final.pth").is_file()
        assert "SEED: %d" % (1 + k) in (out / f"trial{k}" / "config.yaml").read_text()
    for m in ("AP", "AP50", "AP75"):
        vals = [t[m] for t in saved["trials"]]
        assert saved["mean"][m] == pytest.approx(sum(vals) / 2)
        assert saved["std"][m] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)


def test_bad_inputs_fail_clearly(shapes, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(FileNotFoundError, match="expected .*nowhere"):
        run(tiny_opts(shapes, out, 2) + ["DATASETS.REGISTER.s_test.ROOT", str(tmp_path / "nowhere")])
    assert not (out / "model_final.pth").exists()
    with pytest.raises(ValueError, match="NUM_CLASSES = 5.*3 classes"):
        run(tiny_opts(shapes, out, 2, MODEL__ROI_HEADS__NUM_CLASSES=5))
    with pytest.raises(UserError, match="SOLVER.MAX_ITERS"):  # train_net: an unknown key is a user error
        run(tiny_opts(shapes, out, 2) + ["SOLVER.MAX_ITERS", "3"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_BASE_: {CPU_CFG}\nMODEL:\n  ROI_HEAD:\n    NUM_CLASSES: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml: unknown config key 'MODEL.ROI_HEAD'"):
        train_net.main(["--engine", "torchvision", "--config", str(bad_yaml)])
    with pytest.raises(ValueError, match="ResNet-18 has basic blocks.*FPN"):
        train_net.main(["--engine", "torchvision", "--config", os.path.join(REPO, "configs", "voc_r50.yaml"),
                        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS = 'See Instructions"):
        run(tiny_opts(shapes, out, 2) + ["MODEL.WEIGHTS", "See Instructions"])
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED is True but MODEL.DEVICE is 'cpu'"):
        run(tiny_opts(shapes, out, 2, SOLVER__AMP__ENABLED=True))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="MODEL.DEVICE is 'cuda' but CUDA is not available"):
            run(tiny_opts(shapes, out, 2, MODEL__DEVICE="cuda"))
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 0.*loss_rpn_cls="):
        run(tiny_opts(shapes, out, 2, MODEL__PIXEL_STD="[0.0, 0.0, 0.0]"))


def _shared_data_opts(which, root):
    """Command-line overrides pointing the CPU config's registered datasets at `root` (../shared/data/<which>)."""
    if which == "voc_bccd":
        return ["DATASETS.REGISTER.bccd_trainval.ROOT", str(root), "DATASETS.REGISTER.bccd_test.ROOT", str(root)]
    opts = []
    for split in ("train", "val"):
        opts += [f"DATASETS.REGISTER.coco_tiny_{split}.IMAGE_ROOT", str(root / f"{split}2017"),
                 f"DATASETS.REGISTER.coco_tiny_{split}.JSON_FILE",
                 str(root / "annotations" / f"instances_{split}2017.json")]
    return opts


@pytest.mark.slow
def test_coco_tiny_smoke(shared, tmp_path):
    """The repo's CPU config on tiny COCO's real images: the RPN loss falls over a short run and COCO
    evaluation runs. No pretrained-beats-scratch check here: with 80 classes and 50 training images, both
    runs score AP 0.0 within a test-sized budget (measured, see README.md, "Transfer")."""
    root = shared("data", "coco_tiny")
    cfg = os.path.join(REPO, "configs", "cpu", "coco_tiny_r18_fpn.yaml")
    out = tmp_path / "coco_tiny"
    res = train_net.main(["--engine", "torchvision", "--config", cfg] + _shared_data_opts("coco_tiny", root) + [
        "SOLVER.MAX_ITER", "40", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0025",
        "INPUT.MIN_SIZE_TRAIN", "(112,)", "INPUT.MAX_SIZE_TRAIN", "192", "INPUT.MIN_SIZE_TEST", "112",
        "INPUT.MAX_SIZE_TEST", "192",
        "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "0", "SEED", "0", "OUTPUT_DIR", str(out)])
    train = [r for r in read_metrics(out) if "total_loss" in r]
    assert train[-1]["loss_rpn_cls"] < train[0]["loss_rpn_cls"]
    assert set(res) >= {"bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl"}


BCCD_CLASSES = ("RBC", "WBC", "Platelets")


def write_object_crops(dataset_dicts, class_names, out, per_class=400, n_val=20, size=64, seed=0):
    """ImageFolder `out/{train,val}/<class>/*.png` of the boxes of `dataset_dicts` (detectron2 dicts,
    XYXY_ABS), each resized to `size` px; at most `per_class` crops per class, `n_val` of them in val/.
    Boxes under 8x8 px and crowd boxes are skipped. Returns {class: number of crops}."""
    import random

    from PIL import Image
    crops = {c: [] for c in class_names}
    for d in dataset_dicts:
        img = None
        for a in d["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            if a.get("iscrowd", 0) or x1 - x0 < 8 or y1 - y0 < 8:
                continue
            img = img or Image.open(d["file_name"]).convert("RGB")
            box = (int(x0), int(y0), int(round(x1)), int(round(y1)))
            crops[class_names[a["category_id"]]].append(img.crop(box).resize((size, size), Image.BILINEAR))
    rng = random.Random(seed)
    for name, items in crops.items():
        if len(items) < n_val + 1:
            raise ValueError(f"only {len(items)} crops of class {name!r}; need more than {n_val}")
        rng.shuffle(items)
        items = items[:per_class]
        crops[name] = len(items)
        for split, part in (("val", items[:n_val]), ("train", items[n_val:])):
            folder = os.path.join(out, split, name)
            os.makedirs(folder, exist_ok=True)
            for i, crop in enumerate(part):
                crop.save(os.path.join(folder, f"{i:04d}.png"))
    return crops


BCCD_SEED = 0


@pytest.fixture(scope="module")
def bccd_transfer(tmp_path_factory):
    """Pretrain -> convert -> fine-tune twice on ../shared/data/voc_bccd, all through the project's CLIs.

    1. Object crops of BCCD's *trainval* boxes (the detector's training split; the test split is never
       seen), class = the box's class (RBC / WBC / Platelets, RBC capped at 400 like the others' ~300),
       64 px, written by write_object_crops.
    2. distill/train_imagenet.py --method supervised: ResNet-18, one epoch (29 steps of 32 crops at
       48 px). Its crop accuracy varies with the seed (val top-1 87/33/67 % for seeds 0/1/2, measured),
       yet every one of those backbones beats random init below. Measured caveat: two epochs of this
       pretraining made the 40-iteration fine-tuning diverge at lr 0.005 (loss_cls 2.0 -> 3.2, AP50 2.9
       vs 12.3 for scratch), so the schedule here is the one that was measured, not a tunable.
    3. transfer.d2_format.torchvision_to_d2 + save_d2_file -> a detectron2 .pkl.
    4. transfer/train_net.py (torchvision engine, configs/cpu/voc_bccd_r18_fpn.yaml at 112 px, batch 2,
       40 iterations, same SEED and schedule) once with MODEL.WEIGHTS = that .pkl, once with "".
    Returns {"pretrain": last-epoch metrics, "pretrained"/"scratch": (final metrics, train rows)}."""
    from distill import train_imagenet
    from transfer.d2_format import save_d2_file, torchvision_to_d2
    from transfer.data import load_voc

    root = shared_path("data", "voc_bccd")
    work = tmp_path_factory.mktemp("bccd_transfer")
    counts = write_object_crops(load_voc(str(root), "trainval", BCCD_CLASSES), BCCD_CLASSES,
                                str(work / "crops"), seed=BCCD_SEED)
    assert min(counts.values()) > 250, counts
    pretrain = train_imagenet.main([
        str(work / "crops"), "-a", "resnet18", "--method", "supervised", "--epochs", "1", "-b", "32",
        "--lr", "0.05", "--crop-size", "48", "--val-resize", "56", "-j", "0", "--device", "cpu",
        "--print-freq", "50", "--seed", str(BCCD_SEED), "--output-dir", str(work / "pretrain")])
    backbone = torch.load(work / "pretrain" / "student_backbone.pth", weights_only=True)
    pkl = work / "r18_bccd_crops.pkl"
    save_d2_file(torchvision_to_d2(backbone).model, str(pkl))

    runs = {"pretrain": pretrain}
    cfg = os.path.join(REPO, "configs", "cpu", "voc_bccd_r18_fpn.yaml")
    for name, weights in (("pretrained", str(pkl)), ("scratch", "")):
        out = work / name
        data = _shared_data_opts("voc_bccd", root)
        res = train_net.main(["--engine", "torchvision", "--config", cfg] + data + [
            "MODEL.WEIGHTS", weights, "SOLVER.MAX_ITER", "40", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.BASE_LR", "0.005", "SOLVER.STEPS", "(32,)", "SOLVER.WARMUP_ITERS", "10",
            "SOLVER.CHECKPOINT_PERIOD", "1000", "INPUT.MIN_SIZE_TRAIN", "(112,)", "INPUT.MAX_SIZE_TRAIN", "190",
            "INPUT.MIN_SIZE_TEST", "112", "INPUT.MAX_SIZE_TEST", "190", "TEST.PRECISE_BN.ENABLED", "False",
            "DATALOADER.NUM_WORKERS", "0", "SEED", str(BCCD_SEED), "OUTPUT_DIR", str(out)])
        runs[name] = (res, [r for r in read_metrics(out) if "total_loss" in r])
        runs[name + "_log"] = (out / "log.txt").read_text()
    return runs


@pytest.mark.slow
def test_bccd_crop_pretrained_backbone_beats_scratch(bccd_transfer):
    """On real BCCD images, a backbone pretrained on BCCD's own training crops and converted to detectron2
    format gives a clearly higher test AP50 and AP than random init after the same fine-tuning.
    Measured with SEED 0/1/2: AP50 17.8/24.0/21.7 vs 6.9/12.3/10.5 (+10.9/+11.8/+11.3),
    AP 4.5/8.0/5.9 vs 1.9/3.7/3.4; about 90 s for the module fixture on 2 cores."""
    assert "initialising the ResNet from" in bccd_transfer["pretrained_log"]
    assert "initialising the ResNet from" not in bccd_transfer["scratch_log"]
    pre, scratch = bccd_transfer["pretrained"][0], bccd_transfer["scratch"][0]
    assert pre["bbox/AP50"] > scratch["bbox/AP50"] + 5, (pre, scratch)
    assert pre["bbox/AP"] > scratch["bbox/AP"], (pre, scratch)


@pytest.mark.slow
def test_bccd_finetuning_loss_falls(bccd_transfer):
    """Both fine-tunings log iterations 19 and 39, and their total loss falls (pretrained and scratch)."""
    for name in ("pretrained", "scratch"):
        rows = bccd_transfer[name][1]
        assert [r["iteration"] for r in rows] == [19, 39], name
        assert rows[-1]["total_loss"] < rows[0]["total_loss"], (name, rows)
    assert {"train/loss", "val/top1"} <= set(bccd_transfer["pretrain"])


def _shape_batch(rng, n, size=40):
    """Classification crops of the detection task's shapes (random colours on noise): [n,3,size,size], labels."""
    import numpy as np
    from PIL import Image, ImageDraw
    xs, ys = [], []
    for _ in range(n):
        img = Image.fromarray(rng.randint(60, 140, size=(size, size, 3)).astype(np.uint8))
        d = ImageDraw.Draw(img)
        s = rng.randint(size // 2, size - 4)
        x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
        k = rng.randint(3)
        c = tuple(int(v) for v in rng.randint(0, 256, 3))
        box = [x0, y0, x0 + s - 1, y0 + s - 1]
        if k == 0:
            d.rectangle(box, fill=c)
        elif k == 1:
            d.ellipse(box, fill=c)
        else:
            d.polygon([(x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1), (x0 + (s - 1) / 2, y0)], fill=c)
        xs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))
        ys.append(k)
    return torch.stack(xs), torch.tensor(ys)


@pytest.fixture(scope="module")
def shapes_pretrained_pkl(tmp_path_factory):
    """A ResNet-18 pretrained for 150 steps on shape classification, converted to detectron2 format."""
    import numpy as np
    import torchvision
    from transfer.d2_format import save_d2_file, torchvision_to_d2

    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    net = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    net.train()
    for step in range(150):
        x, y = _shape_batch(rng, 32)
        loss = torch.nn.functional.cross_entropy(net((x.float() - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        x, y = _shape_batch(np.random.RandomState(1), 200)
        acc = (net((x.float() - mean) / std).argmax(1) == y).float().mean().item()
    assert acc > 0.8, f"pretraining did not learn the shapes (accuracy {acc:.2f})"
    pkl = tmp_path_factory.mktemp("shapes_pretrained") / "r18.pkl"
    save_d2_file(torchvision_to_d2(net.state_dict()).model, pkl)
    return pkl


@pytest.mark.slow
@pytest.mark.skip(reason="not a reliable claim in the current environment (venv rebuilt from the registry: "
                  "numpy 2.4.6, pillow 13.0.0): scratch reaches AP50 45.0 vs pretrained 41.2 at 200 iterations "
                  "(seed 1) and 41.7 vs 41.2 (seed 2), and pretrained leads at no measured length or LR; the old "
                  "code gives the same numbers. Pretrained-beats-scratch stays tested on BCCD (the test above); "
                  "the shapes pretraining must be redone (docs/testing.md)")
@pytest.mark.parametrize("fmt", ["voc", "coco"])
def test_pretrained_backbone_beats_scratch(shapes, shapes_pretrained_pkl, tmp_path, fmt):
    """The shape-pretrained backbone, converted by the converter, gives clearly higher AP than random init
    after the same short fine-tuning — read as VOC (VOC evaluator, area AP) and as COCO (pycocotools)."""
    results = {}
    for name, weights in (("pretrained", str(shapes_pretrained_pkl)), ("scratch", "")):
        # 100 iterations are not enough: the pretrained run is still behind there (measured)
        results[name] = run(tiny_opts(shapes, tmp_path / name, 200, fmt=fmt, MODEL__WEIGHTS=weights,
                                      TEST__PRECISE_BN__ENABLED=False))
    assert "initialising the ResNet from" in (tmp_path / "pretrained" / "log.txt").read_text()
    # measured here: VOC AP50 40.9 vs 25.3, AP 17.5 vs 10.7; COCO (same detections) AP50 40.8 vs 25.3, AP 17.8 vs 10.7
    assert results["pretrained"]["bbox/AP50"] > results["scratch"]["bbox/AP50"] + 8, results
    assert results["pretrained"]["bbox/AP"] > results["scratch"]["bbox/AP"], results


@pytest.mark.slow
def test_two_processes_on_cpu(shapes, tmp_path):
    """--num-gpus 2 with MODEL.DEVICE cpu: two gloo processes share the batch (DDP) and the evaluation."""
    out = tmp_path / "ddp"
    run(["--num-gpus", "2"] + tiny_opts(shapes, out, 4, SOLVER__IMS_PER_BATCH=4, TEST__PRECISE_BN__NUM_ITER=1))
    assert (out / "model_final.pth").is_file() and (out / "log.txt.rank1").is_file()
    log = (out / "log.txt").read_text()
    assert "over 2 process(es)" in log and "inference on s_test: 40 images" in log
    ev = [r for r in read_metrics(out) if "bbox/AP" in r]
    assert len(ev) == 1 and ev[0]["iteration"] == 3
