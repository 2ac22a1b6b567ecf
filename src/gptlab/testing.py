"""Conformance checks: any TaskModule subclass (`check_task`), any DataModule subclass (`check_datamodule`).

    from gptlab.testing import check_datamodule, check_task

    def test_my_task_conforms(tmp_path):
        check_task(tiny_config, tmp_path)   # a dict (or YAML path): model + data + trainer, tiny

    def test_my_data_conforms(tmp_path):
        check_datamodule({"class_path": "my.DataModule", "init_args": {...}}, tmp_path)

`check_task` drives gptlab's CLI in-process, the way users run a task, and checks what the rest of
gptlab relies on (docs/design.md §4):

1. `fit` trains a few steps with a finite loss, logs only "{stage}/{name}" keys, and writes the
   run directory: config.yaml, tokenizer/, checkpoints/best.ckpt and last.ckpt, the checkpoint
   naming the task class;
2. `test --ckpt_path <run>/checkpoints/last.ckpt`, with no config (the run's own is found),
   writes reports/test_report.{txt,md,json} whose numbers are finite;
3. `TaskClass.load_from_checkpoint(last.ckpt)` with no other argument rebuilds the model: the
   same weights as the checkpoint and the same outputs on a test batch as the evaluated model.

The config needs validation data (best.ckpt is chosen on a validation metric) and test data.
`check_datamodule` is described in its docstring and docs/data-shapes.md.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

__all__ = ["check_datamodule", "check_task"]

_LOG_KEY = re.compile(r"^(train|val|test)/[\w./-]+$")


def _fail(message: str) -> None:
    raise AssertionError(f"task conformance: {message}")


def check_task(
    config: dict[str, Any] | str | Path, tmp_path: str | Path, max_steps: int = 4
) -> dict[str, Any]:
    """Run fit -> test -> load_from_checkpoint on `config`; raise AssertionError on the first violation.

    Args:
        config: a complete tiny experiment (model, data, trainer with validation), as a dict or a
            YAML file. `logs`, `experiment` and `trainer.max_steps` are set here.
        tmp_path: a scratch directory for the run.
        max_steps: optimizer steps of the fit.

    Returns:
        {"run_dir": Path, "report": the test report as a dict, "model": the reloaded task}.
    """
    from gptlab.cli import GPTLabCLI

    tmp_path = Path(tmp_path)
    if isinstance(config, dict):
        path = tmp_path / "conformance.yaml"
        path.write_text(yaml.safe_dump(config))
        config = path
    logs = tmp_path / "conformance-logs"
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # the CLI reads args only, not pytest's argv
        return _check(GPTLabCLI, Path(config), logs, max_steps)


def _check(GPTLabCLI: type, config: Path, logs: Path, max_steps: int) -> dict[str, Any]:
    fit = GPTLabCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--logs",
            str(logs),
            "--experiment",
            "conformance",
            "--trainer.max_steps",
            str(max_steps),
        ]
    )
    task_class = type(fit.model)
    loss = fit.trainer.callback_metrics.get("train/loss")
    if loss is None or not math.isfinite(float(loss)):
        _fail(f"{task_class.__name__}: train/loss is {loss} after fit")
    bad_keys = [k for k in fit.trainer.callback_metrics if not _LOG_KEY.match(k)]
    if bad_keys:
        _fail(f"{task_class.__name__} logs keys outside the '{{stage}}/{{name}}' scheme: {bad_keys}")

    runs = sorted((logs / "conformance").glob("version_*"))
    if len(runs) != 1:
        _fail(f"expected one run directory under {logs / 'conformance'}, found {[r.name for r in runs]}")
    run = runs[0]
    for name in ("config.yaml", "tokenizer", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        if not (run / name).exists():
            _fail(f"the run directory {run} has no {name}")
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    expected_task = f"{task_class.__module__}.{task_class.__qualname__}"
    if checkpoint.get("gptlab", {}).get("task") != expected_task:
        _fail(f"{last} records task {checkpoint.get('gptlab')}, expected {expected_task}")

    test = GPTLabCLI(args=["test", "--ckpt_path", str(last)])
    report_file = run / "reports" / "test_report.json"
    for suffix in ("txt", "md", "json"):
        if not (run / "reports" / f"test_report.{suffix}").is_file():
            _fail(f"`test` wrote no reports/test_report.{suffix} in {run}")
    report = json.loads(report_file.read_text())
    numbers = {k: v for k, v in report["metrics"].items() if isinstance(v, int | float)}
    if not numbers or not all(math.isfinite(v) for v in numbers.values()):
        _fail(f"the test report's metrics are missing or not finite: {report['metrics']}")

    reloaded = task_class.load_from_checkpoint(last)
    state = reloaded.state_dict()
    if set(state) != set(checkpoint["state_dict"]) or not all(
        torch.equal(state[k], checkpoint["state_dict"][k]) for k in state
    ):
        _fail(f"{task_class.__name__}.load_from_checkpoint({last.name}) does not restore its weights")
    batch = next(iter(test.datamodule.test_dataloader()))
    evaluated = test.model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(batch), evaluated(batch), msg="reloaded model gives other outputs"
        )
    return {"run_dir": run, "report": report, "model": reloaded}


# ----------------------------------------------------------------------------- data modules
def _data_fail(data: Any, message: str) -> None:
    raise AssertionError(f"data conformance: {type(data).__name__}: {message}")


def check_datamodule(data: Any, tmp_path: str | Path) -> dict[str, Any]:
    """Set up a DataModule for every stage and check what tasks and resume rely on; raise
    AssertionError naming the first violation (docs/data-shapes.md).

    1. `prepare_data` + `setup` for fit, validate, test and predict (fresh instances, as each
       command builds its own) give non-empty loaders; validation at `validate` is validation at `fit`;
    2. every batch keeps the batch contract (docs/design.md §4.1): `input_ids` / `attention_mask`
       int64 (B, T), right-padded with the pad id, ids below `vocab_size`, T at most block_size + 1;
       `labels` (B,), (B, T) with -100 on padding, or (B, C) multi-hot; B at most the batch size;
       other entries one per row;
    3. the training order is a function of the seed: a second instance gives the same batches,
       and one that loads a `state_dict` after k batches continues with batch k (exact resume);
    4. the module pickles (DataLoader workers) and `corpus_fingerprint` is stable and changes
       when a training file changes;
    5. the tokenizer saved with `save_tokenizer` reloads with `AutoTokenizer.from_pretrained`
       and encodes as the module's does.

    Args:
        data: a DataModule not yet set up (copied for each instance), or its config as under
            `data:` in YAML ({"class_path": ..., "init_args": {...}}; a dict or a YAML file, whose
            `data:` block is used if it has one). A config without `cache_dir` caches in tmp_path.
            It needs validation, test and predict inputs (predict may fall back to test).
        tmp_path: a scratch directory (the saved tokenizer, copies of the training files).

    Returns:
        {"datamodule": the module set up for fit, "batches": the first batch of each loader by
        role (train, val, test, predict; val None without validation)}.
    """
    import copy
    import pickle

    from transformers import AutoTokenizer

    from gptlab.data import DataModule
    from gptlab.data.sources import expand_files

    tmp_path = Path(tmp_path)
    if isinstance(data, DataModule):
        pristine = copy.deepcopy(data)

        def make() -> DataModule:
            return copy.deepcopy(pristine)
    else:
        config = _data_config(data, tmp_path)

        def make() -> DataModule:
            return _instantiate_data(config)

    def ready(stage: str) -> DataModule:
        module = make()
        module.prepare_data()
        module.setup(stage)
        return module

    fit = ready("fit")
    train = list(fit.train_dataloader())
    if not train:
        _data_fail(fit, "setup('fit') gives no training batches")
    if sum(len(b["input_ids"]) for b in train) != len(fit.train_dataset):
        _data_fail(
            fit, f"the training batches of one epoch do not hold the {len(fit.train_dataset)} examples"
        )
    for batch in train:
        _check_batch(fit, batch, "train", fit.batch_size)
    val = _loader_batches(fit, fit.val_dataloader(), "val")
    if getattr(fit, "label_names", None) is not None:
        names = fit.label_names
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            _data_fail(fit, f"label_names {names!r} are not distinct strings")

    # 3. order and resume
    again = ready("fit")
    if not _same(list(again.train_dataloader()), train):
        _data_fail(
            fit, "two instances with the same seed give other training batches (order must be (seed, epoch))"
        )
    if len(train) > 1:
        k = len(train) // 2
        state = fit.state_dict()
        again.load_state_dict(state)
        if again.state_dict() != state:
            _data_fail(
                fit, f"load_state_dict(state_dict()) does not round-trip: {again.state_dict()} != {state}"
            )
        again.load_state_dict({**state, "train_batches_consumed": k})
        if not _same(list(again.train_dataloader()), train[k:]):
            _data_fail(fit, f"after {k} consumed batches, a resumed loader does not continue with batch {k}")

    # 1. the other stages, each on a fresh instance
    validate = ready("validate")
    if not _same(_loader_batches(validate, validate.val_dataloader(), "val"), val):
        _data_fail(fit, "validation at `validate` differs from validation at `fit`")
    tested = ready("test")
    test = _loader_batches(tested, tested.test_dataloader(), "test")
    predicted = ready("predict")
    predict = _loader_batches(predicted, predicted.predict_dataloader(), "predict")
    for stage, batches in (("test", test), ("predict", predict)):
        if not batches:
            _data_fail(fit, f"setup('{stage}') gives no {stage} batches: give the module {stage} inputs")

    # 4. pickling and the fingerprint
    items = [fit.train_dataset[i] for i in range(min(2, len(fit.train_dataset)))]
    if not _same([pickle.loads(pickle.dumps(fit)).collate(items)], [fit.collate(items)]):
        _data_fail(fit, "a pickled copy (as DataLoader workers get) collates other batches")
    _check_fingerprint(fit, make, expand_files, tmp_path)

    # 5. the tokenizer
    saved = tmp_path / "conformance-tokenizer"
    fit.save_tokenizer(saved)
    reloaded = AutoTokenizer.from_pretrained(str(saved), trust_remote_code=False)
    row = train[0]["input_ids"][0][train[0]["attention_mask"][0].bool()]
    text = fit.tokenizer.decode(row.tolist(), skip_special_tokens=True)
    for name in ("eos_token_id", "pad_token_id", "unk_token_id", "chat_template"):
        if getattr(reloaded, name, None) != getattr(fit.tokenizer, name, None):
            _data_fail(fit, f"the saved tokenizer's {name} differs from the module's")
    if len(reloaded) != len(fit.tokenizer) or reloaded(text)["input_ids"] != fit.tokenizer(text)["input_ids"]:
        _data_fail(fit, f"the tokenizer saved in {saved} encodes {text[:60]!r} differently once reloaded")
    batches = {"train": train[0], "val": val[0] if val else None, "test": test[0], "predict": predict[0]}
    return {"datamodule": fit, "batches": batches}


def _data_config(data: dict[str, Any] | str | Path, tmp_path: Path) -> dict[str, Any]:
    config = yaml.safe_load(Path(data).read_text()) if isinstance(data, str | Path) else dict(data)
    config = config.get("data", config)
    init_args = dict(config.get("init_args") or {})
    init_args.setdefault("cache_dir", str(tmp_path / "cache"))
    return {**config, "init_args": init_args}


def _instantiate_data(config: dict[str, Any]) -> Any:
    """The DataModule of `config`, built as the CLI builds `data:` (jsonargparse, types checked)."""
    from jsonargparse import ArgumentParser

    from gptlab.data import DataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DataModule, "data", required=True)
    return parser.instantiate_classes(parser.parse_object({"data": config})).data


def _loader_batches(data: Any, loader: Any, stage: str) -> list[dict[str, Any]]:
    batches = list(loader)  # [] where a module has no such set (no validation)
    limit = data.batch_size if stage == "train" else data.eval_batch_size
    for batch in batches:
        _check_batch(data, batch, stage, limit)
    return batches


def _check_batch(data: Any, batch: Any, stage: str, max_rows: int) -> None:
    """The batch contract (docs/design.md §4.1) on one batch of `stage`."""

    def fail(message: str) -> None:
        _data_fail(data, f"{stage} batch: {message}")

    if not isinstance(batch, dict):
        fail(f"a {type(batch).__name__}, not a dict")
    for key in ("input_ids", "attention_mask") + (("labels",) if stage != "predict" else ()):
        if not isinstance(batch.get(key), torch.Tensor):
            fail(f"no tensor {key!r} (keys: {sorted(batch)})")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.dtype != torch.int64 or mask.dtype != torch.int64 or ids.dim() != 2 or mask.shape != ids.shape:
        shapes = f"input_ids {ids.dtype} {tuple(ids.shape)}, attention_mask {mask.dtype} {tuple(mask.shape)}"
        fail(f"{shapes}: both must be int64 (B, T)")
    rows, length = ids.shape
    if not 1 <= rows <= max_rows or length < 1:
        fail(f"{rows} rows of {length} tokens; expected 1 to {max_rows} rows (the batch size)")
    if (
        not ((mask == 0) | (mask == 1)).all()
        or not (mask[:, 0] == 1).all()
        or (mask[:, 1:] > mask[:, :-1]).any()
    ):
        fail("attention_mask must be 1 on real tokens then 0 on padding (right-padded, every row non-empty)")
    if not (ids[mask == 0] == data.pad_token_id).all():
        fail(f"padding positions of input_ids must hold the pad id {data.pad_token_id}")
    if ids.min() < 0 or ids.max() >= data.vocab_size:
        fail(f"token ids outside [0, vocab_size={data.vocab_size})")
    block_size = getattr(data, "block_size", None)
    if isinstance(block_size, int) and length > block_size + 1:
        fail(f"{length} tokens per row, more than block_size={block_size} (+ 1 for a next-token target)")
    labels = batch.get("labels")
    if labels is not None:
        _check_labels(data, labels, mask, fail)
    for key, value in batch.items():
        if len(value) != rows:
            fail(f"{key!r} has {len(value)} entries for {rows} rows")


def _check_labels(data: Any, labels: torch.Tensor, mask: torch.Tensor, fail: Any) -> None:
    rows = len(mask)
    classes = len(data.label_names) if getattr(data, "label_names", None) is not None else data.vocab_size
    if labels.dim() == 1 and labels.shape == (rows,) and labels.is_floating_point():
        return  # regression targets
    known = labels[labels != -100]
    if labels.dtype != torch.int64:
        fail(f"labels are {labels.dtype}; class ids and token labels are int64 (-100: ignore)")
    if labels.shape == mask.shape:
        if not (labels[mask == 0] == -100).all():
            fail("labels on padding must be -100 (ignored by the loss)")
    elif labels.shape == (rows, classes) and labels.dim() == 2:
        if not ((known == 0) | (known == 1)).all():
            fail("(B, C) labels must be multi-hot 0 / 1")
        return
    elif labels.shape != (rows,):
        fail(
            f"labels {tuple(labels.shape)}; expected (B,), (B, T) or (B, C) for input_ids {tuple(mask.shape)}"
        )
    if len(known) and (known.min() < 0 or known.max() >= classes):
        fail(f"labels outside [0, {classes}) other than -100")


def _check_fingerprint(data: Any, make: Any, expand_files: Any, tmp_path: Path) -> None:
    """`corpus_fingerprint` is the same for the same data and changes when a training file changes."""
    try:
        first = data.corpus_fingerprint()
    except NotImplementedError:
        return  # a module that never trains a tokenizer need not have one (DataModule.prepare_data)
    if make().corpus_fingerprint() != first:
        _data_fail(data, "corpus_fingerprint differs between two instances of the same data")
    if data.role_files.get("train") is None:
        return  # a dataset: its fingerprint is its name (and revision)
    copies = tmp_path / "conformance-train"
    copies.mkdir(exist_ok=True)
    paths = []
    for i, path in enumerate(expand_files(data.role_files["train"], "train_files")):
        paths.append(copies / f"{i}-{path.name}")
        paths[-1].write_bytes(path.read_bytes())
    module = make()
    module.role_files["train"] = [str(p) for p in paths]
    before = module.corpus_fingerprint()
    _grow(paths[0])
    module = make()
    module.role_files["train"] = [str(p) for p in paths]
    if module.corpus_fingerprint() == before:
        _data_fail(data, f"corpus_fingerprint does not change when a training file ({paths[0].name}) changes")


def _grow(path: Path) -> None:
    """Append one record to a data file: its last line again (a row, a JSON line, a CoNLL token)."""
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)
        return
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
        path.write_text(json.dumps(records + records[:1]), encoding="utf-8")
        return
    lines = [line for line in text.splitlines() if line.strip()]
    path.write_text(text.rstrip("\n") + "\n" + (lines[-1] if lines else "x") + "\n", encoding="utf-8")


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Batches equal key by key (tensors by value)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys():
            return False
        for key in x:
            u, v = x[key], y[key]
            if isinstance(u, torch.Tensor) != isinstance(v, torch.Tensor):
                return False
            if isinstance(u, torch.Tensor) and not (u.shape == v.shape and torch.equal(u, v)):
                return False
            if not isinstance(u, torch.Tensor) and u != v:
                return False
    return True
