"""Multi-rank training: FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's ModelParallelStrategy.

`trainer.strategy=fsdp` selects :class:`FSDP2Strategy` (data parallel = world size, tensor parallel = 1); the
LightningModule's ``configure_model`` calls :func:`shard_model`, which applies the wrap policy below. Lightning
calls ``configure_model`` before ``configure_optimizers``, so the optimizer is built over the sharded (DTensor)
parameters (``LlavaSPModule.configure_optimizers`` checks it). Lightning's own ``FSDPStrategy`` (FSDP1) refuses
CPU; FSDP2 runs on CPU over gloo, which is how the test suite exercises all of this.

Wrap policy (bottom-up; every unit holds only trainable or only frozen parameters):

============================  ==========  ===============================================================
unit                          trains?     contents
============================  ==========  ===============================================================
LoRA of decoder layer i       yes         every LoRA A/B linear inside layer i, one grouped unit
decoder layer i               no          the rest of layer i (the frozen base projections, norms)
modules_to_save copies        yes         each trained copy (e.g. embed_tokens, lm_head) its own unit
input embeddings (full LLM)   yes         stage.full_llm: the table on its own (looked up before the LLM's
                                          forward), then the decoder (norm) and lm_head as trained subtrees
input / output embeddings     no          the frozen originals (their own units: never all-gathered when
                                          a trained copy replaces them)
the HF causal LM              no          what is left (final norm); its forward is the one `generate` calls
vision encoder block j        no          one unit per block (the backbone's fsdp_blocks())
vision tower                  no          patch/position embeddings, layer norms
projector.sfe                 yes         the SP extractor (all six full-window SP convolutions)
projector.dfi                 yes         the DFI (its K/V convolution + LN-linears)
projector                     yes         the rest: heads W_s, W_p (the whole `mlp` projector)
LlavaSP (root)                -           nothing left; the root unit drives FSDP's per-step bookkeeping
============================  ==========  ===============================================================

Why LoRA is split out: peft puts the trainable ``lora_A``/``lora_B`` linears *inside* the frozen decoder layer,
so wrapping the layer alone puts 7 frozen base weights and 14 trainable adapter weights in one unit. FSDP1's flat
parameters cannot hold that (an error, or with ``use_orig_params`` gradient memory for the whole flat parameter:
the LoRA + FSDP memory blow-up LLaVA trainers hit). FSDP2 shards per parameter and tolerates a mix, but keeping
them apart still pays: a frozen unit never takes part in a reduce-scatter, its all-gather carries only the
(bf16, for 7B) base weights, and the fp32 adapters travel in their own collectives. Per-linear adapter units
would cost 14 extra all-gathers and reduce-scatters per layer; one grouped unit per layer
(``fully_shard([lora modules...])``) costs one of each. :func:`plan_units` computes which parameters each unit
will own, exactly as ``fully_shard`` assigns them (a module's parameters minus those of units sharded before
it), and :func:`check_units` raises before anything is sharded if a unit would mix trainable and frozen ones.

The SFE convolutions cannot be units of their own: they are parameters of one ``ParameterList`` used inside
``SpatialFeatureExtractor.forward``, and FSDP2 all-gathers on a module's forward. The whole SFE is one unit
(at 7B scale 6 convs x 512 x 1024 x up to 24 x 24 ~ 0.76 B parameters, unsharded only during its own forward
and backward).

Initialisation: FSDP2, unlike DDP, does not broadcast rank 0's weights; each rank keeps its own slice of its own
copy. Random-init trainable tensors (LoRA A, the projector) are therefore broadcast from rank 0 before sharding,
and a fingerprint of every frozen unit is compared across ranks (a rank that loaded different frozen weights is
an error, not a silent mix of two models).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_sp.checkpoint import SHARDED_META, is_sharded_checkpoint, sharded_tensor_keys
from lightning_sp.thirdparty.transformers_internals import no_split_module_classes

log = logging.getLogger(__name__)

BF16_PRECISIONS = ("bf16-mixed", "bf16", "bf16-true")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)  # no forward: never a unit


# ---- the wrap plan -----------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One `fully_shard` call: its modules and the parameters it will own."""

    name: str
    modules: list[nn.Module]
    params: dict[str, nn.Parameter] = field(default_factory=dict)

    @property
    def trainable(self) -> Optional[bool]:
        flags = {p.requires_grad for p in self.params.values()}
        return flags.pop() if len(flags) == 1 else None  # None: empty or mixed

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


