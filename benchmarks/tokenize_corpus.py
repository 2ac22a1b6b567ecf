"""Tokenizing a corpus larger than memory: gptlab's streaming path vs `tokenizers`' own batch encoding.

    python benchmarks/tokenize_corpus.py --size_mb 1000 --long_line_mb 100 --work /tmp/tokbench
    python benchmarks/tokenize_corpus.py --size_mb 40 --long_line_mb 10 --slice_mb 8   # quick

A generated corpus of `--size_mb` MB in two text files: `lines.txt` (many lines of 5 to 100
words) and `line.txt` (`--long_line_mb` MB on one line, no newline). Words are drawn from a
50,000-word vocabulary with Zipf frequencies, with numbers and punctuation mixed in. A byte-level
BPE (gptlab's `BPE` recipe, 8192 tokens) is trained on the whole of `line.txt` through
`TextDataModule.tokenizer_corpus` (in pieces, never the whole line; its peak memory is reported).

Each measurement runs in its own process, so its peak RSS (`ru_maxrss`, imports included) is its own:
  gptlab     `TextDataModule(train_files=...).prepare_data()` on each file (val_fraction 0.1, the
             default tail split), from text on disk to the .npy cache, with the tokenizer loaded
             from a directory, as a run does;
  tokenizers `Tokenizer.encode_batch_fast` (the library's fastest batch call: no offsets) on the
             lines of the first `--slice_mb` MB of `lines.txt`, read into memory whole, in calls
             of about 4 MB of lines; only the calls are timed.
Both use the same cores (`tokenizers`' Rayon pool: RAYON_NUM_THREADS, by default every core this
process may run on; `--threads` sets it for both). Baseline runs come before, between and after
gptlab's, so that load on a shared machine hits both; the ratio uses their mean, of wall-clock
throughput and of MB per CPU-second (less disturbed by other processes). The baseline's ids are checked
against the start of gptlab's stream: streaming must not change a token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

MB = 1_000_000
PUNCTUATION = [".", ",", ";", "!", "?", " 42", " 1999", "'s", " (see above)", " -", ":", " 3.14"]


# ----------------------------------------------------------------------------- corpus
def line_pool(megabytes: float, seed: int = 0) -> list[str]:
    """Lines (without newline) of Zipf-distributed pseudo-words, about `megabytes` MB in all."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 12))) for _ in range(50_000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    lines, size = [], 0
    while size < megabytes * MB:
        words = [vocab[i] for i in rng.choice(len(vocab), size=50_000, p=p / p.sum())]
        start = 0
        while start < len(words):
            n = int(rng.integers(5, 100))
            line = (
                " ".join(words[start : start + n]).capitalize() + PUNCTUATION[rng.integers(len(PUNCTUATION))]
            )
            lines.append(line)
            size += len(line) + 1
            start += n
    return lines


def write_corpus(work: Path, size_mb: float, long_line_mb: float) -> tuple[Path, Path]:
    """lines.txt and line.txt, `size_mb` MB together; reused when present with the same sizes."""
    lines_path, line_path = work / "lines.txt", work / "line.txt"
    spec = work / "corpus.json"
    wanted = {"size_mb": size_mb, "long_line_mb": long_line_mb}
    if spec.is_file() and json.loads(spec.read_text()) == wanted:
        return lines_path, line_path
    pool = line_pool(min(8.0, size_mb / 4))
    rng = np.random.default_rng(1)
    for path, target, separator in (
        (lines_path, size_mb - long_line_mb, "\n"),
        (line_path, long_line_mb, " "),
    ):
        with path.open("w", encoding="utf-8") as f:
            written = 0
            while written < target * MB:
                # The pool in a new order each round: the same words, never the same long run of them.
                text = separator.join(pool[i] for i in rng.permutation(len(pool))) + separator
                text = text[: int(target * MB) - written]
                f.write(text)
                written += len(text)
    spec.write_text(json.dumps(wanted))
    return lines_path, line_path


