"""CIFAR-100 folder reading (restricted unpickler, checks), augmentation contract, writer, download."""
import hashlib
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from cocord_common.errors import UserError
from distill.cifar_data import (CifarTestSet, CifarTrainSet, UnsafePickleError, download_cifar100,
                                load_cifar_pickle, write_cifar100)
from distill.data import build_train_loader, sample_seed

MEAN = np.array([0.5071, 0.4867, 0.4408], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.2675, 0.2565, 0.2761], dtype=np.float32).reshape(3, 1, 1)
NAMES = [f"name{i}" for i in range(10)]


def random_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def tiny(tmp_path):
    """A 12-train / 5-test, 10-class CIFAR-format folder; returns (root, train, labels, test, labels)."""
    train, test = random_images(12, 0), random_images(5, 1)
    train_labels, test_labels = [i % 10 for i in range(12)], [9, 0, 3, 3, 7]
    write_cifar100(tmp_path, train, train_labels, test, test_labels, fine_label_names=NAMES)
    return tmp_path, train, train_labels, test, test_labels


def normalized(hwc_uint8):
    return (hwc_uint8.transpose(2, 0, 1).astype(np.float32) / 255 - MEAN) / STD


def test_round_trip(tiny):
    root, train, train_labels, test, test_labels = tiny
    assert sorted(os.listdir(root / "cifar-100-python")) == ["meta", "test", "train"]
    test_set = CifarTestSet(root)
    assert test_set.classes == NAMES and test_set.targets == test_labels and len(test_set) == 5
    for i in range(5):
        image, target = test_set[i]
        assert target == test_labels[i]
        np.testing.assert_allclose(image.numpy(), normalized(test[i]), rtol=0, atol=1e-5)
    train_set = CifarTrainSet(root)
    assert train_set.targets == train_labels and len(train_set) == 12
    raw = load_cifar_pickle(root / "cifar-100-python" / "train")
    assert raw["data"].shape == (12, 3072) and raw["data"].dtype == np.uint8
    # rows are channel-major: the first 1024 bytes are the red plane, row by row
    assert np.array_equal(raw["data"][3, :1024], train[3, :, :, 0].reshape(-1))
    assert np.array_equal(raw["data"][3, 2048:], train[3, :, :, 2].reshape(-1))


def expected_views(hwc_uint8, seed, epoch, index, num_views):
    """RandomCrop(32, padding 4) + flip + normalise, with the draws replayed from the sample's generator."""
    gen = torch.Generator().manual_seed(sample_seed(seed, epoch, index))
    padded = np.zeros((40, 40, 3), dtype=np.uint8)
    padded[4:36, 4:36] = hwc_uint8
    views = []
    for _ in range(num_views):
        top = int(torch.randint(0, 9, (1,), generator=gen))
        left = int(torch.randint(0, 9, (1,), generator=gen))
        crop = padded[top:top + 32, left:left + 32]
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop[:, ::-1]
        views.append(normalized(np.ascontiguousarray(crop)))
    return views


def test_train_views_follow_seed_epoch_index(tiny):
    root, train, train_labels, _, _ = tiny
    dataset = CifarTrainSet(root, num_views=3, seed=5)
    dataset.set_epoch(2)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    for index in range(12):
        views, target, returned_index = dataset[index]
        assert target == train_labels[index] and returned_index == index and len(views) == 3
        for got, want in zip(views, expected_views(train[index], 5, 2, index, 3)):
            np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is never drawn from

    # the same (seed, epoch, index) gives the same views in another instance, whatever the global RNG
    torch.manual_seed(999)
    again = CifarTrainSet(root, num_views=3, seed=5)
    again.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(again[7][0], dataset[7][0]))
    # the views of one sample are independent draws, and another epoch draws again
    assert sum(not torch.equal(v[0], v[1]) for v, _, _ in (dataset[i] for i in range(12))) >= 10
    other_epoch = CifarTrainSet(root, num_views=3, seed=5)
    other_epoch.set_epoch(3)
    assert sum(not torch.equal(dataset[i][0][0], other_epoch[i][0][0]) for i in range(12)) >= 10


def test_train_set_feeds_the_shared_loader(tiny):
    root = tiny[0]
    loader = build_train_loader(CifarTrainSet(root, num_views=3), per_rank_batch=4, workers=0, rank=0,
                                world_size=1, seed=0, epoch=1, pin_memory=False)
    batches = list(loader)
    assert len(batches) == 3
    views, targets, indices = batches[0]
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 3 and targets.shape == indices.shape == (4,)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(12))


