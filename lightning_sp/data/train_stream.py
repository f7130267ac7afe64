"""The training stream: a pure function of (seed, epoch), resumable mid-epoch at the exact next batch.

Each (rank, worker) streams its own shards (split by rank, then by worker), reshuffled for every pass with an RNG
seeded by (seed, epoch, pass, rank, worker) and repeated without end, through a shuffle buffer seeded the same
way, into the SampleBuilder and the batcher; it stops after its share of the rank's planned batches (so every
rank runs the same number of steps whatever its shards hold). WebDataset's own ``detshuffle`` counts epochs
inside each worker process, which a restarted process cannot reproduce; seeding from the epoch number can.

Every batch carries ``stream_position = (worker, raw_samples_read)``: how many raw samples that worker had read
(bad records included) when the batch was complete. A :class:`StreamPosition` remembers, for the batches the
model has *trained on*, the last position of each worker and how many batches the epoch has used; a checkpoint
stores it. Resuming replays each worker's raw samples up to its position -- tar reads and the shuffle buffer
only, no image decode or tokenisation -- and goes on with the next batch. The DataLoader's workers are rotated
so that the resumed run takes batches in the uninterrupted run's order (worker ``i`` of the loader plays
worker ``(i + batches) % workers`` of the epoch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import count, islice
from typing import Callable, Iterable, Iterator

import webdataset as wds
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

from lightning_sp.data import locations


@dataclass
class StreamPosition:
    """Where a rank's training stream stands: the epoch, the batches trained in it, and per worker the raw
    samples read up to its last trained batch."""

    epoch: int = 0
    batches: int = 0
    raw: dict[int, int] = field(default_factory=dict)

    def advance(self, worker: int, raw_samples_read: int) -> None:
        self.batches += 1
        self.raw[int(worker)] = int(raw_samples_read)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.batches, "raw": dict(self.raw)}

    @classmethod
    def from_state(cls, state: dict) -> "StreamPosition":
        return cls(int(state["epoch"]), int(state["batches"]), {int(k): int(v) for k, v in state["raw"].items()})


def worker_share(per_rank: int, worker: int, num_workers: int) -> int:
    """Batches worker ``worker`` contributes to a rank's ``per_rank``: the loader takes them round-robin."""
    return per_rank // num_workers + (worker < per_rank % num_workers)


