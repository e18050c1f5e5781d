#!/usr/bin/env python
"""Convert a ResNet student (or any torchvision ResNet) to a Detectron2 `.pkl`, refusing to drop
a backbone weight silently.

    python tools/convert_to_d2.py INPUT OUTPUT.pkl [--source student|slow_student] [--arch resnet50]
                                  [--prefix P] [--verbose] [--check [--check-image IMG]]

INPUT kinds, detected from the file's structure (torch files load with weights_only=True):
  - a checkpoint of distill/train_imagenet.py (dict with `student`, `slow_student`, `arch`, ...):
    the online student by default, the slow-moving student with --source slow_student;
  - a plain torchvision ResNet state dict (e.g. distill's student_backbone.pth), optionally with
    the DDP `module.` prefix;
  - a MoCo-style checkpoint: `state_dict` holding `module.encoder_q.*` (the query encoder is taken;
    encoder_k, queue and the projection head are dropped).
Classifier and distillation heads are dropped by name and listed; anything else that is not a
tensor of the recognised ResNet makes the tool refuse (exit 1, nothing written).
"""
import argparse
import collections
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from transfer.backbone import build_resnet_trunk, load_trunk_weights, trunk_features  # noqa: E402
from transfer.d2_format import (RESNET_SPECS, is_head_key, load_d2_file, recognise_depth,  # noqa
                                save_d2_file, torchvision_to_d2, tv_to_d2_name)

SOURCES = ("student", "slow_student")
ARCH_CHOICES = tuple(f"resnet{d}" for d in RESNET_SPECS)
# Prefixes under which a backbone is found automatically, in order of preference.
KNOWN_PREFIXES = collections.OrderedDict([
    ("", "torchvision names"),
    ("encoder_q.", "MoCo query encoder"),
    ("backbone.", "backbone."),
    ("encoder.", "encoder."),
])
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


class ConversionError(Exception):
    """A refusal: the message says what is wrong and how to fix it."""


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_torch_file(path):
    if not os.path.isfile(path):
        raise ConversionError(f"input {path} does not exist")
    if path.endswith(".pkl"):
        raise ConversionError(f"{path} is a .pkl (already detectron2 format?); the input must be a "
                              "torch checkpoint or state dict (.pth)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # arbitrary objects (code) in the pickle, or a corrupt file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(
            f"refusing to load {path}: it cannot be read with torch.load(weights_only=True) "
            f"({first}). Only tensors, containers, strings and numbers are accepted; re-save the "
            "weights as a plain state dict (torch.save(model.state_dict(), ...))") from None