class MixedUnitError(RuntimeError):
    """An FSDP unit would hold trainable and frozen parameters together."""


class _Planner:
    def __init__(self, root: nn.Module) -> None:
        self.names = {id(p): n for n, p in root.named_parameters()}
        self.module_names = {id(m): n or "<root>" for n, m in root.named_modules()}
        self.assigned: set[int] = set()
        self.units: list[Unit] = []

    def free(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if id(p) not in self.assigned]

    def add(self, modules: list[nn.Module], label: str = "", keep_empty: bool = False) -> None:
        params: dict[str, nn.Parameter] = {}
        for m in modules:
            for p in self.free(m):
                params.setdefault(self.names[id(p)], p)
        if not params and not keep_empty:
            return
        self.assigned.update(id(p) for p in params.values())
        if len(modules) == 1:
            name = self.module_names[id(modules[0])]
        else:  # a group: the common prefix of its members' names
            name = os.path.commonprefix([self.module_names[id(m)] for m in modules]).rstrip(".")
        self.units.append(Unit(f"{name} ({label})" if label else name, modules, params))

    def narrow(self, module: nn.Module) -> nn.Module:
        """The innermost callable submodule holding all of `module`'s free parameters: for a peft
        `ModulesToSaveWrapper` that is the frozen `original_module`, which a unit of its own keeps sharded
        (never all-gathered) while the trained copy is in use."""
        while not any(id(q) not in self.assigned for q in module.parameters(recurse=False)):
            holders = [c for c in module.children() if self.free(c)]
            if len(holders) != 1 or isinstance(holders[0], _CONTAINERS):
                break
            module = holders[0]
        return module

    def trainable_subtrees(self, module: nn.Module) -> list[nn.Module]:
        """Maximal callable submodules of `module` whose free parameters are all trainable (LoRA A/B linears,
        peft `modules_to_save` copies); `module` itself is not considered."""
        found = []
        for child in module.children():
            free = self.free(child)
            if not free:
                continue
            if all(p.requires_grad for p in free) and not isinstance(child, _CONTAINERS):
                found.append(child)
            elif any(p.requires_grad for p in free):
                found.extend(self.trainable_subtrees(child))
        return found


def _layers(model: nn.Module) -> list[nn.Module]:
    classes = no_split_module_classes(model)
    return [m for m in model.modules() if m is not model and type(m).__name__ in classes]


def plan_units(model: nn.Module) -> list[Unit]:
    """The FSDP units of a `LlavaSP`, in the order `fully_shard` must be applied (innermost first)."""
    p = _Planner(model)
    llm = model.llm
    hf = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    for layer in _layers(hf):
        adapters = p.trainable_subtrees(layer)
        if adapters and any(not q.requires_grad for q in p.free(layer)):
            p.add(adapters, label=f"{len(adapters)} trainable modules")
        p.add([layer])
    inp, out = llm.get_input_embeddings(), llm.get_output_embeddings()
    if all(q.requires_grad for q in p.free(inp)):
        # Trained in full (stage.full_llm): a unit of its own, before the trainable subtrees would put it in the
        # decoder's. LlavaSP.embed looks tokens up before the LLM's forward runs, so an enclosing unit would not
        # have all-gathered the table yet.
        p.add([inp])
    for sub in p.trainable_subtrees(llm):
        p.add([sub])
    tied = out is not None and {id(q) for q in inp.parameters()} & {id(q) for q in out.parameters()}
    if not tied:  # tied weights must share a unit: leave them to the LM's unit
        p.add([p.narrow(inp)])
        if out is not None:
            p.add([p.narrow(out)])
    p.add([hf])
    p.add([llm])
    for layer in model.vision.fsdp_blocks():
        p.add([layer])
    p.add([model.vision])
    for part in model.projector.fsdp_units():  # declared by the projector (Projector.fsdp_units)
        p.add([part])
    p.add([model.projector])
    p.add([model], keep_empty=True)
    return p.units


