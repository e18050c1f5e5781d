#!/usr/bin/env python
"""Rewrite a pipeline output folder's report (report.md, results.json, plots/) from its files; the code
is cocord_pipeline/report.py."""
import sys

from cocord_pipeline.cli import report_main

if __name__ == "__main__":
    sys.exit(report_main())