def extract_state_dict(obj, path, source="student"):
    """(state dict, what was detected, arch named in the checkpoint or None)."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    if "student" in obj and isinstance(obj.get("student"), dict):
        sd = obj.get(source)
        what = (f"distillation checkpoint of distill/train_imagenet.py (method "
                f"{obj.get('method', '?')}, arch {obj.get('arch', '?')}, epoch "
                f"{obj.get('epoch', '?')}); converting '{source}'")
        if sd is None:
            raise ConversionError(
                f"{path} has no '{source}' weights (method {obj.get('method', '?')} keeps no "
                "slow-moving student); use --source student")
        if not _is_state_dict(sd):
            raise ConversionError(f"{path}: '{source}' is not a state dict of tensors")
        return dict(sd), what, obj.get("arch")
    if source != "student":
        raise ConversionError(f"--source {source} needs a checkpoint of distill/train_imagenet.py; "
                              f"{path} is not one (it has no 'student' entry)")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        if not _is_state_dict(sd):
            raise ConversionError(f"{path}: 'state_dict' holds values that are not tensors")
        return dict(sd), "checkpoint with a 'state_dict' entry (MoCo-style)", obj.get("arch")
    if _is_state_dict(obj):
        return dict(obj), "plain state dict", None
    raise ConversionError(
        f"{path} is neither a distillation checkpoint ('student'), a MoCo-style checkpoint "
        f"('state_dict') nor a state dict of tensors; top-level keys: {sorted(map(str, obj))[:20]}")


def select_backbone(sd, prefix=None):
    """Strip DDP's `module.` and pick the backbone prefix. Returns (backbone sd, prefix, notes,
    keys outside the backbone that are heads)."""
    notes = []
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("DDP 'module.' prefix stripped")
    if prefix is None:
        found = [p for p in KNOWN_PREFIXES
                 if any(k.startswith(p) and tv_to_d2_name(k[len(p):]) for k in sd)]
        if not found:
            others = sorted({k[:-len("conv1.weight")] for k in sd if k.endswith("conv1.weight")
                             and not re.search(r"layer\d+\.\d+\.conv1\.weight$", k)})
            hint = f"; pass --prefix (candidates: {others})" if others else ""
            raise ConversionError(
                "no backbone tensor found (torchvision names such as conv1.weight, "
                f"layer1.0.conv1.weight) under the known prefixes {list(KNOWN_PREFIXES)}{hint}; "
                f"keys seen: {', '.join(list(sd)[:10])}")
        prefix = found[0]
    elif not any(k.startswith(prefix) and tv_to_d2_name(k[len(prefix):]) for k in sd):
        raise ConversionError(f"--prefix '{prefix}': no backbone tensor under it")
    if prefix:
        notes.append(f"backbone under '{prefix}' ({KNOWN_PREFIXES.get(prefix, 'from --prefix')})")
    inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    outside = [k for k in sd if not k.startswith(prefix)]
    unplaceable = [k for k in outside if not is_head_key(k)]
    if unplaceable:
        raise ConversionError(
            f"{len(unplaceable)} key(s) outside the backbone '{prefix}*' are not a known head, so "
            f"they cannot be placed: {', '.join(unplaceable[:20])}"
            + (" ..." if len(unplaceable) > 20 else ""))
    return inner, prefix, notes, outside


def arch_to_depth(arch, where):
    m = re.fullmatch(r"resnet(\d+)", str(arch))
    if not m or int(m.group(1)) not in RESNET_SPECS:
        raise ConversionError(f"{where} names arch '{arch}', not one of {ARCH_CHOICES}")
    return int(m.group(1))


def _group(keys, prefix=""):
    """'encoder_k.* (320), queue, ...': dropped keys summarised by their first name (after the
    backbone prefix for keys under it)."""
    def head(k):
        rest = k[len(prefix):] if prefix and k.startswith(prefix) else k
        first = rest.split(".")[0]
        return (k[:len(k) - len(rest)] + first) + (".*" if "." in rest else "")
    groups = collections.Counter(head(k) for k in keys)
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())


def mapping_table(mapping, verbose):
    if verbose:
        w = max(len(s) for s, _, _ in mapping)
        w2 = max(len(d) for _, d, _ in mapping)
        rows = [f"  {'torchvision':<{w}}  {'detectron2':<{w2}}  shape"]
        rows += [f"  {s:<{w}}  {d:<{w2}}  {list(shape)}" for s, d, shape in mapping]
        return "\n".join(rows)
    # one row per stage: the rule and how many tensors it placed
    stages = collections.OrderedDict()
    for s, d, _ in mapping:
        src = "conv1, bn1" if not s.startswith("layer") else s.split(".")[0] + ".*"
        dst = d.split(".")[0] + (".conv1(.norm).*" if d.startswith("stem") else ".*")
        stages.setdefault((src, dst), 0)
        stages[(src, dst)] += 1
    rows = [f"  {'torchvision':<12}  {'detectron2':<22}  tensors"]
    rows += [f"  {s:<12}  {d:<22}  {n}" for (s, d), n in stages.items()]
    rows.append("  within blocks: bnK -> convK.norm, downsample.0 -> shortcut, "
                "downsample.1 -> shortcut.norm")
    return "\n".join(rows)


def load_image(path, size):
    """[1,3,H,W] normalised RGB tensor (shorter side `size`), and a description."""
    if path is None:
        g = torch.Generator().manual_seed(0)
        # smooth gradients plus noise: deterministic, with structure at every scale
        yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size),
                                indexing="ij")
        img = torch.stack([xx, yy, (xx + yy) / 2]) * 0.7 + 0.3 * torch.rand(3, size, size,
                                                                           generator=g)
        desc = f"deterministic synthetic image {size}x{size} (no --check-image given)"
    else:
        from PIL import Image

        if not os.path.isfile(path):
            raise ConversionError(f"--check-image {path} does not exist")
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
            img = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        desc = f"{path} ({w}x{h}, resized to {img.shape[2]}x{img.shape[1]})"
    mean = torch.tensor(TORCHVISION_MEAN).view(3, 1, 1)
    std = torch.tensor(TORCHVISION_STD).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0), desc


def check_features(pkl_path, source_sd, depth, image, log=print, rtol=1e-4, atol=1e-5):
    """Load `pkl_path` into transfer.backbone's trunk and compare res2..res5 with the source
    torchvision ResNet's (eval mode). Returns {stage: max abs diff}; raises ConversionError."""
    import torchvision

    trunk = build_resnet_trunk(depth, "BN")
    load_trunk_weights(trunk, load_d2_file(pkl_path), log=lambda m: log("  trunk: " + m))
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    res = ref.load_state_dict({k: v for k, v in source_sd.items() if not k.startswith("fc.")},
                              strict=False)
    if [k for k in res.missing_keys if not k.startswith("fc.")] or res.unexpected_keys:
        raise ConversionError(f"--check: source weights do not fit resnet{depth}: {res}")
    ref.fc = torch.nn.Identity()
    trunk.eval()
    ref.eval()
    with torch.no_grad():
        a, b = trunk_features(trunk, image), trunk_features(ref, image)
    diffs, bad = collections.OrderedDict(), []
    for name in a:
        diffs[name] = (a[name] - b[name]).abs().max().item()
        ok = torch.allclose(a[name], b[name], rtol=rtol, atol=atol)
        log(f"  {name} {list(a[name].shape)}: max abs diff {diffs[name]:.3g} "
            f"(max |feature| {b[name].abs().max().item():.3g}) {'ok' if ok else 'MISMATCH'}")
        if not ok:
            bad.append(name)
    if bad:
        raise ConversionError(f"--check failed: features differ at {bad}")
    return diffs


