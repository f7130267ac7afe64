"""The run config's typed schema: one dataclass per section, every field with its default and meaning.

Composition and validation live in :mod:`lightning_sp.config`, which re-exports these names; this module imports
nothing of the package, so components (the official-release key tables, say) can take a section's type without
pulling in composition, which itself imports the component registries it validates against.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class VisionConfig:
    # Registry name of the encoder family (lightning_sp/models/vision): clip (HF CLIP) | timm (SigLIP, DINOv2, ...).
    backbone: str = "clip"
    arch: Optional[str] = None  # timm only: the architecture name, e.g. vit_so400m_patch14_siglip_384
    # Pretrained weights: clip an HF id or local dir; timm a hub id, a weights file or a directory. None builds a
    # random-init encoder of the backbone's family from the fields below.
    name_or_path: Optional[str] = None
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 256
    select_layer: int = -2  # LLaVA-1.5: penultimate block, CLS dropped
    # Random-init encoders only: "sincos" gives patch features a clear 2-D position, as a trained CLIP's have;
    # "hf" keeps transformers' N(0, 0.02) table, which a random encoder's patch content drowns out.
    position_init: str = "sincos"
    init_seed: int = 0  # random-init encoders are rebuilt from this seed when a checkpoint is loaded
    trust_remote_code: bool = False


@dataclass
class LLMConfig:
    # Registry name of the LLM family (lightning_sp/models/llm.py): vicuna | llama3 | qwen2. It decides the
    # instruct stage's conversation format and the random-init architecture.
    backbone: str = "vicuna"
    name_or_path: Optional[str] = None  # HF id or local dir; None builds a random-init model from the fields below
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 344
    max_position_embeddings: int = 2048
    # RoPE base (random-init only; a pretrained LLM keeps its own). Llama-2's is 1e4, Llama-3's 5e5.
    rope_theta: float = 10000.0
    # Std of the random-init weights (random-init only). transformers' 0.02 suits widths near 768; at width 128 it
    # makes attention logits ~20x smaller than a 1/sqrt(width) init, and attention learns to route only slowly.
    initializer_range: float = 0.02
    init_seed: int = 0
    dtype: str = "float32"  # weights of the frozen LLM: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # empty: the LLM backbone's (every Llama projection)
    # Extra LLM modules trained in full (peft `modules_to_save`); the tiny random default trains its embeddings.
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: str = "data/tokenizer"
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ProjectorConfig:
    """`projector.name` and the union of the registered projectors' options (each arm's `Projector.Options`
    dataclass, same names and defaults: tests/test_projectors.py); a projector is handed only its own."""

    name: str = "pooling"  # a key of lightning_sp.models.projectors.PROJECTORS
    sp_width: int = 512  # D, width of the SP branch (paper: 512)
    dfi: bool = True  # Detail Feature Integrator on the SP tokens
    dfi_kv_tokens: int = 25  # K/V tokens of the DFI: a square number (25 = 5x5 as released, 49 = 7x7)
    sides: Optional[list[int]] = None  # SP window sides on the paper's 24x24 grid; None = [4, 8, 12, 16, 20, 24]
    head_bias: Optional[bool] = None  # bias of W_s; None = the released variant's choice
    # `cropping_transformer` only: pre-norm TransformerEncoderLayers (width D) shared by all windows, and their
    # heads (must divide sp_width).
    extractor_layers: int = 1
    extractor_heads: int = 8


@dataclass
class SyntheticDataConfig:
    raw_dir: str = "data/synthetic"
    n_train: int = 4000
    n_val: int = 300
    turns: int = 3
    seed: int = 0


@dataclass
class DataConfig:
    train_dir: str = MISSING  # WebDataset shards + index.json
    val_dir: Optional[str] = None
    batch_size: int = 16
    val_batch_size: int = 32
    num_workers: int = 1
    shuffle_buffer: int = 500
    # LLaVA's group_by_modality_length (its stage 2): within each group of this many batches of a rank's stream,
    # image and text-only samples are batched apart and by length, and the batches shuffled; 1 = off (batches in
    # stream order). Keeps equal batches per rank, no repeats and exact mid-epoch resume.
    length_group_batches: int = 1
    max_length: int = 2048
    shard_size: int = 1000
    synthetic: Optional[SyntheticDataConfig] = None  # set: generate + convert the data when shards are missing
    # Stop the run (callbacks.SkipLimit) when more than this fraction of the training records read so far were
    # skipped as unusable (each is logged with its id and reason); checked from 200 records on, over all ranks.
    max_skipped_fraction: float = 0.01


@dataclass
class StageConfig:
    name: str = "finetune"  # align | finetune
    # The conversation format: plain (align) or, left null, the LLM backbone's own (vicuna_v1, llama3, qwen2);
    # compose fills it in, so a saved config names the format it trained with.
    template: Optional[str] = None
    lora: bool = True  # attach LoRA adapters to the LLM (finetune); align trains the projector only
    # Every LLM weight trains (no LoRA): LLaVA-1.5 "full", the paper's main baseline (stage=finetune_full).
    full_llm: bool = False


@dataclass
class OptimConfig:
    lr_projector: float = 2e-5
    lr_lora: float = 2e-4
    lr_llm: float = 2e-5  # the LLM's own weights under stage.full_llm (LLaVA-1.5 full fine-tuning: 2e-5)
    # Full-window SP convolutions (fan-in up to 24*24*C): Adam moves every weight by ~lr per step, so their
    # outputs move by ~lr * fan_in; None = lr_projector (the official recipe).
    lr_sp_conv: Optional[float] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    # "cosine" (LLaVA's: linear warmup, cosine to 0 over the run) or "wsd" (warmup, constant, then a cosine decay
    # over the last `decay_ratio` of the steps): a short run that is still learning keeps its full rate longer.
    schedule: str = "cosine"
    decay_ratio: float = 0.2  # wsd only
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    max_steps: int = 300
    val_check_interval: int = 100  # optimizer steps... counted in training batches, as Lightning does
    limit_val_batches: Optional[int] = None
    num_sanity_val_steps: int = 0
    log_every_n_steps: int = 10
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    # The recipe's samples per optimizer step (None: not checked). Set, it must equal data.batch_size x devices x
    # accumulate_grad_batches; when accumulate_grad_batches is left at 1 (not given on the command line) and the
    # device count is known at config time, the accumulation is derived from it. With devices=-1/"auto" the
    # check runs in train() once the launcher has resolved the world size.
    global_batch_size: Optional[int] = None
    enable_progress_bar: bool = True
    # Lightning's everyday Trainer arguments, passed through as they are.
    num_nodes: int = 1
    max_epochs: Optional[int] = None  # None: max_steps alone decides
    fast_dev_run: Any = False  # True or N: N batches of train and val, no checkpoints or logs (a smoke test)
    deterministic: Any = None  # True, False, "warn" or None (torch's default)
    profiler: Optional[str] = None  # "simple", "advanced" or "pytorch": report at the end of fit
    # trainer=fsdp only: each checkpoint a directory of per-rank torch distributed checkpoint shards (model and
    # optimizer state never gathered to one rank: 7B full fine-tuning) instead of one file gathered on rank 0.
    # None (the default): on exactly for stage.full_llm under trainer.strategy=fsdp, whose gathered checkpoint would
    # pass ~92 GB through rank 0 at 7B; a LoRA run keeps its small, anywhere-loadable file. Compose fills it in.
    sharded_checkpoints: Optional[bool] = None


@dataclass
class EvalConfig:
    max_new_tokens: int = 8


@dataclass
class VizConfig:
    """Attention-map images in TensorBoard (lightning_sp/callbacks/attention.py): a few fixed val images."""

    enabled: bool = True
    every_n_val: int = 1  # every n-th validation run (validation itself runs every trainer.val_check_interval)
    num_images: int = 2
    # Cell-naming val questions whose answer attention is measured each validation (val/attention_on_target,
    # lightning_sp/callbacks/attention_metrics.py): the first ones of the split; None = all of them.
    attention_questions: Optional[int] = 400


@dataclass
class RunConfig:
    choices: dict[str, str] = field(default_factory=dict)  # group -> selected YAML name (filled by compose)
    model: ModelConfig = field(default_factory=ModelConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    viz: VizConfig = field(default_factory=VizConfig)
    seed: int = 0
    run_dir: Optional[str] = None  # default: runs/<variant>/<timestamp>
    save_top_k: int = 1
    # Warm start (not resume): a checkpoint file or run directory whose trainable tensors (projector required,
    # LoRA if present) initialise this run; optimizer, schedule and step start fresh. See lightning_sp/warm_start.py.
    init: Optional[str] = None
    # Resume (not warm start): "auto" continues from <run_dir>/checkpoints/last.ckpt when it exists (fresh start
    # otherwise), a path continues from that checkpoint: weights, optimizer, schedule and step. Needs run_dir.
    resume: Optional[str] = None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def with_component_fields(section: type, components: Iterable[type], where: str) -> type:
    """`section` (a schema dataclass) extended by the fields that components declare in their own options
    dataclasses beyond it: a plug-in's new keys (a projector's ``Options``, a vision or LLM backbone's ``Options``)
    become config keys with their defaults, type-checked like the rest. A field that is already a key must keep its
    default (one key, one meaning); every field needs a default. Returns `section` itself when nothing is new."""
    known = {f.name: (_default(f), section.__name__) for f in dataclasses.fields(section)}
    new = []
    for component in components:
        hints = typing.get_type_hints(component)  # resolved here: the new class lives in another module
        for f in dataclasses.fields(component):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(
                    f"{component.__qualname__}.{f.name} has no default: every {where}.* key a component declares "
                    "needs one (the config schema gives each key a value)"
                )
            if f.name in known:
                default, owner = known[f.name]
                if _default(f) != default:
                    raise ValueError(
                        f"{where}.{f.name}: {component.__qualname__} declares default {_default(f)!r}, but "
                        f"{owner} already declares it with default {default!r}; one key has one default (rename "
                        "the new option)"
                    )
                continue
            known[f.name] = (_default(f), component.__qualname__)
            new.append((f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory)))
    if not new:
        return section
    return dataclasses.make_dataclass(section.__name__, new, bases=(section,))


def run_schema(
    projector_options: Iterable[type] = (), vision_options: Iterable[type] = (), llm_options: Iterable[type] = ()
) -> type:
    """RunConfig with the `projector.*`, `model.vision.*` and `model.llm.*` keys that the given components' options
    dataclasses declare beyond it (config.run_schema passes the registered ones)."""
    projector = with_component_fields(ProjectorConfig, projector_options, "projector")
    vision = with_component_fields(VisionConfig, vision_options, "model.vision")
    llm = with_component_fields(LLMConfig, llm_options, "model.llm")
    if (projector, vision, llm) == (ProjectorConfig, VisionConfig, LLMConfig):
        return RunConfig

    def section(name: str, cls: type) -> tuple[str, type, dataclasses.Field]:
        return name, cls, dataclasses.field(default_factory=cls)

    model = dataclasses.make_dataclass(
        "ModelConfig", [section("vision", vision), section("llm", llm)], bases=(ModelConfig,)
    )
    return dataclasses.make_dataclass(
        "RunConfig", [section("model", model), section("projector", projector)], bases=(RunConfig,)
    )
