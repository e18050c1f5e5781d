"""distill/data.py: ImageFolder scanning, multi-view augmentation, determinism, clear errors.

`make_image_folder` is also used by test_train_imagenet.py and test_distributed.py.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from distill import data



def write_jpeg(path, size, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, "JPEG")


def make_image_folder(root, classes=3, train_per_class=4, val_per_class=2, odd_modes=True):
    """A tiny ImageFolder tree root/{train,val}/class_k/*.JPEG of random-size noise images;
    with `odd_modes`, one grayscale and one CMYK JPEG among the training images."""
    root = str(root)
    n = 0
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            for i in range(per):
                mode = "RGB"
                if odd_modes and split == "train" and c == 0 and i == 0:
                    mode = "L"
                if odd_modes and split == "train" and c == 1 and i == 0:
                    mode = "CMYK"
                size = (36 + 7 * ((n * 5) % 4), 40 + 5 * (n % 3))
                write_jpeg(os.path.join(root, split, f"class_{c}", f"img_{i}.JPEG"), size, n, mode)
                n += 1
    return root


def test_multiview_shapes_modes_and_determinism(tmp_path):
    root = make_image_folder(tmp_path)
    ds = data.MultiViewImageFolder(os.path.join(root, "train"), crop_size=24, num_views=3, seed=7)
    assert len(ds) == 12 and ds.classes == ["class_0", "class_1", "class_2"]
    # grayscale (index 0) and CMYK (index 4) come out as 3-channel crops
    for idx in (0, 4, 11):
        views, target, index = ds[idx]
        assert index == idx and target == ds.targets[idx]
        assert len(views) == 3 and all(v.shape == (3, 24, 24) and v.dtype == torch.float32 for v in views)
        # independent augmentations of one decode: the views differ
        assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    # same (seed, epoch, index) -> same pixels, whatever the global RNG did in between
    a = ds[5][0]
    torch.manual_seed(123)
    b = ds[5][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ds.set_epoch(1)
    c = ds[5][0]
    assert not torch.equal(a[0], c[0])  # a new epoch draws new augmentations


def test_random_resized_crop_params_in_bounds():
    gen = torch.Generator().manual_seed(0)
    for h, w in ((40, 60), (500, 375), (10, 200)):
        for _ in range(200):
            i, j, ch, cw = data.random_resized_crop_params(h, w, (0.08, 1.0), (3 / 4, 4 / 3), gen)
            assert 0 <= i and 0 <= j and 0 < ch and 0 < cw and i + ch <= h and j + cw <= w


def test_loader_is_independent_of_workers(tmp_path):
    root = make_image_folder(tmp_path, odd_modes=False)
    ds = data.MultiViewImageFolder(os.path.join(root, "train"), crop_size=16, num_views=2, seed=3)

    def batches(workers):
        loader = data.build_train_loader(ds, 4, workers, rank=0, world_size=1, seed=3, epoch=2, pin_memory=False)
        return [(torch.stack(v), t, i) for v, t, i in loader]

    b0, b2 = batches(0), batches(2)
    assert len(b0) == 3
    for (v0, t0, i0), (v2, t2, i2) in zip(b0, b2):
        assert torch.equal(v0, v2) and torch.equal(t0, t2) and torch.equal(i0, i2)


def test_sharded_epochs_cover_the_global_batch(tmp_path):
    """Two ranks' shards of an epoch are disjoint and together are what a 1-process run sees."""
    root = make_image_folder(tmp_path, odd_modes=False)
    ds = data.MultiViewImageFolder(os.path.join(root, "train"), crop_size=16, seed=1)
    idx = [torch.cat([i for _, _, i in data.build_train_loader(ds, 2, 0, r, 2, 1, 0, False)]) for r in (0, 1)]
    assert set(idx[0].tolist()).isdisjoint(idx[1].tolist())
    assert len(idx[0]) == len(idx[1]) == 6


def test_val_transform_and_sharding(tmp_path):
    root = make_image_folder(tmp_path)
    train = data.MultiViewImageFolder(os.path.join(root, "train"), crop_size=24)
    val = data.EvalImageFolder(os.path.join(root, "val"), 24, 28, train.class_to_idx)
    img, target = val[0]
    assert img.shape == (3, 24, 24) and target == 0
    assert torch.equal(val[3][0], val[3][0])  # deterministic
    seen = [i for r in range(2) for i in data.ShardSampler(len(val), r, 2)]
    assert sorted(seen) == list(range(len(val)))  # no padding, each image once


def test_unreadable_image_names_the_file(tmp_path):
    root = make_image_folder(tmp_path, odd_modes=False)
    bad = os.path.join(root, "train", "class_2", "broken.JPEG")
    with open(bad, "wb") as f:
        f.write(b"this is not a jpeg")
    ds = data.MultiViewImageFolder(os.path.join(root, "train"), crop_size=16)
    idx = [i for i, (p, _) in enumerate(ds.samples) if p == bad][0]
    with pytest.raises(data.ImageError, match=r"cannot read image .*broken\.JPEG"):
        ds[idx]


def test_missing_and_mismatched_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/train does not exist"):
        data.MultiViewImageFolder(str(tmp_path / "nowhere" / "train"), crop_size=16)
    os.makedirs(tmp_path / "empty" / "train")
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        data.MultiViewImageFolder(str(tmp_path / "empty" / "train"), crop_size=16)
    root = make_image_folder(tmp_path / "d", odd_modes=False)
    os.rename(os.path.join(root, "val", "class_2"), os.path.join(root, "val", "class_9"))
    train = data.MultiViewImageFolder(os.path.join(root, "train"), crop_size=16)
    with pytest.raises(ValueError, match=r"same classes .*class_9"):
        data.EvalImageFolder(os.path.join(root, "val"), 16, 20, train.class_to_idx)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.build_train_loader(train, 8, 0, 0, 2, 0, 0, False)


def test_pure_red_keeps_rgb_order_through_train_and_val_transforms(tmp_path):
    """Channel 0 is red after normalisation: (1 - 0.485) / 0.229 = 2.2489, while green and blue are
    (0 - 0.456) / 0.224 = -2.0357 and (0 - 0.406) / 0.225 = -1.8044 (issue 16, item 2)."""
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "red")
        Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / split / "red" / "red.png")  # lossless
    want = torch.tensor([2.248908, -2.035714, -1.804444])[:, None, None]
    train = data.MultiViewImageFolder(str(tmp_path / "train"), crop_size=16, num_views=2)
    val = data.EvalImageFolder(str(tmp_path / "val"), 16, 20, train.class_to_idx)
    for img in train[0][0] + [val[0][0]]:
        assert img.shape == (3, 16, 16)
        torch.testing.assert_close(img, want.expand(3, 16, 16), rtol=0, atol=1e-5)
