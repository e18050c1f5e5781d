"""Transfer protocol details shared with detectron2 / MoCo (issue 14, items 2, 3, 4, 6):
naiveSyncBN's equal-weight statistics, the detectron2 engine's PreciseBN stream length, RPN
proposal selection on logits, and VOC AP over the classes present in the test split."""
import logging
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.models.detection.rpn import RegionProposalNetwork

from transfer import torchvision_engine
from transfer.backbone import NaiveSyncBatchNorm2d, build_resnet_trunk
from transfer.config import load_config
from transfer.evaluation import evaluate_voc
from transfer.modeling import D2RPN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-5


# ------------------------------------------------------------------------------------ naiveSyncBN
def _rank_input(rank):
    """Different data per rank, and different batch and image sizes: equal weight per rank is then
    not the statistics of the pooled pixels."""
    g = torch.Generator().manual_seed(100 + rank)
    shape = [(2, 3, 4, 5), (3, 3, 2, 3)][rank]
    return (torch.randn(shape, generator=g) * (1 + 2 * rank) + 3 * rank).double()


def _affine():
    return torch.tensor([1.5, 0.5, 2.0], dtype=torch.float64), torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)


def _sync_bn_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bn = NaiveSyncBatchNorm2d(3).double()
        w, b = _affine()
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        x = _rank_input(rank).requires_grad_(True)
        y = bn(x)
        (y * torch.arange(1.0, 4.0, dtype=torch.float64).view(1, 3, 1, 1)).sin().sum().backward()
        torch.save({"y": y.detach(), "x_grad": x.grad, "running_mean": bn.running_mean,
                    "running_var": bn.running_var, "tracked": bn.num_batches_tracked},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _rank_loss(y):
    return (y * torch.arange(1.0, 4.0, dtype=torch.float64).view(1, 3, 1, 1)).sin().sum()


@pytest.mark.slow  # two spawned processes: about a minute on a loaded 2-core machine
def test_naive_sync_bn_two_processes_average_the_per_rank_statistics_with_equal_weight(tmp_path):
    mp.spawn(_sync_bn_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # expected, by hand: mean and mean of squares per rank over (N, H, W), then their plain average
    xs = [_rank_input(r).requires_grad_(True) for r in range(2)]
    mean = sum(x.mean(dim=(0, 2, 3)) for x in xs) / 2
    var = sum((x * x).mean(dim=(0, 2, 3)) for x in xs) / 2 - mean * mean
    pooled = torch.cat([x.detach().permute(1, 0, 2, 3).reshape(3, -1) for x in xs], dim=1)
    assert not torch.allclose(mean.detach(), pooled.mean(dim=1))  # the test data tells the two apart
    w, b = _affine()
    ys = [(x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + EPS) * w.view(1, 3, 1, 1)
          + b.view(1, 3, 1, 1) for x in xs]
    # the all-reduce is differentiable: each rank's input gets the gradient of the sum of all ranks' losses
    sum(_rank_loss(y) for y in ys).backward()
    for r in range(2):
        assert torch.allclose(got[r]["y"], ys[r].detach(), atol=1e-10)
        assert torch.allclose(got[r]["x_grad"], xs[r].grad, atol=1e-10)
        # momentum 0.1 from (0, 1) towards the biased variance; num_batches_tracked untouched (detectron2)
        assert torch.allclose(got[r]["running_mean"], 0.1 * mean.detach(), atol=1e-12)
        assert torch.allclose(got[r]["running_var"], 0.9 + 0.1 * var.detach(), atol=1e-12)
        assert int(got[r]["tracked"]) == 0


def test_naive_sync_bn_in_one_process_is_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 6) * 2 + 1
    naive, plain = NaiveSyncBatchNorm2d(3), torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        for m in (naive, plain):
            m.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    for train in (True, False):
        naive.train(train)
        plain.train(train)
        assert torch.equal(naive(x), plain(x))
    assert torch.equal(naive.running_mean, plain.running_mean)
    assert torch.equal(naive.running_var, plain.running_var)  # BatchNorm2d's unbiased update here


def test_naive_sync_bn_is_a_norm_choice_and_the_moco_c4_default():
    trunk = build_resnet_trunk(18, "naiveSyncBN")
    assert isinstance(trunk.bn1, NaiveSyncBatchNorm2d) and isinstance(trunk.layer4[1].bn2, NaiveSyncBatchNorm2d)
    for name in ("voc_r50.yaml", "coco_r50.yaml"):  # MoCo's Base-RCNN-C4-BN.yaml: naiveSyncBN
        assert load_config(os.path.join(REPO, "configs", name)).MODEL.RESNETS.NORM == "naiveSyncBN"
    with pytest.raises(ValueError, match="naiveSyncBN"):  # the choices name it
        load_config(None, ["MODEL.RESNETS.NORM", "syncbn", "MODEL.RESNETS.STRIDE_IN_1X1", "False"])


# ------------------------------------------------------------------------------------ PreciseBN stream
def _precise_bn_draws(max_iter, period, num_iter):
    """Batches detectron2's PreciseBN hook draws, by replaying its after_step rule."""
    drawn = 0
    for it in range(max_iter):
        nxt = it + 1
        if nxt == max_iter or (period > 0 and nxt % period == 0):
            drawn += num_iter
    return drawn


@pytest.mark.parametrize("max_iter,period,num_iter", [(10, 0, 1), (10, 0, 200), (10, 5, 3), (10, 3, 4),
                                                      (24000, 0, 200), (7, 20, 2)])
def test_detectron2_precise_bn_stream_is_what_the_hook_draws(max_iter, period, num_iter, monkeypatch):
    d2e = pytest.importorskip("transfer.detectron2_engine")
    from detectron2.config import get_cfg
    cfg = get_cfg()
    cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD, cfg.TEST.PRECISE_BN.NUM_ITER = max_iter, period, num_iter
    requested = []
    monkeypatch.setattr(d2e, "TrainStream", lambda cfg, seed, start, n: requested.append((start, n)))
    trainer = types.SimpleNamespace(_building_hooks=True, loader_seed=0,
                                    precise_bn_batches=d2e.Trainer.precise_bn_batches)
    d2e.Trainer.build_train_loader(trainer, cfg)
    assert requested == [(0, _precise_bn_draws(max_iter, period, num_iter))]


# ------------------------------------------------------------------------------------ RPN on logits
def _rpn(post_nms_topk, cls=D2RPN):
    kw = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
              pre_nms_top_n={"training": 50, "testing": 50}, post_nms_top_n={"training": post_nms_topk,
                                                                             "testing": post_nms_topk},
              nms_thresh=0.7)
    if cls is D2RPN:
        kw["beta"] = 0.0
    rpn = cls(torch.nn.Identity(), torch.nn.Identity(), **kw)
    rpn.min_size = 1e-3
    return rpn.eval()


