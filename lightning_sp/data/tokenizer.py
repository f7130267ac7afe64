"""Tokenizers: the small shipped BPE tokenizer and a loader for real (Vicuna) tokenizers.

The shipped tokenizer (``data/tokenizer``) exists so that the whole pipeline -- templates, label masks,
tiny LLMs, tests -- runs offline without a hub download. It mimics the conventions of the Llama/Vicuna
tokenizer that LLaVA-SP uses (``<unk>``=0, ``<s>``=1, ``</s>``=2, BOS prepended, no EOS appended) so that
code written against it behaves the same with the real one.

Rebuild it with ``python -m lightning_sp.data.tokenizer --out data/tokenizer``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lightning_sp.constants import IMAGE_TOKEN
from lightning_sp.paths import resolve

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
# Order fixes the ids: 0..4, matching Llama's unk/bos/eos = 0/1/2.
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE_TOKEN]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# Files whose presence marks a directory as something AutoTokenizer can load.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and save it (HF format) to ``out_dir``.

    Byte-level means every string is encodable (no ``<unk>`` in practice) and, with ``trim_offsets=False``,
    each token's char offsets cover exactly the characters it was built from -- the property that label
    masking in :mod:`lightning_sp.data.conversation` relies on.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False: a prefix space would be a character with no offset in the original text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,  # the corpus is tiny; rare words still deserve merges
        special_tokens=SPECIAL_TOKENS,  # registered as special added tokens: never split, one id each
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            # Keep the leading-space byte inside each token's offsets so offsets tile the text exactly.
            processors.ByteLevel(trim_offsets=False),
            # Like Llama: BOS in front, no EOS (the conversation template writes </s> itself).
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IMAGE_TOKEN],
        padding_side="right",
        # Decoding must round-trip text exactly; the HF clean-up would drop spaces before punctuation.
        clean_up_tokenization_spaces=False,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def default_corpus() -> list[str]:
    """Training texts for the shipped tokenizer: chat template words, the synthetic spatial-VQA vocabulary
    and a little generic English. Deterministic (no randomness), so the tokenizer rebuilds bit-identically."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle"]
    positions = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
    rows, cols = ["top", "middle", "bottom"], ["left", "middle", "right"]
    relations = ["left of", "right of", "above", "below"]
    numbers = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    texts = [
        f"{VICUNA_SYSTEM} USER: {IMAGE_TOKEN}\nWhat is in the image? ASSISTANT: A red circle.</s>"
        "USER: Thanks. ASSISTANT: You are welcome.</s>",
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "Describe the image. Describe the image briefly. Render a clear and concise summary of the photo.",
    ]
    for colour, shape in itertools.product(colours, shapes):
        texts += [
            f"What color is the {shape}? {colour.capitalize()}. The {shape} is {colour}.",
            f"Is there a {colour} {shape}? Yes. No, there is no {colour} {shape}.",
            f"A {colour} {shape} on a 3x3 grid. There is a {colour} {shape} in the image.",
        ]
    for pos, shape in itertools.product(positions, shapes):
        texts += [
            f"What shape is in the {pos} cell? A {shape}. The {shape} is in the {pos}.",
            f"Where is the {shape}? In the {pos} of the grid. {pos.capitalize()}.",
            f"What color is the shape in the {pos} cell? none",  # lowercase short answers, as generated
        ]
    for row, col in itertools.product(rows, cols):
        texts.append(f"Which shape is in the {row} row and the {col} column? Row {row}, column {col}.")
    for rel, (c1, c2) in itertools.product(relations, zip(colours, colours[1:] + colours[:1])):
        texts.append(f"Is the {c1} shape {rel} the {c2} shape? Yes, it is {rel} it. No, it is not.")
    for n, word in enumerate(numbers):
        texts += [
            f"How many shapes are there? {n}. There are {word} shapes. Count: {n}",
            f"How many {colours[n % 6]} {shapes[n % 3]}s are in row {n % 3} and column {(n + 1) % 3}? {n}",
        ]
    # Whole chat turns, so the template's own words (system prompt, roles, </s>USER) get merged tokens too.
    for colour, shape in zip(colours, shapes * 2):
        texts.append(
            f"{VICUNA_SYSTEM} USER: {IMAGE_TOKEN}\nWhat color is the {shape}? ASSISTANT: {colour.capitalize()}.</s>"
            f"USER: Where is it? ASSISTANT: It is in the {positions[len(colour)]} cell.</s>"
        )
    texts += _GENERIC_ENGLISH
    return texts


