"""scripts/prepare_english_small.py writes the corpus that configs/pretrain/english_small.yaml reads."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import REPO, shared_data


def test_prepare_english_small_writes_the_configs_corpus_without_labels(tmp_path):
    tsv = shared_data("sst2/train.tsv")
    shared_data("conll2003/eng.train")
    out = tmp_path / "english_small"
    script = REPO / "scripts" / "prepare_english_small.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    sst2 = (out / "sst2_train.txt").read_text(encoding="utf-8").splitlines()
    conll = (out / "conll2003_train.txt").read_text(encoding="utf-8").splitlines()
    # One sentence per line, labels dropped: every SST-2 row but the header; CoNLL-2003's 14,041.
    rows = tsv.read_text(encoding="utf-8").splitlines()
    assert len(sst2) == len(rows) - 1 and len(conll) == 14041
    assert sst2[0] == rows[1].rsplit("\t", 1)[0].strip()
    assert not any(line.endswith(("\t0", "\t1")) for line in sst2)
    assert conll[0] == "EU rejects German call to boycott British lamb ."
    # The config reads exactly what the script writes by default.
    config = yaml.safe_load((REPO / "configs" / "pretrain" / "english_small.yaml").read_text())
    files = config["data"]["init_args"]["train_files"]
    assert "corpora/english_small/*.txt" in files


def test_prepare_english_small_names_missing_datasets(tmp_path):
    script = REPO / "scripts" / "prepare_english_small.py"
    done = subprocess.run(
        [sys.executable, str(script), "--data", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "sst2/train.tsv" in done.stderr and "--data" in done.stderr
    assert not (tmp_path / "out").exists()
