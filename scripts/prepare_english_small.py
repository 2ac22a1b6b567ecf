"""The unlabeled English corpus of `configs/pretrain/english_small.yaml` (nanoGPT's prepare.py pattern).

    python scripts/prepare_english_small.py            # -> corpora/english_small/*_train.txt
    python scripts/prepare_english_small.py --out DIR  # elsewhere (then set data.init_args.train_files)

The corpus is the sentences of SST-2 `train.tsv` and CoNLL-2003 `eng.train` with their labels
dropped, one sentence per line: training splits only, so no test sentence is ever seen in
pretraining. The pretraining config adds Tiny Shakespeare. The output goes to `corpora/` (git
ignores it) rather than `data/`, which holds the shared datasets and may be read-only.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_corpus(data: Path, out: Path) -> list[Path]:
    """Write the unlabeled text of the two tasks' training splits into `out`, one sentence per line."""
    sources = [data / "sst2" / "train.tsv", data / "conll2003" / "eng.train"]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise SystemExit(
            f"prepare_english_small: missing {', '.join(missing)}: pass --data DIR (the datasets)"
        )
    out.mkdir(parents=True, exist_ok=True)
    sst2 = out / "sst2_train.txt"
    with sources[0].open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)  # header: sentence, label
        sst2.write_text("".join(row[0].strip() + "\n" for row in rows), encoding="utf-8")
    conll = out / "conll2003_train.txt"
    sentences, words = [], []
    for line in sources[1].read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip() and not line.startswith("-DOCSTART-"):
            words.append(line.split()[0])  # the token column; tags dropped
        elif words:  # a blank line ends a sentence
            sentences.append(" ".join(words))
            words = []
    conll.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    return [sst2, conll]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=REPO / "data", help="the datasets folder (sst2/, conll2003/)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "corpora" / "english_small", help="output folder")
    args = parser.parse_args()
    for path in write_corpus(args.data, args.out):
        print(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
