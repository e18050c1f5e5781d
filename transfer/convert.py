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
tensor of the recognised ResNet makes the tool refuse (`convert_to_d2.py: error: ...`, exit 2, nothing
written; --debug shows the traceback), as does a tensor holding NaN or inf.
"""
import argparse
import collections
import os
import re
import sys

import numpy as np
import torch

from cocord_common.constants import IMAGENET_MEAN, IMAGENET_STD
from cocord_common.errors import UserError, run_main
from cocord_common.weights import SOURCES, read_state_dict, select_backbone
from transfer.backbone import build_resnet_trunk, load_trunk_weights, trunk_features
from transfer.d2_format import (RESNET_SPECS, is_head_key, load_d2_file, recognise_depth,
                                save_d2_file, torchvision_to_d2, tv_to_d2_name)

ARCH_CHOICES = tuple(f"resnet{d}" for d in RESNET_SPECS)


class ConversionError(UserError):
    """A refusal: the message says what is wrong and how to fix it."""


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
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((img - mean) / std).unsqueeze(0), desc


def compare_features(d2_model, source_sd, depth, image, log=print, rtol=1e-4, atol=1e-5):
    """Load detectron2-format weights `d2_model` into transfer.backbone's trunk and compare
    res2..res5 with the source torchvision ResNet's (eval mode). Returns {stage: max abs diff};
    raises ConversionError."""
    import torchvision

    trunk = build_resnet_trunk(depth, "BN")
    load_trunk_weights(trunk, d2_model, log=lambda m: log("  trunk: " + m))
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


def check_features(pkl_path, source_sd, depth, image, log=print, rtol=1e-4, atol=1e-5):
    """compare_features for the detectron2 `.pkl` file `pkl_path`."""
    return compare_features(load_d2_file(pkl_path), source_sd, depth, image, log, rtol, atol)


def _read_backbone(input_path, source, arch, prefix):
    """(torchvision backbone state dict, ResNet depth or None, prefix, dropped keys outside it,
    the 'detected:' log line)."""
    found = read_state_dict(input_path, source)
    backbone = select_backbone(found.state_dict, lambda k: tv_to_d2_name(k) is not None,
                               is_head_key, prefix)
    depth = None
    if arch is not None:
        depth = arch_to_depth(arch, "--arch")
    if found.arch is not None:
        ckpt_depth = arch_to_depth(found.arch, f"{input_path}'s 'arch'")
        if depth is not None and depth != ckpt_depth:
            raise ConversionError(f"--arch {arch} contradicts the checkpoint's arch '{found.arch}'")
        depth = ckpt_depth
    detected = f"detected: {found.description}" + "".join(
        f"; {n}" for n in found.notes + backbone.notes)
    return backbone.state_dict, depth, backbone.prefix, backbone.outside, detected


def _log_conversion(result, inner, prefix, outside, verbose, log):
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


def _check_finite(model, input_path):
    """Refuse NaN / inf weights: detectron2 would train (or diverge) from them without a word."""
    bad = []
    for name, value in model.items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad.append(f"{name} ({int((~np.isfinite(arr)).sum())} of {arr.size} values)")
    if bad:
        raise ConversionError(f"{input_path}: {len(bad)} tensor(s) hold NaN or inf: {', '.join(bad[:10])}"
                              + (" ..." if len(bad) > 10 else "") + "; convert a checkpoint from before the "
                              "training diverged")


def _write_verified(model, output_path):
    """save_d2_file (atomic), then read the file back: a file that differs is removed."""
    save_d2_file(model, output_path)
    reread = load_d2_file(output_path)
    if list(reread) != list(model) or any(
            not np.array_equal(reread[k], v, equal_nan=True) for k, v in model.items()):
        os.remove(output_path)
        raise ConversionError(f"{output_path} does not read back as written (removed)")


def convert(input_path, output_path, source="student", arch=None, prefix=None, verbose=False,
            check=False, check_image=None, check_size=224, log=print):
    """Convert and write; returns the ConversionResult. Raises ConversionError (nothing written)."""
    if not str(output_path).endswith(".pkl"):
        raise ConversionError(f"output {output_path} must end in .pkl (detectron2 reads weights "
                              "files by extension)")
    if os.path.isdir(output_path):
        raise ConversionError(f"output {output_path} is a folder; give a file path such as "
                              f"{os.path.join(os.fspath(output_path), 'model.pkl')}")
    parent = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(parent):
        raise ConversionError(f"output {output_path}: its folder {parent} does not exist; create it first")
    inner, depth, prefix, outside, detected = _read_backbone(input_path, source, arch, prefix)
    log(f"input: {input_path}")
    log(detected)
    try:
        result = torchvision_to_d2(inner, depth)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    _check_finite(result.model, input_path)
    _log_conversion(result, inner, prefix, outside, verbose, log)
    # --check runs before anything is written, so a failed check leaves no file behind
    if check:
        image, img_desc = load_image(check_image, check_size)
        log(f"check: {img_desc}")
        diffs = compare_features(result.model, inner, result.depth, image, log)
        log(f"check passed: max abs diff over res2..res5 = {max(diffs.values()):.3g}")
    output_path = os.fspath(output_path)
    _write_verified(result.model, output_path)
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
                   help="load the converted weights into transfer/backbone.py's trunk and compare "
                        "res2..res5 features with the source ResNet's")
    p.add_argument("--check-image", default=None,
                   help="image for --check (default: a deterministic synthetic image)")
    p.add_argument("--check-size", default=224, type=int,
                   help="shorter side of the --check image in pixels (default: 224)")
    return p


def _main(argv):
    args = get_parser().parse_args(argv)
    try:
        convert(args.input, args.output, source=args.source, arch=args.arch, prefix=args.prefix,
                verbose=args.verbose, check=args.check, check_image=args.check_image,
                check_size=args.check_size)
    except (UserError, ValueError) as e:  # our ValueErrors name the key and the fix
        raise ConversionError(f"{e}; nothing written to {args.output}") from e
    return 0


def main(argv=None):
    """The converter's command line: 0 when written; a refusal prints `convert_to_d2.py: error: ...`
    and exits 2 (cocord_common.errors.run_main; --debug shows the traceback)."""
    return run_main(_main, argv, prog="convert_to_d2.py")


if __name__ == "__main__":
    sys.exit(main())