def check_units(units: list[Unit], model: nn.Module) -> None:
    """Raise unless every parameter is in exactly one unit and no unit mixes trainable and frozen ones."""
    for unit in units:
        flags = {q.requires_grad for q in unit.params.values()}
        if len(flags) > 1:
            trainable = sorted(n for n, q in unit.params.items() if q.requires_grad)
            frozen = sorted(n for n, q in unit.params.items() if not q.requires_grad)
            raise MixedUnitError(
                f"FSDP unit '{unit.name}' would mix {len(trainable)} trainable parameters (e.g. {trainable[:3]}) "
                f"with {len(frozen)} frozen ones (e.g. {frozen[:3]}): give the trainable ones a module of their "
                "own (lightning_sp/distributed.py plan_units)"
            )
    owned = [n for u in units for n in u.params]
    missing = {n for n, _ in model.named_parameters()} - set(owned)
    if missing or len(owned) != len(set(owned)):
        raise RuntimeError(f"FSDP plan leaves out {sorted(missing)[:5]} or assigns a parameter twice")


def describe_units(units: list[Unit]) -> str:
    width = max(len(u.name) for u in units)
    rows = [
        f"{u.name:<{width}}  {'trainable' if u.trainable else 'frozen' if u.trainable is False else '-':>9}  "
        f"{u.numel():>13,}"
        for u in units
    ]
    return "\n".join([f"{'FSDP unit':<{width}}  {'':>9}  {'parameters':>13}", *rows])


# ---- applying it -------------------------------------------------------------------------------------------


