"""`python -m lightning_sp generate`: ask questions about an image and watch the answer stream in.

The model is a run directory, a `.ckpt`, or a directory written by `export` (then loaded with plain transformers,
as a user of the export would: Auto classes, the processor's chat template). With `question=...` it answers once;
without, it reads one question per line from stdin until end of input, each about the same image (no memory of
earlier turns: the embedded task is single-turn). Greedy decoding, like `eval`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from omegaconf import MISSING
from transformers import TextStreamer

from lightning_sp.command_options import parse_command_options
from lightning_sp.config import ConfigError
from lightning_sp.inference import Predictor, Question

USAGE = 'python -m lightning_sp generate ckpt=<run, .ckpt or HF export> image=PATH [question="..."] [max_new_tokens=64]'


@dataclass
class GenerateOptions:
    ckpt: str = MISSING  # a run directory, a .ckpt, or an `export` directory
    image: Optional[str] = None  # an image file; none: text-only questions
    question: Optional[str] = None  # none: one question per line from stdin
    max_new_tokens: int = 64
    device: str = "auto"
    dtype: Optional[str] = None  # float32 | bfloat16 | float16 (run checkpoints; an export loads in its own dtype)


class CheckpointAnswerer:
    """A run or `.ckpt`: question -> answer, streamed to stdout as generated, returned as text."""

    def __init__(self, ckpt: str, image: Optional[str], max_new_tokens: int, device: str, dtype: Optional[str]):
        self.predictor = Predictor.from_checkpoint(ckpt, device=device, dtype=dtype)
        self.image, self.max_new_tokens = image, max_new_tokens

    def __call__(self, question: str) -> str:
        builder = self.predictor.builder
        batch = builder.collate([builder(Question(question_id="generate", text=question, image=self.image))])
        streamer = TextStreamer(self.predictor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        return self.predictor.generate(batch, self.max_new_tokens, streamer=streamer)[0]


class ExportAnswerer:
    """An `export` directory through plain transformers: what the model card tells users to do."""

    def __init__(self, directory: str, image: Optional[str], max_new_tokens: int, device: str):
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True).eval()
        if device != "auto":
            self.model.to(device)
        self.image = Image.open(image).convert("RGB") if image else None
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, question: str) -> str:
        content = ([{"type": "image"}] if self.image is not None else []) + [{"type": "text", "text": question}]
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = self.processor(images=self.image, text=prompt, return_tensors="pt").to(self.model.device)
        streamer = TextStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, streamer=streamer)
        return self.processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def is_export(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and not (p / "checkpoints").is_dir()


def answerer(opts: dict) -> Callable[[str], str]:
    if opts["image"] is not None and not Path(opts["image"]).is_file():
        raise FileNotFoundError(f"image={opts['image']}: no such file")
    if is_export(opts["ckpt"]):
        return ExportAnswerer(opts["ckpt"], opts["image"], opts["max_new_tokens"], opts["device"])
    return CheckpointAnswerer(opts["ckpt"], opts["image"], opts["max_new_tokens"], opts["device"], opts["dtype"])


def generate_from_args(args: Sequence[str], questions: Optional[Iterable[str]] = None) -> list[str]:
    """CLI entry: answers (also streamed to stdout) for `question=` or each stdin line."""
    opts, overrides = parse_command_options(args, GenerateOptions, "generate", USAGE)
    if overrides:
        raise ConfigError(f"generate takes no config overrides ({', '.join(overrides)}); {USAGE}")
    answer = answerer(opts)
    if opts["question"] is not None:
        questions = [opts["question"]]
    elif questions is None:
        if sys.stdin.isatty():
            print("one question per line; end with Ctrl-D", file=sys.stderr)
        questions = sys.stdin
    answers = []
    for line in questions:
        question = line.strip()
        if question:
            answers.append(answer(question))  # TextStreamer prints the answer and a newline as it goes
    return answers
