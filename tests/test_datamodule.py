"""ShardDataModule on real shards made from synthetic data: batch layout, equal epochs per rank, eval fields."""

import json
from itertools import islice

import lightning as L
import pytest
import torch

from lightning_sp.constants import IGNORE_INDEX, IMAGE_TOKEN
from lightning_sp.data import shards, synthetic
from lightning_sp.data.collate import collate_train
from lightning_sp.data.datamodule import ShardDataModule

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29

N_VIS, SIZE, BATCH = 6, 32, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """38 train samples in 6 uneven shards (one text-only, one the encoder rejects), 10 val samples in 3 shards."""
    root = tmp_path_factory.mktemp("data")
    synthetic.generate(root, n_train=36, n_val=10, seed=0, image_size=SIZE, turns=2, progress=False)
    train = json.loads((root / "train.json").read_text())
    train.append(
        {"id": "text_only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
    )
    train.append({"id": "gpt_first", "conversations": [{"from": "gpt", "value": "no question"}]})
    (root / "train.json").write_text(json.dumps(train))
    shards.convert(root / "train.json", root, root / "train", shard_size=7, workers=1, progress=False)
    shards.convert(root / "val.json", root, root / "val", shard_size=4, workers=1, progress=False)
    val = {r["id"]: r for r in json.loads((root / "val.json").read_text())}
    return root, val


def make(root, tokenizer, **kw):
    args = dict(
        train_dir=root / "train",
        val_dir=root / "val",
        tokenizer=tokenizer,
        template="vicuna_v1",
        num_visual_tokens=N_VIS,
        image_size=SIZE,
        batch_size=BATCH,
        val_batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        max_length=512,
        seed=0,
    )
    dm = ShardDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def check_training_fields(batch, tokenizer):
    image_id, pad_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    b, length = ids.shape
    assert ids.dtype == labels.dtype == mask.dtype == torch.long and labels.shape == mask.shape == (b, length)
    assert batch["pixel_values"].shape == (b, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert batch["has_image"].dtype == torch.bool and batch["has_image"].shape == (b,)
    counts = (ids == image_id).sum(1)
    assert torch.equal(counts, batch["has_image"].long() * N_VIS)  # N image tokens or none
    assert (labels[ids == image_id] == IGNORE_INDEX).all()
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (ids[mask == 0] == pad_id).all()
    assert (mask.sum(1) > 0).all() and ((labels != IGNORE_INDEX).sum(1) > 0).all()  # every row supervised
    for row in range(b):  # right padding: ones then zeros
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()
    text_only = ~batch["has_image"]
    assert (batch["pixel_values"][text_only] == 0).all()
    assert (batch["pixel_values"][batch["has_image"]].flatten(1).std(1) > 0).all()


def test_train_batches(data, tokenizer):
    root, _ = data
    dm = make(root, tokenizer)
    assert dm.steps_per_epoch == 38 // BATCH
    loader = dm.train_dataloader()
    assert len(loader) == dm.steps_per_epoch
    epochs, skipped, text_only = [], 0, 0
    for epoch in range(2):
        batches = list(loader)
        assert len(batches) == dm.steps_per_epoch
        epochs.append([])
        for batch in batches:
            assert len(batch["ids"]) == BATCH  # no partial batches in training
            check_training_fields(batch, tokenizer)
            skipped += batch["skipped"]
            text_only += int((~batch["has_image"]).sum())
            epochs[-1] += batch["ids"]
    seen = epochs[0] + epochs[1]
    assert skipped >= 1 and "gpt_first" not in seen  # the rejected record is counted, never batched
    assert text_only >= 1
    # an epoch is 36 of the 37 usable records, each once; the next epoch is a new order
    assert all(len(e) == len(set(e)) == 36 for e in epochs) and epochs[0] != epochs[1]
    assert len(set(seen)) <= 37


def test_every_rank_gets_the_same_number_of_batches(data, tokenizer, monkeypatch):
    """Two simulated ranks with two workers each over 6 uneven shards: equal batch counts, disjoint shards."""
    root, _ = data
    ids = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = make(root, tokenizer, num_workers=2)
        assert dm.steps_per_epoch == 38 // (BATCH * 2)
        loader = dm.train_dataloader()
        ids[rank] = set()
        for _ in range(2):
            batches = list(loader)
            assert len(batches) == dm.steps_per_epoch
            ids[rank].update(i for b in batches for i in b["ids"])
    assert ids[0] and ids[1] and not ids[0] & ids[1]

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="non-empty shards"):
        make(root, tokenizer, num_workers=2).train_dataloader()


def test_val_batches(data, tokenizer, monkeypatch):
    root, val = data
    image_id, pad_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id
    suffix = tokenizer("x ASSISTANT:", add_special_tokens=False)["input_ids"][1:]
    got = []
    for rank in (0, 1):  # also: ranks x workers split the val samples exactly, even with few shards
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        for batch in make(root, tokenizer, num_workers=2).val_dataloader():
            check_training_fields(batch, tokenizer)
            prompts, pmask = batch["prompt_ids"], batch["prompt_attention_mask"]
            assert prompts.dtype == pmask.dtype == torch.long and prompts.shape == pmask.shape
            for row, rid in enumerate(batch["ids"]):
                n = int(pmask[row].sum())
                assert not pmask[row, :-n].any() and pmask[row, -n:].all()  # LEFT padded
                assert (prompts[row, :-n] == pad_id).all()
                assert prompts[row, -len(suffix) :].tolist() == suffix  # ends where the answer starts
                assert int((prompts[row] == image_id).sum()) == N_VIS
                assert batch["answers"][row] == val[rid]["conversations"][-1]["value"]
                assert batch["qtypes"][row] == val[rid]["qtype"]
                got.append(rid)
    assert sorted(got) == sorted(val)


def test_collate_rejects_wrong_image_token_count(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    sample = {
        "id": "x",
        "input_ids": torch.tensor([1, image_id, image_id, 5]),
        "labels": torch.full((4,), -100),
        "pixel_values": torch.zeros(3, 2, 2),
        "has_image": True,
    }
    with pytest.raises(ValueError, match="'x' has 2 image tokens, expected 3"):
        collate_train([sample], 0, image_token_id=image_id, num_visual_tokens=3)


class _CountingModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.steps_per_epoch = []

    def on_train_epoch_start(self):
        self.steps_per_epoch.append(0)

    def training_step(self, batch, batch_idx):
        self.steps_per_epoch[-1] += 1
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_runs_planned_epochs(data, tokenizer):
    root, _ = data
    dm = ShardDataModule(
        root / "train",
        None,
        tokenizer,
        "vicuna_v1",
        num_visual_tokens=N_VIS,
        image_size=SIZE,
        batch_size=BATCH,
        val_batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        max_length=512,
    )
    module = _CountingModule()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert module.steps_per_epoch == [dm.steps_per_epoch] * 2


# ---- the faster sample building and collate give the very batches of the previous code -------------------------


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "previous_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_previous_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _previous_batch(ib, raw, ids, tokenizer):
    """What the sample building + collate before the speed-up (benchmarks/previous_pipeline.py) make of these
    records."""
    return ib.previous_collate(
        [ib.previous_sample(raw[i], tokenizer, num_visual=N_VIS, image_size=SIZE, max_length=512) for i in ids],
        tokenizer.pad_token_id,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_train_and_val_batches_equal_the_previous_pipeline(data, tokenizer, workers):
    """Direct tokenizer call, numpy expansion, pixels written into the batch buffer (shared memory in workers),
    checks on the padded matrices: bit for bit the batches the previous code made, text-only rows included."""
    root, _ = data
    ib = _bench()
    raw = {**ib.raw_samples(root / "train"), **ib.raw_samples(root / "val")}
    dm = make(root, tokenizer, num_workers=workers)
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader())
    assert any(not b["has_image"].all() for b in batches) and any(len(b["ids"]) < BATCH for b in batches)
    for batch in batches:
        assert ib.same_batch(batch, _previous_batch(ib, raw, batch["ids"], tokenizer)), batch["ids"]


def _previous_collate_checks(samples, image_token_id, num_visual_tokens):
    for s in samples:  # collate_train's checks before the speed-up: per sample, in order
        count = int((s["input_ids"] == image_token_id).sum())
        expected = num_visual_tokens if s["has_image"] else 0
        if count != expected:
            raise ValueError(
                f"sample {s['id']!r} has {count} image tokens, expected {expected} "
                f"(has_image={s['has_image']}, num_visual_tokens={num_visual_tokens})"
            )
        if not bool((s["labels"] != IGNORE_INDEX).any()):
            raise ValueError(f"sample {s['id']!r} has no supervised token (every label is {IGNORE_INDEX})")


def _random_samples(n, image_id, seed, slab=None):
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = int(torch.randint(1, 12, (1,), generator=g))
        ids = torch.randint(5, 50, (length,), generator=g)
        has_image = bool(i % 3)
        if has_image:
            ids = torch.cat([ids[:1], torch.full((3,), image_id), ids[1:]])
        labels = torch.where(torch.rand(len(ids), generator=g) < 0.5, ids, torch.full_like(ids, IGNORE_INDEX))
        labels[-1] = ids[-1]
        pixels = slab[i] if slab is not None else torch.rand(3, 4, 4, generator=g)
        pixels.copy_(torch.rand(3, 4, 4, generator=g))
        samples.append(
            {
                "id": f"s{i}",
                "input_ids": ids,
                "labels": labels,
                "pixel_values": pixels,
                "has_image": has_image,
                "skipped": i % 2,
                "skipped_reasons": {"bad_json": i % 2},
            }
        )
    return samples


@pytest.mark.parametrize("pad_id", [0, 4])  # 4: the pad id is the image id (checked per sample then)
def test_collate_equals_the_previous_collate(pad_id):
    ib = _bench()
    image_id = 4
    for seed, in_buffer in ((0, False), (1, True), (2, True)):
        slab = torch.empty(5, 3, 4, 4) if in_buffer else None
        samples = _random_samples(5, image_id, seed, slab)
        got = collate_train(samples, pad_id, image_token_id=image_id, num_visual_tokens=3)
        ref = ib.previous_collate(samples, pad_id)
        assert ib.same_batch(got, ref) and got["skipped"] == 2 and got["skipped_reasons"] == {"bad_json": 2}
        assert (got["pixel_values"] is slab) == in_buffer  # slots of one buffer, in order: handed on, not copied
    slab = torch.empty(5, 3, 4, 4)
    samples = _random_samples(5, image_id, 3, slab)
    for subset in (samples[::-1], samples[:4], samples[1:]):  # not that buffer's slots in order: stacked
        got = collate_train(subset, pad_id, image_token_id=image_id, num_visual_tokens=3)
        assert got["pixel_values"] is not slab and got["pixel_values"].data_ptr() != slab.data_ptr()
        assert ib.same_batch(got, ib.previous_collate(subset, pad_id))


def test_collate_reports_the_first_bad_sample_like_before():
    image_id = 4
    samples = _random_samples(6, image_id, 0)
    samples[2]["labels"] = torch.full_like(samples[2]["labels"], IGNORE_INDEX)  # no supervised token
    samples[4]["input_ids"] = samples[4]["input_ids"][samples[4]["input_ids"] != image_id]  # image ids lost
    samples[4]["labels"] = samples[4]["labels"][: len(samples[4]["input_ids"])]
    for batch in (samples, samples[3:], [samples[5], samples[4], samples[2]]):
        with pytest.raises(ValueError) as previous:
            _previous_collate_checks(batch, image_id, 3)
        with pytest.raises(ValueError) as now:
            collate_train(batch, 0, image_token_id=image_id, num_visual_tokens=3)
        assert str(now.value) == str(previous.value)


def test_sample_builder_fills_one_buffer_per_batch(data, tokenizer, monkeypatch):
    from lightning_sp.data.samples import SampleBuilder

    root, _ = data
    raw = [s for i, s in _bench().raw_samples(root / "train").items() if i != "gpt_first"]
    bad = {"__key__": "bad", "json": b'{"id": "bad", "conversations": [{"from": "gpt", "value": "x"}]}'}
    stream = raw[:3] + [bad] + raw[3:9]
    plain = SampleBuilder(tokenizer, "vicuna_v1", N_VIS, SIZE, 512)
    batched = SampleBuilder(tokenizer, "vicuna_v1", N_VIS, SIZE, 512, batch_size=BATCH)
    ref, got = list(plain(iter(stream))), list(batched(iter(stream)))
    assert len(got) == len(ref) == 9 and batched.skipped == plain.skipped == {"gpt_first": 1}
    for a, b in zip(got, ref):
        assert a.keys() == b.keys() and a["id"] == b["id"] and torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert b["pixel_values"]._base is None  # without batch_size: a tensor of its own, as before
    buffers = [s["pixel_values"]._base for s in got]
    assert all(buffers[i] is buffers[i // BATCH * BATCH] for i in range(9))  # the failed record used no slot
    assert buffers[0] is not buffers[BATCH] and buffers[0].shape == (BATCH, 3, SIZE, SIZE)
    assert all(torch.equal(buffers[0][i], got[i]["pixel_values"]) for i in range(BATCH))
    assert not buffers[0].is_shared()
    # inside a DataLoader worker the buffer is allocated in shared memory, like default_collate's output
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    in_worker = SampleBuilder(tokenizer, "vicuna_v1", N_VIS, SIZE, 512, batch_size=BATCH)
    samples = list(islice(in_worker(iter(raw)), BATCH))
    assert samples[0]["pixel_values"]._base.is_shared()
    batch = collate_train(
        samples,
        tokenizer.pad_token_id,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        num_visual_tokens=N_VIS,
    )
    assert batch["pixel_values"] is samples[0]["pixel_values"]._base and batch["pixel_values"].is_shared()
    assert torch.equal(batch["pixel_values"], torch.stack([s["pixel_values"] for s in ref[:BATCH]]))
