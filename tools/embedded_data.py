#!/usr/bin/env python
"""Build the embedded default datasets into a folder; the code is cocord_pipeline/embedded_data.py."""
from cocord_pipeline.embedded_data import main

if __name__ == "__main__":
    main()
