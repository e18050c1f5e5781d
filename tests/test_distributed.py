"""Two gloo processes on CPU: identical queues (holding both ranks' keys) and identical weights
after every step; without batch statistics their update equals one process's on the global batch.
Plus the real CLI under torchrun."""
import glob
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import REPO
from cocord_common import dist
from distill import engine
from cocord_common.checkpoint import load_checkpoint
from distill.methods import build_method, default_method_args
from distill.models import build_resnet
from test_distill_data import make_image_folder

GLOBAL_BATCH, STEPS, QUEUE = 8, 3, 12  # 8 keys per step into 12 slots: wraps at step 2, not a multiple



def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_batchnorm(module):
    """Replace every BatchNorm by Identity, in place: a model without batch statistics, so a
    per-rank batch and the global batch give the same per-sample outputs."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_batchnorm(child)
    return module


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g) for _ in range(3)]
    target = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    return views, target, torch.arange(GLOBAL_BATCH) + step * GLOBAL_BATCH


def run_steps(variant, rank, world, teacher_path, gather):
    """STEPS CoCoRD updates through the trainer's own pieces (wrap_ddp, train_step); returns the
    Method's full state after each step."""
    torch.manual_seed(0)  # identical init on every rank and in the 1-process reference
    student = build_resnet("resnet18", 3)
    teacher = build_resnet("resnet18", 3)
    teacher.load_state_dict(torch.load(teacher_path, weights_only=True))
    if variant == "nobn":
        strip_batchnorm(student)
    args = default_method_args(queue_size=QUEUE, proj_dim=16, proj_hidden_dim=16, pred_dim=8)
    method = build_method("cocord", args, student, teacher, 64, torch.arange(64) % 3, gather=gather)
    if variant == "nobn":
        strip_batchnorm(method)
        method.to("cpu")  # re-pairs the EMA parameters after the module surgery
    device = torch.device("cpu")
    model = dist.wrap_ddp(method, device)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    scaler = engine.build_scaler(device, "off")
    model.train()
    b = GLOBAL_BATCH // world
    history = [{k: v.clone() for k, v in method.state_dict().items()}]
    for step in range(STEPS):
        views, target, index = global_batch(step)
        sl = slice(rank * b, (rank + 1) * b)  # rank r holds samples [r*b, (r+1)*b) of the global batch
        engine.train_step(model, optimizer, scaler, [v[sl] for v in views], target[sl], index[sl], device,
                          "off", where=f"step {step}")
        history.append({k: v.clone() for k, v in method.state_dict().items()})
    dist.average_batchnorm_buffers(method)  # what the trainer does at each epoch end
    history.append({k: v.clone() for k, v in method.state_dict().items()})
    return history


def _worker(rank, world, port, folder, teacher_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = dist.init_distributed("env://", None, "cpu")
    assert info.distributed and dist.get_world_size() == world
    try:
        for variant in ("bn", "nobn"):
            torch.save(run_steps(variant, rank, world, teacher_path, dist.gather),
                       os.path.join(folder, f"{variant}_rank{rank}.pt"))
    finally:
        dist.cleanup()


@pytest.fixture(scope="module")
def two_process_histories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(1)
    teacher_path = str(folder / "teacher.pth")
    torch.save(build_resnet("resnet18", 3).state_dict(), teacher_path)
    mp.spawn(_worker, args=(2, free_port(), str(folder), teacher_path), nprocs=2, join=True)
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    return {v: (load(f"{v}_rank0.pt"), load(f"{v}_rank1.pt")) for v in ("bn", "nobn")}, teacher_path


@pytest.mark.parametrize("variant", ["bn", "nobn"])
def test_ranks_hold_identical_state_after_every_step(two_process_histories, variant):
    h0, h1 = two_process_histories[0][variant]
    assert len(h0) == len(h1) == STEPS + 2  # init, each step, after the epoch-end BN averaging
    for step, (s0, s1) in enumerate(zip(h0, h1)):
        assert s0.keys() == s1.keys()
        for k in s0:
            if k.endswith(("running_mean", "running_var")) and 0 < step <= STEPS:
                continue  # each rank's own BN statistics until the epoch-end average
            assert torch.equal(s0[k], s1[k]), f"step {step}: {k} differs between ranks"
    if variant == "bn":  # the running stats did differ before averaging (per-rank batches)
        assert not torch.equal(h0[1]["student.bn1.running_mean"], h1[1]["student.bn1.running_mean"])
    # the queue holds the gathered keys of both ranks: 8 new rows per step, FIFO with wrap-around
    q0, q1, q2 = h0[0]["queue"], h0[1]["queue"], h0[2]["queue"]
    assert [int(h["queue_ptr"]) for h in h0] == [0, 8, 16 % QUEUE, 24 % QUEUE, 24 % QUEUE]
    assert not torch.isclose(q1[:8], q0[:8]).all(dim=1).any()  # all 8 rows (4 per rank) written
    assert torch.equal(q1[8:], q0[8:])
    assert torch.equal(q2[4:8], q1[4:8]) and not torch.isclose(q2[8:], q1[8:]).all(dim=1).any()
    # the weights really moved
    assert not torch.equal(h0[0]["student.conv1.weight"], h0[-1]["student.conv1.weight"])


def test_two_processes_equal_one_process_on_the_global_batch(two_process_histories):
    """Without batch statistics, 2 ranks x 4 samples == 1 process x 8 samples (weights and queue)."""
    histories, teacher_path = two_process_histories
    h2 = histories["nobn"][0]
    h1 = run_steps("nobn", 0, 1, teacher_path, gather=None)
    for step, (a, b) in enumerate(zip(h1, h2)):
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), \
                f"step {step}: {k} differs (max {(a[k].float() - b[k].float()).abs().max():.3g})"
    # in particular rank 0's queue holds rank 1's keys (rows 4..7 of the first global batch)
    assert torch.allclose(h1[1]["queue"][4:8], h2[1]["queue"][4:8], atol=1e-5)


