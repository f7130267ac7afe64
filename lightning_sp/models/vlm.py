"""The vision-language model: encoder -> projector -> visual tokens spliced into the LLM's input embeddings."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sp.constants import IGNORE_INDEX, supervised_logit_positions
from lightning_sp.models.llm import attach_lora, build_llm
from lightning_sp.models.projectors import Projector, build_projector
from lightning_sp.models.vision import VisionBackbone, build_vision
from lightning_sp.thirdparty.torch_internals import assert_async


def assert_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise on NaN/Inf instead of hiding it (the official code masked them with `nan_to_num`).

    `torch._assert_async` checks on the device without a host sync, so the training step stays asynchronous on
    GPU (there the failure surfaces as a device-side assert); on CPU it raises a RuntimeError at once.
    """
    assert_async(torch.isfinite(tensor).all(), f"non-finite values in {what}")


class LlavaSP(nn.Module):
    """Vision tower (frozen) + projector + causal LM (frozen, optionally with LoRA).

    A batch carries each sample's `<image>` placeholder already expanded to `projector.layout.num_tokens`
    copies (the collator does it), so splicing is a single gather + `torch.where` over the whole batch, with no
    per-sample Python and no host sync. Text-only samples still run through the tower and projector (zero
    image, no placeholder): every rank then issues the same collectives under DDP/FSDP.
    """

    def __init__(self, vision: VisionBackbone, projector: Projector, llm: nn.Module, image_token_id: int) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "LlavaSP":
        vision = build_vision(cfg.model.vision)
        llm = build_llm(cfg.model.llm, tokenizer)
        projector = build_projector(
            cfg.projector, vision_width=vision.hidden_size, llm_width=llm.config.hidden_size, grid=vision.grid
        )
        if cfg.stage.lora:
            llm = attach_lora(llm, cfg.model.lora)
        return cls(vision, projector, llm, tokenizer.convert_tokens_to_ids("<image>"))

    @property
    def num_visual_tokens(self) -> int:
        return self.projector.layout.num_tokens

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, T, H) visual tokens in the projector's layout."""
        features = self.vision(pixel_values)
        assert_finite(features, "vision encoder features")
        tokens = self.projector(features.to(self._projector_dtype()))
        assert_finite(tokens, f"projector '{getattr(self.projector, 'registry_name', '?')}' output")
        return tokens

    def _projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every `<image>` position replaced by the sample's visual tokens, in order."""
        is_image = input_ids == self.image_token_id
        embeddings = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        visual = self.visual_tokens(pixel_values).to(embeddings.dtype)
        # k-th image position of a sample takes its k-th visual token.
        order = (is_image.cumsum(dim=1) - 1).clamp(0, visual.shape[1] - 1)
        gathered = torch.gather(visual, 1, order.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
        return torch.where(is_image.unsqueeze(-1), gathered, embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        logit_positions: Optional[torch.Tensor] = None,
        **_: object,
    ):
        """With ``labels``: the mean cross-entropy of the supervised next tokens, computed from logits at only the
        positions that predict a label in some row (``logit_positions``, ascending, as
        :func:`supervised_logit_positions` computes them; the collators do so on the host). The visual tokens and
        the prompt need no logits: at 7B shape full logits are B x L x 32000 fp32 (0.26 GB per sample of 2048
        tokens) plus their gradient, and the LM head's FLOPs over 582 visual positions are wasted. The loss equals
        the LM's own (``labels=``) up to rounding; the returned ``logits`` cover ``logit_positions`` only."""
        embeds = self.embed(input_ids, pixel_values)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask)
        if logit_positions is None:
            logit_positions = supervised_logit_positions(labels)  # one host sync (nonzero)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=logit_positions)
        targets = labels[:, 1:].index_select(1, logit_positions)  # position p predicts token p + 1
        out.loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return out

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        max_new_tokens: int = 16,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        synced_gpus: Optional[bool] = None,  # None: HF decides (True when FSDP-managed and world size > 1)
        streamer=None,  # a transformers streamer (TextStreamer, TextIteratorStreamer): tokens as they come
        stop_strings: Sequence[str] = (),
        tokenizer=None,  # needed with stop_strings (transformers matches them on the tokens' text)
    ) -> torch.Tensor:
        """Greedy decoding from LEFT-padded prompts; returns only the new tokens (B, <=max_new_tokens).

        A sequence ends at EOS or once its text contains one of ``stop_strings`` (transformers'
        StopStringCriteria; the stop string's tokens are kept, as HF does); the batch ends when all have."""
        if prompt_attention_mask[:, -1].min() == 0:
            raise ValueError("generation prompts must be left-padded (last column of the attention mask all ones)")
        stops = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        return self.llm.generate(
            inputs_embeds=self.embed(prompt_ids, pixel_values),
            attention_mask=prompt_attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **stops,
        )

    def generate_batch(
        self,
        batch: dict,
        tokenizer,
        max_new_tokens: int,
        *,
        synced_gpus: Optional[bool] = None,
        streamer=None,
        stop_strings: Sequence[str] = (),
    ) -> torch.Tensor:
        """:meth:`generate` on a batch's left-padded ``prompt_ids`` / ``prompt_attention_mask`` / ``pixel_values``
        (moved to the model's device), stopping at ``tokenizer``'s EOS and padding with its pad id. The one greedy
        decoding every caller goes through: ``LlavaSPModule.generate_tokens`` (evaluation, the lmms-eval adapter,
        ``generate``) and the attention maps (lightning_sp/viz/maps.py)."""
        device = next(self.parameters()).device
        return self.generate(
            batch["prompt_ids"].to(device),
            batch["prompt_attention_mask"].to(device),
            batch["pixel_values"].to(device),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
            streamer=streamer,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
        )
