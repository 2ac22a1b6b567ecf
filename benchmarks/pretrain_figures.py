"""Run one pretraining experiment end to end and print the figures the README quotes.

    python benchmarks/pretrain_figures.py configs/pretrain/quickstart.yaml
    python benchmarks/pretrain_figures.py configs/pretrain/shakespeare_char.yaml

Times the whole `main.py fit` command (tokenizer training and tokenization included; use a fresh
`--cache` directory to include them), then reads the run's TensorBoard events: the validation loss
at step 0 and at the end, and the relative drop. Extra arguments are passed on to `main.py fit`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--cache", default=None, help="cache_dir for the run (default: a fresh temp dir)")
    args, extra = parser.parse_known_args()
    logs = Path(tempfile.mkdtemp(prefix="gptlab-figures-"))
    cache = args.cache or str(logs / "cache")
    command = [
        sys.executable,
        str(REPO / "main.py"),
        "fit",
        "--config",
        args.config,
        "--logs",
        str(logs),
        "--data.init_args.cache_dir",
        cache,
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    run = next(logs.glob("*/version_0"))
    events = EventAccumulator(str(run))
    events.Reload()
    val = [(e.step, e.value) for e in events.Scalars("val/loss")]
    figures = {
        "config": args.config,
        "wall_seconds": round(wall, 1),
        "val_loss_first": {"step": val[0][0], "value": round(val[0][1], 4)},
        "val_loss_last": {"step": val[-1][0], "value": round(val[-1][1], 4)},
        "drop_percent": round(100 * (1 - val[-1][1] / val[0][1]), 1),
        "run_dir": str(run),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
