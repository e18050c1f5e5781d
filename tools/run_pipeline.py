#!/usr/bin/env python
"""The whole pipeline in one command (`cocord-pipeline` once installed); the code is cocord_pipeline/."""
import sys

from cocord_pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
