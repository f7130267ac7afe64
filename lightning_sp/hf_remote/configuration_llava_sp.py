"""LLaVA-SP configuration for `trust_remote_code` loading (written by lightning_sp's `export`; no lightning_sp
import). Layout: a CLIP vision config, a causal-LM text config, and the spatial projector's settings."""

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto import CONFIG_MAPPING


def _sub_config(value, default_model_type: str):
    """A sub-config given as a config object, a dict (as read from config.json) or None (the default type)."""
    if isinstance(value, dict):
        value = dict(value)
        value["model_type"] = value.get("model_type", default_model_type)
        return CONFIG_MAPPING[value["model_type"]](**value)
    return CONFIG_MAPPING[default_model_type]() if value is None else value


class LlavaSPConfig(PretrainedConfig):
    """`projector`: {"name": "pooling"|"cropping", "sp_width": D, "dfi": bool, "dfi_kv_tokens": n*n,
    "sides": window sides on the paper's 24x24 grid or None (4..24), "head_bias": bool}. The visual tokens of an
    image are the SP tokens followed by the grid*grid patch tokens: `image_seq_length` of them, which is how many
    `image_token_index` placeholders each image needs in `input_ids`."""

    model_type = "llava_sp"
    attribute_map = {"image_token_id": "image_token_index"}
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_token_index=None,
        vision_feature_layer=-2,
        projector=None,
        image_seq_length=None,
        **kwargs,
    ):
        self.vision_config = _sub_config(vision_config, "clip_vision_model")
        self.text_config = _sub_config(text_config, "llama")
        self.image_token_index = image_token_index
        self.vision_feature_layer = vision_feature_layer
        self.projector = dict(
            projector
            or {"name": "pooling", "sp_width": 512, "dfi": True, "dfi_kv_tokens": 25, "sides": None, "head_bias": False}
        )
        self.image_seq_length = image_seq_length
        kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)
