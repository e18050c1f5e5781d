"""The shared atomic checkpoint writer (cocord_common/checkpoint.py)."""
import os

import pytest
import torch

from cocord_common import checkpoint as ckpt


def test_save_points_last_checkpoint_and_loads_weights_only(tmp_path):
    ckpt.save_checkpoint({"w": torch.arange(3), "epoch": 1}, tmp_path, "checkpoint_0001.pth")
    ckpt.save_checkpoint({"w": torch.arange(4), "epoch": 2}, tmp_path, "checkpoint_0002.pth")
    path = ckpt.last_checkpoint(tmp_path)
    assert os.path.basename(path) == "checkpoint_0002.pth"
    assert ckpt.load_checkpoint(path)["epoch"] == 2
    # no temp files are left behind, and files get ordinary (umask) permissions, not mkstemp's 0600
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0001.pth", "checkpoint_0002.pth", "last_checkpoint"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_previous_file(tmp_path):
    ckpt.save_checkpoint({"epoch": 1}, tmp_path, "model.pth")

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_write(str(tmp_path / "model.pth"), broken)
    assert ckpt.load_checkpoint(str(tmp_path / "model.pth"))["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model.pth"]


def test_no_pointer_means_fresh_start_and_dangling_pointer_is_an_error(tmp_path):
    assert ckpt.last_checkpoint(tmp_path) is None
    (tmp_path / "last_checkpoint").write_text("gone.pth")
    with pytest.raises(FileNotFoundError, match="gone.pth"):
        ckpt.last_checkpoint(tmp_path)


def test_refuses_files_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint"):
        ckpt.load_checkpoint(str(tmp_path / "evil.pth"))
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(str(tmp_path / "missing.pth"))