class TrainStream(IterableDataset):
    """One epoch of one rank's training batches (an iterable for ``wds.DataPipeline``/``WebLoader``).

    ``builder`` turns raw samples into model samples (dropping bad ones), ``collate`` turns a list of them into a
    batch; ``resume`` is the position to continue from (same epoch), or None to start the epoch afresh.
    ``on_lost(url, n)`` hears of ``n`` samples a shard did not yield against ``expected_samples[url]``;
    ``on_replayed()`` is called once a resume's replay is done: shard-level events met while replaying (``handler``,
    ``on_lost``) were counted by the run that trained on those samples, so the listener drops them.

    ``group_batches > 1`` batches by modality and length (LLaVA's ``group_by_modality_length``, per rank and
    worker, see :func:`length_grouped`): every ``group_batches * batch_size`` consecutive samples are batched
    together, and a batch's stream position is the raw count at its group's start (its group's end for the
    group's last batch), so a resume rebuilds a partly trained group and skips the batches already trained.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        seed: int,
        epoch: int,
        per_rank: int,
        batch_size: int,
        shuffle_buffer: int,
        builder: Callable[[Iterable[dict]], Iterator[dict]],
        collate: Callable[[list[dict]], dict],
        handler: Callable[[Exception], bool],
        resume: StreamPosition | None = None,
        expected_samples: dict[str, int] | None = None,
        on_lost: Callable[[str, int], None] | None = None,
        on_replayed: Callable[[], None] | None = None,
        group_batches: int = 1,
    ):
        self.urls, self.seed, self.epoch, self.per_rank = list(urls), seed, epoch, per_rank
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.builder, self.collate, self.handler = builder, collate, handler
        self.resume = resume if resume is not None and resume.batches > 0 else None
        self.expected_samples, self.on_lost = expected_samples or {}, on_lost  # per url, from index.json
        self.on_replayed = on_replayed
        if group_batches < 1:
            raise ValueError(f"group_batches must be >= 1, got {group_batches}")
        self.group_batches = group_batches

    def _rng(self, *parts) -> random.Random:
        return random.Random("/".join(str(p) for p in (self.seed, self.epoch, *parts)))

    def __iter__(self) -> Iterator[dict]:
        rank, world_size, loader_worker, num_workers = pytorch_worker_info()
        done = self.resume.batches if self.resume else 0
        worker = (loader_worker + done) % num_workers  # see the module docstring: keeps the batch order
        skip_batches = worker_share(done, worker, num_workers)
        skip_raw = self.resume.raw.get(worker, 0) if self.resume else 0  # layout checked on load (datamodule)
        shards = self.urls[rank::world_size][worker::num_workers]
        unpacked = read = 0  # raw samples out of the tars / out of the shuffle buffer

        def unpack(urls: list[str]) -> Iterator[dict]:
            nonlocal unpacked
            for url in urls:
                found = 0
                for sample in locations.tar_samples([{"url": url}], handler=self.handler):
                    unpacked += 1
                    found += 1
                    yield sample
                expected = self.expected_samples.get(url)
                if expected is not None and found < expected and self.on_lost is not None:
                    self.on_lost(url, expected - found)  # a truncated tar ends early: count what it lost

        def passes() -> Iterator[dict]:
            # Shuffled pass after pass, each drained before the next starts, so that no record comes twice
            # within an epoch unless the epoch is longer than a pass (when many records are skipped).
            for n in count():
                before = unpacked
                order = list(shards)
                self._rng("shards", n, rank, worker).shuffle(order)
                samples = unpack(order)
                if self.shuffle_buffer > 1:
                    samples = wds.shuffle(
                        self.shuffle_buffer, initial=self.shuffle_buffer, rng=self._rng("samples", n, rank, worker)
                    )(samples)
                yield from samples
                if unpacked == before:  # a whole pass without one sample: repeating would spin forever
                    raise RuntimeError(f"rank {rank} worker {worker}: its shards {shards} yield no samples")

        def counted(samples: Iterable[dict]) -> Iterator[dict]:
            nonlocal read
            for sample in samples:
                read += 1
                yield sample

        samples = counted(passes())
        for _ in islice(samples, skip_raw):  # replay up to the resume position: raw bytes only
            pass
        if skip_raw and self.on_replayed is not None:
            self.on_replayed()
        share = worker_share(self.per_rank, worker, num_workers) - skip_batches

        def positioned() -> Iterator[dict]:
            # Not wds.batched: it emits a batch only when the sample after it arrives, so `read` would already
            # count one sample of the next batch.
            batch = []
            for sample in self.builder(samples):
                batch.append(sample)
                if len(batch) == self.batch_size:
                    out, batch = self.collate(batch), []
                    out["stream_position"] = (worker, read)
                    yield out

        def grouped() -> Iterator[dict]:
            # The builder reads raw samples a batch at a time (SampleBuilder._chunks), and a group is whole batches:
            # when a group completes, `read` counts exactly the raw samples of this and the earlier groups.
            size, start, group = self.group_batches * self.batch_size, read, []
            trained = skip_batches % self.group_batches  # of the first group, when resuming inside it
            for sample in self.builder(samples):
                group.append(sample)
                if len(group) < size:
                    continue
                end = read
                batches = length_grouped(group, self.batch_size, self._rng("groups", rank, worker, start))
                for i, members in enumerate(batches[trained:], trained):
                    out = self.collate(members)
                    out["stream_position"] = (worker, end if i == len(batches) - 1 else start)
                    yield out
                group, start, trained = [], end, 0

        batches = grouped() if self.group_batches > 1 else positioned()
        yield from take_exactly(batches, share, "batches")


def sample_length(sample: dict) -> int:
    return len(sample["input_ids"])


def length_grouped(samples: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """LLaVA's ``group_by_modality_length`` on one group of samples (a multiple of ``batch_size``): image and
    text-only samples are batched apart, each sorted by length (longest first, stream order among equals), so a
    batch pads to lengths close to its own; the few left over from each modality (fewer than a batch each, a batch
    together) make one mixed batch; the batches are shuffled with ``rng``.

    LLaVA groups megabatches drawn from the whole dataset by one sampler; here every (rank, worker) streams its own
    shards, so a group is that stream's next samples (``data.length_group_batches`` batches of them)."""
    if len(samples) % batch_size:
        raise ValueError(f"a group of {len(samples)} samples is not whole batches of {batch_size}")
    batches, rest = [], []
    for has_image in (True, False):
        pool = sorted((s for s in samples if bool(s["has_image"]) == has_image), key=sample_length, reverse=True)
        whole = len(pool) - len(pool) % batch_size
        batches += [pool[i : i + batch_size] for i in range(0, whole, batch_size)]
        rest += pool[whole:]
    if rest:
        batches.append(rest)
    rng.shuffle(batches)
    return batches


def take_exactly(src: Iterable, share: int, what: str) -> Iterator:
    """Yield exactly `share` items of `src`, or raise: failing beats leaving the other ranks waiting in a collective."""
    produced = 0
    for item in islice(src, share):
        produced += 1
        yield item
    if produced < share:
        rank, _, worker, _ = pytorch_worker_info()
        raise RuntimeError(
            f"rank {rank} worker {worker} produced {produced} of {share} {what}: its shards yield no "
            "usable samples (see the skipped-record warnings)"
        )
