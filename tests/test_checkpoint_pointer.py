"""Crash safety rests on one order: the checkpoint file is complete and in place before `last_checkpoint`
names it. These tests fail if the pointer is written first (issue 16, item 3)."""
import os

import pytest
import torch

from cocord_common import checkpoint as ckpt


def test_failed_checkpoint_write_leaves_pointer_on_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint({"epoch": 1}, tmp_path, "checkpoint_0001.pth")
    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("killed mid-write")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="killed mid-write"):
        ckpt.save_checkpoint({"epoch": 2}, tmp_path, "checkpoint_0002.pth")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last_checkpoint").read_text().strip() == "checkpoint_0001.pth"
    assert ckpt.load_checkpoint(ckpt.last_checkpoint(tmp_path))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0001.pth", "last_checkpoint"]  # no temp file left


def test_pointer_is_renamed_into_place_after_the_checkpoint(tmp_path, monkeypatch):
    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        # when the pointer lands, the file it names must already be complete under its real name
        if os.path.basename(dst) == ckpt.POINTER:
            with open(src, encoding="utf-8") as f:
                named = f.read().strip()
            assert ckpt.load_checkpoint(os.path.join(os.path.dirname(dst), named))["epoch"] == 3
        renamed.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    ckpt.save_checkpoint({"epoch": 3}, tmp_path, "checkpoint_0003.pth")
    assert renamed == ["checkpoint_0003.pth", ckpt.POINTER]
