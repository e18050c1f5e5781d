"""CIFAR-100 for distillation: torchvision's on-disk format, read safely, augmented per sample.

Layout (what every user already has, and what torchvision's CIFAR100 reads):
    DATA/cifar-100-python/train   50,000 training images
    DATA/cifar-100-python/test    10,000 test images
    DATA/cifar-100-python/meta    class names
Each file is a pickle of a dict. train/test: 'data' (uint8 array, N x 3072: the red, green, then
blue 32x32 plane of each image, row-major), 'fine_labels' (N ints), 'coarse_labels', 'filenames',
'batch_label'; meta: 'fine_label_names', 'coarse_label_names'. The official files were written by
Python 2, so their keys and strings come back as bytes or latin-1 str depending on the loader;
both spellings are accepted.

A pickle can run any code when loaded, so the files are read by `RestrictedUnpickler`, which
only lets through what the format needs: numpy array reconstruction (numpy's `_reconstruct`,
`ndarray` and `dtype`; the official Python 2 files name the first `numpy.core.multiarray._reconstruct`,
files written under numpy >= 2 `numpy._core.multiarray._reconstruct`). Dicts, lists, ints and
strings need no importable name at all. Anything else is refused before it runs.

Training samples are augmented as RepDistiller does (RandomCrop(32, padding=4) with zero padding,
horizontal flip, normalisation with CIFAR100_MEAN / CIFAR100_STD), `num_views` times independently,
from a generator seeded by (seed, epoch, index) as in distill/data.py, never from the global RNG.
Test samples are only normalised.
"""
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from cocord_common.errors import UserError
from distill.data import SeededViewsDataset

CIFAR100_DIRNAME = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGE_SIZE = 32
CROP_PADDING = 4
PIXELS_PER_IMAGE = 3 * IMAGE_SIZE * IMAGE_SIZE  # 3072

_NUMPY_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own array rebuilder, whatever its module
ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,   # numpy 1.x / Python 2 files
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,  # files written by numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafePickleError(UserError):
    """A CIFAR file asked to load something outside the format (tampered or not a CIFAR file)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR format: only ALLOWED_PICKLE_GLOBALS may be imported.

    Loads Python 2 strings as latin-1 (numpy's way of reading Python 2 array pickles)."""

    def __init__(self, file, path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module, name):
        allowed = ALLOWED_PICKLE_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"{self.path}: refused to load '{module}.{name}'. A CIFAR-100 file only holds numpy "
                f"arrays, lists and strings, so this file is tampered with or not a CIFAR-100 file "
                f"(nothing from it was run). Replace it with the file from the official archive "
                f"{CIFAR100_URL} (md5 {CIFAR100_MD5})")
        return allowed

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.path}: holds a persistent reference, which CIFAR files never do")


