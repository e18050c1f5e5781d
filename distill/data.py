"""ImageNet-style data for distillation: ImageFolder trees, multi-view augmentation, sharding.

Assumptions: `DATA/train/<class>/<image>` (and `DATA/val/<class>/<image>` unless validation is off),
images with one of the extensions IMAGE_EXTENSIONS (torchvision's list plus .jfif, .jpe and .gif, all
read by PIL); other files are skipped and reported (`skipped_files`). Grayscale, palette and CMYK
images are converted to RGB; 16-bit and 32-bit grayscale (PIL modes I;16, I, F) are scaled from their
real bit depth to 8 bits (PIL's own convert would clip them at 255). The val tree must hold exactly
the train tree's classes, so class indices agree. `check_image_files` opens every file before
training, so a broken image stops the run at the start, not after an epoch.

Each training sample is decoded once and augmented `num_views` times independently
(RandomResizedCrop + horizontal flip + normalize). The augmentation randomness comes from a
generator seeded by (seed, epoch, sample index), never from the global RNG: a sample's views are
the same whatever the number of workers or ranks, which makes resume exact with workers and lets a
2-process run see the same pixels as a 1-process run.
"""
import collections
import concurrent.futures
import math
import os

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from cocord_common.constants import IMAGENET_MEAN, IMAGENET_STD
from cocord_common.errors import UserError

# torchvision's list plus JPEG's and GIF's other names; PIL reads them all (a GIF: its first frame)
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".jfif", ".jpe", ".gif")
FILE_CHECKS = ("header", "full", "off")


class ImageError(UserError):
    """An image file that cannot be read; the message names it."""


