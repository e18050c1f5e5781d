"""The distillation LR schedule (issue 16, item 4): x0.1 at each milestone, cosine per epoch, and the LR
the optimizer really uses in each epoch of a training run. Expected values are written out by hand."""
import json

import pytest
import torch

from distill import engine, train_imagenet
from test_distill_data import make_image_folder

# epochs 100, milestones 30 60 90: the factor during each epoch around every milestone
STEP = {0: 1.0, 29: 1.0, 30: 0.1, 31: 0.1, 59: 0.1, 60: 0.01, 61: 0.01, 89: 0.01, 90: 0.001, 91: 0.001, 99: 0.001}
# cosine over 100 epochs: 0.5 * (1 + cos(pi * e / 100))
COSINE = {0: 1.0, 25: 0.8535533905932737, 50: 0.5, 75: 0.14644660940672627, 100: 0.0}


@pytest.mark.parametrize("epoch,factor", sorted(STEP.items()))
def test_step_factor_at_before_and_after_each_milestone(epoch, factor):
    assert engine.lr_factor(epoch, 100, [30, 60, 90], cos=False) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("epoch,factor", sorted(COSINE.items()))
def test_cosine_factor_at_its_ends_and_midpoint(epoch, factor):
    assert engine.lr_factor(epoch, 100, [30, 60, 90], cos=True) == pytest.approx(factor, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("cos,table", [(False, STEP), (True, COSINE)])
def test_scheduler_gives_the_optimizer_base_lr_times_the_factor(cos, table):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    scheduler = engine.build_scheduler(opt, 100, [30, 60, 90], cos)
    for epoch in range(100):  # stepped once per epoch, after it
        if epoch in table:
            assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * table[epoch], rel=1e-12, abs=1e-15), epoch
        opt.step()
        scheduler.step()


@pytest.mark.parametrize("flags,factors", [
    (["--schedule", "1", "3"], [1.0, 0.1, 0.1, 0.01]),
    (["--cos"], [1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),  # 0.5 * (1 + cos(pi * e / 4))
])
def test_training_run_uses_base_lr_times_factor_in_each_epoch(tmp_path, monkeypatch, flags, factors):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1, odd_modes=False)
    used = []  # the LR of the optimizer at every training step
    real_step = engine.train_step

    def spy(model, optimizer, *args, **kwargs):
        used.append(optimizer.param_groups[0]["lr"])
        return real_step(model, optimizer, *args, **kwargs)
    monkeypatch.setattr(engine, "train_step", spy)
    out = tmp_path / "out"
    train_imagenet.main([data, "-a", "resnet18", "--method", "supervised", "--epochs", "4", "--lr", "0.4",
                         "-b", "2", "--max-steps-per-epoch", "1", "--crop-size", "32", "--no-val", "-j", "0",
                         "--keep-checkpoints", "1", "--output-dir", str(out)] + flags)
    want = [pytest.approx(0.4 * f, rel=1e-12) for f in factors]
    assert used == want
    logged = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    assert logged == want
