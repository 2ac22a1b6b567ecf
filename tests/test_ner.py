"""Entity-level NER scores equal seqeval's (conlleval semantics) on the same predictions, batches, ranks."""

from __future__ import annotations

import random

import pytest
import torch
from seqeval.metrics import classification_report as seqeval_report
from seqeval.metrics import f1_score as seqeval_f1
from seqeval.metrics.sequence_labeling import get_entities

from gptlab.metrics import EntityCounts, EntityF1, entities, entity_table, is_entity_tagset, split_tag

IOB2 = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
IOBES = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-ORG", "I-ORG", "E-ORG", "S-ORG"]

# (gold, predicted) sentence pairs covering the edge cases conlleval defines.
EDGE_CASES = {
    "I- without B- starts an entity": (["O", "I-PER", "I-PER", "O"], ["O", "B-PER", "I-PER", "O"]),
    "entity at sentence end": (["O", "B-LOC", "I-LOC"], ["O", "B-LOC", "I-LOC"]),
    "IOB1: B- only between two same-type entities": (
        ["I-PER", "I-PER", "B-PER", "O", "I-ORG"],
        ["I-PER", "I-PER", "I-PER", "O", "I-ORG"],
    ),
    "type change inside a span": (["B-PER", "I-PER", "I-ORG", "O"], ["B-PER", "I-ORG", "I-ORG", "O"]),
    "IOBES single and end": (["S-PER", "B-ORG", "E-ORG", "O"], ["S-PER", "B-ORG", "I-ORG", "O"]),
    "IOBES E- without B-": (["O", "E-PER", "S-ORG"], ["O", "S-PER", "S-ORG"]),
    "all O": (["O", "O"], ["B-PER", "O"]),
}


def counts_for(
    gold: list[list[str]], pred: list[list[str]], tags: list[str], batch_size: int = 3
) -> EntityCounts:
    """EntityCounts fed in padded batches of tag ids, as the task feeds it."""
    metric = EntityCounts(tags)
    index = {t: i for i, t in enumerate(tags)}
    for start in range(0, len(gold), batch_size):
        g_batch, p_batch = gold[start : start + batch_size], pred[start : start + batch_size]
        width = max(len(s) for s in g_batch)
        target = torch.full((len(g_batch), width), -100)
        preds = torch.zeros((len(g_batch), width), dtype=torch.long)
        for row, (g, p) in enumerate(zip(g_batch, p_batch, strict=True)):
            target[row, : len(g)] = torch.tensor([index[t] for t in g])
            preds[row, : len(p)] = torch.tensor([index[t] for t in p])
        metric.update(preds, target)
    return metric


def assert_equals_seqeval(gold: list[list[str]], pred: list[list[str]], tags: list[str]) -> None:
    metric = counts_for(gold, pred, tags)
    table, summary = entity_table(metric.types, metric.compute())
    expected = seqeval_report(gold, pred, output_dict=True, zero_division=0)
    rows = {row[0]: row[1:] for row in table.rows}
    assert set(rows) == set(expected)
    for name, (precision, recall, f1, support) in rows.items():
        ref = expected[name]
        assert precision == pytest.approx(ref["precision"], abs=1e-12), name
        assert recall == pytest.approx(ref["recall"], abs=1e-12), name
        assert f1 == pytest.approx(ref["f1-score"], abs=1e-12), name
        assert support == ref["support"], name
    assert summary["entity_f1"] == pytest.approx(seqeval_f1(gold, pred), abs=1e-12)


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_match_seqeval(case):
    gold, pred = EDGE_CASES[case]
    tags = IOBES if any(t[0] in "ES" for t in gold + pred) else IOB2
    assert sorted(entities(gold)) == sorted(get_entities(gold))
    assert sorted(entities(pred)) == sorted(get_entities(pred))
    # Alone, and among other sentences (batches mix them).
    assert_equals_seqeval([gold], [pred], tags)
    others = list(EDGE_CASES.values())
    assert_equals_seqeval([gold] + [g for g, _ in others], [pred] + [p for _, p in others], IOBES + IOB2[5:])


