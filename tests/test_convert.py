"""Backbone conversion (transfer/convert.py via tools/convert_to_d2.py, transfer/d2_format.py,
transfer/backbone.py)."""
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from cocord_common.checkpoint import save_atomic, save_checkpoint
from transfer import convert as conv
from transfer.backbone import (build_resnet_trunk, check_arch_for_meta, freeze_stages,
                               load_trunk_weights, trunk_features)
from transfer.d2_format import (RESNET_SPECS, d2_to_torchvision, d2_to_tv_name,
                                expected_torchvision_shapes, load_d2_file, save_d2_file,
                                torchvision_to_d2, tv_to_d2_name)

REPO = Path(__file__).resolve().parents[1]


def random_resnet(depth, seed=0):
    """torchvision ResNet with every BN parameter and statistic random, so that a swapped or
    skipped norm tensor changes the features (default BN init is the identity)."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(7)
    return m.eval()


def tv_features(model, x):
    return trunk_features(model, x)


def exit_code(argv):
    """The converter's exit status: main's return value, or run_main's sys.exit(2) on a refusal."""
    try:
        return conv.main(argv)
    except SystemExit as e:
        return e.code


def files_in(folder):
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.fixture(scope="module")
def r18():
    return random_resnet(18)


@pytest.fixture
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# name mapping


@pytest.mark.parametrize("depth", sorted(RESNET_SPECS))
def test_name_mapping_is_a_bijection(depth):
    expected = expected_torchvision_shapes(depth)
    d2 = [tv_to_d2_name(k) for k in expected]
    assert None not in d2 and len(set(d2)) == len(d2)
    assert [d2_to_tv_name(n) for n in d2] == list(expected)
    assert tv_to_d2_name("layer1.0.bn2.running_var") == "res2.0.conv2.norm.running_var"
    assert tv_to_d2_name("layer4.0.downsample.1.bias") == "res5.0.shortcut.norm.bias"
    assert tv_to_d2_name("bn1.weight") == "stem.conv1.norm.weight"
    assert tv_to_d2_name("fc.weight") is None


@pytest.mark.parametrize("arch,depth", [("R50-C4", 50), ("R50-FPN", 50), ("R18-FPN", 18),
                                        ("R101-C4", 101)])
def test_every_detectron2_backbone_key_is_produced(shared, arch, depth):
    ref = json.loads(shared("reference", "detectron2_model_keys.json").read_text())[arch]
    result = torchvision_to_d2(getattr(torchvision.models, f"resnet{depth}")().state_dict())
    assert result.depth == depth and result.dropped == ["fc.weight", "fc.bias"]
    needed = {}
    for k, shape in ref.items():
        if k.startswith("backbone.bottom_up."):
            needed[k[len("backbone.bottom_up."):]] = shape
        elif k.startswith("backbone.") and not k.startswith("backbone.fpn_"):
            needed[k[len("backbone."):]] = shape
        elif k.startswith("roi_heads.res5."):
            needed[k[len("roi_heads."):]] = shape
    assert len(needed) > 100
    missing = sorted(set(needed) - set(result.model))
    assert not missing, missing
    bad = {k: (list(result.model[k].shape), s) for k, s in needed.items()
           if list(result.model[k].shape) != s}
    assert not bad, bad
    # and nothing beyond detectron2's names, except the BN counters of frozen stages
    extra = set(result.model) - set(needed)
    assert all(k.endswith("num_batches_tracked") for k in extra), extra


# ---------------------------------------------------------------------------------------------
# round trip torchvision -> .pkl -> our trunk


