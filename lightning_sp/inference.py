"""Answering questions with a trained run: the model rebuilt from a checkpoint for inference, questions turned
into left-padded prompt batches (the run's conversation template, the image placeholder first, an optional
suffix), greedy answers cut at stop strings. `eval`, `generate`, the lmms-eval adapter and the HF-export tests
all answer through :class:`Predictor`, so they give the same answers for the same question.

Prompts are LEFT-padded and position ids come from the attention mask, so a batch answers exactly as the same
questions one at a time do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.data.collate import left_padded_prompts
from lightning_sp.data.conversation import encode_continuation, expanded_prompt_ids
from lightning_sp.data.images import DEFAULT_STATS, ImageProcessor, ImageStats
from lightning_sp.dtypes import dtype_named
from lightning_sp.errors import InputError
from lightning_sp.module import load_module

PAPER_MAX_NEW_TOKENS = 128


class EvalDataError(InputError):
    """A benchmark file or question that cannot be used; the message names the question and the fix."""


@dataclass
class Question:
    """One benchmark question, as the model will be asked it."""

    question_id: Any
    text: str  # the human turn (suffix included), without the <image> placeholder
    image: Any = None  # a path, encoded bytes, a PIL image, a uint8 (3,H,W) tensor, or None (text only)
    references: Optional[list] = None  # reference answers (strings, or VQA answer dicts)
    label: Optional[str] = None  # POPE: "yes" | "no"
    category: Optional[str] = None  # POPE split, question type, ...
    record: Optional[dict] = None  # a full LLaVA record to prompt from instead of `text` (synthetic val)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_for_inference(
    path: str | Path, overrides: Sequence[str] = (), device: str = "cpu", dtype: Optional[str] = None
):
    """:func:`lightning_sp.module.load_module` (the LightningModule of a run, rebuilt from a checkpoint or run
    directory, strict about trainable tensors), cast to ``dtype``, on ``device``, in eval mode."""

    cast = dtype_named(dtype) if dtype is not None else None  # a bad name fails before the model loads
    module = load_module(path, overrides)
    if cast is not None:
        # RoPE's inverse frequencies stay float32, as transformers' from_pretrained(torch_dtype=...) keeps them:
        # rounded to bf16 they shift every position's angle (logits up to ~0.03 apart on the tiny model).
        keep = {name: buf for name, buf in module.named_buffers() if name.endswith("inv_freq")}
        module = module.to(cast)
        for name, buf in keep.items():
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner), attr, buf)
    return module.to(_device(device)).eval()


# ---- prompts and batches ----------------------------------------------------------------------------------


def _pixels_from(image, processor: ImageProcessor, qid) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise EvalDataError(f"question {qid!r}: image {path} not found (check image_root)")
        image = path.read_bytes()
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image (lmms-eval passes these)
        import numpy as np

        image = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    try:
        return processor(image)
    except ValueError as exc:
        raise EvalDataError(f"question {qid!r}: {exc}") from exc


class PromptBuilder:
    """Question -> (expanded prompt ids, pixel values), and a list of those -> a left-padded batch.

    Holds no model, so DataLoader workers can use it."""

    def __init__(
        self, tokenizer, template: str, num_visual_tokens: int, image_size: int, image_stats: ImageStats | None = None
    ):
        self.tokenizer, self.template, self.num_visual_tokens = tokenizer, template, num_visual_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.processor = ImageProcessor(image_size, *(image_stats or DEFAULT_STATS))
        self.image_size = image_size

    def record(self, q: Question) -> dict:
        if q.record is not None:
            return q.record
        rec = {"id": q.question_id, "conversations": [{"from": "human", "value": q.text.replace(IMAGE_TOKEN, "")}]}
        if q.image is not None:
            rec["image"] = "image"  # any non-empty value: the placeholder goes in front of the question
        return rec

    def prompt_ids(self, q: Question) -> torch.Tensor:
        return expanded_prompt_ids(self.record(q), self.tokenizer, self.template, self.num_visual_tokens)

    def pixel_values(self, q: Question) -> torch.Tensor:
        if q.image is None:
            return torch.zeros(3, self.image_size, self.image_size)
        return _pixels_from(q.image, self.processor, q.question_id)

    def __call__(self, q: Question) -> dict:
        return {"prompt_ids": self.prompt_ids(q), "pixel_values": self.pixel_values(q)}

    def collate(self, items: list[dict]) -> dict:
        batch = left_padded_prompts([it["prompt_ids"] for it in items], self.tokenizer.pad_token_id)
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
        return batch


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (lm-eval's ``until`` convention)."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


class _Prepared(torch.utils.data.Dataset):
    def __init__(self, questions: Sequence[Question], builder: PromptBuilder):
        self.questions, self.builder = questions, builder

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict:
        return self.builder(self.questions[i])


class Predictor:
    """A trained model answering questions: batched greedy generation and continuation log-likelihoods."""

    def __init__(self, module):
        self.module = module.eval()
        self.model, self.tokenizer, self.cfg = module.model, module.tokenizer, module.cfg
        self.builder = PromptBuilder(
            self.tokenizer,
            self.cfg.stage.template,
            self.model.num_visual_tokens,
            self.cfg.model.vision.image_size,
            image_stats=self.model.vision.stats,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, overrides: Sequence[str] = (), device: str = "auto", dtype: Optional[str] = None
    ) -> "Predictor":
        return cls(load_for_inference(path, overrides, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, streamer=None, stop_strings: Sequence[str] = ()) -> list[str]:
        """Greedy answers for a collated batch; with ``stop_strings`` each answer ends before the first of them
        (decoding stops there instead of running to ``max_new_tokens``)."""
        new_tokens = self.module.generate_tokens(batch, max_new_tokens, streamer=streamer, stop_strings=stop_strings)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop_strings(t, stop_strings).strip() for t in texts]

    def predict(
        self,
        questions: Sequence[Question],
        batch_size: int = 8,
        max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
        num_workers: int = 0,
        progress: bool = True,
        stop_strings: Sequence[str] = (),
    ) -> list[str]:
        """Greedy answers, in the order of ``questions``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        loader = torch.utils.data.DataLoader(
            _Prepared(questions, self.builder),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=self.builder.collate,
        )
        answers: list[str] = []
        for batch in tqdm(loader, desc="generating", unit="batch", disable=not progress):
            answers += self.generate(batch, max_new_tokens, stop_strings=stop_strings)
        return answers

    @torch.no_grad()
    def loglikelihood(self, question: Question, continuation: str) -> tuple[float, bool]:
        """(log P(continuation | prompt), whether greedy decoding would produce exactly its tokens).

        The continuation's ids are those it has after the prompt (conversation.encode_continuation: the tokens the
        model saw in training; answers follow "ASSISTANT:" after a space, so a continuation without leading
        whitespace gets one), appended to the prompt's ids, as lm-eval does."""
        cont = encode_continuation(self.builder.record(question), self.tokenizer, self.builder.template, continuation)
        return self.continuation_logprob(question, torch.tensor(cont, dtype=torch.long))

    @torch.no_grad()
    def continuation_logprob(self, question: Question, cont: torch.Tensor) -> tuple[float, bool]:
        """:meth:`loglikelihood` for continuation token ids (1-D)."""
        if cont.numel() == 0:
            return 0.0, True
        prompt = self.builder.prompt_ids(question)
        ids = torch.cat([prompt, cont]).unsqueeze(0).to(self.device)
        pixels = self.builder.pixel_values(question).unsqueeze(0).to(self.device)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels).logits
        logits = logits[0, prompt.numel() - 1 : -1].float()
        cont = cont.to(self.device)
        logprob = torch.log_softmax(logits, dim=-1).gather(1, cont.unsqueeze(1)).sum()
        return float(logprob), bool((logits.argmax(dim=-1) == cont).all())