def test_rpn_keeps_the_higher_logit_when_sigmoids_saturate():
    # two overlapping boxes on two RPN levels, logits 18 and 20: sigmoid is 1.0 for both in float32
    assert torch.sigmoid(torch.tensor(18.0)) == torch.sigmoid(torch.tensor(20.0)) == 1.0
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [12.0, 12.0, 52.0, 52.0]]])
    logits = torch.tensor([[18.0, 20.0]])
    kept, scores = _rpn(1).filter_proposals(boxes, logits, [(100, 100)], [1, 1])
    assert kept[0].tolist() == [[12.0, 12.0, 52.0, 52.0]] and scores[0].tolist() == [20.0]
    # what ranking on probabilities did: the tie goes to the first level's box
    old, _ = _rpn(1, RegionProposalNetwork).filter_proposals(boxes, logits, [(100, 100)], [1, 1])
    assert old[0].tolist() == [[10.0, 10.0, 50.0, 50.0]]


def _random_proposals(seed, levels, images=2, saturate=False):
    g = torch.Generator().manual_seed(seed)
    props, logits = [], []
    for n in levels:
        xy = torch.rand(images, n, 2, generator=g) * 150
        wh = torch.rand(images, n, 2, generator=g) * 60 + 2
        props.append(torch.cat([xy, xy + wh], dim=2))
        lg = torch.randn(images, n, generator=g) * 4
        if saturate:  # a third of the logits far past float32 sigmoid's saturation, many of them close
            lg[:, ::3] = 17 + torch.rand(images, lg[:, ::3].shape[1], generator=g) * 6
        logits.append(lg)
    return props, logits


@pytest.mark.parametrize("saturate", [False, True])
def test_rpn_proposals_equal_detectron2s(saturate):
    pytest.importorskip("detectron2")
    from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
    levels = [300, 120, 40]
    props, logits = _random_proposals(3, levels, saturate=saturate)
    sizes = [(170, 180), (160, 200)]
    ours, our_logits = _rpn(60).filter_proposals(torch.cat(props, 1), torch.cat(logits, 1), sizes, levels)
    theirs = find_top_rpn_proposals(props, logits, sizes, 0.7, 50, 60, 0.0, False)
    for o, ol, t in zip(ours, our_logits, theirs):
        assert torch.equal(o, t.proposal_boxes.tensor) and torch.equal(ol, t.objectness_logits)
    if not saturate:  # without ties in probability, torchvision's own selection is the same one
        old, old_probs = _rpn(60, RegionProposalNetwork).filter_proposals(torch.cat(props, 1), torch.cat(logits, 1),
                                                                          sizes, levels)
        for o, ol, b, p in zip(ours, our_logits, old, old_probs):
            assert torch.equal(o, b) and torch.equal(torch.sigmoid(ol), p)