@pytest.mark.parametrize("depth,norm", [(18, "BN"), (18, "FrozenBN"), (50, "BN")])
def test_roundtrip_features_identical(tmp_path, x, depth, norm):
    src = random_resnet(depth, seed=depth)
    result = torchvision_to_d2(src.state_dict())
    if depth < 50:  # through the file (ResNet-50's 100 MB write is covered by the d2 test)
        save_d2_file(result.model, tmp_path / "w.pkl")
        weights = load_d2_file(tmp_path / "w.pkl")
    else:
        weights = result.model
    trunk = build_resnet_trunk(depth, norm)
    messages = []
    info = load_trunk_weights(trunk, weights, messages.append)
    assert "loaded" in messages[0] and len(info["loaded"]) >= 100
    trunk.eval()
    with torch.no_grad():
        a, b = trunk_features(trunk, x), tv_features(src, x)
    assert list(a) == ["res2", "res3", "res4", "res5"]
    for k in a:  # same modules -> bit-identical; FrozenBN folds BN into scale/shift -> float noise
        assert torch.equal(a[k], b[k]) if norm == "BN" else torch.allclose(a[k], b[k], atol=1e-5), k
    # a fresh trunk gives other features: the equality above is the weights, not luck
    with torch.no_grad():
        fresh = trunk_features(build_resnet_trunk(depth, norm).eval(), x)
    assert not torch.allclose(fresh["res5"], b["res5"])


def test_trunk_has_no_classifier_and_rejects_bad_args():
    trunk = build_resnet_trunk(18)
    assert not any(k.startswith("fc.") for k in trunk.state_dict())
    with pytest.raises(ValueError, match="depth 20"):
        build_resnet_trunk(20)
    with pytest.raises(ValueError, match="GN"):
        build_resnet_trunk(18, "GN")
    assert isinstance(build_resnet_trunk(18, "SyncBN").bn1, torch.nn.SyncBatchNorm)


def test_load_trunk_weights_names_every_missing_key(r18):
    model = torchvision_to_d2(r18.state_dict()).model
    del model["res3.1.conv2.norm.running_var"], model["stem.conv1.weight"]
    with pytest.raises(ValueError) as e:
        load_trunk_weights(build_resnet_trunk(18), model)
    assert "res3.1.conv2.norm.running_var" in str(e.value) and "stem.conv1.weight" in str(e.value)


def test_load_trunk_weights_refuses_foreign_names_and_wrong_depth(r18):
    # Caffe2-style names are no backbone at all: every key is reported missing
    with pytest.raises(ValueError, match="120|100 missing"):
        load_trunk_weights(build_resnet_trunk(18), {"res2_0_branch2a_w": np.zeros((64, 64, 1, 1))})
    with pytest.raises(ValueError, match="ResNet-50"):
        load_trunk_weights(build_resnet_trunk(50), torchvision_to_d2(r18.state_dict()).model)


def test_d2_to_torchvision_accepts_detector_prefixes(r18, x):
    model = torchvision_to_d2(r18.state_dict()).model
    fpn = {"backbone.bottom_up." + k: v for k, v in model.items()}
    fpn["backbone.fpn_lateral2.weight"] = np.zeros((256, 64, 1, 1), np.float32)
    fpn["proposal_generator.rpn_head.conv.weight"] = np.zeros((256, 256, 3, 3), np.float32)
    c4 = {("roi_heads." if k.startswith("res5") else "backbone.") + k: torch.from_numpy(v)
          for k, v in model.items()}
    c4["pixel_mean"] = torch.zeros(3, 1, 1)
    for d2 in (fpn, c4):
        tv = d2_to_torchvision(d2, 18)
        assert set(tv) == {k for k in r18.state_dict() if not k.startswith("fc.")}
        trunk = build_resnet_trunk(18)
        info = load_trunk_weights(trunk, d2)
        assert info["ignored"] and all("fpn" in k or "rpn" in k or "pixel" in k
                                       for k in info["ignored"])
        with torch.no_grad():
            assert torch.equal(trunk_features(trunk.eval(), x)["res5"], tv_features(r18, x)["res5"])


