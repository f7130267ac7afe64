"""WebDataset LightningDataModule: shards (see shards.py) -> padded, image-expanded training and eval batches.

Multi-rank training with WebDataset hangs when one rank runs out of data before the others (the others wait
in a collective forever). Here the train stream repeats its shards without end and every (rank, worker) is
cut to a planned number of batches, computed from the sample counts in ``index.json``, so every rank yields
exactly ``steps_per_epoch`` batches whatever the shard sizes or the records skipped on the way. An epoch is
therefore about one pass, not exactly one: each epoch starts a fresh, reshuffled pass over the rank's shards.
The stream is a function of (seed, epoch) and checkpoints hold its position, so a resumed run trains on exactly
the batches an uninterrupted one would (lightning_sp/data/train_stream.py).

Bad records (``RecordError`` from the conversation encoder, bad images, non-UTF-8 or invalid JSON) and unreadable
shards (a truncated tar) are skipped, counted and logged with the record id, shard and reason, never fatal: each
batch carries ``skipped`` and ``skipped_reasons`` ({reason: count}), what its worker dropped since its previous
batch. ``callbacks.SkipLimit`` stops a run whose skipped fraction exceeds ``data.max_skipped_fraction``.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.data import locations
from lightning_sp.data.collate import collate_eval, collate_train
from lightning_sp.data.images import ImageStats
from lightning_sp.data.samples import SampleBuilder
from lightning_sp.data.shards import load_index
from lightning_sp.data.tokenizer import load_tokenizer
from lightning_sp.data.train_stream import StreamPosition, TrainStream, take_exactly
from lightning_sp.ranks import gather_objects

log = logging.getLogger(__name__)


# ---- stream stages ---------------------------------------------------------------------------------------


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

    def __init__(
        self,
        train_dir,
        val_dir=None,
        tokenizer=None,
        template: str = "vicuna_v1",
        *,
        num_visual_tokens: int,
        image_size: int,
        batch_size: int = 16,
        val_batch_size: int = 32,
        num_workers: int = 1,
        shuffle_buffer: int = 500,
        max_length: int | None = 2048,
        seed: int = 0,
        equal_val_shares: bool = False,
        length_group_batches: int = 1,
        image_stats: ImageStats | None = None,
    ):
        """``num_visual_tokens`` (SP + patch tokens per image) and ``image_size`` come from the model (its projector
        and vision backbone), so they have no defaults. ``template`` (the config's ``stage.template``) and
        ``image_stats`` (the vision backbone's (mean, std) normalisation, ``image_stats(cfg.model.vision)``) come from
        the config too: ``train.build_datamodule`` passes both. Their defaults, LLaVA-1.5's ``vicuna_v1`` and CLIP's
        stats (``images.DEFAULT_STATS``), serve direct use of this class (tests, benchmarks/input_bench.py) only."""
        super().__init__()
        self.image_stats = image_stats
        if tokenizer is None:
            raise ValueError("ShardDataModule needs a tokenizer (object or path for load_tokenizer)")
        if max_length is not None and max_length <= num_visual_tokens:
            raise ValueError(
                f"max_length={max_length} leaves no room for text after {num_visual_tokens} visual "
                "tokens; raise data.max_length"
            )
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        # A directory or a URL (data/locations.py): shards stream from either, nothing copied.
        self.train_dir = locations.normalise(train_dir)
        self.val_dir = locations.normalise(val_dir) if val_dir else None
        self.template, self.num_visual_tokens, self.image_size = template, num_visual_tokens, image_size
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.shuffle_buffer, self.max_length, self.seed = shuffle_buffer, max_length, seed
        if length_group_batches < 1:
            raise ValueError(f"length_group_batches must be >= 1 (1 = off), got {length_group_batches}")
        self.length_group_batches = length_group_batches  # TrainStream.group_batches: LLaVA's length grouping
        self.equal_val_shares = equal_val_shares  # see EqualShare; train.py sets it for trainer.strategy=fsdp
        self.steps_per_epoch: int | None = None
        self.train_index = self.val_index = None
        self.position = StreamPosition()  # of the batches trained so far; saved in checkpoints
        self._resume: StreamPosition | None = None  # restored from a checkpoint, used by the next train epoch

    def _collate_kwargs(self) -> dict:
        return {
            "pad_token_id": self.tokenizer.pad_token_id,
            "num_visual_tokens": self.num_visual_tokens,
            "image_token_id": self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        }

    def _world_size(self) -> int:
        """As the trainer sees it, else as WebDataset's node splitter will (RANK/WORLD_SIZE or torch.distributed)."""
        return self.trainer.world_size if self.trainer is not None else pytorch_worker_info()[1]

    def setup(self, stage: str | None = None) -> None:
        self.train_index = load_index(self.train_dir)
        self.val_index = load_index(self.val_dir) if self.val_dir else None
        world_size = self._world_size()
        self.steps_per_epoch = self.train_index["totals"]["samples"] // (self.batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.train_dir} has {self.train_index['totals']['samples']} samples: fewer than "
                f"one batch ({self.batch_size}) per rank ({world_size} ranks)"
            )

    def _loader(self, dataset) -> wds.WebLoader:
        if self.num_workers > 0:
            # Workers fork after the tokenizer has been used; its own thread pool would only warn and turn off.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # A loader of its own seeds its workers without drawing from the global RNG, which training owns
        # (dropout): creating a val loader must not shift the random stream a resumed run replays.
        return wds.WebLoader(
            dataset, batch_size=None, num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed)
        )

    def _urls(self, directory, index: dict) -> list[str]:
        return [locations.join(directory, s["name"]) for s in index["shards"] if s["samples"] > 0]

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
        return EpochLoader(self, urls)

    def train_epoch(self, urls: list[str], epoch: int) -> wds.WebLoader:
        """The loader of one training epoch; continues from the restored position when it is in this epoch."""
        resume, self._resume = self._resume, None
        if resume is not None and resume.batches >= self.steps_per_epoch:  # saved as an epoch ended
            resume = None if epoch > resume.epoch else StreamPosition(epoch=resume.epoch + 1)
        if resume is not None and resume.epoch != epoch:
            raise RuntimeError(
                f"the checkpoint's data stream stands in epoch {resume.epoch}, the trainer resumes "
                f"in epoch {epoch}: cannot continue the stream exactly"
            )
        self.position = resume or StreamPosition(epoch=epoch)
        builder = SampleBuilder(
            self.tokenizer,
            self.template,
            self.num_visual_tokens,
            self.image_size,
            self.max_length,
            batch_size=self.batch_size,
            image_stats=self.image_stats,
        )
        stream = TrainStream(
            urls,
            seed=self.seed,
            epoch=epoch,
            per_rank=self.steps_per_epoch,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            builder=builder,
            collate=partial(collate_train, **self._collate_kwargs()),
            handler=builder.shard_error,
            resume=resume,
            on_lost=builder.records_lost,
            on_replayed=builder.discard_pending,
            group_batches=self.length_group_batches,
            expected_samples={
                locations.join(self.train_dir, s["name"]): s["samples"] for s in self.train_index["shards"]
            },
        )
        return self._loader(stream)

    # ---- exact resume: the position of the batches trained so far travels in the checkpoint --------------
    def on_before_batch_transfer(self, batch, dataloader_idx):
        if self.trainer is not None and self.trainer.training and "stream_position" in batch:
            self.position.advance(*batch["stream_position"])
        return batch

    def state_dict(self) -> dict:
        # Every rank streams its own shards, so the checkpoint (written by rank 0) needs every rank's position.
        # Lightning builds checkpoint contents on all ranks together, so a collective is safe here.
        return {
            "stream_positions": gather_objects(self.position.state_dict()),
            "steps_per_epoch": self.steps_per_epoch,
            "num_workers": self.num_workers,
            "length_group_batches": self.length_group_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        if "stream_positions" not in state:
            return
        positions = [StreamPosition.from_state(p) for p in state["stream_positions"]]
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if any(p.batches for p in positions):  # stopped mid-epoch: the stream must continue identically
            changed = {
                key: (was, now)
                for key, was, now in (
                    ("ranks", len(positions), self._world_size()),
                    ("data.num_workers", state["num_workers"], self.num_workers),
                    ("steps per epoch", state["steps_per_epoch"], self.steps_per_epoch),
                    ("data.length_group_batches", state.get("length_group_batches", 1), self.length_group_batches),
                )
                if was != now
            }
            if changed:
                raise ValueError(
                    f"the checkpoint stopped mid-epoch and the data layout changed since (was, now): "
                    f"{changed}; resume with the same devices, data.num_workers, data.batch_size, "
                    "data.length_group_batches and shards, or from a checkpoint written at the end of "
                    "an epoch"
                )
        self.resume_at(positions[rank] if rank < len(positions) else StreamPosition(epoch=positions[0].epoch))

    def resume_at(self, position: StreamPosition | None) -> None:
        """Let the next training epoch's stream continue from ``position`` (this rank's; what
        :meth:`load_state_dict` does with a checkpoint's), or start it afresh with None."""
        self._resume = position

    def val_dataloader(self):
        if self.val_dir is None:
            return []
        if self.val_index is None:
            self.setup("validate")
        builder = SampleBuilder(
            self.tokenizer,
            self.template,
            self.num_visual_tokens,
            self.image_size,
            self.max_length,
            for_eval=True,
            batch_size=self.val_batch_size,
            image_stats=self.image_stats,
        )
        dataset = locations.ShardDataset(self._urls(self.val_dir, self.val_index), handler=builder.shard_error)
        dataset = dataset.compose(split_samples, builder)
        if self.equal_val_shares:
            dataset = dataset.compose(EqualShare(self.val_index["totals"]["samples"]))
        dataset = dataset.batched(
            self.val_batch_size, collation_fn=partial(collate_eval, **self._collate_kwargs()), partial=True
        )
        return self._loader(dataset)


class EpochLoader:
    """What `train_dataloader` returns: each `iter()` (Lightning calls it once per epoch) builds that epoch's
    loader, so the stream is a function of the epoch number rather than of worker-process history."""

    def __init__(self, datamodule: ShardDataModule, urls: list[str]):
        self.datamodule, self.urls = datamodule, urls
        self.next_epoch = 0  # without a Trainer (scripts, tests): each pass over the loader is the next epoch

    def __len__(self) -> int:
        return self.datamodule.steps_per_epoch

    def __iter__(self):
        # A generator, so nothing is built until the first batch is asked for: Lightning also calls iter() just
        # to check that the loader is iterable, which must not use up the resume position.
        trainer = self.datamodule.trainer
        epoch = trainer.current_epoch if trainer is not None else self.next_epoch
        self.next_epoch = epoch + 1
        yield from self.datamodule.train_epoch(self.urls, epoch)
