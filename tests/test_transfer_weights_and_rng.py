"""The torchvision engine's one weights reader (training and --eval-only) and its RNG restore."""
import logging
import os
import random

import numpy as np
import pytest
import torch

from cocord_common.checkpoint import save_atomic
from cocord_common.rng import rng_state
from transfer import torchvision_engine as engine
from transfer.config import load_config
from transfer.d2_format import save_d2_file, torchvision_to_d2
from transfer.modeling import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CFG = os.path.join(REPO, "configs", "cpu", "voc_bccd_r18_fpn.yaml")


@pytest.fixture(scope="module")
def cfg():
    return load_config(CPU_CFG, ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NUM_CLASSES", "3"])


def test_load_weights_kinds_and_refusals(tmp_path, cfg):
    assert engine.load_weights("") == (None, None)
    import torchvision
    tv = torchvision.models.resnet18()
    save_d2_file(torchvision_to_d2(tv.state_dict()).model, tmp_path / "r18.pkl")
    backbone, state = engine.load_weights(str(tmp_path / "r18.pkl"))
    assert state is None and np.array_equal(backbone["stem.conv1.weight"], tv.conv1.weight.detach().numpy())
    detector = build_model(cfg)
    save_atomic({"model": detector.state_dict(), "iteration": 7}, str(tmp_path / "model_0000007.pth"))
    backbone, state = engine.load_weights(str(tmp_path / "model_0000007.pth"))
    assert backbone is None and state["iteration"] == 7
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS = '.*w\.pt': expected a detectron2 '\.pkl'"):
        engine.load_weights(str(tmp_path / "w.pt"))
    save_atomic({"weights": {}}, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match=r"other.pth' is not a checkpoint of this engine \(no 'model' entry.*"
                                         r"tools/convert_to_d2.py"):
        engine.load_weights(str(tmp_path / "other.pth"))


def test_build_detector_loads_the_full_detector_and_says_so(tmp_path, cfg, caplog):
    torch.manual_seed(0)
    trained = build_model(cfg)
    save_atomic({"model": trained.state_dict(), "iteration": 3}, str(tmp_path / "m.pth"))
    with caplog.at_level(logging.INFO, logger="transfer"):
        model, state = engine.build_detector(cfg, str(tmp_path / "m.pth"))
    assert state["iteration"] == 3 and "loaded the full detector from" in caplog.text
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def _draws():
    return torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]


def test_restore_rng_current_and_legacy_checkpoints():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    saved = rng_state()
    first = _draws()
    engine.restore_rng(saved)
    again = _draws()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
    # checkpoints written before cocord_common.rng hold the torch state only
    legacy = {"torch": torch.get_rng_state()}
    a = torch.rand(3)
    engine.restore_rng(legacy)
    assert torch.equal(torch.rand(3), a)