def test_d2_to_torchvision_refuses_conflicts_and_unplaceable(r18):
    model = torchvision_to_d2(r18.state_dict()).model
    both = dict(model)
    both["backbone.res2.0.conv1.weight"] = model["res2.0.conv1.weight"] + 1
    with pytest.raises(ValueError, match="different values"):
        d2_to_torchvision(both)
    odd = dict(model)
    odd["res2.0.conv9.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="res2.0.conv9.weight"):
        d2_to_torchvision(odd)
    with pytest.raises(ValueError, match="not in a ResNet-18: res5.2"):
        d2_to_torchvision(dict(model, **{"res5.2.conv1.weight": np.zeros((512, 512, 3, 3))}), 18)


def test_freeze_stages_keeps_outputs_and_stops_gradients(r18, x):
    trunk = build_resnet_trunk(18)
    load_trunk_weights(trunk, torchvision_to_d2(r18.state_dict()).model)
    freeze_stages(trunk, 2)
    assert not any(p.requires_grad for p in trunk.layer1.parameters())
    assert all(p.requires_grad for p in trunk.layer2.parameters())
    assert isinstance(trunk.bn1, torchvision.ops.FrozenBatchNorm2d)
    assert isinstance(trunk.layer1[0].bn1, torchvision.ops.FrozenBatchNorm2d)
    trunk.train()  # frozen statistics must not move, even in train mode
    with torch.no_grad():
        res2 = trunk_features(trunk, x, ("res2",))["res2"]
    assert torch.allclose(res2, tv_features(r18, x)["res2"], atol=1e-5)
    with pytest.raises(ValueError, match="FREEZE_AT"):
        freeze_stages(trunk, 6)


def test_check_arch_for_meta():
    for depth in (18, 34):
        for head in ("Res5ROIHeads", "Res5ROIHeadsExtraNorm"):
            with pytest.raises(ValueError, match="FPN config.*voc_r18_fpn"):
                check_arch_for_meta(depth, head)
        check_arch_for_meta(depth, "StandardROIHeads", res2_out_channels=64)
    check_arch_for_meta(50, "Res5ROIHeads", res2_out_channels=256, stride_in_1x1=False)
    with pytest.raises(ValueError, match="RES2_OUT_CHANNELS.*64"):
        check_arch_for_meta(18, "StandardROIHeads", res2_out_channels=256)
    with pytest.raises(ValueError, match="STRIDE_IN_1X1 False"):
        check_arch_for_meta(50, "Res5ROIHeads", stride_in_1x1=True)
    with pytest.raises(ValueError, match="DEPTH 20"):
        check_arch_for_meta(20, "StandardROIHeads")


# ---------------------------------------------------------------------------------------------
# safe I/O

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_save_load_d2_file_roundtrip_and_format(tmp_path):
    model = {"stem.conv1.weight": np.random.rand(2, 3).astype(np.float32),
             "res2.0.conv1.norm.num_batches_tracked": np.array(5)}
    save_d2_file(model, tmp_path / "a.pkl")
    with open(tmp_path / "a.pkl", "rb") as f:
        raw = pickle.load(f)
    assert raw["__author__"] == "cocord-transfer" and raw["matching_heuristics"] is True
    back = load_d2_file(tmp_path / "a.pkl")
    assert list(back) == list(model) and all(np.array_equal(back[k], model[k]) for k in model)
    # files written by others with protocol 5 (numpy's out-of-band path) load too
    with open(tmp_path / "p5.pkl", "wb") as f:
        pickle.dump({"model": model, "__author__": "x"}, f, protocol=5)
    assert np.array_equal(load_d2_file(tmp_path / "p5.pkl")["stem.conv1.weight"],
                          model["stem.conv1.weight"])
    assert files_in(tmp_path) == ["a.pkl", "p5.pkl"]  # no temp files left


def test_load_d2_file_refuses_code_and_non_d2_content(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"a": _Evil(str(marker))}}, f)
    with pytest.raises(ValueError, match="open' is not allowed"):
        load_d2_file(tmp_path / "evil.pkl")
    assert not marker.exists()
    with open(tmp_path / "obj.pkl", "wb") as f:
        pickle.dump({"model": {"a": np.array([1, "x"], dtype=object)}}, f)
    with pytest.raises(ValueError, match="not allowed|not a numeric array"):
        load_d2_file(tmp_path / "obj.pkl")
    with open(tmp_path / "nomodel.pkl", "wb") as f:
        pickle.dump({"blobs": {}}, f)
    with pytest.raises(ValueError, match="not in detectron2 format"):
        load_d2_file(tmp_path / "nomodel.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read"):
        load_d2_file(tmp_path / "junk.pkl")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected a detectron2 '\.pkl'"):
        load_d2_file(tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError):
        load_d2_file(tmp_path / "absent.pkl")


