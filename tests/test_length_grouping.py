"""LLaVA's group_by_modality_length as a stream option (`data.length_group_batches`): batches of one modality
and similar lengths, and still every promise of the plain stream -- each record once per epoch, equal batches per
rank, and an exact resume from any batch, also from inside a group."""

import random

import pytest
import torch
from test_datamodule import BATCH, data, make  # noqa: F401 -- `data` is a fixture

from lightning_sp.data.train_stream import StreamPosition, length_grouped

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29


def fake_samples(n, seed=0, text_share=0.3):
    rng = random.Random(seed)
    return [
        {"id": i, "input_ids": torch.zeros(rng.randint(5, 300)), "has_image": rng.random() > text_share}
        for i in range(n)
    ]


def padding(batches) -> int:
    return sum(len(b) * max(len(s["input_ids"]) for s in b) - sum(len(s["input_ids"]) for s in b) for b in batches)


@pytest.mark.parametrize("seed", range(5))
def test_length_grouped_batches_by_modality_and_length(seed):
    samples, b = fake_samples(64, seed), 8
    batches = length_grouped(samples, b, random.Random(seed))
    assert sorted(s["id"] for batch in batches for s in batch) == list(range(64))  # each sample once
    assert all(len(batch) == b for batch in batches)
    mixed = [batch for batch in batches if len({s["has_image"] for s in batch}) > 1]
    assert len(mixed) <= 1
    for has_image in (True, False):
        # the single-modality batches of a modality cover disjoint length ranges: they are cut from one sorted list
        ranges = sorted(
            (min(len(s["input_ids"]) for s in batch), max(len(s["input_ids"]) for s in batch))
            for batch in batches
            if batch not in mixed and batch[0]["has_image"] == has_image
        )
        assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
        pool = [s for s in samples if s["has_image"] == has_image]
        leftover = [s for batch in mixed for s in batch if s["has_image"] == has_image]
        assert len(leftover) == len(pool) % b and len(leftover) < b
        if leftover:  # the shortest of their modality are left over
            assert max(len(s["input_ids"]) for s in leftover) <= min(
                len(s["input_ids"]) for s in pool if s not in leftover
            )
    stream_order = [samples[i : i + b] for i in range(0, 64, b)]
    assert padding(batches) < padding(stream_order)
    assert [[s["id"] for s in x] for x in length_grouped(samples, b, random.Random(seed))] == [
        [s["id"] for s in x] for x in batches
    ]  # a function of the samples and the RNG: resumable
    with pytest.raises(ValueError, match="not whole batches"):
        length_grouped(samples[:-1], b, random.Random(0))


def epoch_batches(dm):
    return list(dm.train_dataloader())


def test_grouped_epochs_keep_each_record_once_and_reorder_within_groups(data, tokenizer):  # noqa: F811
    root, _ = data
    plain, grouped = make(root, tokenizer), make(root, tokenizer, length_group_batches=3)
    a, b = epoch_batches(plain), epoch_batches(grouped)
    assert len(a) == len(b) == plain.steps_per_epoch
    ids_a, ids_b = [i for x in a for i in x["ids"]], [i for x in b for i in x["ids"]]
    assert len(ids_b) == len(set(ids_b)) == 36  # each record once, as without grouping
    group = 3 * BATCH
    for start in range(0, len(ids_a) - len(ids_a) % group, group):  # whole groups: the same samples, reordered
        assert sorted(ids_a[start : start + group]) == sorted(ids_b[start : start + group])
    assert ids_a != ids_b
    assert any(not x["has_image"].all() for x in b)  # the text-only record is in this epoch
    for start in range(0, len(b) - len(b) % 3, 3):  # at most one mixed batch per group
        assert sum(0 < int(x["has_image"].sum()) < BATCH for x in b[start : start + 3]) <= 1


def test_grouped_ranks_get_equal_batches(data, tokenizer, monkeypatch):  # noqa: F811
    root, _ = data
    counts, ids = {}, {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = make(root, tokenizer, num_workers=2, length_group_batches=2)
        batches = epoch_batches(dm)
        counts[rank], ids[rank] = len(batches), {i for x in batches for i in x["ids"]}
    assert counts[0] == counts[1] == 38 // (BATCH * 2)
    assert not ids[0] & ids[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_every_batch_continues_the_grouped_stream_exactly(data, tokenizer, workers):  # noqa: F811
    """Stop after k batches (inside a group or at its end), restore the position as a checkpoint would: the
    resumed loader yields exactly the uninterrupted epoch's remaining batches."""
    root, _ = data
    whole = make(root, tokenizer, num_workers=workers, length_group_batches=2)
    batches = epoch_batches(whole)
    for k in range(1, len(batches)):
        position = StreamPosition(epoch=0)
        for batch in batches[:k]:
            position.advance(*batch["stream_position"])
        resumed = make(root, tokenizer, num_workers=workers, length_group_batches=2)
        resumed.load_state_dict(
            {
                "stream_positions": [position.state_dict()],
                "num_workers": workers,
                "steps_per_epoch": whole.steps_per_epoch,
                "length_group_batches": 2,
            }
        )
        rest = epoch_batches(resumed)
        assert [x["ids"] for x in rest] == [x["ids"] for x in batches[k:]], f"resumed after {k} batches"
        assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(rest, batches[k:]))


def test_a_changed_grouping_refuses_a_mid_epoch_resume(data, tokenizer):  # noqa: F811
    root, _ = data
    dm = make(root, tokenizer, length_group_batches=2)
    state = {
        "stream_positions": [{"epoch": 0, "batches": 2, "raw": {0: 9}}],
        "num_workers": 0,
        "steps_per_epoch": dm.steps_per_epoch,
    }  # written without grouping (no key: 1)
    with pytest.raises(ValueError, match="data.length_group_batches"):
        dm.load_state_dict(state)