def _fingerprint(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(f"{tuple(t.shape)}:{t.detach().float().sum(dtype=torch.float64).item():.10e}".encode())
    return h.hexdigest()[:16]


def sync_initial_weights(units: list[Unit], device: torch.device) -> None:
    """Before sharding: rank 0's trainable tensors to every rank; frozen ones must already agree."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for unit in units:
        if not unit.trainable:
            continue
        for q in unit.params.values():
            buf = q.data if device.type == "cpu" else q.data.to(device)
            dist.broadcast(buf, src=0)
            if buf is not q.data:
                q.data.copy_(buf.cpu())
    frozen = {u.name: _fingerprint(list(u.params.values())) for u in units if u.trainable is False}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, frozen)
    bad = sorted(k for k in frozen if any(other[k] != frozen[k] for other in everyone))
    if bad:
        raise RuntimeError(
            f"ranks hold different frozen weights in {bad[:5]}: every rank must load the same "
            "checkpoints (model.*.name_or_path) and init seeds"
        )


def shard_model(model: nn.Module, mesh, bf16: bool, sync: bool = True) -> list[Unit]:
    """Apply `fully_shard` to a `LlavaSP` per the plan above; returns the units (also logged on rank 0)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    # Trainable weights stay fp32 (the optimizer's master copy); bf16 is only the compute/all-gather dtype.
    for name, q in model.named_parameters():
        if q.requires_grad and q.dtype != torch.float32:
            log.info("trainable %s is %s: kept in float32 under FSDP", name, q.dtype)
            q.data = q.data.float()
    units = plan_units(model)
    check_units(units, model)
    if sync:
        sync_initial_weights(units, torch.device(mesh.device_type))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    for unit in units:
        fully_shard(unit.modules if len(unit.modules) > 1 else unit.modules[0], mesh=mesh, mp_policy=mp)
    plain = [n for n, q in model.named_parameters() if not isinstance(q, DTensor)]
    if plain:
        raise RuntimeError(f"parameters left unsharded after fully_shard: {plain[:5]}")
    return units


# ---- the strategy ------------------------------------------------------------------------------------------


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy as pure FSDP2: data parallel over every process, no tensor parallelism.

    Checkpoints hold trainable tensors only (`ignore_frozen_params`: the frozen 7B LLM is never gathered to
    rank 0 just to be dropped by `LlavaSPModule.on_save_checkpoint`). By default as one file in the same layout as
    single-device runs, so `last.ckpt` loads anywhere with `torch.load`; with `trainer.sharded_checkpoints`
    (`save_distributed_checkpoint`) as a directory of per-rank DCP shards that nothing gathers (full fine-tuning
    at 7B: ~92 GB of weights and AdamW state), which `checkpoint.read_checkpoint` reads without a process group."""

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size="auto",
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(
            full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True, ignore_frozen_params=True
        )
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # The base class loads the weights itself with strict=False (frozen ones are absent by design), which
        # would also accept a checkpoint that lacks a trainable tensor: check that first.
        path = Path(self.broadcast(checkpoint_path))
        if path.is_file():
            keys = torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)["state_dict"].keys()
            self.lightning_module.check_trainable_keys(keys)
        elif is_sharded_checkpoint(path):
            self.lightning_module.check_trainable_keys(sharded_tensor_keys(path))
            return self._load_sharded(path, weights_only)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def _load_sharded(self, path: Path, weights_only: Optional[bool]) -> dict[str, Any]:
        """Lightning's sharded load, but for trainable tensors only: its own asks DCP for the module's whole state
        dict, frozen weights included, which our checkpoints leave out by design ("Missing key in checkpoint").
        Each rank reads its own shards of the model and of every optimizer; returns the rest (`meta.pt`)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_state = {
            "state_dict": get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=True))
        }
        dcp.load(model_state, checkpoint_id=str(path))
        set_model_state_dict(self.model, model_state["state_dict"], options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(self.optimizers):  # keyed as ModelParallelStrategy.save_checkpoint keys them
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(optim_state, checkpoint_id=str(path))
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=optim_state[key], options=StateDictOptions(cpu_offload=True)
            )
        return torch.load(path / SHARDED_META, map_location="cpu", weights_only=weights_only)


def build_strategy(cfg) -> Any:
    """The Trainer's `strategy` argument for `cfg.trainer.strategy` (`fsdp` is ours; the rest is Lightning's)."""
    if cfg.trainer.strategy == "fsdp":
        return FSDP2Strategy(save_distributed_checkpoint=cfg.trainer.sharded_checkpoints)
    return cfg.trainer.strategy


# ---- per-rank accounting -----------------------------------------------------------------------------------


class RankSummary(Callback):
    """Counts what each rank trained on and writes `<run_dir>/ranks/rank<r>.json` at the end of fit, so that a
    multi-rank run can be checked for equal work (and a text-only-only rank is visible). `batches` counts this
    process's training batches (after a resume: those since the resume); `global_step` is the trainer's."""

    def __init__(self, run_dir) -> None:
        self.run_dir = Path(run_dir)
        self.batches = self.text_only_batches = self.samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        self.samples += int(batch["input_ids"].shape[0])
        if "has_image" in batch and not bool(batch["has_image"].any()):
            self.text_only_batches += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        summary = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "batches": self.batches,
            "samples": self.samples,
            "text_only_batches": self.text_only_batches,
            "epochs": trainer.current_epoch,
            "strategy": type(trainer.strategy).__name__,
        }
        log.info("rank %d/%d done: %s", trainer.global_rank, trainer.world_size, summary)
        out = self.run_dir / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(summary, indent=1))