def load_rgb(path):
    """Decode an image file into an RGB PIL image; an unreadable file is an error naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as e:
        raise ImageError(
            f"cannot read image {path}: {type(e).__name__}: {e}. Delete or replace the file "
            f"(corrupt or not an image)") from e
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = high_depth_to_8bit(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def high_depth_to_8bit(img):
    """A grayscale image of more than 8 bits per pixel (PIL modes I;16*, I, F) as an 8-bit "L" image,
    scaled by its bit depth: 65535 -> 255 for a 16-bit file (PIL's convert clips everything over 255).
    The depth is the file's (16 for PNG, BitsPerSample for TIFF) when known; otherwise the smallest of
    8 / 16 / 32 bits that holds the largest value, and [0, 1] for a float image whose values fit there."""
    values = np.asarray(img).astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    bits = declared_bit_depth(img)
    if bits is None and img.mode == "F" and top <= 1.0:
        full_scale = 1.0
    else:
        bits = bits or next(b for b in (8, 16, 32) if top <= 2 ** b - 1 or b == 32)
        full_scale = float(2 ** bits - 1)
    scaled = np.clip(np.rint(np.clip(values, 0.0, full_scale) * (255.0 / full_scale)), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def declared_bit_depth(img):
    """Bits per sample written in the file's header, or None when the format does not say."""
    if img.format == "PNG":
        return 16  # PNG's only grayscale depth above 8; PIL opens it as I;16 (older versions: I)
    if img.format == "TIFF":
        bits = getattr(img, "tag_v2", {}).get(258)  # BitsPerSample
        bits = bits[0] if isinstance(bits, tuple) else bits
        return int(bits) if bits and img.mode != "F" else None
    if img.mode.startswith("I;16"):
        return 16
    return None


def check_image_files(paths, mode="header", threads=1):
    """[(index, path, reason)] of the files among `paths` that cannot be read, in `paths` order.
    mode "header": PIL opens and verifies each file (the header and, for PNG, the chunk checksums);
    cheap, but a JPEG cut inside its pixel data passes. mode "full": each file is decoded as
    training would. I/O-bound, so `threads` threads share the work."""
    check = _verify_header if mode == "header" else _decode_fully

    def one(item):
        index, path = item
        reason = check(path)
        return None if reason is None else (index, path, reason)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        found = pool.map(one, enumerate(paths), chunksize=64)
        return [r for r in found if r is not None]


def _verify_header(path):
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def _decode_fully(path):
    try:
        load_rgb(path)
    except ImageError as e:
        cause = e.__cause__
        return f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
    return None


def scan_folder(root, class_to_idx=None):
    """(samples [(path, class_idx)], classes) of an ImageFolder tree, with clear errors."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root} does not exist; DATA must hold train/<class>/*.JPEG "
            f"(and val/<class>/*.JPEG unless --no-val)")
    classes, found = find_classes_safe(root)
    skipped = collections.defaultdict(list)
    if class_to_idx is not None:
        if classes != sorted(class_to_idx):
            extra = sorted(set(classes) - set(class_to_idx))[:5]
            missing = sorted(set(class_to_idx) - set(classes))[:5]
            raise UserError(
                f"{root} has {len(classes)} class folders, the train folder {len(class_to_idx)}; "
                f"they must be the same classes (only in {root}: {extra}; missing there: {missing})")
        found = class_to_idx
    def accepted(path):
        ok = path.lower().endswith(IMAGE_EXTENSIONS)
        if not ok:
            skipped[os.path.splitext(path)[1].lower() or "(no extension)"].append(path)
        return ok

    try:
        samples = make_dataset(root, found, is_valid_file=accepted)
    except FileNotFoundError as e:
        also = f"; skipped there: {describe_skipped(skipped)}" if skipped else ""
        raise FileNotFoundError(f"{root}: {e} (accepted extensions: {' '.join(IMAGE_EXTENSIONS)}){also}") from e
    return samples, classes, found, dict(skipped)


def describe_skipped(skipped):
    """'3 .heic (e.g. a/b.heic), 1 .txt (e.g. a/c.txt)' for {extension: [paths]}, most frequent first."""
    ranked = sorted(skipped.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    return ", ".join(f"{len(paths)} {ext} (e.g. {paths[0]})" for ext, paths in ranked)


def find_classes_safe(root):
    try:
        return find_classes(root)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{root} has no class sub-folders ({e}); expected {root}/<class>/<image>") from e


def sample_seed(seed, epoch, index):
    """A 63-bit seed mixing (seed, epoch, index) so nearby triples give unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


def random_resized_crop_params(height, width, scale, ratio, gen):
    """(top, left, h, w) as torchvision's RandomResizedCrop.get_params, drawn from `gen`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=gen).tolist()
        target_area = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            j = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return i, j, h, w
    # Fallback: the largest central crop within the ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainView:
    """RandomResizedCrop(crop, scale) + horizontal flip + ToTensor + normalize, randomness from `gen`."""

    def __init__(self, crop_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.crop_size = crop_size
        self.scale = scale
        self.ratio = ratio

    def __call__(self, img, gen):
        i, j, h, w = random_resized_crop_params(img.height, img.width, self.scale, self.ratio, gen)
        img = TF.resized_crop(img, i, j, h, w, [self.crop_size, self.crop_size],
                              interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if torch.rand(1, generator=gen).item() < 0.5:
            img = TF.hflip(img)
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


class SeededViewsDataset(torch.utils.data.Dataset):
    """What every distillation training set shares: item `index` is ([num_views augmented views], target,
    index), the sample decoded once (`load`) and augmented `num_views` times (`augment`) with randomness
    from a generator seeded by (seed, epoch, index) only. Call set_epoch(epoch) before iterating.
    Subclasses set `targets` (one class index per sample) and define `load` and `augment`."""

    def __init__(self, num_views=1, seed=0):
        self.num_views = num_views  # the trainer sets it to the method's
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Call before iterating (workers copy the dataset when the iterator is created)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.targets)

    def load(self, index):
        """The decoded sample `index`, as `augment` takes it."""
        raise NotImplementedError

    def augment(self, sample, gen):
        """One view of `sample`, its randomness from `gen` only."""
        raise NotImplementedError

    def __getitem__(self, index):
        sample = self.load(index)  # decoded once for all views
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
        views = [self.augment(sample, gen) for _ in range(self.num_views)]
        return views, self.targets[index], index


class MultiViewImageFolder(SeededViewsDataset):
    """Training set of an ImageFolder tree: RandomResizedCrop + flip views (TrainView)."""

    def __init__(self, root, crop_size, num_views=1, seed=0):
        super().__init__(num_views, seed)
        self.root = root
        self.samples, self.classes, self.class_to_idx, self.skipped_files = scan_folder(root)
        self.targets = [t for _, t in self.samples]
        self.view = TrainView(crop_size)

    def load(self, index):
        return load_rgb(self.samples[index][0])

    def augment(self, sample, gen):
        return self.view(sample, gen)


class EvalImageFolder(torch.utils.data.Dataset):
    """Validation set: Resize(val_resize) + CenterCrop(crop) + normalize; returns (image, target)."""

    def __init__(self, root, crop_size, val_resize, class_to_idx):
        self.root = root
        self.samples, self.classes, _, self.skipped_files = scan_folder(root, class_to_idx)
        self.crop_size = crop_size
        self.val_resize = val_resize

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = load_rgb(path)
        img = TF.resize(img, self.val_resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [self.crop_size, self.crop_size])
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD), target


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation sharding without padding: rank r takes indices r, r+W, ... (each counted once)."""

    def __init__(self, n, rank, world_size):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def seed_worker_fn(seed, epoch, rank):
    """worker_init_fn seeding numpy/random/torch in each worker from (seed, epoch, rank, worker)."""
    def init(worker_id):
        import random
        s = sample_seed(seed, epoch, 1_000_003 * (rank + 1) + worker_id)
        random.seed(s)
        np.random.seed(s % 2 ** 32)
        torch.manual_seed(s)
    return init


def build_train_loader(dataset, per_rank_batch, workers, rank, world_size, seed, epoch, pin_memory):
    """Loader for one epoch. The sampler shuffles from (seed, epoch), so an epoch's order never
    depends on the RNG state; the last incomplete batch is dropped (BatchNorm and the queue need
    full batches)."""
    if len(dataset) < per_rank_batch * world_size:
        raise UserError(
            f"{dataset.root} holds {len(dataset)} images, fewer than one global batch "
            f"({per_rank_batch * world_size}); lower -b/--batch-size")
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank_batch, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=True, worker_init_fn=seed_worker_fn(seed, epoch, rank),
        persistent_workers=False)


def build_val_loader(dataset, per_rank_batch, workers, rank, world_size, pin_memory):
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank_batch, sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=workers, pin_memory=pin_memory, drop_last=False)