# ------------------------------------------------------------------------------------ VOC: absent classes
CLASSES = ["cat", "dog", "bird"]


def _voc(tmp_path, objects):
    """A VOC folder whose test split has `objects` = {image id: [(class, box)]}."""
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    for image_id, objs in objects.items():
        xml = "".join(f"<object><name>{c}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
                      f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                      for c, b in objs)
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{xml}</annotation>")
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("\n".join(objects) + "\n")


def _meta(tmp_path, year):
    return {"thing_classes": CLASSES, "dirname": str(tmp_path), "split": "test", "year": year,
            "evaluator_type": "pascal_voc"}


def _perfect(objects, extra=()):
    """Exact detections of every object (VOC XML corners are 1-based: the loader's boxes are -1)."""
    preds = {}
    for image_id, objs in objects.items():
        boxes = [[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b in objs] + [e[1] for e in extra if e[0] == image_id]
        classes = [CLASSES.index(c) for c, _ in objs] + [e[2] for e in extra if e[0] == image_id]
        preds[image_id] = {"boxes": np.array(boxes, np.float32), "scores": np.linspace(0.9, 0.5, len(boxes)),
                           "classes": np.array(classes)}
    return preds


OBJECTS = {"a": [("cat", (11, 21, 60, 80)), ("dog", (101, 31, 170, 120))], "b": [("dog", (21, 11, 90, 70))]}


@pytest.mark.parametrize("year", [2007, 2012])
def test_voc_ap_averages_the_classes_present_in_the_test_split(tmp_path, year, caplog):
    _voc(tmp_path, OBJECTS)  # no bird in the split
    # a false "bird" detection too: with no bird ground truth it changes nothing
    preds = _perfect(OBJECTS, extra=[("b", [100.0, 100.0, 140.0, 150.0], 2)])
    with caplog.at_level(logging.WARNING, logger="transfer.evaluation"):
        res = evaluate_voc(_meta(tmp_path, year), preds)
    # cat and dog found exactly: AP 100 at every IoU; detectron2 would give NaN (2012) or 66.7 (2007)
    assert (res["AP"], res["AP50"], res["AP75"]) == pytest.approx((100.0, 100.0, 100.0), abs=1e-9)
    assert res["excluded_classes"] == ["bird"]
    bird = res["per_class_AP50"]["bird"]
    assert (bird == 0.0) if year == 2007 else math.isnan(bird)  # detectron2's per-class value is kept
    assert "bird" in caplog.text and "headline" in caplog.text


def test_voc_with_every_class_present_has_no_excluded_key(tmp_path):
    objects = dict(OBJECTS, c=[("bird", (5, 5, 40, 44))])
    _voc(tmp_path, objects)
    res = evaluate_voc(_meta(tmp_path, 2012), _perfect(objects))
    assert "excluded_classes" not in res and res["AP"] == 100.0


def test_engines_record_excluded_classes_in_metrics_only_as_names(tmp_path, monkeypatch):
    _voc(tmp_path, OBJECTS)
    meta, preds = _meta(tmp_path, 2012), _perfect(OBJECTS)
    # torchvision engine: the eval line gets bbox/excluded_classes beside the numbers
    monkeypatch.setattr(torchvision_engine.tdata, "get_dataset_dicts", lambda name, cfg: [])
    monkeypatch.setattr(torchvision_engine.tdata, "build_test_loader", lambda cfg, dicts, rank, world: [])
    monkeypatch.setattr(torchvision_engine, "inference", lambda model, loader, device: (preds, 0.0))
    cfg = types.SimpleNamespace(DATASETS=types.SimpleNamespace(TEST=("mine_test",)),
                                MODEL=types.SimpleNamespace(MASK_ON=False))
    flat = torchvision_engine.evaluate_all(cfg, torch.nn.Identity(), {"mine_test": meta}, "cpu")
    assert flat["bbox/excluded_classes"] == ["bird"] and flat["bbox/AP"] == 100.0
    # detectron2 engine: its EvalHook takes numbers only, so the names stay out of its results
    d2e = pytest.importorskip("transfer.detectron2_engine")
    ev = d2e.TransferEvaluator.__new__(d2e.TransferEvaluator)
    ev._meta, ev._distributed, ev._predictions, ev._tasks = meta, False, preds, ("bbox",)
    bbox = ev.evaluate()["bbox"]
    assert bbox["AP"] == 100.0 and all(isinstance(v, float) for v in bbox.values())
