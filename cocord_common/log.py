"""Logging set-up shared by the stages: one named logger writing to stdout (rank 0 only) and to
OUTPUT_DIR/log.txt (other ranks: log.txt.rank{r}). Calling it again replaces the handlers, so a second
run in the same process (tests, `--trials`) never duplicates lines."""
import logging
import os
import sys

DEFAULT_FORMAT = "[%(asctime)s] %(message)s"


def close_logging(name):
    """Remove and close every handler of logger `name`."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    return logger


def setup_logging(name, output_dir, rank=0, fmt=DEFAULT_FORMAT, rank_files=True):
    """Logger `name` at INFO, not propagating; stdout on rank 0; a log file per rank (rank 0: log.txt;
    others: log.txt.rank{r}, or none when rank_files is False)."""
    logger = close_logging(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter(fmt, "%m/%d %H:%M:%S")
    handlers = []
    if rank == 0 or rank_files:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "log.txt" if rank == 0 else f"log.txt.rank{rank}")))
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(formatter)
        logger.addHandler(h)
    return logger