def test_converter_refuses_pickle_with_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _Evil(str(marker))}, f)
    assert exit_code([str(tmp_path / "evil.pth"), str(tmp_path / "out.pkl")]) == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "nothing written" in err
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()


# ---------------------------------------------------------------------------------------------
# the CLI: input kinds


def i3_checkpoint(folder, student, slow, arch="resnet18", method="cocord"):
    """A checkpoint in distill/train_imagenet.py's layout (interface I3)."""
    obj = {"arch": arch, "method": method, "epoch": 2, "step": 10, "config": {"arch": arch},
           "student": student.state_dict(),
           "slow_student": None if slow is None else
           {k: v for k, v in slow.state_dict().items() if not k.startswith("fc.")},
           "method_state": {"queue": torch.randn(16, 8), "proj.weight": torch.randn(8, 512)},
           "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "scaler": {},
           "rng": {"torch": torch.get_rng_state()}}
    return save_checkpoint(obj, str(folder), "checkpoint_0002.pth")


def assert_pkl_equals(path, model):
    d2 = load_d2_file(path)
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert np.array_equal(d2[tv_to_d2_name(k)], v.numpy()), k
    assert len(d2) == len(model.state_dict()) - 2


def test_cli_distill_checkpoint_student_and_slow_student(tmp_path, capsys):
    student, slow = random_resnet(18, 1), random_resnet(18, 2)
    ck = i3_checkpoint(tmp_path / "run", student, slow)
    assert conv.main([ck, str(tmp_path / "s.pkl")]) == 0
    out = capsys.readouterr().out
    assert "distillation checkpoint" in out and "converting 'student'" in out
    assert "ResNet-18" in out and "converted: 120 tensors" in out and "dropped: 2 tensors: fc.*" in out
    assert_pkl_equals(tmp_path / "s.pkl", student)
    assert conv.main([ck, str(tmp_path / "slow.pkl"), "--source", "slow_student"]) == 0
    assert "converting 'slow_student'" in capsys.readouterr().out
    assert_pkl_equals(tmp_path / "slow.pkl", slow)


def test_cli_slow_student_absent_or_arch_contradiction(tmp_path, capsys):
    ck = i3_checkpoint(tmp_path / "run", random_resnet(18), None, method="kd")
    assert exit_code([ck, str(tmp_path / "o.pkl"), "--source", "slow_student"]) == 2
    assert "no 'slow_student'" in capsys.readouterr().err
    assert exit_code([ck, str(tmp_path / "o.pkl"), "--arch", "resnet50"]) == 2
    assert "contradicts" in capsys.readouterr().err
    assert not (tmp_path / "o.pkl").exists()


