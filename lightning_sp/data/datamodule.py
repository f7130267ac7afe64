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

import json
import logging
import os
from collections import Counter
from functools import partial
from itertools import islice
from pathlib import Path, PurePosixPath

import lightning as L
import torch
import webdataset as wds
from torch.nn.utils.rnn import pad_sequence
from webdataset.utils import pytorch_worker_info

from lightning_sp.data.conversation import (
    IGNORE_INDEX,
    RecordEncoder,
    RecordError,
    expanded_prompt_ids,
    expand_image_token,
    reference_answer,
    supervised_logit_positions,
)
from lightning_sp.data.images import DEFAULT_STATS, ImageDecodeError, ImageProcessor, ImageStats
from lightning_sp.data import locations
from lightning_sp.data.shards import load_index
from lightning_sp.data.tokenizer import IMAGE_TOKEN, load_tokenizer
from lightning_sp.thirdparty.torch_internals import shared_empty
from lightning_sp.data.train_stream import StreamPosition, TrainStream, take_exactly
from lightning_sp.ranks import gather_objects

log = logging.getLogger(__name__)


# ---- samples ---------------------------------------------------------------------------------------------


class SampleBuilder:
    """Pipeline stage: raw shard samples -> model-ready sample dicts; drops (and counts) unusable records.

    Each yielded sample carries ``skipped`` and ``skipped_reasons``: what was dropped in this process since the
    previous yielded sample. :meth:`shard_error` is the WebDataset handler for shards that cannot be read to the
    end; it counts ``bad_shard`` into the same tally.

    ``batch_size``: the batcher downstream takes every ``batch_size`` consecutive samples of this builder as a batch
    (TrainStream; for eval it only sizes the buffer). Each returned sample's ``pixel_values`` is then written straight
    into its slot of a ``(batch_size, 3, S, S)`` buffer (one new buffer per batch, in shared memory inside a
    DataLoader worker, as ``default_collate`` does), and :func:`collate_train` hands that buffer on instead of
    copying the samples with ``torch.stack`` -- the same numbers without the copy; other groupings are stacked as
    usual. In training, the builder also reads the raw samples the current batch still needs together and tokenises
    them before decoding their images (see :meth:`_chunks`): never more raw samples than one-by-one building reads
    before the batch completes, so the stream positions, the batches and their skip counts are unchanged.
    """

    def __init__(
        self,
        tokenizer,
        template: str,
        num_visual_tokens: int,
        image_size: int,
        max_length: int | None,
        for_eval: bool = False,
        batch_size: int | None = None,
        image_stats: ImageStats | None = None,
    ):
        self.tokenizer, self.template, self.for_eval = tokenizer, template, for_eval
        self.num_visual_tokens, self.max_length = num_visual_tokens, max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.processor = ImageProcessor(image_size, *(image_stats or DEFAULT_STATS))
        self.image_size = image_size
        self.batch_size = batch_size if batch_size and batch_size > 0 else None
        self._slab: torch.Tensor | None = None  # this batch's pixel buffer; samples returned so far fill its slots
        self._slot = 0
        self._encoder: RecordEncoder | None = None  # made on the first record (checks the tokenizer once)
        self.skipped: Counter = Counter()  # reason -> count, in this process (each DataLoader worker has its own)
        self._pending: Counter = Counter()  # reason -> count since the last yielded sample

    def _pixel_slot(self) -> torch.Tensor:
        """Where the sample being built writes its pixels: the next free slot of the batch buffer (a fresh tensor
        without ``batch_size``). A slot is used up only when the sample is whole (see :meth:`_slot_used`), so
        a record that fails half-way leaves it to the next one."""
        shape = (3, self.image_size, self.image_size)
        if self.batch_size is None:
            return torch.empty(shape)
        if self._slab is None:
            if torch.utils.data.get_worker_info() is not None:
                # In a worker the batch crosses to the main process by shared memory: allocating it there saves
                # the copy that pickling a private tensor makes (default_collate does the same).
                self._slab = shared_empty(self.batch_size, *shape)
            else:
                self._slab = torch.empty(self.batch_size, *shape)
        return self._slab[self._slot]

    def _slot_used(self) -> None:
        if self.batch_size is not None:
            self._slot += 1
            if self._slot == self.batch_size:  # full: the next sample starts the next batch's buffer
                self._slab, self._slot = None, 0

    def _encode(self, record: dict, max_length: int | None):
        """conversation.encode(record, tokenizer, template, max_length), the tokenizer checked once per builder."""
        if self._encoder is None:  # raises here, on the first record, exactly as encode() would
            self._encoder = RecordEncoder(self.tokenizer, self.template)
        return self._encoder(record, max_length)

    def _prepare(self, sample: dict) -> tuple:
        """The text half of building a sample: checks, JSON, tokenisation and label mask."""
        key = sample.get("__key__")
        if not isinstance(key, str) or key.startswith("/") or ".." in PurePosixPath(key).parts:
            # Shards are read in memory, never extracted; still, our converter writes flat names only, so such a
            # member means a shard from elsewhere that an extracting tool would write outside its folder.
            raise RecordError(
                key,
                "tar member name is absolute or contains '..'",
                "rebuild the shard with python -m lightning_sp convert",
                code="unsafe_member_name",
            )
        if "json" not in sample:  # e.g. an image member whose record was lost to a truncated shard
            raise RecordError(
                key, f"sample has no .json member (has: {sorted(k for k in sample if k[:2] != '__')})", code="malformed"
            )
        record = json.loads(sample["json"])
        if not isinstance(record, dict):
            raise RecordError(key, f"record is a JSON {type(record).__name__}, not an object", code="malformed")
        rid = record.setdefault("id", key)  # so that every message names the record
        image_bytes = next((v for k, v in sample.items() if not k.startswith("__") and k != "json"), None)
        max_length = self.max_length
        if record.get("image"):
            if image_bytes is None:
                raise RecordError(rid, "record names an image but the shard holds none", code="image_missing")
            if max_length is not None:  # encode() counts <image> as one token; bound the expanded length
                max_length -= self.num_visual_tokens - 1
        return record, rid, image_bytes, self._encode(record, max_length)

    def _finish(self, record: dict, rid, image_bytes, enc) -> dict:
        """The image half of building a sample, and the sample dict."""
        pixel_values = self._pixel_slot()
        if enc.has_image:
            try:
                self.processor(image_bytes, out=pixel_values)
            except ImageDecodeError as exc:
                raise RecordError(
                    rid, f"image: {exc}", "replace the image or drop the record", code=f"image_{exc.reason}"
                ) from None
        else:
            pixel_values.zero_()
        input_ids, labels = expand_image_token(enc.input_ids, enc.labels, self.image_token_id, self.num_visual_tokens)
        out = {
            "id": str(rid),
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "has_image": enc.has_image,
        }
        if self.for_eval:
            out["prompt_ids"] = expanded_prompt_ids(record, self.tokenizer, self.template, self.num_visual_tokens)
            out["answer"] = reference_answer(record) or ""
            out["qtype"] = str(record.get("qtype", "all"))
        self._slot_used()
        return out

    def _count(self, reason: str) -> None:
        self.skipped[reason] += 1
        self._pending[reason] += 1

    def records_lost(self, url: str, n: int) -> None:
        """A shard ended ``n`` samples short of its index count (truncated): count them as skipped records."""
        self.skipped["lost_in_bad_shard"] += n
        self._pending["lost_in_bad_shard"] += n
        log.warning("shard %s ended %d records short of its index.json count (reason lost_in_bad_shard)", url, n)

    def discard_pending(self) -> None:
        """Forget what was counted since the last yielded sample: a resume's replay re-meets shard-level events
        (a truncated tar) that the interrupted run already counted, and its checkpoint holds those counts."""
        self.skipped -= self._pending
        self._pending.clear()

    def shard_error(self, exn: Exception) -> bool:
        """WebDataset handler: log, count ``bad_shard``, go on with the next shard (True = continue)."""
        args = getattr(exn, "args", ())
        # WebDataset appends the shard url to the args when a whole shard fails (cannot be opened, or a truncated
        # tar); an error inside one tar member is reported first without it, then again with it: count once.
        url = args[-1] if len(args) > 1 and isinstance(args[-1], str) else None
        message = f"{type(exn).__name__}: {args[0] if args and isinstance(args[0], str) else exn}"
        if url is None:
            log.warning("read error inside a shard (reading on): %s", message)
            return True
        self._count("bad_shard")
        log.warning("skipping the rest of shard %s in this pass (reason bad_shard): %s", url, message)
        return True

    def _chunks(self, src):
        """``src`` as lists of raw samples. Training (``batch_size`` set): each list holds the raw samples the
        current batch still needs, ``batch_size`` minus the samples it has -- the least that can complete it, so
        nothing is read before the batch needs it: the raw-sample count a batch is completed at (its
        ``stream_position``) stays what one-by-one reading gives. Otherwise one sample at a time."""
        if self.batch_size is None or self.for_eval:  # eval: EqualShare may stop mid-batch; read no further
            for sample in src:
                yield [sample]
            return
        src = iter(src)
        while chunk := list(islice(src, self.batch_size - self._slot)):
            yield chunk

    def __call__(self, src):
        for chunk in self._chunks(src):
            # All records' text first, then all images: tokenising among the images' megabyte buffers runs from
            # evicted caches (0.1-0.3 ms/sample on a busy host). Errors are kept and dealt with in stream order,
            # so skip counts, messages and the samples yielded are those of building one sample at a time.
            prepared = []
            for sample in chunk:
                try:
                    prepared.append((sample, self._prepare(sample), None))
                except Exception as exc:  # noqa: BLE001 -- raised (or counted) below, at the record's turn
                    prepared.append((sample, None, exc))
            for sample, state, error in prepared:
                try:
                    if error is not None:
                        raise error
                    out = self._finish(*state)
                except (RecordError, UnicodeError, json.JSONDecodeError) as exc:
                    if isinstance(exc, RecordError):
                        rid, reason, detail = exc.record_id, exc.code, str(exc)
                    else:  # the .json member itself: not UTF-8, or not JSON
                        rid, detail = sample.get("__key__"), f"{type(exc).__name__}: {exc}"
                        reason = "not_utf8" if isinstance(exc, UnicodeError) else "bad_json"
                    self._count(reason)
                    log.warning(
                        "skipping record %r from %s (reason %s): %s", rid, sample.get("__url__"), reason, detail
                    )
                    continue
                out["skipped"], out["skipped_reasons"] = sum(self._pending.values()), dict(self._pending)
                self._pending.clear()
                yield out


