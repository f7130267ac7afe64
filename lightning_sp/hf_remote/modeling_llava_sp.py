"""LLaVA-SP model for `trust_remote_code` loading (written by lightning_sp's `export`; imports only torch and
transformers). CLIP vision tower (hidden_states[vision_feature_layer], CLS dropped) -> spatial projector (SFE + DFI
-> W_s for the SP tokens, W_p for the patch tokens; SP tokens first) -> spliced over the `image_token_index`
placeholders of `input_ids` -> causal LM. The math and parameter names follow lightning_sp's SpatialProjector.

Used like HF's LlavaForConditionalGeneration (the export registers it for AutoModelForImageTextToText,
AutoModelForCausalLM and AutoModel, and saves a LlavaProcessor that expands each `<image>` into
`config.image_seq_length` placeholders and pads on the left):

    model = AutoModelForImageTextToText.from_pretrained(export_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(export_dir)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=32)          # prompt + new tokens, as HF Llava returns
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

`generate` is transformers' own (GenerationMixin): the image is embedded in the prefill step only, and every
decoding option of `generate` applies. Batched prompts must be LEFT-padded (the exported processor does that).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from .configuration_llava_sp import LlavaSPConfig

PAPER_GRID = 24
PAPER_SIDES = (4, 8, 12, 16, 20, 24)
DFI_STRIDE = 2


def scaled_sides(grid, sides=None):
    return [max(1, round(s * grid / PAPER_GRID)) for s in (sides or PAPER_SIDES)]


def window_dot(window, weight):
    """Conv2d with kernel == window, as a matmul: (B, C, k, k) x (D, C, k, k) -> (B, D)."""
    return window.reshape(window.shape[0], -1) @ weight.reshape(weight.shape[0], -1).t()


class SpatialFeatureExtractor(nn.Module):
    def __init__(self, mode, vision_width, sp_width, grid, sides=None):
        super().__init__()
        self.mode, self.grid = mode, grid
        self.sides = scaled_sides(grid, sides)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(sp_width, vision_width, s, s)) for s in self.sides)

    def forward(self, grid_features):
        tokens = []
        for side, weight in zip(self.sides, self.weights):
            if self.mode == "cropping":
                lo = (self.grid - side) // 2
                window = grid_features[:, :, lo : lo + side, lo : lo + side]
            elif side == self.grid:
                window = grid_features
            else:
                window = F.adaptive_avg_pool2d(grid_features, side)
            tokens.append(window_dot(window, weight))
        return torch.stack(tokens, dim=1)


class DetailFeatureIntegrator(nn.Module):
    def __init__(self, vision_width, sp_width, grid, kv_tokens=25):
        super().__init__()
        self.kernel = grid - DFI_STRIDE * (math.isqrt(kv_tokens) - 1)
        self.kv_weight = nn.Parameter(torch.empty(sp_width, vision_width, self.kernel, self.kernel))
        self.query, self.key, self.value = (
            nn.Sequential(nn.LayerNorm(sp_width), nn.Linear(sp_width, sp_width)) for _ in range(3)
        )

    def forward(self, sp_raw, grid_features):
        cols = F.unfold(grid_features, self.kernel, stride=DFI_STRIDE)
        kv = cols.transpose(1, 2) @ self.kv_weight.reshape(self.kv_weight.shape[0], -1).t()
        q, k, v = self.query(sp_raw), self.key(kv), self.value(kv)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return torch.cat([sp_raw, attention @ v], dim=-1)


class SpatialProjector(nn.Module):
    def __init__(self, cfg, vision_width, llm_width, grid):
        super().__init__()
        if cfg["name"] not in ("pooling", "cropping"):
            raise ValueError(f"unknown LLaVA-SP projector {cfg['name']!r}")
        self.grid, d = grid, cfg["sp_width"]
        self.sfe = SpatialFeatureExtractor(cfg["name"], vision_width, d, grid, cfg.get("sides"))
        self.dfi = DetailFeatureIntegrator(vision_width, d, grid, cfg.get("dfi_kv_tokens", 25)) if cfg["dfi"] else None
        self.spatial_head = nn.Sequential(
            nn.GELU(), nn.Linear(2 * d if cfg["dfi"] else d, llm_width, bias=bool(cfg["head_bias"]))
        )
        self.patch_head = nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))

    @property
    def num_tokens(self):
        return len(self.sfe.sides) + self.grid * self.grid

    def forward(self, patches):
        b, n, c = patches.shape
        grid_features = patches.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        sp = self.sfe(grid_features)
        if self.dfi is not None:
            sp = self.dfi(sp, grid_features)
        return torch.cat([self.spatial_head(sp), self.patch_head(patches)], dim=1)


class LlavaSPPreTrainedModel(PreTrainedModel):
    config_class = LlavaSPConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["CLIPEncoderLayer", "LlamaDecoderLayer"]

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, SpatialFeatureExtractor):
            for weight in module.weights:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif isinstance(module, DetailFeatureIntegrator):
            nn.init.kaiming_uniform_(module.kv_weight, a=math.sqrt(5))


class LlavaSPForConditionalGeneration(LlavaSPPreTrainedModel, GenerationMixin):
    def __init__(self, config: LlavaSPConfig):
        super().__init__(config)
        vision = config.vision_config
        self.grid = vision.image_size // vision.patch_size
        self.vision_tower = AutoModel.from_config(vision)
        self.projector = SpatialProjector(
            config.projector, vision.hidden_size, config.text_config.hidden_size, self.grid
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    @property
    def num_image_tokens(self):
        return self.projector.num_tokens

    def image_features(self, pixel_values):
        """(B, 3, S, S) -> (B, image_seq_length, H)."""
        dtype = self.vision_tower.get_input_embeddings().weight.dtype
        with torch.no_grad():
            out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        patches = out.hidden_states[self.config.vision_feature_layer][:, 1:]
        return self.projector(patches.to(self.projector.patch_head[0].weight.dtype))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with each sample's placeholders replaced, in order, by its image's visual tokens."""
        is_image = input_ids == self.config.image_token_index
        embeddings = self.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        if pixel_values is None:
            if is_image.any():
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            return embeddings
        counts = is_image.sum(dim=1)
        n = self.num_image_tokens
        if bool(((counts != n) & (counts != 0)).any()):
            raise ValueError(
                f"each sample needs exactly {n} image placeholders (config.image_seq_length) or none; "
                f"got {counts.tolist()}"
            )
        visual = self.image_features(pixel_values).to(embeddings.dtype)
        order = (is_image.cumsum(dim=1) - 1).clamp(0, n - 1)
        gathered = torch.gather(visual, 1, order.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
        return torch.where(is_image.unsqueeze(-1), gathered, embeddings)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache_position=None,
        logits_to_keep=0,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        elif pixel_values is not None:
            raise ValueError("give input_ids (with image placeholders) together with pixel_values, not inputs_embeds")
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            cache_position=cache_position,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids,
        past_key_values=None,
        inputs_embeds=None,
        pixel_values=None,
        attention_mask=None,
        cache_position=None,
        logits_to_keep=None,
        **kwargs,
    ):
        """As HF Llava: the image goes in with the prompt (prefill); cached decoding steps feed text tokens only."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache_position=cache_position,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if cache_position is None or cache_position[0] == 0 or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
        return model_inputs