@pytest.mark.slow
def test_cli_under_torchrun_two_gloo_processes(tmp_path):
    data = make_image_folder(tmp_path / "data", odd_modes=False)
    torch.manual_seed(0)
    teacher = str(tmp_path / "t.pth")
    torch.save(build_resnet("resnet18", 3).state_dict(), teacher)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "distill" / "train_imagenet.py"), data, "-a", "resnet18", "--teacher-arch", "resnet18",
           "--teacher-weights", teacher, "--method", "cocord", "--device", "cpu", "--output-dir", str(out),
           "-b", "4", "--epochs", "1", "--max-steps-per-epoch", "2", "--crop-size", "32", "--val-resize", "36",
           "-j", "0", "--queue-size", "10", "--proj-dim", "16", "--proj-hidden-dim", "16", "--pred-dim", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = load_checkpoint(str(out / "checkpoint_0001.pth"))
    assert len(ckpt["rng"]) == 2 and ckpt["config"]["world_size"] == 2 and ckpt["step"] == 2
    assert int(ckpt["method_state"]["queue_ptr"]) == 8 % 10  # 2 steps x 4 gathered keys
    m = json.loads(open(out / "metrics.jsonl").readline())
    assert m["epoch"] == 1 and "val/top1" in m
    assert "2 process(es) on cpu, batch 4 (2/process)" in open(out / "log.txt").read()
    assert glob.glob(str(out / "tb" / "events.*")) and os.path.isfile(out / "student_backbone.pth")


@pytest.mark.slow
def test_two_stage_method_and_cifar_cli_under_torchrun(tmp_path):
    """distill/train_cifar.py with `ab` on 2 gloo processes: the initialisation epoch, the switch (a fresh
    optimizer and DDP wrapped again over the main stage's parameters), then a main epoch."""
    import numpy as np
    from distill.cifar_data import write_cifar100
    from distill.models import build_model
    rng = np.random.default_rng(0)
    write_cifar100(tmp_path / "data", rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), [i % 4 for i in range(16)],
                   rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), [0, 1, 2, 3],
                   fine_label_names=["a", "b", "c", "d"])
    torch.manual_seed(0)
    teacher = str(tmp_path / "t.pth")
    torch.save({"model": build_model("resnet20", 4).state_dict(), "epoch": 240}, teacher)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "distill" / "train_cifar.py"), str(tmp_path / "data"), "-a", "resnet8", "--teacher-arch",
           "resnet20", "--teacher-weights", teacher, "--method", "ab", "--init-epochs", "1", "--device", "cpu",
           "--output-dir", str(out), "-b", "4", "--epochs", "1", "--max-steps-per-epoch", "2", "-j", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(m["epoch"], m.get("init_epoch"), m["step"]) for m in lines] == [(0, 1, 2), (1, None, 4)]
    assert "train/ab" in lines[0] and "train/ce" in lines[1]
    ckpt = load_checkpoint(str(out / "checkpoint_0001.pth"))
    assert len(ckpt["rng"]) == 2 and ckpt["config"]["world_size"] == 2
    assert ckpt["method_state"]["_extra_state"] == {"init_epochs": 1, "init_epochs_done": 1}
    assert "initialisation stage done after 1 epoch(s)" in open(out / "log.txt").read()
