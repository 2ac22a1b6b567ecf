"""Entity-level NER scores with conlleval semantics, summed over batches and devices.

An entity (chunk) is a maximal span of tags of one type, found the way the CoNLL shared tasks'
`conlleval` script finds it (and `seqeval` in its default mode). A tag is `O` or `<prefix>-<TYPE>`
with prefix B (begin), I (inside), E (end) or S (single), so IOB1, IOB2 and IOBES all read with
the same two rules, applied between each tag and the one before it:

    a chunk ends   before a B or S, after an E or S, at an O, at a change of type
    a chunk starts at a B or S, at an I or E after O / E / S, at a change of type

Consequences worth knowing: `I-PER` with no `B-PER` before it starts an entity (IOB1 input reads
correctly); `B-PER I-ORG` is two entities; an entity runs to the end of its sentence.

A predicted entity counts as correct only if its type, start and end all equal a gold entity's.
`EntityCounts` keeps three count vectors per entity type (true positives, predicted, gold) as
torchmetrics states reduced by sum, so scores computed from them are exact over any number of
batches and processes (never an average of per-batch F1s).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from gptlab.metrics.classification import COLUMNS, prf
from gptlab.reports import Table

OUTSIDE = "O"
PREFIXES = ("B", "I", "E", "S")


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER"; ("O", "") for "O"; ValueError for anything else."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in PREFIXES or not kind:
        raise ValueError(f"{tag!r} is not an entity tag (O, or B-/I-/E-/S- followed by a type)")
    return prefix, kind


def is_entity_tagset(tags: Sequence[str]) -> bool:
    """Whether every tag is `O` or `B-/I-/E-/S-TYPE` (and at least one is not `O`)."""
    try:
        parsed = [split_tag(t) for t in tags]
    except ValueError:
        return False
    return any(prefix != OUTSIDE for prefix, _ in parsed)


def _chunk_end(prev_prefix: str, prefix: str, prev_type: str, kind: str) -> bool:
    # conlleval's endOfChunk (the [ and ] tags of the original are not used in CoNLL data).
    if prev_prefix in ("E", "S"):
        return True
    if prev_prefix in ("B", "I") and prefix in ("B", "S", OUTSIDE):
        return True
    return prev_prefix != OUTSIDE and prev_type != kind


def _chunk_start(prev_prefix: str, prefix: str, prev_type: str, kind: str) -> bool:
    # conlleval's startOfChunk.
    if prefix in ("B", "S"):
        return True
    if prev_prefix in ("E", "S", OUTSIDE) and prefix in ("E", "I"):
        return True
    return prefix != OUTSIDE and prev_type != kind


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one sentence as (type, first index, last index), in order."""
    found = []
    prev_prefix, prev_type, start = OUTSIDE, "", 0
    # A trailing O closes an entity that runs to the end of the sentence.
    for i, tag in enumerate([*tags, OUTSIDE]):
        prefix, kind = split_tag(tag)
        if _chunk_end(prev_prefix, prefix, prev_type, kind):
            found.append((prev_type, start, i - 1))
        if _chunk_start(prev_prefix, prefix, prev_type, kind):
            start = i
        prev_prefix, prev_type = prefix, kind
    return found


def entity_types(tag_names: Sequence[str]) -> list[str]:
    """Entity types named by a tag set, sorted: ["LOC", "MISC", "ORG", "PER"] for CoNLL-2003."""
    return sorted({split_tag(t)[1] for t in tag_names} - {""})


class EntityCounts(Metric):
    """Per entity type: correct predicted entities, predicted entities, gold entities.

    `update(preds, target)` takes tag ids of shape (B, W), one row per sentence and one column
    per word; positions where `target == ignore_index` are padding and are dropped (they must
    come after the sentence's words). `compute()` returns the summed counts, shape (3, K) for
    the K types of `types`: rows tp, predicted, gold.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, tag_names: Sequence[str], ignore_index: int = -100) -> None:
        super().__init__()
        for tag in tag_names:
            split_tag(tag)  # every tag must parse, or the counts would be meaningless
        self.tag_names = list(tag_names)
        self.types = entity_types(tag_names)
        self._type_index = {t: i for i, t in enumerate(self.types)}
        self.ignore_index = ignore_index
        for name in ("tp", "pred", "gold"):
            self.add_state(name, torch.zeros(len(self.types), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        counts = torch.zeros(3, len(self.types), dtype=torch.long)
        # Chunking is sequential and per sentence; sentences are short, so plain Python on CPU.
        for pred_row, gold_row in zip(preds.tolist(), target.tolist(), strict=True):
            n = sum(1 for g in gold_row if g != self.ignore_index)
            pred = {e for e in entities([self.tag_names[i] for i in pred_row[:n]])}
            gold = {e for e in entities([self.tag_names[i] for i in gold_row[:n]])}
            for row, spans in ((0, pred & gold), (1, pred), (2, gold)):
                for kind, _, _ in spans:
                    counts[row, self._type_index[kind]] += 1
        counts = counts.to(self.tp.device)
        self.tp += counts[0]
        self.pred += counts[1]
        self.gold += counts[2]

    def compute(self) -> torch.Tensor:
        return torch.stack([self.tp, self.pred, self.gold])  # (3, K)


class EntityF1(EntityCounts):
    """Micro-averaged entity F1 (conlleval's overall FB1), a scalar to log and monitor."""

    def compute(self) -> torch.Tensor:
        tp, pred, gold = (x.sum() for x in (self.tp, self.pred, self.gold))
        return prf(tp, pred - tp, gold - tp)[2].float()


def entity_table(
    types: Sequence[str], counts: torch.Tensor, title: str = "Entity-level scores (conlleval)"
) -> tuple[Table, dict[str, float]]:
    """Per-type precision / recall / F1 / support with micro, macro and weighted averages.

    As `seqeval.metrics.classification_report`: the rows and the macro average cover the types
    that occur in the gold or the predicted entities (a type that never occurs has no score).

    Args:
        types: entity types, in the order of `counts`' columns.
        counts: (3, K) tensor from `EntityCounts.compute()`: tp, predicted, gold.
    """
    tp, pred, gold = (row.long().cpu() for row in torch.as_tensor(counts))
    seen = (pred + gold) > 0
    names = [t for t, s in zip(types, seen.tolist(), strict=True) if s]
    tp, fp, fn = tp[seen], (pred - tp)[seen], (gold - tp)[seen]
    precision, recall, f1 = prf(tp, fp, fn)
    support = tp + fn
    total = int(support.sum())
    rows: list[list] = [
        [name, float(p), float(r), float(f), int(s)]
        for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
    ]
    micro = [float(x) for x in prf(tp.sum(), fp.sum(), fn.sum())]
    n = max(len(names), 1)
    macro = [float(x.sum() / n) for x in (precision, recall, f1)]
    weights = support.double()
    weighted = [float((x * weights).sum() / weights.sum()) if total else 0.0 for x in (precision, recall, f1)]
    rows += [["micro avg", *micro, total], ["macro avg", *macro, total], ["weighted avg", *weighted, total]]
    summary = {
        "entity_precision": micro[0],
        "entity_recall": micro[1],
        "entity_f1": micro[2],
        "entity_macro_f1": macro[2],
        "gold_entities": total,
        "predicted_entities": int((tp + fp).sum()),
    }
    return Table(title=title, columns=COLUMNS, rows=rows), summary
