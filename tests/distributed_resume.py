"""Helper of tests/test_distributed.py (not a test): resume a run from a checkpoint under the configured strategy
and record, once the checkpoint is restored, how far the trainable weights are from the checkpoint's, and where
each rank's data stream continues.

    python tests/distributed_resume.py CKPT OUT_JSON override...

Lightning launches the other ranks by running this script again with the same arguments.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_sp import config as config_lib
from lightning_sp.data.tokenizer import load_tokenizer
from lightning_sp.module import LlavaSPModule
from lightning_sp.paths import resolve
from lightning_sp.train import build_datamodule, build_trainer


class CheckRestored(L.Callback):
    def __init__(self, ckpt: Path, out: Path) -> None:
        self.ckpt, self.out = ckpt, out

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A collective under FSDP (gathers the shards): every rank calls it, rank 0 receives the tensors.
        now = get_model_state_dict(
            pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        )
        if trainer.is_global_zero:
            saved = torch.load(self.ckpt, map_location="cpu", weights_only=True)["state_dict"]
            diff = max((now[k].float() - saved[k].float()).abs().max().item() for k in saved)
            self.out.write_text(
                json.dumps(
                    {
                        "same_keys": sorted(now) == sorted(saved),
                        "max_abs_diff": diff,
                        "restored_step": trainer.global_step,
                    }
                )
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # This rank's data-stream position once its first resumed batch is in (one batch past the checkpoint's).
        if not hasattr(self, "first_position"):
            self.first_position = trainer.datamodule.position.state_dict()
            self.out.with_name(f"{self.out.stem}.rank{trainer.global_rank}.json").write_text(
                json.dumps(self.first_position)
            )


def main(ckpt: str, out: str, overrides: list[str]) -> None:
    cfg = config_lib.compose(overrides)
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(str(resolve(cfg.model.tokenizer)))
    module = LlavaSPModule(cfg, tokenizer)
    datamodule = build_datamodule(cfg, tokenizer, module.model.num_visual_tokens)
    trainer = build_trainer(cfg, Path(cfg.run_dir))
    trainer.callbacks.append(CheckRestored(Path(ckpt), Path(out)))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