def test_documented_readings():
    assert entities(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)]  # I- without B-
    assert entities(["B-PER", "I-ORG"]) == [("PER", 0, 0), ("ORG", 1, 1)]  # type change
    assert entities(["I-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]  # IOB1 boundary
    assert entities(["B-LOC", "I-LOC"]) == [("LOC", 0, 1)]  # runs to the sentence end


@pytest.mark.parametrize("tags", [IOB2, IOBES], ids=["iob1-iob2", "iobes"])
def test_random_sentences_match_seqeval(tags):
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 15))]
        gold = [[rng.choice(tags) for _ in range(n)] for n in lengths]
        # Predictions: gold with some tags changed, so there are hits and misses of every kind.
        pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in s] for s in gold]
        assert_equals_seqeval(gold, pred, tags)


def test_counts_are_summed_over_batches_never_averaged():
    rng = random.Random(1)
    gold = [[rng.choice(IOB2) for _ in range(rng.randint(1, 9))] for _ in range(40)]
    pred = [[t if rng.random() < 0.6 else rng.choice(IOB2) for t in s] for s in gold]
    one_batch = counts_for(gold, pred, IOB2, batch_size=40).compute()
    assert torch.equal(counts_for(gold, pred, IOB2, batch_size=1).compute(), one_batch)
    assert torch.equal(counts_for(gold, pred, IOB2, batch_size=7).compute(), one_batch)
    f1 = EntityF1(IOB2)
    f1.update(*_ids(gold, pred, IOB2))
    assert f1.compute().item() == pytest.approx(seqeval_f1(gold, pred), abs=1e-6)


def _ids(gold, pred, tags):
    index = {t: i for i, t in enumerate(tags)}
    width = max(len(s) for s in gold)
    target = torch.full((len(gold), width), -100)
    preds = torch.zeros((len(gold), width), dtype=torch.long)
    for row, (g, p) in enumerate(zip(gold, pred, strict=True)):
        target[row, : len(g)] = torch.tensor([index[t] for t in g])
        preds[row, : len(p)] = torch.tensor([index[t] for t in p])
    return preds, target


def test_tag_sets():
    assert split_tag("B-MISC") == ("B", "MISC") and split_tag("O") == ("O", "")
    assert is_entity_tagset(IOB2) and is_entity_tagset(IOBES)
    assert not is_entity_tagset(["NN", "VB", "DT"]) and not is_entity_tagset(["O"])
    with pytest.raises(ValueError, match="not an entity tag"):
        EntityCounts(["O", "X-PER"])


def _ddp_worker(rank: int, world: int, port: int, shards: list, tags: list[str], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metric = EntityCounts(tags)
    # Uneven shards and several batches per rank, as under a DistributedSampler.
    gold, pred = shards[rank]
    for start in range(0, len(gold), 4):
        metric.update(*_ids(gold[start : start + 4], pred[start : start + 4], tags))
    counts = metric.compute()
    if rank == 0:
        torch.save(counts, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_counts_are_summed_across_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    rng = random.Random(2)
    gold = [[rng.choice(IOB2) for _ in range(rng.randint(1, 9))] for _ in range(30)]
    pred = [[t if rng.random() < 0.6 else rng.choice(IOB2) for t in s] for s in gold]
    shards = [(gold[:11], pred[:11]), (gold[11:], pred[11:])]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "counts.pt"
    # fork: the workers inherit the imported modules instead of importing torch again.
    mp.start_processes(_ddp_worker, args=(2, port, shards, IOB2, str(out)), nprocs=2, start_method="fork")
    assert torch.equal(torch.load(out), counts_for(gold, pred, IOB2).compute())
    table, summary = entity_table(EntityCounts(IOB2).types, torch.load(out))
    assert summary["entity_f1"] == pytest.approx(seqeval_f1(gold, pred), abs=1e-12)