@pytest.mark.parametrize("kind", ["plain", "ddp", "moco", "student_backbone"])
def test_cli_input_kinds(tmp_path, capsys, r18, kind):
    sd = r18.state_dict()
    if kind == "plain":
        obj, says = {k: v for k, v in sd.items() if not k.startswith("fc.")}, "plain state dict"
    elif kind == "ddp":
        obj, says = {"module." + k: v for k, v in sd.items()}, "DDP 'module.' prefix stripped"
    elif kind == "moco":  # MoCo v2: MLP head in encoder_q.fc, a key encoder, a queue
        q = {"module.encoder_q." + k: v for k, v in sd.items() if not k.startswith("fc.")}
        q.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512),
                  "module.encoder_q.fc.2.weight": torch.randn(128, 512)})
        q.update({"module.encoder_k." + k[len("module.encoder_q."):]: v + 1 for k, v in q.items()})
        q.update({"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1)})
        obj, says = {"arch": "resnet18", "epoch": 200, "state_dict": q}, "MoCo query encoder"
    else:  # what distill/train_imagenet.py writes beside its checkpoints
        obj, says = sd, "plain state dict"
    name = "student_backbone.pth" if kind == "student_backbone" else "in.pth"
    save_atomic(obj, str(tmp_path / name))
    assert conv.main([str(tmp_path / name), str(tmp_path / "o.pkl")]) == 0
    out = capsys.readouterr().out
    assert says in out
    if kind == "moco":
        assert "encoder_q.fc.* (2), encoder_k.* (122), queue, queue_ptr" in out
    assert_pkl_equals(tmp_path / "o.pkl", r18)


def test_cli_prefix_flag(tmp_path, capsys, r18):
    save_atomic({"net." + k: v for k, v in r18.state_dict().items()}, str(tmp_path / "in.pth"))
    assert exit_code([str(tmp_path / "in.pth"), str(tmp_path / "o.pkl")]) == 2
    assert "--prefix (candidates: ['net.'])" in capsys.readouterr().err
    assert conv.main([str(tmp_path / "in.pth"), str(tmp_path / "o.pkl"), "--prefix", "net."]) == 0
    assert "backbone under 'net.'" in capsys.readouterr().out
    assert_pkl_equals(tmp_path / "o.pkl", r18)


def test_cli_verbose_lists_every_tensor(tmp_path, capsys, r18):
    save_atomic(r18.state_dict(), str(tmp_path / "in.pth"))
    assert conv.main([str(tmp_path / "in.pth"), str(tmp_path / "o.pkl"), "-v"]) == 0
    out = capsys.readouterr().out
    assert "layer2.0.downsample.1.running_var" in out and "res3.0.shortcut.norm.running_var" in out
    assert "\n  fc.weight" in out


# ---------------------------------------------------------------------------------------------
# the CLI: refusals (exit 2, `convert_to_d2.py: error: ...`, nothing written)


def _refusal_cases(sd):
    no_backbone = {"encoder.weight": torch.zeros(3), "fc.weight": torch.zeros(2, 2)}
    missing = {k: v for k, v in sd.items() if k != "layer2.0.bn1.running_var"}
    shape = dict(sd, **{"layer3.1.conv2.weight": torch.zeros(256, 256, 1, 1)})
    leftover = dict(sd, **{"layer3.1.attention.weight": torch.zeros(4)})
    stranger = dict(sd, **{"mystery_table": torch.zeros(4)})
    gap = {k: v for k, v in random_resnet(34).state_dict().items()
           if not k.startswith("layer3.2.")}
    return [
        (no_backbone, [], "no backbone tensor"),
        (missing, [], "missing 1 tensor.*layer2.0.bn1.running_var"),
        (shape, [], r"shape mismatch.*layer3.1.conv2.weight: file \(256, 256, 1, 1\)"),
        (leftover, [], "cannot be placed.*layer3.1.attention.weight"),
        (stranger, [], "cannot be placed.*mystery_table"),
        (gap, ["--arch", "resnet34"], "missing.*layer3.2.conv1.weight"),
        (sd, ["--arch", "resnet50"], "ResNet-50 was expected"),
        ({k: v for k, v in sd.items() if k != "conv1.weight"}, [], "missing 1 tensor.*conv1.weight"),
    ]


def test_cli_refusals_write_nothing(tmp_path, capsys, r18):
    out = tmp_path / "out" / "o.pkl"
    out.parent.mkdir()
    for i, (obj, extra, msg) in enumerate(_refusal_cases(r18.state_dict())):
        save_atomic(obj, str(tmp_path / f"in{i}.pth"))
        assert exit_code([str(tmp_path / f"in{i}.pth"), str(out)] + extra) == 2, msg
        err = capsys.readouterr().err
        assert re.search(msg, err), (msg, err)
        assert "nothing written" in err
        assert files_in(out.parent) == [], msg
    # an existing output is left as it was
    out.write_bytes(b"old")
    assert exit_code([str(tmp_path / "in1.pth"), str(out)]) == 2
    assert out.read_bytes() == b"old"
    capsys.readouterr()
    save_atomic(r18.state_dict(), str(tmp_path / "good.pth"))
    assert exit_code([str(tmp_path / "good.pth"), str(tmp_path / "o.pth")]) == 2
    assert "must end in .pkl" in capsys.readouterr().err


def test_cli_unrecognised_layout_needs_arch(tmp_path, capsys, r18):
    sd = {k: v for k, v in r18.state_dict().items() if not k.startswith("layer4.1.")}
    save_atomic(sd, str(tmp_path / "in.pth"))
    assert exit_code([str(tmp_path / "in.pth"), str(tmp_path / "o.pkl")]) == 2
    assert "no standard ResNet" in capsys.readouterr().err
    assert exit_code([str(tmp_path / "in.pth"), str(tmp_path / "o.pkl"), "--arch", "resnet18"]) == 2
    assert "layer4.1.conv1.weight" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# --check


def test_cli_check_on_a_real_image(tmp_path, capsys, shared):
    img = sorted(shared("data", "voc_bccd", "JPEGImages").glob("*.jpg"))[0]
    ck = i3_checkpoint(tmp_path / "run", random_resnet(18, 3), random_resnet(18, 4))
    assert conv.main([ck, str(tmp_path / "o.pkl"), "--check", "--check-image", str(img),
                      "--check-size", "96"]) == 0
    out = capsys.readouterr().out
    assert img.name in out and "synthetic" not in out
    for stage in ("res2", "res3", "res4", "res5"):
        assert f"{stage} [1, " in out
    assert "check passed: max abs diff over res2..res5 = 0" in out


def test_cli_check_synthetic_default_and_detects_mismatch(tmp_path, capsys):
    save_atomic(random_resnet(18, 5).state_dict(), str(tmp_path / "in.pth"))
    assert conv.main([str(tmp_path / "in.pth"), str(tmp_path / "o.pkl"), "--check",
                      "--check-size", "64"]) == 0
    assert "deterministic synthetic image 64x64" in capsys.readouterr().out
    # the checker fails when the file holds other weights than the source
    image, _ = conv.load_image(None, 64)
    other = random_resnet(18, 6).state_dict()
    with pytest.raises(conv.ConversionError, match="features differ"):
        conv.check_features(str(tmp_path / "o.pkl"), other, 18, image, log=lambda m: None)


def test_failed_check_writes_nothing(tmp_path, capsys, monkeypatch, r18):
    """--check runs before the file is written: a failure leaves an existing output as it was."""
    save_atomic(r18.state_dict(), str(tmp_path / "in.pth"))
    out = tmp_path / "o.pkl"
    out.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise conv.ConversionError("--check failed: features differ at ['res5']")
    monkeypatch.setattr(conv, "compare_features", fail)
    assert exit_code([str(tmp_path / "in.pth"), str(out), "--check", "--check-size", "32"]) == 2
    assert "features differ" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and files_in(tmp_path) == ["in.pth", "o.pkl"]


def test_check_image_is_rgb_normalised_with_imagenet_constants(tmp_path):
    """A pure-red file becomes channel 0 = (1 - 0.485) / 0.229, channels 1, 2 = -mean / std."""
    from PIL import Image

    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "red.png")
    image, desc = conv.load_image(str(tmp_path / "red.png"), 2)
    assert image.shape == (1, 3, 2, 3) and "red.png (6x4, resized to 3x2)" in desc
    by_hand = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
    for c, v in enumerate(by_hand):
        assert torch.allclose(image[0, c], torch.full((2, 3), v), atol=1e-6), (c, image[0, c])


def test_cli_subprocess_exit_codes(tmp_path, r18):
    save_atomic({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "heads.pth"))
    cmd = [sys.executable, str(REPO / "tools" / "convert_to_d2.py"), str(tmp_path / "heads.pth"),
           str(tmp_path / "o.pkl")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "no backbone tensor" in p.stderr
    assert not (tmp_path / "o.pkl").exists()


# ---------------------------------------------------------------------------------------------
# real detectron2 (CPU test build) loads the file


def _d2_model(depth, fpn):
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 20
    if fpn:  # as detectron2's Base-RCNN-FPN.yaml
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
        if depth < 50:
            cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    check_arch_for_meta(depth, cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.RESNETS.RES2_OUT_CHANNELS,
                        cfg.MODEL.RESNETS.STRIDE_IN_1X1)
    return build_model(cfg).eval()


@pytest.mark.detectron2
@pytest.mark.parametrize("depth,fpn", [(50, False), (18, True)], ids=["R50-C4", "R18-FPN"])
def test_detectron2_checkpointer_loads_converted_file(tmp_path, shared, depth, fpn):
    model = _d2_model(depth, fpn)
    from detectron2.checkpoint import DetectionCheckpointer
    from PIL import Image

    src = random_resnet(depth, seed=10 + depth)
    save_atomic(src.state_dict(), str(tmp_path / "student_backbone.pth"))
    assert conv.main([str(tmp_path / "student_backbone.pth"), str(tmp_path / "w.pkl")]) == 0
    ckpt = DetectionCheckpointer(model)
    incompatible = ckpt._load_model(ckpt._load_file(str(tmp_path / "w.pkl")))
    backbone_prefixes = ("backbone.bottom_up.",) if fpn else ("backbone.", "roi_heads.res5.")
    missing = [k for k in incompatible.missing_keys if k.startswith(backbone_prefixes)]
    assert not missing, missing
    assert not incompatible.incorrect_shapes
    # only BN counters of the stages detectron2 freezes (FrozenBN has none) are left unused
    assert all(k.endswith("num_batches_tracked") and k.startswith(("stem.", "res2."))
               for k in incompatible.unexpected_keys), incompatible.unexpected_keys

    # same real image through detectron2's preprocessing (RGB, torchvision mean/std in 0..255)
    # and through torchvision's normalisation; 160x128 needs no padding for FPN's divisibility 32
    jpg = sorted(shared("data", "voc_bccd", "JPEGImages").glob("*.jpg"))[1]
    rgb = np.asarray(Image.open(jpg).convert("RGB").resize((160, 128)), dtype=np.float32)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x_tv = ((chw / 255.0 - mean) / std).unsqueeze(0)
    with torch.no_grad():
        images = model.preprocess_image([{"image": chw}])
        assert images.tensor.shape == x_tv.shape
        ref = tv_features(src, x_tv)
        if fpn:
            got = model.backbone.bottom_up(images.tensor)
            stages = ["res2", "res3", "res4", "res5"]
        else:
            got = dict(model.backbone(images.tensor))
            got["res5"] = model.roi_heads.res5(got["res4"])  # C4: res5 lives in the box head
            stages = ["res4", "res5"]
    for s in stages:
        # float32 rounding of the two preprocessing orders grows with depth: judge the difference
        # against the stage's feature scale (a wrong or swapped tensor differs by O(scale))
        diff, scale = (got[s] - ref[s]).abs().max().item(), ref[s].abs().max().item()
        assert diff <= 1e-5 * scale + 1e-4, (s, diff, scale)
