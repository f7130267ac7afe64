"""The sample building and collate of lightning_sp before its speed-ups, kept as an archive: the yardstick that
benchmarks/input_bench.py times ours against and that tests/test_datamodule.py and tests/test_benchmarks.py hold
ours bit-identical to.

What each function was: the image path after decode before the channels-last rewrite (CHW torchvision pad, resize,
to_dtype + normalize), the label mask through transformers' tokenizer call before the direct Rust call, the
`<image>` expansion with torch.cat before the numpy path, and the collate before the batch pixel buffer. It uses only
public lightning_sp APIs (today's templates and tokenizer check, the pad of `images.expand2square`, the JPEG decode);
what it needs of the record validation is written out here as it was, for records that validation accepts.
One tokenizer pass over the whole conversation, as it was: the same ids as ours for tokenizers where one pass is
exact (the shipped byte-level BPE, legacy Llama tokenizers; `conversation.one_pass_exact`), not for others.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

NUM_VISUAL_TOKENS = 582  # SP-Pooling: 6 SP + 576 patch tokens
IMAGE_SIZE = 336
MAX_LENGTH = 2048
IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BATCH_TENSORS = ("input_ids", "labels", "attention_mask", "pixel_values", "has_image")


def previous_image_path(image: torch.Tensor, fill: list[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """lightning_sp's image path after decode before the channels-last rewrite: CHW pad (torchvision), resize,
    to_dtype + normalize. Kept as the yardstick of that change; the outputs must be bit-identical."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from lightning_sp.data.images import expand2square

    image = F.resize(expand2square(image, fill), [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.normalize(F.to_dtype(image, torch.float32, scale=True), mean=list(CLIP_MEAN), std=list(CLIP_STD))


def previous_turns(record: dict) -> tuple[list[tuple[str, str]], bool]:
    """The record validation's output for a record it accepts: (role, text) turns with `<image>` moved to the front
    of the first human turn (LLaVA's preprocess_multimodal; prepended when absent), and whether there is an image."""
    turns = [(turn["from"], turn["value"]) for turn in record["conversations"]]
    has_image = bool(record.get("image"))
    if has_image:
        turns[0] = (turns[0][0], IMAGE_TOKEN + "\n" + turns[0][1].replace(IMAGE_TOKEN, "").strip())
    return turns, has_image


def previous_tokenize(
    record: dict, tokenizer, max_length: int, template: str = "vicuna_v1"
) -> tuple[list[int], list[int], bool]:
    """conversation.encode before the direct tokenizer call, for records it accepts (no truncation errors): the
    transformers tokenizer call, then the per-token label list. Kept as the yardstick of the direct Rust tokenizer
    call; the numbers must be identical."""
    from lightning_sp.data.conversation import check_tokenizer, get_template

    template = get_template(template)
    image_id = check_tokenizer(tokenizer, template)
    turns, has_image = previous_turns(record)
    text, spans = template.render(turns)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = enc["input_ids"]
    supervised = bytearray(len(text))
    for start, end in spans:
        supervised[start:end] = b"\x01" * (end - start)
    labels = [
        tid if end > start and supervised.find(1, start, end) != -1 else IGNORE_INDEX
        for tid, (start, end) in zip(ids, enc["offset_mapping"])
    ]
    if ids.count(image_id) != int(has_image):  # the check encode made: one <image> id exactly when there is an image
        raise ValueError(f"record {record.get('id')}: {ids.count(image_id)} {IMAGE_TOKEN} ids, has_image={has_image}")
    ids, labels = ids[:max_length], labels[:max_length]
    assert sum(label != IGNORE_INDEX for label in labels) > 0
    return ids, labels, has_image


def previous_expand(
    ids: list[int], labels: list[int], image_id: int, num_visual: int = NUM_VISUAL_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """expand_image_token before the numpy path: list -> tensor, then torch.cat around the image position."""
    ids, lab = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)
    p = int((ids == image_id).nonzero().flatten()[0])
    return (
        torch.cat([ids[:p], ids.new_full((num_visual,), image_id), ids[p + 1 :]]),
        torch.cat([lab[:p], lab.new_full((num_visual,), IGNORE_INDEX), lab[p + 1 :]]),
    )


def previous_sample(
    raw: dict,
    tokenizer,
    num_visual: int = NUM_VISUAL_TOKENS,
    image_size: int = IMAGE_SIZE,
    max_length: int = MAX_LENGTH,
    template: str = "vicuna_v1",
) -> dict:
    """SampleBuilder.build before the batch pixel buffer and the direct tokenizer call, from a raw shard sample of
    a record it accepts. The pixels come from `previous_image_path` (the CHW torchvision path), independent of
    ImageProcessor."""
    from lightning_sp.data.images import decode_pixels

    record = json.loads(raw["json"])
    record.setdefault("id", raw["__key__"])
    image = next((v for k, v in raw.items() if not k.startswith("__") and k != "json"), None)
    text_max = max_length - (num_visual - 1 if record.get("image") else 0)
    ids, labels, has_image = previous_tokenize(record, tokenizer, text_max, template)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # The pad colour is LLaVA's truncated mean, as ImageProcessor's since it stopped rounding (images.pad_fill).
    pixels = (
        previous_image_path(decode_pixels(image), [int(255 * m) for m in CLIP_MEAN], image_size)
        if has_image
        else torch.zeros(3, image_size, image_size)
    )
    input_ids, labels = (
        previous_expand(ids, labels, image_id, num_visual)
        if has_image
        else (torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long))
    )
    return {
        "id": str(record["id"]),
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": pixels,
        "has_image": has_image,
    }


def previous_collate(samples: list[dict], pad_id: int) -> dict:
    """collate_train before the batch pixel buffer: pad_sequence of each field, attention mask from ones_like,
    torch.stack of the pixels."""
    ids = [s["input_ids"] for s in samples]
    return {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "labels": pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX),
        "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_value=0),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "has_image": torch.tensor([s["has_image"] for s in samples], dtype=torch.bool),
        "ids": [s["id"] for s in samples],
    }


def raw_samples(shard_dir: Path) -> dict[str, dict]:
    """Every raw sample (tar members) of a shard directory, by record id (the id a batch's ``ids`` list)."""
    import webdataset as wds

    raw = {}
    for tar in sorted(Path(shard_dir).glob("*.tar")):
        for sample in wds.tarfile_to_samples()([{"url": str(tar)}]):
            raw[str(json.loads(sample["json"]).get("id", sample["__key__"]))] = sample
    return raw


def same_batch(batch: dict, ref: dict) -> bool:
    """Every tensor field equal (torch.equal), dtype and shape included, and the same records in the same order."""
    return batch["ids"] == ref["ids"] and all(
        batch[k].dtype == ref[k].dtype and batch[k].shape == ref[k].shape and torch.equal(batch[k], ref[k])
        for k in BATCH_TENSORS
    )
