"""cocord_common/weights.py: every kind of file a user may hold a ResNet in, and the refusals."""
import pickle
import re

import pytest
import torch

from cocord_common.checkpoint import save_atomic
from cocord_common.weights import (KIND_DISTILL, KIND_PLAIN, KIND_STATE_DICT_ENTRY, WeightsError,
                                   read_state_dict, select_backbone, strip_module_prefix)


def tiny_resnet_sd(seed=0):
    """A few tensors with torchvision ResNet names (the reader does not check architectures)."""
    g = torch.Generator().manual_seed(seed)
    return {"conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
            "bn1.running_mean": torch.randn(4, generator=g),
            "layer1.0.conv1.weight": torch.randn(4, 4, 1, 1, generator=g),
            "fc.weight": torch.randn(2, 4, generator=g)}


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def save(tmp_path, obj, name="in.pth"):
    path = str(tmp_path / name)
    save_atomic(obj, path)
    return path


# stand-ins for transfer.d2_format's name rules, written out here
def is_backbone_key(k):
    return re.match(r"^(conv1\.weight|bn1\.\w+|layer[1-4]\.\d+\.\w+\.\w+)$", k) is not None


def is_head_key(k):
    return re.match(r"^(fc|encoder_k|queue\w*)(\.|$)", k) is not None


def test_plain_state_dict_and_student_backbone(tmp_path):
    sd = tiny_resnet_sd()
    for name in ("in.pth", "student_backbone.pth"):
        found = read_state_dict(save(tmp_path, sd, name))
        assert found.kind == KIND_PLAIN and found.arch is None and found.notes == []
        assert found.description == "plain state dict"
        assert_same(found.state_dict, sd)


def test_ddp_prefix_stripped(tmp_path):
    sd = tiny_resnet_sd()
    found = read_state_dict(save(tmp_path, {"module." + k: v for k, v in sd.items()}))
    assert found.kind == KIND_PLAIN and found.notes == ["DDP 'module.' prefix stripped"]
    assert_same(found.state_dict, sd)


def test_partial_module_prefix_is_kept():
    sd = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    out, stripped = strip_module_prefix(sd)
    assert not stripped and list(out) == ["module.a", "b"]


def test_pytorch_examples_checkpoint(tmp_path):
    sd = tiny_resnet_sd()
    obj = {"epoch": 90, "arch": "resnet50", "best_acc1": 76.1,
           "state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": {"state": {}}}
    found = read_state_dict(save(tmp_path, obj))
    assert found.kind == KIND_STATE_DICT_ENTRY and found.arch == "resnet50"
    assert found.notes == ["DDP 'module.' prefix stripped"]
    assert_same(found.state_dict, sd)


def test_moco_checkpoint_query_encoder(tmp_path):
    sd = tiny_resnet_sd()
    q = {"module.encoder_q." + k: v for k, v in sd.items()}
    q.update({"module.encoder_k." + k: v + 1 for k, v in sd.items()})
    q["module.queue"] = torch.randn(8, 4)
    found = read_state_dict(save(tmp_path, {"arch": "resnet18", "state_dict": q}))
    assert found.kind == KIND_STATE_DICT_ENTRY and found.arch == "resnet18"
    bb = select_backbone(found.state_dict, is_backbone_key, is_head_key)
    assert bb.prefix == "encoder_q."
    assert bb.notes == ["backbone under 'encoder_q.' (MoCo query encoder)"]
    assert_same(bb.state_dict, sd)  # the query encoder, its fc included (a head, dropped later)
    assert bb.outside == ["encoder_k." + k for k in sd] + ["queue"]


def distill_checkpoint(slow):
    return {"arch": "resnet18", "method": "cocord", "epoch": 3, "student": tiny_resnet_sd(1),
            "slow_student": slow, "optimizer": {"state": {}, "param_groups": []},
            "rng": {"torch": torch.get_rng_state()}}


def test_distill_checkpoint_student_and_slow_student(tmp_path):
    slow = tiny_resnet_sd(2)
    path = save(tmp_path, distill_checkpoint(slow))
    found = read_state_dict(path)
    assert found.kind == KIND_DISTILL and found.arch == "resnet18"
    assert "method cocord, arch resnet18, epoch 3" in found.description
    assert_same(found.state_dict, tiny_resnet_sd(1))
    assert_same(read_state_dict(path, source="slow_student").state_dict, slow)


def test_distill_checkpoint_without_slow_student(tmp_path):
    path = save(tmp_path, distill_checkpoint(None))
    with pytest.raises(WeightsError, match=re.escape(path) + ".*no 'slow_student'"):
        read_state_dict(path, source="slow_student")


def test_slow_student_needs_a_distill_checkpoint(tmp_path):
    path = save(tmp_path, tiny_resnet_sd())
    with pytest.raises(WeightsError, match="needs a checkpoint of distill.*no 'student' entry"):
        read_state_dict(path, source="slow_student")
    with pytest.raises(WeightsError, match="choices are"):
        read_state_dict(path, source="teacher")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refusals_name_the_file(tmp_path):
    with pytest.raises(WeightsError, match="absent.pth does not exist"):
        read_state_dict(str(tmp_path / "absent.pth"))
    pkl = tmp_path / "w.pkl"
    pkl.write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"w\.pkl is a \.pkl"):
        read_state_dict(str(pkl))
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _Evil(str(marker))}, f)
    with pytest.raises(WeightsError, match="evil.pth.*weights_only=True"):
        read_state_dict(str(tmp_path / "evil.pth"))
    assert not marker.exists()
    with pytest.raises(WeightsError, match="list.pth holds a list"):
        read_state_dict(save(tmp_path, [torch.zeros(1)], "list.pth"))
    with pytest.raises(WeightsError, match="mixed.pth is neither.*top-level keys: \\['a', 'b'\\]"):
        read_state_dict(save(tmp_path, {"a": torch.zeros(1), "b": 3}, "mixed.pth"))
    with pytest.raises(WeightsError, match="sd.pth: 'state_dict' holds values that are not tensors"):
        read_state_dict(save(tmp_path, {"state_dict": {"a": 1}}, "sd.pth"))
    assert issubclass(WeightsError, ValueError)
    with pytest.raises(WeightsError, match="is a folder"):
        read_state_dict(str(tmp_path))


def test_select_backbone_refusals():
    sd = tiny_resnet_sd()
    with pytest.raises(WeightsError, match=r"no backbone tensor.*--prefix \(candidates: \['net\.'\]\)"):
        select_backbone({"net." + k: v for k, v in sd.items()}, is_backbone_key, is_head_key)
    bb = select_backbone({"net." + k: v for k, v in sd.items()}, is_backbone_key, is_head_key,
                         prefix="net.")
    assert bb.notes == ["backbone under 'net.' (from --prefix)"] and bb.outside == []
    with pytest.raises(WeightsError, match="--prefix 'x.': no backbone tensor under it"):
        select_backbone(sd, is_backbone_key, is_head_key, prefix="x.")
    with pytest.raises(WeightsError, match="1 key.*cannot be placed: mystery"):
        select_backbone({"encoder_q." + k: v for k, v in sd.items()} | {"mystery": torch.zeros(1)},
                        is_backbone_key, is_head_key)
