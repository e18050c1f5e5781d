#!/usr/bin/env python
"""Convert a ResNet student (or any torchvision ResNet) to a Detectron2 `.pkl`: the entry script of
transfer/convert.py (see there, or run with --help).

    python tools/convert_to_d2.py INPUT OUTPUT.pkl [--source student|slow_student] [--arch resnet50]
                                  [--prefix P] [--verbose] [--check [--check-image IMG]]
"""
import sys

from transfer.convert import main

if __name__ == "__main__":
    sys.exit(main())