def convert(input_path, output_path, source="student", arch=None, prefix=None, verbose=False,
            check=False, check_image=None, check_size=224, log=print):
    """Convert and write; returns the ConversionResult. Raises ConversionError (nothing written)."""
    if not str(output_path).endswith(".pkl"):
        raise ConversionError(f"output {output_path} must end in .pkl (detectron2 reads weights "
                              "files by extension)")
    if source not in SOURCES:
        raise ConversionError(f"--source {source}: choices are {SOURCES}")
    obj = read_torch_file(str(input_path))
    sd, what, ckpt_arch = extract_state_dict(obj, input_path, source)
    inner, prefix, notes, outside = select_backbone(sd, prefix)
    depth = None
    if arch is not None:
        depth = arch_to_depth(arch, "--arch")
    if ckpt_arch is not None:
        ckpt_depth = arch_to_depth(ckpt_arch, f"{input_path}'s 'arch'")
        if depth is not None and depth != ckpt_depth:
            raise ConversionError(f"--arch {arch} contradicts the checkpoint's arch '{ckpt_arch}'")
        depth = ckpt_depth
    log(f"input: {input_path}")
    log(f"detected: {what}" + "".join(f"; {n}" for n in notes))
    try:
        result = torchvision_to_d2(inner, depth)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    _, desc = recognise_depth(inner.keys())
    log(f"architecture: {desc}")
    dropped = [prefix + k for k in result.dropped] + outside
    n_opt = sum(1 for _, d, _ in result.mapping if d.endswith("num_batches_tracked"))
    log(f"mapping (torchvision -> detectron2):\n{mapping_table(result.mapping, verbose)}")
    log(f"converted: {len(result.mapping)} tensors ({n_opt} of them BN num_batches_tracked)")
    if verbose:
        log(f"dropped: {len(dropped)} tensors" + "".join(f"\n  {k}" for k in dropped))
    else:
        log(f"dropped: {len(dropped)} tensors" + (f": {_group(dropped, prefix)}" if dropped else ""))
    if n_opt == 0:
        log("note: the source has no num_batches_tracked counters (not weights); none written")

    # Write next to the destination, verify from the file, then rename: a refusal leaves nothing.
    output_path = os.fspath(output_path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(output_path)),
                       "." + os.path.basename(output_path) + ".converting.pkl")
    try:
        save_d2_file(result.model, tmp)
        reread = load_d2_file(tmp)
        if list(reread) != list(result.model) or any(
                not np.array_equal(reread[k], v) for k, v in result.model.items()):
            raise ConversionError(f"{tmp} does not read back as written")
        if check:
            image, img_desc = load_image(check_image, check_size)
            log(f"check: {img_desc}")
            diffs = check_features(tmp, inner, result.depth, image, log)
            log(f"check passed: max abs diff over res2..res5 = {max(diffs.values()):.3g}")
        os.replace(tmp, output_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"wrote {output_path} (ResNet-{result.depth}; config needs INPUT.FORMAT RGB, torchvision "
        "PIXEL_MEAN/PIXEL_STD, MODEL.RESNETS.STRIDE_IN_1X1 False"
        + (", RES2_OUT_CHANNELS 64, an FPN config" if result.depth < 50 else "") + ")")
    return result


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint or state dict (.pth) to convert")
    p.add_argument("output", help="detectron2 weights file to write (.pkl)")
    p.add_argument("--source", default="student", choices=SOURCES,
                   help="which network of a distillation checkpoint (default: student)")
    p.add_argument("--arch", default=None, choices=ARCH_CHOICES,
                   help="expected architecture (default: recognised from the weights)")
    p.add_argument("--prefix", default=None,
                   help="key prefix of the backbone inside the state dict, e.g. 'encoder_q.' "
                        "(default: found automatically; DDP's 'module.' is always stripped)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print every tensor's mapping and every dropped key")
    p.add_argument("--check", action="store_true",
                   help="load the written weights into transfer/backbone.py's trunk and compare "
                        "res2..res5 features with the source ResNet's")
    p.add_argument("--check-image", default=None,
                   help="image for --check (default: a deterministic synthetic image)")
    p.add_argument("--check-size", default=224, type=int,
                   help="shorter side of the --check image in pixels (default: 224)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        convert(args.input, args.output, source=args.source, arch=args.arch, prefix=args.prefix,
                verbose=args.verbose, check=args.check, check_image=args.check_image,
                check_size=args.check_size)
    except (ConversionError, ValueError) as e:  # our ValueErrors name the key and the fix
        print(f"error: {e}\nnothing written to {args.output}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
