"""Start-up time of the command line against `import lightning` alone, side by side.

    python benchmarks/startup.py                # 5 rounds, interleaved
    python benchmarks/startup.py --rounds 9 --importtime

Each round runs, as fresh processes in turn: `python -c "import lightning"` (the floor: the CLI
is a LightningCLI), `python main.py --help` and `python main.py fit --help`. Interleaving keeps
a busy machine's noise out of the ratios; the medians and their ratios to the floor are printed.
`--importtime` adds the modules that `main.py --help` imports beyond `import lightning`, by
cumulative import time (python -X importtime), to show where the rest goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "import lightning": [sys.executable, "-c", "import lightning"],
    "main.py --help": [sys.executable, "main.py", "--help"],
    "main.py fit --help": [sys.executable, "main.py", "fit", "--help"],
}


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def imports(command: list[str]) -> dict[str, float]:
    """Cumulative import time (s) of each top-level-ish module imported by `command`."""
    result = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], cwd=REPO, capture_output=True, text=True, check=True
    )
    times = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split(":", 1)[1].split("|"))
        if cumulative.isdigit():
            times[name.strip()] = int(cumulative) / 1e6
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument(
        "--importtime", action="store_true", help="also list what --help imports beyond lightning"
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(REPO / "src"))
    runs: dict[str, list[float]] = {name: [] for name in COMMANDS}
    seconds(COMMANDS["import lightning"])  # warm the file cache once, not timed
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            runs[name].append(seconds(command))
    floor = statistics.median(runs["import lightning"])
    print(f"{'command':<22}{'median s':>10}{'min s':>8}{'x import lightning':>20}")
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"{name:<22}{median:>10.2f}{min(values):>8.2f}{median / floor:>20.2f}")
    if args.importtime:
        base = imports(COMMANDS["import lightning"])
        extra = imports(COMMANDS["main.py --help"])
        rest = sorted(((t, m) for m, t in extra.items() if m not in base), reverse=True)
        print("\nimported by main.py --help beyond `import lightning` (cumulative s, largest first):")
        for t, m in rest[:25]:
            print(f"  {t:6.2f}  {m}")


if __name__ == "__main__":
    main()