def load_cifar_pickle(path):
    """The dict stored in one CIFAR file, keys as str; every failure is an error naming the file."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read {path} as a CIFAR-100 pickle ({type(e).__name__}: {e}); the file is "
                        f"truncated or not from {CIFAR100_URL}: extract that archive again") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR-100 file")
    return {as_str(k): v for k, v in obj.items()}


def as_str(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


def require_key(content, key, path):
    if key not in content:
        raise UserError(f"{path} has no key '{key}' (keys: {', '.join(map(str, content))}); "
                        f"not a CIFAR-100 {Path(path).name} file")
    return content[key]


# --- the folder ---------------------------------------------------------------------------------

def cifar100_folder(root):
    """DATA/cifar-100-python, after checking that it holds train, test and meta."""
    folder = Path(root) / CIFAR100_DIRNAME
    missing = [name for name in CIFAR100_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-100 not found: {folder} must hold the files {', '.join(CIFAR100_FILES)} "
            f"(missing: {', '.join(missing)}). Create it by extracting {CIFAR100_URL} into {root} "
            f"(tar xzf cifar-100-python.tar.gz -C {root}), or pass --download to fetch and verify "
            f"that archive (md5 {CIFAR100_MD5}); torchvision's CIFAR100(root={str(root)!r}, "
            f"download=True) makes the same folder")
    return folder


def read_class_names(folder):
    path = Path(folder) / "meta"
    names = require_key(load_cifar_pickle(path), "fine_label_names", path)
    if not isinstance(names, (list, tuple)) or not names \
            or not all(isinstance(n, (str, bytes)) for n in names):
        raise UserError(f"{path}: 'fine_label_names' must be a non-empty list of strings, "
                        f"got {names!r:.80}")
    return [as_str(n) for n in names]


def read_split(folder, split, num_classes):
    """(images uint8 [N, 3, 32, 32], labels [N] ints) of `split` ('train' or 'test'), checked."""
    path = Path(folder) / split
    content = load_cifar_pickle(path)
    data = require_key(content, "data", path)
    labels = require_key(content, "fine_labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != PIXELS_PER_IMAGE or data.shape[0] == 0:
        described = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                     else type(data).__name__)
        raise UserError(f"{path}: key 'data' is a {described}; expected a uint8 array of shape "
                        f"N x {PIXELS_PER_IMAGE} (N >= 1 images of 3x32x32, channel-major)")
    labels = check_labels(labels, data.shape[0], num_classes, f"{path}: key 'fine_labels'")
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return images, labels


def check_labels(labels, n, num_classes, where):
    """Labels as a list of ints, or an error naming `where` and the offending value."""
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)):
        raise UserError(f"{where} is a {type(labels).__name__}; expected a list of {n} ints")
    if len(labels) != n:
        raise UserError(f"{where} has {len(labels)} labels but there are {n} images")
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                or not 0 <= label < num_classes:
            raise UserError(f"{where}[{i}] is {label!r}; labels must be ints in 0..{num_classes - 1} "
                            f"(one per name in meta's 'fine_label_names')")
    return [int(label) for label in labels]


# --- augmentation -------------------------------------------------------------------------------

def normalize_cifar(img):
    """uint8 [3, H, W] -> float [3, H, W] in [0, 1], normalised with CIFAR100_MEAN / CIFAR100_STD."""
    return TF.normalize(img.float().div(255), CIFAR100_MEAN, CIFAR100_STD)


def random_crop_flip(img, gen, padding=CROP_PADDING):
    """RandomCrop(size, padding, zero fill) then a horizontal flip with probability 1/2, on uint8
    [3, H, W]; draws (top, left, flip) from `gen` in torchvision's order."""
    _, h, w = img.shape
    padded = F.pad(img, (padding, padding, padding, padding))
    top = int(torch.randint(0, 2 * padding + 1, (1,), generator=gen))
    left = int(torch.randint(0, 2 * padding + 1, (1,), generator=gen))
    out = padded[:, top:top + h, left:left + w]
    if torch.rand(1, generator=gen).item() < 0.5:
        out = out.flip(-1)
    return out


class CifarTrainSet(SeededViewsDataset):
    """CIFAR-100 training set: returns ([num_views normalised 3x32x32 views], target, index), views by
    random_crop_flip (distill.data.SeededViewsDataset: call set_epoch(epoch) before iterating; a
    sample's views depend only on (seed, epoch, index))."""

    def __init__(self, root, num_views=1, seed=0):
        super().__init__(num_views, seed)
        folder = cifar100_folder(root)
        self.root = str(folder / "train")
        self.classes = read_class_names(folder)
        self.images, self.targets = read_split(folder, "train", len(self.classes))

    def load(self, index):
        return self.images[index]

    def augment(self, sample, gen):
        return normalize_cifar(random_crop_flip(sample, gen))


class CifarTestSet(torch.utils.data.Dataset):
    """CIFAR-100 test set: returns (normalised 3x32x32 image, target)."""

    def __init__(self, root):
        folder = cifar100_folder(root)
        self.root = str(folder / "test")
        self.classes = read_class_names(folder)
        self.images, self.targets = read_split(folder, "test", len(self.classes))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return normalize_cifar(self.images[index]), self.targets[index]


# --- writing a CIFAR-format folder (tests, CPU-scale runs) --------------------------------------