# --- Python 2 files, as in the official archive ----------------------------------------------------

def py2_str(data):
    data = data.encode("latin1") if isinstance(data, str) else data
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


def py2_value(value):
    """Protocol-2 opcodes as Python 2 + numpy 1.x wrote them (py2 str, numpy.core.multiarray)."""
    if isinstance(value, (str, bytes)):
        return py2_str(value)
    if isinstance(value, int):
        return b"J" + struct.pack("<i", value)
    if isinstance(value, list):
        return b"](" + b"".join(py2_value(v) for v in value) + b"e"
    if isinstance(value, np.ndarray):  # uint8, 2-D
        dtype = (b"cnumpy\ndtype\n" + py2_str("u1") + b"K\x00K\x01\x87R"
                 + b"(K\x03" + py2_str("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
        shape = py2_value(value.shape[0]) + py2_value(value.shape[1]) + b"\x86"
        return (b"cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nK\x00\x85" + py2_str("b")
                + b"\x87R(K\x01" + shape + dtype + b"\x89" + py2_str(value.tobytes()) + b"tb")
    raise TypeError(value)


def py2_pickle(d):
    return b"\x80\x02}(" + b"".join(py2_str(k) + py2_value(v) for k, v in d.items()) + b"u."


def test_reads_python2_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = random_images(3, 2)
    data = images.transpose(0, 3, 1, 2).reshape(3, 3072)
    for split in ("train", "test"):
        (folder / split).write_bytes(py2_pickle({
            "filenames": ["a.png", "b.png", "c.png"], "batch_label": "training batch 1 of 1",
            "fine_labels": [99, 0, 42], "coarse_labels": [19, 0, 7], "data": data}))
    (folder / "meta").write_bytes(py2_pickle({"fine_label_names": [f"n{i}" for i in range(100)],
                                              "coarse_label_names": [f"c{i}" for i in range(20)]}))
    dataset = CifarTestSet(tmp_path)
    assert dataset.targets == [99, 0, 42] and len(dataset.classes) == 100 and dataset.classes[42] == "n42"
    np.testing.assert_allclose(dataset[2][0].numpy(), normalized(images[2]), rtol=0, atol=1e-5)
    assert len(CifarTrainSet(tmp_path)) == 3


# --- refusals and errors ---------------------------------------------------------------------------

class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tampered_file_cannot_run_code(tiny, tmp_path):
    root = tiny[0]
    marker = tmp_path / "pwned"
    train = root / "cifar-100-python" / "train"
    for protocol in (2, 4):
        payload = {"data": RunsAShellCommand(marker), "fine_labels": [0]}
        train.write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(UnsafePickleError, match=rf"{train}: refused to load '(posix|os)\.system'"):
            CifarTrainSet(root)
        assert not marker.exists()
    train.write_bytes(pickle.dumps({"data": eval}, protocol=2))
    with pytest.raises(UnsafePickleError, match="refused to load '(builtins|__builtin__)\\.eval'"):
        CifarTrainSet(root)


def write_split(root, split, content):
    (root / "cifar-100-python" / split).write_bytes(pickle.dumps(content, protocol=4))


U8 = np.zeros((2, 3072), np.uint8)
BAD_CONTENTS = [  # (what the file holds, what the error must say after the file's path)
    ({"data": np.zeros((2, 3072), np.float32), "fine_labels": [0, 1]},
     r"key 'data' is a float32 array of shape \(2, 3072\)"),
    ({"data": np.zeros((2, 3000), np.uint8), "fine_labels": [0, 1]},
     r"key 'data' is a uint8 array of shape \(2, 3000\)"),
    ({"data": np.zeros((2, 32, 32, 3), np.uint8), "fine_labels": [0, 1]},
     r"key 'data'.*expected a uint8 array of shape N x 3072"),
    ({"data": [1, 2], "fine_labels": [0, 1]}, r"key 'data' is a list"),
    ({"data": U8, "fine_labels": [0]}, r"key 'fine_labels' has 1 labels but there are 2 images"),
    ({"data": U8, "fine_labels": [0, 10]}, r"key 'fine_labels'\[1\] is 10; labels must be ints in 0..9"),
    ({"data": U8, "fine_labels": [-1, 0]}, r"key 'fine_labels'\[0\] is -1"),
    ({"data": U8, "fine_labels": [0, "1"]}, r"key 'fine_labels'\[1\] is '1'"),
    ({"data": U8}, r"has no key 'fine_labels' \(keys: data\)"),
    ([1, 2, 3], r"holds a list, not the dict of a CIFAR-100 file"),
]


@pytest.mark.parametrize("content, message", BAD_CONTENTS)
def test_bad_contents_name_file_and_key(tiny, content, message):
    root = tiny[0]
    write_split(root, "test", content)
    with pytest.raises(UserError, match=rf"{root / 'cifar-100-python' / 'test'}.*{message}"):
        CifarTestSet(root)


def test_bad_meta_and_truncated_file(tiny):
    root = tiny[0]
    folder = root / "cifar-100-python"
    intact = (folder / "train").read_bytes()
    (folder / "train").write_bytes(intact[: len(intact) // 2])
    with pytest.raises(UserError, match=rf"cannot read {folder / 'train'} as a CIFAR-100 pickle"):
        CifarTrainSet(root)
    write_split(root, "meta", {"coarse_label_names": ["x"]})
    with pytest.raises(UserError, match=rf"{folder / 'meta'} has no key 'fine_label_names'"):
        CifarTestSet(root)


def test_missing_folder_says_what_to_create(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        CifarTrainSet(tmp_path)
    message = str(err.value)
    for part in (str(tmp_path / "cifar-100-python"), "train, test, meta", "--download",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"):
        assert part in message
    write_cifar100(tmp_path, random_images(2, 0), [0, 1], random_images(1, 0), [0])
    os.remove(tmp_path / "cifar-100-python" / "meta")
    with pytest.raises(FileNotFoundError, match="missing: meta"):
        CifarTestSet(tmp_path)


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"train_images must be uint8 of shape \[N, 32, 32, 3\]"):
        write_cifar100(tmp_path, np.zeros((2, 3, 32, 32), np.uint8), [0, 1], random_images(1, 0), [0])
    with pytest.raises(ValueError, match=r"test_labels\[0\] is 100"):
        write_cifar100(tmp_path, random_images(1, 0), [0], random_images(1, 0), [100])


# --- download: md5 check and safe extraction, on local archives (no network) ----------------------

def make_archive(path, members):
    """A .tar.gz with `members`: (name, bytes) for files, (name, '->target') for symlinks."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if isinstance(payload, str):
                info.type, info.linkname = tarfile.SYMTYPE, payload[2:]
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def cifar_members(tmp_path):
    source = write_cifar100(tmp_path / "source", random_images(3, 0), [0, 1, 2], random_images(2, 1), [2, 1])
    return [(f"cifar-100-python/{name}", (source / name).read_bytes()) for name in ("train", "test", "meta")]


def test_download_verifies_and_extracts(tmp_path):
    archive, md5 = make_archive(tmp_path / "good.tar.gz", cifar_members(tmp_path))
    root = tmp_path / "data"
    folder = download_cifar100(root, url=archive.as_uri(), md5=md5)
    assert folder == root / "cifar-100-python"
    assert CifarTestSet(root).targets == [2, 1]
    assert (root / "cifar-100-python.tar.gz").is_file()


def test_download_refuses_md5_mismatch(tmp_path):
    archive, md5 = make_archive(tmp_path / "good.tar.gz", cifar_members(tmp_path))
    root = tmp_path / "data"
    with pytest.raises(UserError, match=rf"has md5 {md5}, expected 0123456789abcdef0123456789abcdef"):
        download_cifar100(root, url=archive.as_uri(), md5="0123456789abcdef0123456789abcdef")
    assert os.listdir(root) == []  # neither the bad archive nor a partial download is kept


@pytest.mark.parametrize("bad_member, shown", [
    (("../escaped.txt", b"x"), "file '../escaped.txt'"),
    (("cifar-100-python/../../escaped.txt", b"x"), "file 'cifar-100-python/../../escaped.txt'"),
    (("/tmp/escaped-absolute.txt", b"x"), "file '/tmp/escaped-absolute.txt'"),
    (("cifar-100-python/link", "->/etc/passwd"), "link 'cifar-100-python/link'"),
])
def test_download_refuses_unsafe_members(tmp_path, bad_member, shown):
    archive, md5 = make_archive(tmp_path / "evil.tar.gz", cifar_members(tmp_path) + [bad_member])
    root = tmp_path / "a" / "data"
    with pytest.raises(UserError, match=rf"refusing to extract {shown}"):
        download_cifar100(root, url=archive.as_uri(), md5=md5)
    assert not (root / "cifar-100-python").exists()  # checked before anything is written
    assert not (tmp_path / "a" / "escaped.txt").exists() and not (root / "escaped.txt").exists()