# ---- collation -------------------------------------------------------------------------------------------


def collate_train(samples: list[dict], pad_token_id: int, *, image_token_id: int, num_visual_tokens: int) -> dict:
    """Right-padded teacher-forcing batch. Every sample must hold exactly ``num_visual_tokens`` image ids
    (image records) or none (text-only): anything else means the model would splice features in the wrong place.
    """
    ids = [s["input_ids"] for s in samples]
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_token_id)
    labels = pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX)
    if pad_token_id != image_token_id:
        # Counted on the padded matrices, two ops per batch rather than per sample: pads are neither image ids
        # nor supervised labels, so each row's counts are its sample's.
        counts = (input_ids == image_token_id).sum(1).tolist()
        supervised = (labels != IGNORE_INDEX).any(1).tolist()
    else:
        counts = [int((s["input_ids"] == image_token_id).sum()) for s in samples]
        supervised = [bool((s["labels"] != IGNORE_INDEX).any()) for s in samples]
    reasons: Counter = Counter()
    for s, count, has_label in zip(samples, counts, supervised):
        expected = num_visual_tokens if s["has_image"] else 0
        if count != expected:
            raise ValueError(
                f"sample {s['id']!r} has {count} image tokens, expected {expected} "
                f"(has_image={s['has_image']}, num_visual_tokens={num_visual_tokens})"
            )
        if not has_label:  # encode() refuses these; a silent zero loss otherwise
            raise ValueError(f"sample {s['id']!r} has no supervised token (every label is {IGNORE_INDEX})")
        reasons.update(s.get("skipped_reasons", {}))
    # = pad_sequence of ones_like(ids) (samples are 1-D): 1 up to each length, then 0, in the ids' dtype
    lengths = torch.tensor([len(i) for i in ids])
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).to(input_ids.dtype)
    pixels = [s["pixel_values"] for s in samples]
    pixel_values = _filled_buffer(pixels)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "logit_positions": supervised_logit_positions(labels),  # here, on the host: no sync in the model
        "pixel_values": torch.stack(pixels) if pixel_values is None else pixel_values,
        "has_image": torch.tensor([s["has_image"] for s in samples], dtype=torch.bool),
        "ids": [s["id"] for s in samples],
        "skipped": sum(s.get("skipped", 0) for s in samples),
        "skipped_reasons": dict(reasons),
    }