def write_cifar100(root, train_images, train_labels, test_images, test_labels, fine_label_names=None):
    """Write DATA/cifar-100-python/{train,test,meta} in the official format; returns the folder.

    Images: uint8 arrays [N, 32, 32, 3] (height, width, RGB). Labels: ints indexing
    `fine_label_names` (default: 100 names class_000 .. class_099). Coarse labels are written as 0
    with the single coarse name 'all' (nothing here reads them)."""
    names = [f"class_{i:03d}" for i in range(100)] if fine_label_names is None else list(fine_label_names)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"fine_label_names must be a non-empty list of str, got {fine_label_names!r}")
    folder = Path(root) / CIFAR100_DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    for split, images, labels, batch_label in (("train", train_images, train_labels, "training batch 1 of 1"),
                                               ("test", test_images, test_labels, "testing batch 1 of 1")):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) \
                or images.shape[0] == 0:
            raise ValueError(f"{split}_images must be uint8 of shape [N, 32, 32, 3] with N >= 1, "
                             f"got {images.dtype} {images.shape}")
        labels = check_labels(list(labels), images.shape[0], len(names), f"{split}_labels")
        data = images.transpose(0, 3, 1, 2).reshape(images.shape[0], PIXELS_PER_IMAGE)  # channel-major rows
        write_pickle(folder / split, {
            "data": np.ascontiguousarray(data), "fine_labels": labels, "coarse_labels": [0] * len(labels),
            "filenames": [f"{split}_{i:05d}.png" for i in range(len(labels))], "batch_label": batch_label})
    write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["all"]})
    return folder


def write_pickle(path, obj):
    """Atomic pickle write. Protocol 4 stores array bytes directly, so reading needs no codec import."""
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    os.replace(tmp, path)


# --- --download: fetch, verify, extract safely --------------------------------------------------

def file_md5(path, chunk=1 << 20):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_tar_members(tar, archive, dest):
    """Refuse any member that is not a plain file or folder under dest/cifar-100-python."""
    allowed_root = (Path(dest) / CIFAR100_DIRNAME).resolve()
    for member in tar.getmembers():
        target = (Path(dest) / member.name).resolve()
        inside = target == allowed_root or allowed_root in target.parents
        if not inside or os.path.isabs(member.name) or not (member.isfile() or member.isdir()):
            kind = "link" if (member.issym() or member.islnk()) else ("file" if member.isfile() else "entry")
            raise UserError(f"{archive}: refusing to extract {kind} '{member.name}': only plain files "
                            f"under {CIFAR100_DIRNAME}/ belong in the CIFAR-100 archive (it is corrupt "
                            f"or malicious; delete it and download again)")


def download_cifar100(root, url=CIFAR100_URL, md5=CIFAR100_MD5):
    """Fetch the CIFAR-100 archive into root, check its md5, extract DATA/cifar-100-python safely.

    Does nothing when the folder is already complete. The archive is kept as
    root/cifar-100-python.tar.gz only once its md5 matches."""
    root = Path(root)
    if all((root / CIFAR100_DIRNAME / name).is_file() for name in CIFAR100_FILES):
        return root / CIFAR100_DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-100-python.tar.gz"
    if not archive.is_file() or file_md5(archive) != md5:
        fetch(url, archive)
        actual = file_md5(archive)
        if actual != md5:
            archive.unlink()
            raise UserError(f"downloaded {url} has md5 {actual}, expected {md5}; the transfer was "
                            f"corrupted or the file changed. Deleted it; try --download again")
    with tarfile.open(archive, "r:gz") as tar:
        check_tar_members(tar, archive, root)
        # tarfile's own "data" filter as a second guard where this Python has it (3.9.17+, 3.11.4+)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, **extra)
    return cifar100_folder(root)


def fetch(url, dest):
    """Download url to dest through a temporary file (no partial file left under dest's name)."""
    fd, tmp = tempfile.mkstemp(dir=Path(dest).parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(tmp, dest)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserError(f"cannot download {url} ({type(e).__name__}: {e}); when offline, create "
                        f"{Path(dest).parent / CIFAR100_DIRNAME} from a copy of the archive instead") from e
