"""Numbers every stage must agree on.

IMAGENET_MEAN / IMAGENET_STD: the per-channel normalisation (RGB order, pixel values in [0, 1]) that
torchvision's ImageNet models and our distillation loader use. The converter's `--check` path feeds
a converted student the same normalisation, so both must read it from here.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
