"""The one checkpoint writer of the project, used by both stages.

A checkpoint is written to a temporary file in the same folder and renamed into place, so a crash
mid-write never leaves a truncated file under the real name; the `last_checkpoint` pointer (a text
file holding the checkpoint's file name, as in detectron2) is updated only after the rename.
Checkpoints hold only tensors, numpy-free Python containers and numbers, so they load with
`torch.load(..., weights_only=True)`.
"""
import os
import tempfile

import torch

POINTER = "last_checkpoint"


def atomic_write(path, write_fn):
    """Call write_fn(binary file) on a temp file beside `path`, then rename it to `path`.

    The result gets the permissions a plain open() would give (mkstemp's files are private, 0600).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path):
    """torch.save `obj` to `path` atomically (temp file + rename)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_text_atomic(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(obj, folder, name):
    """Write `folder/name` atomically, then point `folder/last_checkpoint` at it."""
    path = os.path.join(folder, name)
    save_atomic(obj, path)
    write_text_atomic(os.path.join(folder, POINTER), name)
    return path


def last_checkpoint(folder):
    """Path of the checkpoint named by `folder/last_checkpoint`, or None when there is none.

    A pointer naming a file that does not exist is an error (something deleted it): we refuse to
    silently start from scratch.
    """
    pointer = os.path.join(folder, POINTER)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{pointer} names '{name}', but {path} does not exist; restore that file or delete "
            f"{pointer} to start from scratch")
    return path


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by `save_checkpoint` without executing code from the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file or one holding arbitrary objects
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e
