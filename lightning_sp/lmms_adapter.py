"""lmms-eval model adapter: evaluate a lightning_sp checkpoint on any lmms-eval task.

    pip install -e '.[eval]'     # lmms-eval (>= 0.6, 0.7.3 tested) is an optional extra; this module imports without it
    python -m lmms_eval --model lightning_sp --model_args pretrained=runs/pooling/<stamp> \
        --tasks pope,gqa --batch_size 8 --device cuda
    accelerate launch --num_processes 8 -m lmms_eval --model lightning_sp ...    # data parallel, as llava_hf

lmms-eval finds the model through its manifest registry: the package's ``lmms_eval.models`` entry point names
``lightning_sp.lmms_manifest:manifest``. ``pretrained`` is a run directory, a ``.ckpt`` or an imported official
checkpoint (whatever ``eval ckpt=`` takes); batch size and device come from lmms-eval's own ``--batch_size`` and
``--device``, as for its built-in models; ``dtype`` and ``max_new_tokens`` (the default when a task sets none) are
model args. Under several processes (``accelerate launch`` or ``torchrun``) every rank loads the model on its own
device (``cuda:<LOCAL_RANK>``) and lmms-eval gives it its share of the requests.

Requests are lmms-eval ``Instance`` objects; only their ``.args`` are read:
* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; greedy decoding (sampling
  arguments are ignored, with a warning), ``max_new_tokens`` honoured, and decoding of a sequence stops at the
  task's ``until`` strings (the answer is the text before the first of them).
* ``loglikelihood``: ``(context, continuation_or_doc_to_target, doc_to_visual, doc_id, task, split)`` ->
  ``(log P(continuation), is_greedy)``.
``doc_to_visual(self.task_dict[task][split][doc_id])`` gives the images (lmms-eval sets ``task_dict``); the
model sees one image per question, the first.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.inference import PAPER_MAX_NEW_TOKENS, Predictor, Question

log = logging.getLogger(__name__)

try:  # optional: without lmms-eval the adapter still works (and is tested) as a plain class
    from lmms_eval.api.model import lmms as _LmmsBase
except Exception:  # noqa: BLE001 -- ImportError, or a broken lmms-eval install
    _LmmsBase = object

HAVE_LMMS_EVAL = _LmmsBase is not object


def launch_ranks() -> tuple[int, int, int]:
    """(global rank, local rank, world size) from the launcher's environment (torchrun and accelerate set
    RANK / LOCAL_RANK / WORLD_SIZE); (0, 0, 1) for a single process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def rank_device(device: Optional[str], local_rank: int, world_size: int) -> str:
    """Where this process loads the model: one GPU per process when several run (``cuda:<LOCAL_RANK>``, as
    llava_hf does), else lmms-eval's ``--device`` (``None``: CUDA when there is one)."""
    if world_size > 1 and (device is None or device.startswith("cuda")) and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device or "auto"


class LightningSP(_LmmsBase):
    """lmms-eval model over a lightning_sp checkpoint (``pretrained=<run dir or .ckpt>``)."""

    is_simple = True  # takes lmms-eval's formatted context string (not chat messages)

    def __init__(
        self,
        pretrained: str,
        device: Optional[str] = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = PAPER_MAX_NEW_TOKENS,
        dtype: Optional[str] = None,
        predictor: Optional[Predictor] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("max_batch_size", None)  # lmms-eval passes it with --max_batch_size; batches here are fixed
        if kwargs:
            log.warning("lightning_sp adapter ignores model_args %s", sorted(kwargs))
        if str(batch_size).startswith("auto"):
            raise ValueError("lightning_sp adapter: --batch_size auto is not supported; give a number")
        rank, local_rank, world_size = launch_ranks()
        self._rank, self._world_size = rank, world_size  # what lmms' __init__ would set, and lmms-eval reads
        self.task_dict: dict = getattr(self, "task_dict", {})
        self.predictor = predictor or Predictor.from_checkpoint(
            pretrained, device=rank_device(device, local_rank, world_size), dtype=dtype
        )
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._warned_sampling = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None):
        """lmms-eval's constructor path, with a plain message where its own would raise Python's "got multiple
        values for keyword argument" (batch size and device are lmms-eval options, not model args)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        clash = sorted(set(args) & set(extra))
        if clash:
            raise ValueError(
                f"lightning_sp adapter: {', '.join(clash)} given in --model_args and by lmms-eval; "
                f"use lmms-eval's own option ({', '.join('--' + k for k in clash)}) only"
            )
        return cls(**args, **extra)

    @property
    def tokenizer(self):
        return self.predictor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # ---- requests -> questions -------------------------------------------------------------------------------
    def _question(self, index: int, context: str, doc_to_visual, doc_id, task, split) -> Question:
        visuals = []
        if doc_to_visual is not None:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            if not isinstance(visuals, (list, tuple)):
                visuals = [visuals]
        if len(visuals) > 1:
            log.warning("task %s doc %s has %d images; the model sees the first", task, doc_id, len(visuals))
        return Question(
            question_id=index, text=context.replace(IMAGE_TOKEN, "").strip(), image=visuals[0] if visuals else None
        )

    def _gen_settings(self, gen_kwargs: Optional[dict]) -> tuple[int, tuple[str, ...]]:
        gen_kwargs = dict(gen_kwargs or {})
        if (gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0) and not self._warned_sampling:
            log.warning(
                "lightning_sp adapter decodes greedily (the paper's protocol); ignoring %s",
                {k: gen_kwargs.get(k) for k in ("do_sample", "temperature", "top_p", "num_beams")},
            )
            self._warned_sampling = True
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), tuple(u for u in until if u)

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, batched by identical generation settings, returned in request order."""
        groups: dict[tuple[int, tuple[str, ...]], list[tuple[int, Question]]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            groups.setdefault(self._gen_settings(gen_kwargs), []).append(
                (i, self._question(i, context, doc_to_visual, doc_id, task, split))
            )
        results: list[Optional[str]] = [None] * len(requests)
        for (max_new, until), items in groups.items():
            answers = self.predictor.predict(
                [q for _, q in items],
                batch_size=self.batch_size,
                max_new_tokens=max_new,
                progress=False,
                stop_strings=until,
            )
            for (i, _), answer in zip(items, answers):
                results[i] = answer
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for i, req in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            if isinstance(continuation, (list, tuple)):  # some tasks give a list with one target
                continuation = continuation[0]
            question = self._question(i, context, doc_to_visual, doc_id, task, split)
            out.append(self.predictor.loglikelihood(question, str(continuation)))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("lightning_sp adapter: loglikelihood_rolling (perplexity tasks) is not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("lightning_sp adapter: multi-round generation is not supported")
