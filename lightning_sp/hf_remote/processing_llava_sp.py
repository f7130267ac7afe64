"""A LlavaProcessor that tokenises prompts as LLaVA does (`trust_remote_code`; written by lightning_sp's `export`
only for tokenizers that need it; no lightning_sp import).

LLaVA builds prompt ids with `tokenizer_image_token`: the prompt is split at each `<image>`, every piece is
tokenised as a string of its own (BOS kept on the first, dropped from the others) and the image id goes between
the pieces. transformers' LlavaProcessor expands `<image>` and tokenises the whole prompt in one pass. The two agree
for tokenizers that treat the text after an added token as the start of a new string (byte-level BPE, Llama
SentencePiece with `legacy: true`), but not for Llama tokenizers saved with `legacy: false` (Vicuna v1.5): their
Metaspace pre-tokenizer prepends the dummy-prefix "▁" at the start of the string only, so one pass drops the "▁"
that LLaVA's separately tokenised piece after `<image>` starts with, and every prompt is a token off training's.
This processor keeps everything of LlavaProcessor (image preprocessing, `<image>` expansion, chat template) and
tokenises piece by piece."""

import numpy as np
from transformers import LlavaProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.models.llava.processing_llava import LlavaProcessorKwargs

# Tokenizer options that a piece-by-piece encoding cannot honour: refused with a clear error rather than ignored.
_UNSUPPORTED = (
    "text_pair",
    "text_target",
    "text_pair_target",
    "is_split_into_words",
    "stride",
    "return_overflowing_tokens",
    "return_token_type_ids",
    "return_special_tokens_mask",
    "return_length",
)


class LlavaSPProcessor(LlavaProcessor):
    """`LlavaProcessor` whose text encoding is LLaVA's `tokenizer_image_token` (see the module docstring).

    Accepts what LlavaProcessor's call accepts for prompts (one string or a batch of strings) with the tokenizer
    options `add_special_tokens`, `padding`, `padding_side`, `pad_to_multiple_of`, `truncation` + `max_length`,
    `return_attention_mask`, `return_offsets_mapping` (fast tokenizers; offsets into the expanded prompt, as
    LlavaProcessor's) and `return_tensors`; other tokenizer options raise."""

    def __call__(self, images=None, text=None, audio=None, videos=None, **kwargs) -> BatchFeature:
        if text is None:  # nothing to tokenise: LlavaProcessor's own behaviour
            return super().__call__(images=images, text=text, audio=audio, videos=videos, **kwargs)
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise TypeError("Invalid input text. Please provide a string, or a list of strings")

        output_kwargs = self._merge_kwargs(
            LlavaProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        image_inputs = self.image_processor(images, **output_kwargs["images_kwargs"]) if images is not None else {}
        prompts = list(text)
        if image_inputs.get("pixel_values") is not None:  # the same count and expansion as LlavaProcessor
            height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][0]))
            num_image_tokens = (height // self.patch_size) * (width // self.patch_size)
            num_image_tokens += self.num_additional_image_tokens
            if self.vision_feature_select_strategy == "default":
                num_image_tokens -= 1
            prompts = [p.replace(self.image_token, self.image_token * num_image_tokens) for p in prompts]

        text_kwargs = output_kwargs["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", False)
        text_inputs = self._encode_prompts(prompts, **text_kwargs)
        self._check_special_mm_tokens(prompts, text_inputs, modalities=["image"])
        if return_mm_token_type_ids:
            array_ids = np.array(text_inputs["input_ids"])
            text_inputs["mm_token_type_ids"] = (array_ids == self.image_token_id).astype(np.int64).tolist()
        return BatchFeature(data={**text_inputs, **image_inputs}, tensor_type=return_tensors)

    def _encode_pieces(self, prompt: str, add_special_tokens: bool, offsets: bool):
        """`tokenizer_image_token` of one (expanded) prompt: ids and, with `offsets`, char spans into `prompt`."""
        pieces = prompt.split(self.image_token)
        # An expanded prompt has hundreds of empty pieces between its placeholders: tokenise each distinct one once.
        distinct = list(dict.fromkeys(pieces))
        enc = self.tokenizer(
            distinct, add_special_tokens=add_special_tokens, return_offsets_mapping=offsets, padding=False
        )
        encoded = {p: i for i, p in enumerate(distinct)}
        first = encoded[pieces[0]]
        ids = list(enc["input_ids"][first])
        spans = list(enc["offset_mapping"][first]) if offsets else None
        bos = self.tokenizer.bos_token_id
        drop = 1 if ids and bos is not None and ids[0] == bos else 0  # LLaVA keeps the first piece's BOS only
        at = len(pieces[0])  # where the current placeholder starts in `prompt`
        for piece in pieces[1:]:
            k = encoded[piece]
            ids.append(self.image_token_id)
            ids += enc["input_ids"][k][drop:]
            shift = at + len(self.image_token)
            if offsets:
                spans.append((at, shift))
                spans += [(start + shift, end + shift) for start, end in enc["offset_mapping"][k][drop:]]
            at = shift + len(piece)
        return ids, spans

    def _encode_prompts(
        self,
        prompts,
        add_special_tokens=True,
        padding=False,
        truncation=None,
        max_length=None,
        pad_to_multiple_of=None,
        padding_side=None,
        return_attention_mask=None,
        return_offsets_mapping=False,
        verbose=True,
        **other,
    ) -> dict:
        """The tokenizer's call on `prompts`, each encoded by :meth:`_encode_pieces`, then truncated and padded by
        the tokenizer's own rules."""
        refused = sorted(k for k in other if k in _UNSUPPORTED and other[k] not in (None, False))
        unknown = sorted(k for k in other if k not in _UNSUPPORTED)
        if refused or unknown:
            raise ValueError(
                f"LlavaSPProcessor tokenises prompts piece by piece around {self.image_token} (as LLaVA) and does "
                f"not support the tokenizer option(s) {', '.join(refused + unknown)}; call processor.tokenizer "
                "directly for them (its one-pass ids can differ from the model's training ids after an image)"
            )
        encoded = [self._encode_pieces(p, add_special_tokens, return_offsets_mapping) for p in prompts]
        ids = [e[0] for e in encoded]
        spans = [e[1] for e in encoded]
        if truncation not in (None, False, "do_not_truncate") and max_length is not None:
            # The whole sequence is cut (the tokenizer's rule for a single text), on its truncation side.
            left = self.tokenizer.truncation_side == "left"
            cut = (lambda s: s[len(s) - max_length :]) if left else (lambda s: s[:max_length])
            ids = [cut(s) for s in ids]
            spans = [cut(s) if s is not None else None for s in spans]
        # The ids are final here: padding them is all that is left (not the slower path that warning is about).
        self.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
        padded = self.tokenizer.pad(
            {"input_ids": ids},
            padding=padding,
            # max_length pads only with padding="max_length" (else it only truncated, above), as in the tokenizer.
            max_length=max_length if str(getattr(padding, "value", padding)) == "max_length" else None,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=return_attention_mask,
            verbose=verbose,
        )
        out = {k: [list(row) for row in v] for k, v in padded.items()}
        if return_offsets_mapping:  # padding positions get (0, 0), as the tokenizer gives them
            side = padding_side or self.tokenizer.padding_side
            out["offset_mapping"] = []
            for row, span in zip(out["input_ids"], spans):
                fill = [(0, 0)] * (len(row) - len(span))
                out["offset_mapping"].append(fill + span if side == "left" else span + fill)
        return out


__all__ = ["LlavaSPProcessor"]