# ----------------------------------------------------------------------------- measurements (child processes)
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    """CPU time of this process, all its threads: less disturbed by other load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_train(path: Path, out: Path) -> dict:
    from gptlab.data import BPE, TextDataModule

    start = time.perf_counter()
    dm = TextDataModule(tokenizer=BPE(vocab_size=8192), train_files=str(path), cache_dir=str(out / "cache"))
    tokenizer = BPE(vocab_size=8192).train(dm.tokenizer_corpus())
    seconds = time.perf_counter() - start
    tokenizer.save_pretrained(str(out))
    return {"seconds": seconds, "mb": path.stat().st_size / MB, "rss_mb": peak_rss_mb()}


def child_gptlab(path: Path, tokenizer: Path, cache: Path) -> dict:
    from gptlab.data import TextDataModule

    shutil.rmtree(cache, ignore_errors=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    dm = TextDataModule(tokenizer=str(tokenizer), train_files=str(path), cache_dir=str(cache))
    dm.prepare_data()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    entry = next((cache / "text").iterdir())
    meta = json.loads((entry / "meta.json").read_text())
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {
        "seconds": seconds,
        "cpu": cpu,
        "mb": path.stat().st_size / MB,
        "tokens": tokens,
        "cuts": meta["cuts"],
        "rss_mb": peak_rss_mb(),
        "stream": str(entry / "train.npy"),
    }


def child_tokenizers(lines: Path, tokenizer: Path, slice_mb: float, ids_out: Path) -> dict:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    with lines.open(encoding="utf-8") as f:
        text = f.read(int(slice_mb * MB))
    texts = text[: text.rindex("\n") + 1].splitlines(keepends=True)  # whole lines only
    del text
    # Calls of about 4 MB of lines, as gptlab's batches: one call of the whole slice is slower per
    # character (its encodings fill memory). Only the calls are timed.
    seconds = cpu = 0.0
    ids, batch, size = [], [], 0
    for i, line in enumerate(texts):
        batch.append(line)
        size += len(line)
        if size >= 4 * MB or i == len(texts) - 1:
            start, cpu_start = time.perf_counter(), cpu_seconds()
            encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
            seconds, cpu = seconds + time.perf_counter() - start, cpu + cpu_seconds() - cpu_start
            ids.append(np.fromiter((t for e in encodings for t in e.ids), dtype=np.uint32))
            batch, size = [], 0
    np.save(ids_out, np.concatenate(ids))
    return {
        "seconds": seconds,
        "cpu": cpu,
        "mb": sum(map(len, texts)) / MB,  # ASCII: characters are bytes
        "tokens": sum(map(len, ids)),
        "rss_mb": peak_rss_mb(),
    }


def spawn(args: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run this script with `args` in a new process; its last stdout line is a JSON result."""
    done = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        sys.exit(f"child {args[:2]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size_mb", type=float, default=1000, help="corpus size in MB (both files)")
    parser.add_argument("--long_line_mb", type=float, default=100, help="size of the one-line file in MB")
    parser.add_argument("--slice_mb", type=float, default=32, help="MB of lines the baseline encodes")
    parser.add_argument("--threads", type=int, default=None, help="RAYON_NUM_THREADS for both sides")
    parser.add_argument("--work", type=Path, default=None, help="work directory (kept); default a temp dir")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one measurement, in its own process
        kind, *rest = args.child
        if kind == "train":
            result = child_train(Path(rest[0]), Path(rest[1]))
        elif kind == "gptlab":
            result = child_gptlab(Path(rest[0]), Path(rest[1]), Path(rest[2]))
        else:
            result = child_tokenizers(Path(rest[0]), Path(rest[1]), float(rest[2]), Path(rest[3]))
        print(json.dumps(result))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="tokbench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "ignore"}
    if args.threads:
        env["RAYON_NUM_THREADS"] = str(args.threads)
    cores = args.threads or len(os.sched_getaffinity(0))
    start = time.perf_counter()
    lines, line = write_corpus(work, args.size_mb, args.long_line_mb)
    print(
        f"corpus: {lines} ({lines.stat().st_size / MB:.0f} MB), {line} ({line.stat().st_size / MB:.0f} MB "
        f"on one line), written in {time.perf_counter() - start:.0f}s; {cores} core(s)",
        flush=True,
    )

    tokenizer = work / "tokenizer"
    train = spawn(["--child", "train", str(line), str(tokenizer)], env, args.timeout)
    print(
        f"BPE training on {line.name} ({train['mb']:.0f} MB): {train['seconds']:.1f}s, "
        f"peak RSS {train['rss_mb']:.0f} MB",
        flush=True,
    )

    def baseline(tag: str) -> dict:
        result = spawn(
            [
                "--child",
                "tokenizers",
                str(lines),
                str(tokenizer),
                str(args.slice_mb),
                str(work / "baseline.npy"),
            ],
            env,
            args.timeout,
        )
        rate = result["mb"] / result["seconds"]
        print(
            f"tokenizers encode_batch_fast, {result['mb']:.0f} MB of lines ({tag}): {rate:.2f} MB/s, "
            f"{result['mb'] / result['cpu']:.2f} MB per CPU-second, peak RSS {result['rss_mb']:.0f} MB",
            flush=True,
        )
        return result

    baselines = [baseline("before")]
    ours = {}
    for name, path in (("lines", lines), ("line", line)):
        if ours:
            baselines.append(baseline("between"))
        ours[name] = spawn(
            ["--child", "gptlab", str(path), str(tokenizer), str(work / f"cache-{name}")], env, args.timeout
        )
        r, cuts = ours[name], ours[name]["cuts"]
        print(
            f"gptlab prepare_data, {path.name} ({r['mb']:.0f} MB, {r['tokens']:,} tokens): "
            f"{r['mb'] / r['seconds']:.2f} MB/s, {r['mb'] / r['cpu']:.2f} MB per CPU-second, "
            f"peak RSS {r['rss_mb']:.0f} MB, "
            f"cuts {cuts['made']:,} made / {cuts['changed']} changed",
            flush=True,
        )
        if name == "lines":
            # The baseline's ids are the start of the lines file's stream, cut or not.
            expected = np.load(work / "baseline.npy")
            stream = np.load(ours[name]["stream"], mmap_mode="r")
            same = np.array_equal(stream[: len(expected)], expected)
            print(f"  first {len(expected):,} tokens equal to the baseline's: {same}", flush=True)
    baselines.append(baseline("after"))

    base_rate = sum(b["mb"] / b["seconds"] for b in baselines) / len(baselines)
    base_cpu_rate = sum(b["mb"] / b["cpu"] for b in baselines) / len(baselines)
    total_mb = sum(r["mb"] for r in ours.values())
    our_rate = total_mb / sum(r["seconds"] for r in ours.values())
    our_cpu_rate = total_mb / sum(r["cpu"] for r in ours.values())
    peak = max(r["rss_mb"] for r in ours.values())
    print(
        f"\nsummary on {cores} core(s), load average {os.getloadavg()[0]:.1f}: gptlab {total_mb:.0f} MB, "
        f"peak RSS {peak:.0f} MB, {our_rate:.2f} MB/s vs tokenizers' batch encoding {base_rate:.2f} MB/s "
        f"(mean of {len(baselines)} runs): {our_rate / base_rate:.2f}x; per CPU-second {our_cpu_rate:.2f} vs "
        f"{base_cpu_rate:.2f} MB: {our_cpu_rate / base_cpu_rate:.2f}x"
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
