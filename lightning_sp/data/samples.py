"""One WebDataset sample (a record's JSON and image bytes) -> a training or eval sample: checks, tokenisation and
label mask (conversation.RecordEncoder), the image written into its slot of the batch's pixel buffer. A bad record
is skipped, counted and logged with its id, shard and reason (see datamodule.py), never fatal."""

from __future__ import annotations

import json
import logging
from collections import Counter
from itertools import islice
from pathlib import PurePosixPath

import torch

from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.data.conversation import (
    RecordEncoder,
    RecordError,
    expand_image_token,
    expanded_prompt_ids,
    reference_answer,
)
from lightning_sp.data.images import DEFAULT_STATS, ImageDecodeError, ImageProcessor, ImageStats
from lightning_sp.thirdparty.torch_internals import shared_empty

log = logging.getLogger(__name__)


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
