"""The initialisation stage of the two-stage methods (ab, ft) driven by the shared trainer, through the
real CLI (distill/train_imagenet.py) on tiny data: stage order, learning rates, what each stage trains,
checkpoints and metrics lines of the initialisation epochs, and exact resume from inside the stage."""
import json
import os

import pytest
import torch

from cocord_common.checkpoint import load_checkpoint
from cocord_common.errors import UserError
from distill import train_imagenet
from test_train_imagenet import TINY, _tensors_equal, tiny  # noqa: F401  (tiny is a fixture)

LR = 0.02
# resnet18: 62 parameter tensors, 2 of them the fc; FT's paraphraser: 6 convs with biases
STUDENT_PARAMS, FC_PARAMS, PARAPHRASER_PARAMS = 62, 2, 12


def run(data, teacher, out, method, *extra):
    argv = [data, "-a", "resnet18", "--teacher-arch", "resnet18", "--teacher-weights", teacher, "--method", method,
            "--output-dir", str(out), "--lr", str(LR), "--cos", "--seed", "5", "--max-steps-per-epoch", "2",
            "--keep-checkpoints", "0"] + TINY + list(extra)
    return train_imagenet.main(argv)


def metrics_lines(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def changed(a, b, keys):
    return {k for k in keys if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize("method", ["ab", "ft"])
def test_init_epochs_run_first_with_their_own_optimizer_then_the_main_stage(tiny, tmp_path, method):
    data, teacher = tiny
    final = run(data, teacher, tmp_path, method, "--init-epochs", "2", "--epochs", "2")
    lines = metrics_lines(tmp_path)
    assert [(m["epoch"], m.get("init_epoch")) for m in lines] == [(0, 1), (0, 2), (1, None), (2, None)]
    assert [m["step"] for m in lines] == [2, 4, 6, 8] and final == lines[-1]
    # init stage: constant LR (resnet18 students take the base LR in ab and ft); main: cosine over --epochs 2
    assert [m["lr"] for m in lines] == pytest.approx([LR, LR, LR, LR * 0.5])
    assert {k for k in lines[0] if k.startswith("train/")} == {"train/loss", "train/ab" if method == "ab"
                                                             else "train/ft_rec"}
    assert {k for k in lines[2] if k.startswith("train/")} == ({"train/loss", "train/ce"} if method == "ab"
                                                             else {"train/loss", "train/ce", "train/ft"})
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint_"))
    assert names == ["checkpoint_0000_init_0001.pth", "checkpoint_0000_init_0002.pth", "checkpoint_0001.pth",
                     "checkpoint_0002.pth"]
    c1, c2, m1 = (load_checkpoint(str(tmp_path / n)) for n in names[:3])
    assert (c1["epoch"], c1["init_epoch"], c2["epoch"], c2["init_epoch"]) == (0, 1, 0, 2) and "init_epoch" not in m1
    assert c1["method_state"]["_extra_state"] == {"init_epochs": 2, "init_epochs_done": 1}
    # the optimizer of the initialisation stage covers exactly its parameters
    trained = STUDENT_PARAMS - FC_PARAMS if method == "ab" else PARAPHRASER_PARAMS
    assert len(c1["optimizer"]["param_groups"][0]["params"]) == trained
    # at the switch (after init epoch 2) a fresh SGD over the main stage's parameters, no momentum yet
    assert c2["optimizer"]["state"] == {} and c2["optimizer"]["param_groups"][0]["lr"] == LR
    main_params = STUDENT_PARAMS + (0 if method == "ab" else len([k for k in c2["method_state"]
                                                                  if k.startswith("factor.translator.")
                                                                  and (k.endswith("weight") or k.endswith("bias"))]))
    assert len(c2["optimizer"]["param_groups"][0]["params"]) == main_params
    # what each stage moved: ab's init stage trains the student without its classifier, ft's leaves it alone
    student0 = load_checkpoint(str(tmp_path / names[0]))["student"]
    params = [k for k in student0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = changed(c1["student"], c2["student"], params)
    if method == "ab":
        assert moved and not moved & {"fc.weight", "fc.bias"}
    else:
        assert moved == set() and changed(c1["student"], c2["student"], ["bn1.running_mean"]) == set()
        assert changed(c1["method_state"], c2["method_state"], ["factor.paraphraser.encoder.0.weight"])
    assert {"fc.weight", "fc.bias"} <= changed(c2["student"], m1["student"], params)
    log = open(tmp_path / "log.txt").read()
    assert "Init epoch: [2/2]" in log and "initialisation stage done after 2 epoch(s)" in log


@pytest.mark.parametrize("method,cut", [("ab", 1), ("ft", 2)])  # inside the stage; at the switch
def test_run_interrupted_in_the_initialisation_stage_resumes_bit_exact(tiny, tmp_path, method, cut):
    data, teacher = tiny
    flags = ["--init-epochs", "2", "--epochs", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(data, teacher, full, method, *flags)
    os.makedirs(part)
    name = f"checkpoint_0000_init_{cut:04d}.pth"
    torch.save(load_checkpoint(str(full / name)), part / name)
    (part / "last_checkpoint").write_text(name)
    with open(part / "metrics.jsonl", "w") as f:  # the lines up to the cut, plus a stale one written after it
        for line in open(full / "metrics.jsonl").readlines()[:cut]:
            f.write(line)
        f.write(json.dumps({"epoch": 0, "init_epoch": cut + 1, "stale": True}) + "\n")
    torch.manual_seed(999)  # scramble the global RNG: resume must restore it
    run(data, teacher, part, method, *flags, "--resume", "auto")
    a = load_checkpoint(str(full / "checkpoint_0001.pth"))
    b = load_checkpoint(str(part / "checkpoint_0001.pth"))
    assert a["step"] == b["step"] == 6
    for key in ("student", "method_state", "optimizer", "scheduler", "rng"):
        _tensors_equal(a[key], b[key], key)
    got = [(m["epoch"], m.get("init_epoch"), m.get("stale")) for m in metrics_lines(part)]
    assert got == [(0, 1, None), (0, 2, None), (1, None, None)]
    full_lines, part_lines = metrics_lines(full), metrics_lines(part)
    for x, y in zip(full_lines, part_lines):  # same losses, LR and accuracy (not the timings)
        assert {k: v for k, v in x.items() if k not in ("time", "images_per_sec")} == \
               {k: v for k, v in y.items() if k not in ("time", "images_per_sec")}
    assert f"resumed from {part / name} at initialisation epoch {cut}" in open(part / "log.txt").read()


def test_resume_with_other_init_epochs_is_refused(tiny, tmp_path):
    data, teacher = tiny
    run(data, teacher, tmp_path, "ab", "--init-epochs", "1", "--epochs", "1", "--max-steps-per-epoch", "1")
    with pytest.raises(UserError, match=r"--init-epochs 1, this run has 3; resume with --init-epochs 1"):
        run(data, teacher, tmp_path, "ab", "--init-epochs", "3", "--epochs", "2", "--resume", "auto")