# Generic English so that arbitrary prompts tokenise into sensible pieces rather than single bytes.
_GENERIC_ENGLISH = [
    "The quick brown fox jumps over the lazy dog. It was a bright, cold day in April, and the clocks were striking.",
    "Please answer the following question about this picture, and explain why you think so.",
    "A photo of a cat sitting on a table next to a cup of coffee. The man is riding a bike down the street.",
    "This is a test of the tokenizer: numbers 0 1 2 3 4 5 6 7 8 9 10 100 2048, and punctuation ; : ! ? ' \" ( ) - .",
    "I think the answer is yes, because the object is clearly visible. They have been here before.",
    "A woman is standing in a kitchen with a dog. Two people are walking on the beach at sunset.",
    "There are several cars parked along the road, and a bus is waiting at the traffic light.",
    "The picture shows a large building with many windows, a tree in front of it, and a blue sky above.",
    "What is the man holding in his hand? What is the woman wearing? What time of day is it?",
    "Can you describe the scene in detail? What might happen next? Why is the person smiling?",
    "The children were playing in the park while their parents talked about the weather and the news.",
    "We should consider the question carefully, then give a short and correct answer to the user.",
    "Here is a list of things that you can see: a chair, a lamp, a book, a phone, a bottle and a plate.",
    "Reading, writing and counting are important skills; learning them takes time, practice and patience.",
    "The train left the station at seven o'clock, and it arrived in the city two hours later.",
    "Which of these objects is the largest? The red one is larger than the green one, but smaller than the blue one.",
    "How many people are in the picture? There are three people, and one of them is holding an umbrella.",
    "Is this a real photograph or a drawing? It looks like a painting of a small house near a river.",
    'The text on the sign says "STOP". The number on the shirt is 23. The title of the book is unknown.',
    "Thank you for your question. I am not sure, but I believe that the object on the left is a bicycle.",
]


def run_tokenizer(cfg) -> PreTrainedTokenizerFast:
    """The tokenizer a run config names (``model.tokenizer``, repo-relative paths resolved): the one place a run's
    tokenizer is loaded (LlavaSPModule, import-official)."""
    return load_tokenizer(str(resolve(cfg.model.tokenizer)))


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer and make it usable by the LLaVA-SP data pipeline.

    Adds ``<image>`` as a special token when missing (real Vicuna tokenizers lack it). The embedding matrix
    never needs resizing for it: image positions are replaced by visual features before the embedding
    lookup. Falls back to ``<unk>`` as pad token, as LLaVA does for Vicuna.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    looks_local = path.exists() or path.is_absolute() or name.startswith((".", "~"))
    if looks_local and not (path.is_dir() and any((path / f).exists() for f in _TOKENIZER_FILES)):
        raise FileNotFoundError(
            f"{name!r} is not a tokenizer directory (expected one of {', '.join(_TOKENIZER_FILES)}). "
            "Build the shipped one with `python -m lightning_sp.data.tokenizer --out data/tokenizer`."
        )
    try:
        tok = AutoTokenizer.from_pretrained(
            str(path) if looks_local else name, use_fast=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:  # hub ids that are neither local nor cached end up here
        raise FileNotFoundError(
            f"could not load a tokenizer from {name!r}: not a local tokenizer directory and not a cached "
            f"hub model id ({exc})"
        ) from exc
    if not tok.is_fast:
        # Label masking needs char offsets, which only Rust-backed tokenizers provide.
        raise TypeError(f"{name!r} has no fast tokenizer (tokenizer.json); offsets are required")
    if IMAGE_TOKEN not in tok.all_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_additional_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)build the shipped tokenizer from default_corpus().")
    parser.add_argument("--out", default="data/tokenizer", help="output directory")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    tok = train_tokenizer(default_corpus(), args.out, vocab_size=args.vocab_size)
    print(f"saved tokenizer with {len(tok)} tokens to {args.out}")


if __name__ == "__main__":
    main()
