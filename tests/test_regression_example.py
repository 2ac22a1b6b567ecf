"""The example task made by subclassing only (examples/regression.py) conforms, like any task."""

from __future__ import annotations

import pytest

from conftest import REPO
from finetune_data import finetune_config, write_sentiment
from gptlab.data import DataError
from gptlab.testing import check_task


@pytest.fixture
def examples_importable(monkeypatch):
    # `python main.py` puts the project root on sys.path, so YAML can name examples.regression.*.
    monkeypatch.syspath_prepend(str(REPO))


def test_regression_example_is_at_most_60_lines():
    assert len((REPO / "examples" / "regression.py").read_text().splitlines()) <= 60


def test_regression_example_fits_tests_and_reloads(tmp_path, examples_importable):
    files = write_sentiment(tmp_path)
    result = check_task(finetune_config(tmp_path, "regression", files), tmp_path)
    report = result["report"]
    assert {"loss", "mse", "pearson"} <= set(report["metrics"])
    assert result["model"].label_names == ["label"]  # the target column names the one output
    assert report["metrics"]["mse"] == pytest.approx(report["metrics"]["loss"], rel=1e-4)


def test_regression_targets_must_be_numbers(tmp_path, examples_importable):
    from examples.regression import RegressionDataModule

    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood\t4.5\nbad\tawful\n")
    data = RegressionDataModule(
        train_files=str(train), text_column="sentence", cache_dir=str(tmp_path / "cache")
    )
    data.prepare_data()
    with pytest.raises(DataError, match=f"{train} line 3: target 'awful' is not a number"):
        data.setup("fit")
