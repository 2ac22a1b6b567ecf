"""Task metrics and the tables of the test reports (classification report, entity-level NER)."""

from gptlab.metrics.classification import (
    confusion_scores_table,
    confusion_table,
    multilabel_confusion_table,
    prf,
    scores_table,
)
from gptlab.metrics.ner import (
    EntityCounts,
    EntityF1,
    entities,
    entity_table,
    entity_types,
    is_entity_tagset,
    split_tag,
)

__all__ = [
    "EntityCounts",
    "EntityF1",
    "confusion_scores_table",
    "confusion_table",
    "entities",
    "entity_table",
    "entity_types",
    "is_entity_tagset",
    "multilabel_confusion_table",
    "prf",
    "scores_table",
    "split_tag",
]
