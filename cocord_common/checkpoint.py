"""The one checkpoint writer of the project, used by both stages.

A checkpoint is written to a temporary file in the same folder and renamed into place, so a crash
mid-write never leaves a truncated file under the real name; the `last_checkpoint` pointer (a text
file holding the checkpoint's file name, as in detectron2) is updated only after the rename.
Checkpoints hold only tensors, numpy-free Python containers and numbers, so they load with
`torch.load(..., weights_only=True)`.
"""
import os
import re
import tempfile

import torch

from cocord_common.errors import UserError

POINTER = "last_checkpoint"
# atomic_write's temp files: "." + target name + "." + mkstemp's 8 random characters + ".tmp"
TEMP_FILE_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
# how a torch file begins: torch.save's zip archive, or the legacy format's pickle (protocol 2+)
TORCH_MAGICS = (b"PK\x03\x04", b"\x80")
# how torch's weights-only unpickler names the callable a refused file would import
CODE_REFERENCE_RE = re.compile(r"(Unsupported global: GLOBAL|Trying to load unsupported GLOBAL) [\w.]+")


class CheckpointError(UserError, RuntimeError):
    """A torch file that cannot be loaded safely (not a torch file, corrupt, or holding code); the
    message names the file. Also a RuntimeError, the type load_checkpoint raised before, so callers
    written for that still catch it."""


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


def remove_orphan_temp_files(folder, log):
    """Delete the temp files atomic_write left in `folder` when a run was killed mid-write (only
    names of our exact pattern, only directly in `folder`); log each one. Returns their names."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if TEMP_FILE_RE.match(name) and os.path.isfile(path) and not os.path.islink(path):
            size = os.path.getsize(path)
            os.remove(path)
            log(f"removed {path} ({size / 2**20:.1f} MiB), a temp file left by an interrupted write")
            removed.append(name)
    return removed


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
    """Load a torch file (our checkpoints, state dicts) without executing code from it: `weights_only=True`
    is passed explicitly, so no environment variable (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn it off."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file; give the file inside it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(8)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, not a torch file, or one holding arbitrary objects
        raise CheckpointError(f"cannot load checkpoint {path}: {refusal_reason(e, head)}") from None


def refusal_reason(error, head=None):
    """torch.load's error in our words; `head` = the file's first bytes, when known. Three cases: not a
    torch file at all, a torch file holding code (refused), a damaged torch file. torch's own advice for
    refused files (re-run with weights_only=False) would run whatever code the file carries, so it is
    never repeated."""
    text = str(error)
    if head is not None and not head.startswith(TORCH_MAGICS):
        kind = ("it is empty" if not head else f"it is {'text' if _looks_like_text(head) else 'another format'}: "
                f"it begins with {head!r}")
        return (f"not a torch file ({kind}, while torch.save writes a zip archive or a pickle); give the "
                ".pth file torch.save wrote")
    code = CODE_REFERENCE_RE.search(text)
    if code:
        code = code.group(0)  # only the name: torch's advice around it (allowlist it, weights_only=False) is unsafe
        return ("it holds Python objects other than tensors, numbers, strings and containers, and loading them "
                f"could run code from the file, so it is refused ({code}); re-save it as a plain state dict "
                "(torch.save(model.state_dict(), path)) from a trusted copy")
    detail = text.splitlines()[0] if "Weights only load failed" not in text else next(
        (ln.strip() for ln in text.splitlines() if ln.strip().startswith("Unsupported operand")), "bad pickle data")
    return (f"a damaged torch file ({type(error).__name__}: {detail}); is it truncated (an interrupted copy "
            "or download)? Copy it again")


def _looks_like_text(head):
    """UTF-8 without control characters (the last character may be cut by the 8-byte read)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":
            return False
        text = head[:e.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\r\n" for ch in text)
