"""lmms-eval model adapter: evaluate a lightning_sp checkpoint on any lmms-eval task.

    pip install -e '.[eval]'     # lmms-eval is an optional extra; this module imports without it
    python -m lightning_sp.lmms_adapter --model lightning_sp \
        --model_args pretrained=runs/pooling/<stamp>/checkpoints/last.ckpt,batch_size=8 --tasks pope,gqa

``python -m lightning_sp.lmms_adapter`` registers the model with lmms-eval and then runs lmms-eval's own CLI
with the given arguments. lmms-eval versions differ in how they find models: the package declares the
``lmms_eval.models`` entry point (``lightning_sp = lightning_sp.lmms_adapter:LightningSP``), and
:func:`register` also adds the class to the registries lmms-eval versions keep (``register_model`` /
``AVAILABLE_MODELS``), which is what the launcher relies on.

Requests are lmms-eval ``Instance`` objects; only their ``.args`` are read:
* ``generate_until``: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; greedy decoding (sampling
  arguments are ignored, with a warning), ``max_new_tokens`` (default 128) and the ``until`` stop strings honoured.
* ``loglikelihood``: ``(context, continuation_or_doc_to_target, doc_to_visual, doc_id, task, split)`` ->
  ``(log P(continuation), is_greedy)``.
``doc_to_visual(self.task_dict[task][split][doc_id])`` gives the images (lmms-eval sets ``task_dict``); the
model sees one image per question, the first.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from lightning_sp.data.tokenizer import IMAGE_TOKEN
from lightning_sp.evaluate import PAPER_MAX_NEW_TOKENS, Predictor, Question

log = logging.getLogger(__name__)

try:  # optional: without lmms-eval the adapter still works (and is tested) as a plain class
    from lmms_eval.api.model import lmms as _LmmsBase
except Exception:  # noqa: BLE001 -- ImportError, or a broken lmms-eval install
    _LmmsBase = object

HAVE_LMMS_EVAL = _LmmsBase is not object
MODEL_NAME = "lightning_sp"


class LightningSP(_LmmsBase):
    """lmms-eval model over a lightning_sp checkpoint (``pretrained=<run_dir>/checkpoints/last.ckpt``)."""

    def __init__(self, pretrained: str, device: Optional[str] = None, batch_size: int | str = 1,
                 max_new_tokens: int | str = PAPER_MAX_NEW_TOKENS, dtype: Optional[str] = None,
                 predictor: Optional[Predictor] = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            log.warning("lightning_sp adapter ignores model_args %s", sorted(kwargs))
        if not HAVE_LMMS_EVAL:  # what lmms' __init__ would set
            self._rank, self._world_size = 0, 1
        self.predictor = predictor or Predictor.from_checkpoint(pretrained, device=device or "auto", dtype=dtype)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict: dict = getattr(self, "task_dict", {})
        self._warned_sampling = False

    @property
    def tokenizer(self):
        return self.predictor.tokenizer

    @property
    def rank(self) -> int:
        return getattr(self, "_rank", 0)

    @property
    def world_size(self) -> int:
        return getattr(self, "_world_size", 1)

    # ---- requests -> questions -------------------------------------------------------------------------------
    def _question(self, index: int, context: str, doc_to_visual, doc_id, task, split) -> Question:
        visuals = []
        if doc_to_visual is not None:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
            if not isinstance(visuals, (list, tuple)):
                visuals = [visuals]
        if len(visuals) > 1:
            log.warning("task %s doc %s has %d images; the model sees the first", task, doc_id, len(visuals))
        return Question(question_id=index, text=context.replace(IMAGE_TOKEN, "").strip(),
                        image=visuals[0] if visuals else None)

    def _gen_settings(self, gen_kwargs: Optional[dict]) -> tuple[int, list[str]]:
        gen_kwargs = dict(gen_kwargs or {})
        if (gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0) and not self._warned_sampling:
            log.warning("lightning_sp adapter decodes greedily (the paper's protocol); ignoring %s",
                        {k: gen_kwargs.get(k) for k in ("do_sample", "temperature", "top_p", "num_beams")})
            self._warned_sampling = True
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        return int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), [u for u in until if u]

    def generate_until(self, requests) -> list[str]:
        """Greedy answers, batched by identical generation settings, returned in request order."""
        groups: dict[int, list[tuple[int, Question, list[str]]]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            max_new, until = self._gen_settings(gen_kwargs)
            groups.setdefault(max_new, []).append((i, self._question(i, context, doc_to_visual, doc_id, task, split),
                                                   until))
        results: list[Optional[str]] = [None] * len(requests)
        for max_new, items in groups.items():
            answers = self.predictor.predict([q for _, q, _ in items], batch_size=self.batch_size,
                                             max_new_tokens=max_new, progress=False)
            for (i, _, until), answer in zip(items, answers):
                for stop in until:
                    answer = answer.split(stop)[0]
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


def register() -> list[str]:
    """Make ``--model lightning_sp`` resolvable in the installed lmms-eval; returns where it was registered."""
    if not HAVE_LMMS_EVAL:
        raise ImportError("lmms-eval is not installed: pip install -e '.[eval]'")
    done = []
    try:
        from lmms_eval.api.registry import MODEL_REGISTRY, register_model

        if MODEL_REGISTRY.get(MODEL_NAME) is not LightningSP:
            if MODEL_NAME not in MODEL_REGISTRY:
                register_model(MODEL_NAME)(LightningSP)
            done.append("lmms_eval.api.registry")
    except Exception:  # noqa: BLE001 -- this lmms-eval has no decorator registry
        pass
    try:
        import lmms_eval.models as models

        if isinstance(getattr(models, "AVAILABLE_MODELS", None), dict):
            models.AVAILABLE_MODELS[MODEL_NAME] = f"{__name__}.LightningSP"
            done.append("lmms_eval.models.AVAILABLE_MODELS")
    except Exception:  # noqa: BLE001
        pass
    return done


def main(argv: Optional[list[str]] = None) -> None:
    register()
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