def _filled_buffer(pixels: list[torch.Tensor]) -> torch.Tensor | None:
    """The buffer whose slots ``pixels`` are, in order and exactly (SampleBuilder writes them so), else None. That
    buffer holds what ``torch.stack(pixels)`` would return, so the batch needs no copy."""
    base = pixels[0]._base if pixels else None
    if base is None or not base.is_contiguous() or tuple(base.shape) != (len(pixels), *pixels[0].shape):
        return None
    step = base.stride(0) * base.element_size()
    if all(
        p._base is base
        and p.is_contiguous()
        and p.dtype == base.dtype
        and p.device == base.device
        and p.data_ptr() == base.data_ptr() + i * step
        for i, p in enumerate(pixels)
    ):
        return base
    return None


def left_padded_prompts(prompts: list[torch.Tensor], pad_token_id: int) -> dict:
    """``prompt_ids`` and ``prompt_attention_mask`` of a batch of 1-D prompts, LEFT-padded for batched generation:
    with right padding, the first generated token of a short prompt would follow pad tokens instead of the prompt's
    end (``ASSISTANT:``). The one place prompts are batched (validation and ``evaluate``)."""
    return {
        "prompt_ids": pad_sequence(prompts, batch_first=True, padding_value=pad_token_id, padding_side="left"),
        "prompt_attention_mask": pad_sequence(
            [torch.ones_like(p) for p in prompts], batch_first=True, padding_value=0, padding_side="left"
        ),
    }


def collate_eval(samples: list[dict], pad_token_id: int, *, image_token_id: int, num_visual_tokens: int) -> dict:
    """Training fields (for val loss) plus left-padded prompts (:func:`left_padded_prompts`)."""
    batch = collate_train(samples, pad_token_id, image_token_id=image_token_id, num_visual_tokens=num_visual_tokens)
    batch.update(left_padded_prompts([s["prompt_ids"] for s in samples], pad_token_id))
    batch["answers"] = [s["answer"] for s in samples]
    batch["qtypes"] = [s["qtype"] for s in samples]
    return batch


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
        and vision backbone), so they have no defaults; ``image_stats``: the vision backbone's (mean, std)
        normalisation (default CLIP's)."""
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
        dataset = wds.WebDataset(
            self._urls(self.val_dir, self.val_index),
            handler=builder.shard_error,
            nodesplitter=None,
            workersplitter=None,
            shardshuffle=False,
            empty_check=False,
        )
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
