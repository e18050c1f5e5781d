"""The torchvision engine end to end through transfer/train_net.py, on data the tests write themselves
(and on ../shared's voc_bccd / coco_tiny when present): training, outputs, exact resume, --eval-only,
--trials, and clear errors for bad inputs."""
import json
import os

import pytest
import torch

from test_transfer_data import SHAPES, make_shapes_voc, register_opts
from transfer import train_net

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CFG = os.path.join(REPO, "configs", "cpu", "voc_bccd_r18_fpn.yaml")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP spinning makes small convs ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_voc(str(tmp_path_factory.mktemp("shapes")), n_train=40, n_test=40)


def tiny_opts(root, out, max_iter, **over):
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
    flat = register_opts("s_train", root, "train") + register_opts("s_test", root, "test")
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
    with pytest.raises(KeyError, match="SOLVER.MAX_ITERS"):
        run(tiny_opts(shapes, out, 2) + ["SOLVER.MAX_ITERS", "3"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(f"_BASE_: {CPU_CFG}\nMODEL:\n  ROI_HEAD:\n    NUM_CLASSES: 3\n")
    with pytest.raises(KeyError, match=r"bad\.yaml: unknown config key 'MODEL.ROI_HEAD'"):
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


@pytest.mark.slow
@pytest.mark.parametrize("which", ["voc_bccd", "coco_tiny"])
def test_shared_datasets_smoke(shared, tmp_path, which):
    """The repo's CPU configs on real images: the RPN loss falls over a short run and evaluation runs."""
    root = shared("data", which)
    cfg = os.path.join(REPO, "configs", "cpu", f"{which}_r18_fpn.yaml")
    if which == "voc_bccd":
        data = ["DATASETS.REGISTER.bccd_trainval.ROOT", str(root), "DATASETS.REGISTER.bccd_test.ROOT", str(root)]
    else:
        data = []
        for split in ("train", "val"):
            data += [f"DATASETS.REGISTER.coco_tiny_{split}.IMAGE_ROOT", str(root / f"{split}2017"),
                     f"DATASETS.REGISTER.coco_tiny_{split}.JSON_FILE",
                     str(root / "annotations" / f"instances_{split}2017.json")]
    out = tmp_path / which
    res = train_net.main(["--engine", "torchvision", "--config", cfg] + data + [
        "SOLVER.MAX_ITER", "40", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0025",
        "INPUT.MIN_SIZE_TRAIN", "(112,)", "INPUT.MAX_SIZE_TRAIN", "192", "INPUT.MIN_SIZE_TEST", "112",
        "INPUT.MAX_SIZE_TEST", "192",
        "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "0", "SEED", "0", "OUTPUT_DIR", str(out)])
    train = [r for r in read_metrics(out) if "total_loss" in r]
    assert train[-1]["loss_rpn_cls"] < train[0]["loss_rpn_cls"]
    assert set(res) >= {"bbox/AP", "bbox/AP50", "bbox/AP75"}


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


@pytest.mark.slow
def test_pretrained_backbone_beats_scratch(shapes, tmp_path):
    """A ResNet-18 pretrained for 150 steps on shape classification, converted to detectron2 format
    by the converter, gives clearly higher AP than random init after the same short fine-tuning."""
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
    pkl = tmp_path / "r18.pkl"
    save_d2_file(torchvision_to_d2(net.state_dict()).model, pkl)

    results = {}
    for name, weights in (("pretrained", str(pkl)), ("scratch", "")):
        # 100 iterations are not enough: the pretrained run is still behind there (measured)
        results[name] = run(tiny_opts(shapes, tmp_path / name, 200, MODEL__WEIGHTS=weights,
                                      TEST__PRECISE_BN__ENABLED=False))
    assert "initialising the ResNet from" in (tmp_path / "pretrained" / "log.txt").read_text()
    # measured here: AP50 40.9 vs 25.3, AP 17.5 vs 10.7
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
