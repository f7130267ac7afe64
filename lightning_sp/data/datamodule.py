"""WebDataset LightningDataModule: shards (see shards.py) -> padded, image-expanded training and eval batches.

Multi-rank training with WebDataset hangs when one rank runs out of data before the others (the others wait
in a collective forever). Here the train stream repeats its shards without end and every (rank, worker) is
cut to a planned number of batches, computed from the sample counts in ``index.json``, so every rank yields
exactly ``steps_per_epoch`` batches whatever the shard sizes or the records skipped on the way. An epoch is
therefore about one pass, not exactly one: each epoch starts a fresh, reshuffled pass over the rank's shards.

Bad records (``RecordError`` from the conversation encoder, undecodable images) are skipped and counted, never
fatal: each batch carries ``skipped``, the number dropped since the previous batch of the same worker.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from functools import partial
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from torch.nn.utils.rnn import pad_sequence
from webdataset.utils import pytorch_worker_info

from lightning_sp.data.conversation import (IGNORE_INDEX, RecordError, encode, encode_prompt, expand_image_token,
                                            reference_answer)
from lightning_sp.data.images import ImageDecodeError, ImageProcessor
from lightning_sp.data.shards import load_index
from lightning_sp.data.tokenizer import IMAGE_TOKEN, load_tokenizer

log = logging.getLogger(__name__)


# ---- samples ---------------------------------------------------------------------------------------------

class SampleBuilder:
    """Pipeline stage: raw shard samples -> model-ready sample dicts; drops (and counts) unusable records."""

    def __init__(self, tokenizer, template: str, num_visual_tokens: int, image_size: int,
                 max_length: int | None, for_eval: bool = False):
        self.tokenizer, self.template, self.for_eval = tokenizer, template, for_eval
        self.num_visual_tokens, self.max_length = num_visual_tokens, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.processor = ImageProcessor(image_size)
        self.image_size = image_size
        self.skipped: Counter = Counter()  # reason -> count, in this process (each DataLoader worker has its own)

    def build(self, sample: dict) -> dict:
        record = json.loads(sample["json"])
        rid = record.get("id", sample["__key__"]) if isinstance(record, dict) else sample["__key__"]
        image_bytes = next((v for k, v in sample.items() if not k.startswith("__") and k != "json"), None)
        max_length = self.max_length
        if isinstance(record, dict) and record.get("image"):
            if image_bytes is None:
                raise RecordError(rid, "record names an image but the shard holds none")
            if max_length is not None:  # encode() counts <image> as one token; bound the expanded length
                max_length -= self.num_visual_tokens - 1
        enc = encode(record, self.tokenizer, self.template, max_length)
        if enc.has_image:
            pixel_values = self.processor(image_bytes)
        else:
            pixel_values = torch.zeros(3, self.image_size, self.image_size)
        input_ids, labels = expand_image_token(enc.input_ids, enc.labels, self.image_token_id,
                                               self.num_visual_tokens)
        out = {"id": str(rid), "input_ids": input_ids, "labels": labels, "pixel_values": pixel_values,
               "has_image": enc.has_image}
        if self.for_eval:
            prompt = encode_prompt(record, self.tokenizer, self.template)
            out["prompt_ids"] = expand_image_token(prompt, [IGNORE_INDEX] * len(prompt), self.image_token_id,
                                                   self.num_visual_tokens)[0]
            out["answer"] = reference_answer(record) or ""
            out["qtype"] = str(record.get("qtype", "all"))
        return out

    def __call__(self, src):
        dropped = 0
        for sample in src:
            try:
                out = self.build(sample)
            except (RecordError, ImageDecodeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                reason = exc.reason if isinstance(exc, RecordError) else f"{type(exc).__name__}: {exc}"
                self.skipped[reason.split(":")[0]] += 1
                rid = getattr(exc, "record_id", sample.get("__key__"))
                log.warning("skipping record %r from %s: %s", rid, sample.get("__url__"), reason)
                dropped += 1
                continue
            out["skipped"], dropped = dropped, 0
            yield out


# ---- collation -------------------------------------------------------------------------------------------

def collate_train(samples: list[dict], pad_token_id: int, *, image_token_id: int, num_visual_tokens: int) -> dict:
    """Right-padded teacher-forcing batch. Every sample must hold exactly ``num_visual_tokens`` image ids
    (image records) or none (text-only): anything else means the model would splice features in the wrong place.
    """
    for s in samples:
        count = int((s["input_ids"] == image_token_id).sum())
        expected = num_visual_tokens if s["has_image"] else 0
        if count != expected:
            raise ValueError(f"sample {s['id']!r} has {count} image tokens, expected {expected} "
                             f"(has_image={s['has_image']}, num_visual_tokens={num_visual_tokens})")
    ids = [s["input_ids"] for s in samples]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
        "labels": pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "has_image": torch.tensor([s["has_image"] for s in samples], dtype=torch.bool),
        "ids": [s["id"] for s in samples],
        "skipped": sum(s.get("skipped", 0) for s in samples),
    }


def collate_eval(samples: list[dict], pad_token_id: int, *, image_token_id: int, num_visual_tokens: int) -> dict:
    """Training fields (for val loss) plus LEFT-padded prompts for batched generation: with right padding,
    the first generated token of a short prompt would follow pad tokens instead of ``ASSISTANT:``."""
    batch = collate_train(samples, pad_token_id, image_token_id=image_token_id, num_visual_tokens=num_visual_tokens)
    prompts = [s["prompt_ids"] for s in samples]
    batch["prompt_ids"] = pad_sequence(prompts, batch_first=True, padding_value=pad_token_id, padding_side="left")
    batch["prompt_attention_mask"] = pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True,
                                                  padding_value=0, padding_side="left")
    batch["answers"] = [s["answer"] for s in samples]
    batch["qtypes"] = [s["qtype"] for s in samples]
    return batch


# ---- stream stages ---------------------------------------------------------------------------------------

def take_exactly(src, share: int, what: str):
    """Yield exactly `share` items of `src`, or raise: failing beats leaving the other ranks waiting in a collective."""
    produced = 0
    for item in islice(src, share):
        produced += 1
        yield item
    if produced < share:
        rank, _, worker, _ = pytorch_worker_info()
        raise RuntimeError(f"rank {rank} worker {worker} produced {produced} of {share} {what}: its shards yield no "
                           "usable samples (see the skipped-record warnings)")


class TakeBatches:
    """Cut an endless stream to this rank's planned batches, shared out over the DataLoader workers
    (the loader interleaves them, so the rank sees exactly ``per_rank`` batches)."""

    def __init__(self, per_rank: int):
        self.per_rank = per_rank

    def __call__(self, src):
        _, _, worker, num_workers = pytorch_worker_info()
        share = self.per_rank // num_workers + (worker < self.per_rank % num_workers)
        yield from take_exactly(src, share, "batches")


def split_samples(src):
    """Every (rank, worker) takes every n-th sample: validation stays balanced even with a single val shard."""
    rank, world_size, worker, num_workers = pytorch_worker_info()
    yield from islice(src, rank * num_workers + worker, None, world_size * num_workers)


class EqualShare:
    """Every (rank, worker) keeps exactly ``total // (ranks x workers)`` samples, so every rank runs the same
    number of eval batches; the remainder (fewer than ranks x workers samples) is left out. Needed when the
    weights are sharded (FSDP): each forward all-gathers, and a rank with one batch more would wait forever."""

    def __init__(self, total: int):
        self.total = total

    def __call__(self, src):
        _, world_size, _, num_workers = pytorch_worker_info()
        yield from take_exactly(src, self.total // (world_size * num_workers), "eval samples")


# ---- datamodule ------------------------------------------------------------------------------------------

class ShardDataModule(L.LightningDataModule):
    """Train: endless shuffled stream cut to ``steps_per_epoch`` batches per rank. Val: one ordered pass whose
    batches hold the training fields (val loss) plus left-padded prompts, reference ``answers`` and ``qtypes``.
    ``train_dir``/``val_dir`` are shard directories made by :func:`lightning_sp.data.shards.convert`."""

    def __init__(self, train_dir, val_dir=None, tokenizer=None, template: str = "vicuna_v1",
                 num_visual_tokens: int = 582, image_size: int = 336, batch_size: int = 16,
                 val_batch_size: int = 32, num_workers: int = 1, shuffle_buffer: int = 500,
                 max_length: int | None = 2048, seed: int = 0, equal_val_shares: bool = False):
        super().__init__()
        if tokenizer is None:
            raise ValueError("ShardDataModule needs a tokenizer (object or path for load_tokenizer)")
        if max_length is not None and max_length <= num_visual_tokens:
            raise ValueError(f"max_length={max_length} leaves no room for text after {num_visual_tokens} visual "
                             "tokens; raise data.max_length")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.train_dir, self.val_dir = Path(train_dir), Path(val_dir) if val_dir else None
        self.template, self.num_visual_tokens, self.image_size = template, num_visual_tokens, image_size
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.shuffle_buffer, self.max_length, self.seed = shuffle_buffer, max_length, seed
        self.equal_val_shares = equal_val_shares  # see EqualShare; train.py sets it for trainer.strategy=fsdp
        self.steps_per_epoch: int | None = None
        self.train_index = self.val_index = None

    def _collate_kwargs(self) -> dict:
        return {"pad_token_id": self.tokenizer.pad_token_id, "num_visual_tokens": self.num_visual_tokens,
                "image_token_id": self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}

    def _world_size(self) -> int:
        """As the trainer sees it, else as WebDataset's node splitter will (RANK/WORLD_SIZE or torch.distributed)."""
        return self.trainer.world_size if self.trainer is not None else pytorch_worker_info()[1]

    def setup(self, stage: str | None = None) -> None:
        self.train_index = load_index(self.train_dir)
        self.val_index = load_index(self.val_dir) if self.val_dir else None
        world_size = self._world_size()
        self.steps_per_epoch = self.train_index["totals"]["samples"] // (self.batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.train_dir} has {self.train_index['totals']['samples']} samples: fewer than "
                             f"one batch ({self.batch_size}) per rank ({world_size} ranks)")

    def _loader(self, dataset) -> wds.WebLoader:
        if self.num_workers > 0:
            # Workers fork after the tokenizer has been used; its own thread pool would only warn and turn off.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return wds.WebLoader(dataset, batch_size=None, num_workers=self.num_workers,
                             persistent_workers=self.num_workers > 0)

    def _urls(self, directory: Path, index: dict) -> list[str]:
        return [str(directory / s["name"]) for s in index["shards"] if s["samples"] > 0]

    def train_dataloader(self):
        if self.train_index is None:
            self.setup("fit")
        urls = self._urls(self.train_dir, self.train_index)
        world_size = self._world_size()
        needed = world_size * max(1, self.num_workers)
        if len(urls) < needed:
            raise ValueError(
                f"{self.train_dir} has {len(urls)} non-empty shards but {world_size} ranks x "
                f"{max(1, self.num_workers)} workers need at least {needed}: re-run shards.convert with a smaller "
                "shard_size, or lower data.num_workers"
            )
        # Shards are split over ranks/workers first, then shuffled within each; detshuffle reshuffles each pass.
        dataset = wds.WebDataset(urls, handler=wds.warn_and_continue, nodesplitter=wds.split_by_node,
                                 workersplitter=wds.split_by_worker, shardshuffle=len(urls), detshuffle=True,
                                 seed=self.seed, empty_check=False)
        if self.shuffle_buffer > 1:
            dataset = dataset.compose(wds.detshuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                                     seed=self.seed))
        builder = SampleBuilder(self.tokenizer, self.template, self.num_visual_tokens, self.image_size,
                                self.max_length)
        dataset = dataset.compose(builder).batched(
            self.batch_size, collation_fn=partial(collate_train, **self._collate_kwargs()), partial=False)
        dataset = dataset.repeat()  # endless passes; TakeBatches decides where an epoch ends
        stream = wds.DataPipeline(dataset, TakeBatches(self.steps_per_epoch))
        return self._loader(stream).with_length(self.steps_per_epoch, silent=True)

    def val_dataloader(self):
        if self.val_dir is None:
            return []
        if self.val_index is None:
            self.setup("validate")
        dataset = wds.WebDataset(self._urls(self.val_dir, self.val_index), handler=wds.warn_and_continue,
                                 nodesplitter=None, workersplitter=None, shardshuffle=False, empty_check=False)
        builder = SampleBuilder(self.tokenizer, self.template, self.num_visual_tokens, self.image_size,
                                self.max_length, for_eval=True)
        dataset = dataset.compose(split_samples, builder)
        if self.equal_val_shares:
            dataset = dataset.compose(EqualShare(self.val_index["totals"]["samples"]))
        dataset = dataset.batched(
            self.val_batch_size, collation_fn=partial(collate_eval, **self._collate_kwargs()), partial=True)
        return self._loader(dataset)
