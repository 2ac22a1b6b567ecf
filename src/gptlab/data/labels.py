"""Label names: their order, the name <-> id map, and the checks between data and model.

A data module of labelled examples decides its `label_names` (given, or sorted from the training
labels: `sort_labels`, entity tags by `sort_tags`); the task takes them from the data
(`data.label_names`) and `check_label_names` refuses data whose names differ from a checkpoint's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from gptlab.errors import ConfigError
from gptlab.metrics.ner import OUTSIDE, PREFIXES, is_entity_tagset, split_tag


def is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def sort_labels(values: set[str]) -> list[str]:
    """Sorted label names: numerically when all are integers ("2" before "10")."""
    if all(is_int(v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


class LabelMap:
    """Label name <-> id, with integer labels indexing the names when no name is an integer."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ConfigError(f"label_names has duplicates: {duplicates}")
        self.index = {name: i for i, name in enumerate(self.names)}
        self.by_position = not any(is_int(n) for n in self.names)

    def get(self, value: Any) -> int | None:
        """The id of a label value, or None when it is not one of the names."""
        key = str(value).strip()
        if key in self.index:
            return self.index[key]
        if self.by_position and is_int(value) and 0 <= int(value) < len(self.names):
            return int(value)
        return None

    def describe(self) -> str:
        shown = ", ".join(self.names[:30]) + (
            f", ... ({len(self.names)} in all)" if len(self.names) > 30 else ""
        )
        return shown


def unknown_label_hint(given: bool) -> str:
    source = "data.init_args.label_names" if given else "the training labels"
    return (
        f"Labels must be among the names taken from {source}: fix these rows, or list every label in "
        f"data.init_args.label_names (a fine-tuned checkpoint keeps the labels it was trained with)."
    )


def warn_unused_labels(names: Sequence[str], used: set[int], source: Any) -> None:
    """Warn when given `label_names` hold names the training data never uses (a misspelt name, or
    labels of another dataset): the model has a class it cannot learn."""
    unused = [name for i, name in enumerate(names) if i not in used]
    if unused:
        shown = ", ".join(repr(n) for n in unused[:5]) + (
            f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        )
        rank_zero_warn(
            f"data.init_args.label_names: {shown} never occur in the training data ({source}); the "
            f"model cannot learn a class it never sees: check the spelling against the labels in the "
            f"files, or remove them"
        )


def class_label_names(feature: Any) -> list[str] | None:
    """Names of a ClassLabel feature, also inside a Sequence / list (multi-label, tags)."""
    import datasets

    feature = getattr(feature, "feature", feature)
    if isinstance(feature, list) and feature:
        feature = feature[0]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def check_label_names(data_names: Sequence[str] | None, model_names: Sequence[str], what: str) -> None:
    """Refuse data whose label names differ from the model's (ids would mean other labels)."""
    if data_names is not None and list(data_names) != list(model_names):
        raise ConfigError(
            f"the data's {what} {list(data_names)} differ from the model's {list(model_names)}: a model "
            f"predicts ids in its own label order; give data.init_args.label_names the model's labels"
        )


def sort_tags(tags: set[str]) -> list[str]:
    """O first, then entity tags grouped by type in B, I, E, S order; other tag sets sorted."""
    if not is_entity_tagset(list(tags)):
        return sort_labels(tags)
    order = {p: i for i, p in enumerate(PREFIXES)}
    rest = sorted(tags - {OUTSIDE}, key=lambda t: (split_tag(t)[1], order[split_tag(t)[0]]))
    return ([OUTSIDE] if OUTSIDE in tags else []) + rest
