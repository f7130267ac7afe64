"""Multi-rank training on CPU: 2 processes over gloo, FSDP2 (trainer=fsdp) and DDP (trainer=ddp_cpu).

The training data is built so that one run covers the classic multi-rank hangs at once: three shards of
different sizes (8 image / 4 text-only / 12 image samples), which the node splitter deals out as rank 0 <- the
two image shards (20 samples), rank 1 <- the text-only shard (4 samples). Every step, rank 1's batch is
text-only and rank 0's is not, and rank 1 runs out of data five times sooner. Both ranks must still finish the
same number of steps, and every FSDP collective (all-gathers of the vision tower and projector included) must
match. Rank 0's first shard also starts with a record whose image is corrupt (a PNG that would crash torchvision's
decoder): the rank must skip and report it and still finish in step with the other. Each run is a subprocess
under a hard timeout (its whole process group is killed), so a hang fails the test instead of blocking the suite.
Each rank writes `<run_dir>/ranks/rank<r>.json` (train.RankSummary).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import TINY
from test_hostile_inputs import png_claiming

from lightning_sp import config as config_lib
from lightning_sp.config import ConfigError
from lightning_sp.data import shards, synthetic
from lightning_sp.distributed import MixedUnitError, Unit, check_units, plan_units
from lightning_sp.paths import REPO_ROOT

LAUNCH_TIMEOUT_S = 240
STEPS = 4


# ---- fast checks: wrap plan and config validation (no processes) ---------------------------------------------


def test_wrap_plan_keeps_trainable_and_frozen_apart(tiny_cfg, tokenizer):
    from lightning_sp.module import LlavaSPModule

    model = LlavaSPModule(tiny_cfg(), tokenizer).model  # LoRA + modules_to_save (embed_tokens, lm_head)
    units = plan_units(model)
    check_units(units, model)
    owned = [n for u in units for n in u.params]
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    by_name = {u.name: u for u in units}
    layers = model.llm.get_base_model().model.layers
    for i, layer in enumerate(layers):
        lora = next(u for u in units if u.modules[0] in layer.modules() and u.trainable)
        assert all("lora_" in n for n in lora.params) and len(lora.modules) == 14  # 7 targets x (A, B)
        frozen = next(u for u in units if u.modules == [layer])
        assert frozen.trainable is False and not any("lora_" in n for n in frozen.params)
    assert by_name["projector.sfe"].trainable and by_name["projector.dfi"].trainable
    assert by_name["vision"].trainable is False
    assert units[-1].modules == [model] and not units[-1].params  # the root owns nothing


@pytest.mark.parametrize("overrides", [["vision=siglip_tiny"], ["vision=dinov2_tiny", "llm=qwen2_tiny"]])
def test_wrap_plan_takes_blocks_from_any_backbone_and_units_from_the_projector(overrides, tokenizer):
    """The encoder's blocks come from its backbone (VisionBackbone.fsdp_blocks), the projector's parts from the
    projector (Projector.fsdp_units): a timm encoder and a Qwen2 LLM plan like CLIP and Llama."""
    from lightning_sp.data.tokenizer import load_tokenizer
    from lightning_sp.module import LlavaSPModule
    from lightning_sp.paths import resolve

    cfg = config_lib.compose(overrides)
    model = LlavaSPModule(cfg, load_tokenizer(str(resolve(cfg.model.tokenizer)))).model
    units = plan_units(model)
    check_units(units, model)
    assert sorted(n for u in units for n in u.params) == sorted(n for n, _ in model.named_parameters())
    blocks = model.vision.fsdp_blocks()
    assert len(blocks) == cfg.model.vision.num_layers - 1  # pruned after the selected (penultimate) block
    assert all(any(u.modules == [block] for u in units) for block in blocks)
    assert all(any(u.modules == [part] for u in units) for part in model.projector.fsdp_units())
    layers = model.llm.get_base_model().model.layers
    assert all(any(u.modules == [layer] and u.trainable is False for u in units) for layer in layers)


def test_a_unit_mixing_trainable_and_frozen_is_refused(tiny_cfg, tokenizer):
    from lightning_sp.module import LlavaSPModule

    model = LlavaSPModule(tiny_cfg(), tokenizer).model
    layer = model.llm.get_base_model().model.layers[0]  # frozen base weights + trainable LoRA, wrapped whole
    mixed = [Unit("layer 0 whole", [layer], dict(layer.named_parameters()))]
    with pytest.raises(MixedUnitError, match="'layer 0 whole' would mix .* trainable .* frozen"):
        check_units(mixed, model)


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "bf16-true"])
def test_fsdp_refuses_fp16_and_bf16_true(precision):
    with pytest.raises(ConfigError, match=f"trainer.precision={precision} with trainer.strategy=fsdp.*bf16-mixed"):
        config_lib.compose(["trainer=fsdp", f"trainer.precision={precision}"])


def test_global_batch_size():
    cfg = config_lib.compose(["trainer=ddp_cpu", "data.batch_size=4", "trainer.accumulate_grad_batches=3"])
    from lightning_sp.global_batch import global_batch_size

    assert global_batch_size(cfg) == 4 * 2 * 3
    assert global_batch_size(config_lib.compose(["trainer=fsdp"])) is None  # devices=-1: at launch


# ---- 2-process runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multirank")
    raw = root / "raw"
    synthetic.generate(raw, n_train=20, n_val=8, seed=0, image_size=336, turns=2, workers=1, progress=False)
    records = json.loads((raw / "train.json").read_text())
    text_only = [
        {
            "id": f"text_{i}",
            "conversations": [{"from": "human", "value": f"Say the number {i}."}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(4)
    ]
    parts = [records[:8], text_only, records[8:]]  # shard i of the merged index: ranks take shards[rank::2]
    train, listed = root / "train", []
    train.mkdir()
    for i, part in enumerate(parts):
        (root / f"part{i}.json").write_text(json.dumps(part))
        index = shards.convert(
            root / f"part{i}.json", raw, root / f"part{i}", shard_size=len(part), workers=1, progress=False
        )
        (entry,) = index["shards"]
        shutil.copy(root / f"part{i}" / entry["name"], train / f"shard-{i:06d}.tar")
        listed.append({**entry, "name": f"shard-{i:06d}.tar"})
    prepend_corrupt_record(train / "shard-000000.tar")
    listed[0].update(samples=listed[0]["samples"] + 1, images=listed[0]["images"] + 1)
    totals = {k: sum(s[k] for s in listed) for k in ("samples", "images", "text_only")}
    (train / "index.json").write_text(
        json.dumps(
            {
                "shards": listed,
                "totals": {**totals, "records": totals["samples"], "skipped": 0, "skipped_by_reason": {}},
            }
        )
    )
    shards.convert(raw / "val.json", raw, root / "val", shard_size=8, workers=1, progress=False)
    return {"train": train, "val": root / "val"}


def prepend_corrupt_record(shard: Path) -> None:
    """Put an image record whose PNG rows do not match its data first in `shard`, so that the rank streaming it
    reads it in its first batches."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    record = {
        "id": "corrupt_image",
        "image": "corrupt_image.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "?"}],
    }
    with tarfile.open(shard, "w") as tar:
        for name, blob in (
            ("corrupt_image.json", json.dumps(record).encode()),
            ("corrupt_image.png", png_claiming(20, 16)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for member, blob in members:
            tar.addfile(member, io.BytesIO(blob))


def assert_corrupt_record_skipped(run_dir: Path) -> None:
    out = (run_dir.parent / "launch.log").read_text()
    assert "skipping record 'corrupt_image' from" in out and "(reason image_corrupt)" in out, out[-3000:]


def overrides(data, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        "data.synthetic=null",
        f"data.train_dir={data['train']}",
        f"data.val_dir={data['val']}",
        "data.batch_size=4",
        "data.val_batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "viz.enabled=false",
        f"run_dir={run_dir}",
        *extra,
    ]


def launch(args: list[str], timeout: float = LAUNCH_TIMEOUT_S) -> str:
    """Run `python ARGS` (which launches its second rank itself); kill the whole process group on timeout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "LIGHTNING_SP_RUN_DIR")
    }
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"2-process run hung (> {timeout}s): python {' '.join(args)}\n{out[-4000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}: python {' '.join(args)}\n{out[-6000:]}"
    return out


def rank_summaries(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def assert_equal_work_with_a_text_only_rank(run_dir: Path, steps: int = STEPS, batches: int = STEPS) -> None:
    ranks = rank_summaries(run_dir)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [steps, steps], ranks
    assert [r["batches"] for r in ranks] == [batches, batches], ranks
    # rank 1 trained on the text-only shard only, rank 0 never saw a text-only batch
    assert [r["text_only_batches"] for r in ranks] == [0, batches], ranks


@pytest.fixture(scope="module")
def fsdp_run(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    out = launch(
        [
            "-m",
            "lightning_sp",
            "train",
            *overrides(
                data,
                run_dir,
                "trainer=fsdp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "trainer.precision=32-true",
            ),
        ]
    )
    (run_dir.parent / "launch.log").write_text(out)
    return run_dir


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    (run_dir.parent / "launch.log").write_text(
        launch(["-m", "lightning_sp", "train", *overrides(data, run_dir, "trainer=ddp_cpu")])
    )
    return run_dir


def trainable_state(path: Path) -> dict[str, torch.Tensor]:
    from lightning_sp.checkpoint import read_checkpoint

    if path.is_dir():  # a sharded checkpoint (trainer.sharded_checkpoints)
        return read_checkpoint(path)["state_dict"]
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_fsdp_two_ranks_uneven_shards_text_only_rank(fsdp_run):
    assert_equal_work_with_a_text_only_rank(fsdp_run)
    assert_corrupt_record_skipped(fsdp_run)
    assert {r["strategy"] for r in rank_summaries(fsdp_run)} == {"FSDP2Strategy"}
    metrics = json.loads((fsdp_run / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "val/accuracy"))  # val ran under FSDP


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_fsdp_checkpoint_is_one_trainable_only_file_that_loads_without_fsdp(fsdp_run, tokenizer):
    from lightning_sp.module import LlavaSPModule

    last = fsdp_run / "checkpoints" / "last.ckpt"
    assert last.is_file()  # save_distributed_checkpoint=False: a single file, not a directory of shards
    state = trainable_state(last)
    fresh = LlavaSPModule(config_lib.load_saved(fsdp_run / "config.yaml"), tokenizer)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all(type(t) is torch.Tensor for t in state.values())  # no DTensors
    before = {n: p.detach().clone() for n, p in fresh.named_parameters() if n in trainable}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and not set(missing) & trainable
    params = dict(fresh.named_parameters())
    assert all(torch.equal(params[n], state[n]) for n in state)
    assert any(not torch.equal(before[n], state[n]) for n in state)  # it did train


@pytest.mark.slow
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
def test_ddp_two_ranks_same_work_and_same_weights_as_fsdp(ddp_run, fsdp_run):
    assert_equal_work_with_a_text_only_rank(ddp_run)
    assert_corrupt_record_skipped(ddp_run)
    assert {r["strategy"] for r in rank_summaries(ddp_run)} == {"DDPStrategy"}
    # Same data, init and optimizer: FSDP's sharded all-gather / reduce-scatter steps must reproduce DDP's
    # all-reduce steps (gradient clipping over sharded gradients included) up to float reassociation.
    ddp, fsdp = (
        trainable_state(ddp_run / "checkpoints" / "last.ckpt"),
        trainable_state(fsdp_run / "checkpoints" / "last.ckpt"),
    )
    assert set(ddp) == set(fsdp)
    worst = max(((ddp[k] - fsdp[k]).abs().max().item(), k) for k in ddp)
    assert worst[0] < 1e-5, worst  # observed: ~1e-7


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_fsdp_resume_restores_weights_bf16_with_gradient_checkpointing(fsdp_run, data, tmp_path):
    run_dir, report = tmp_path / "resumed", tmp_path / "restored.json"
    launch(
        [
            str(Path(__file__).with_name("distributed_resume.py")),
            str(fsdp_run / "checkpoints" / "last.ckpt"),
            str(report),
            *overrides(
                data,
                run_dir,
                "trainer=fsdp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "trainer.precision=bf16-mixed",
                "model.llm.gradient_checkpointing=true",
                f"trainer.max_steps={STEPS + 2}",
            ),
        ]
    )
    restored = json.loads(report.read_text())
    assert restored["same_keys"] and restored["max_abs_diff"] == 0.0 and restored["restored_step"] == STEPS
    # every rank's own stream position was saved (rank 0 wrote the file) and each rank continued from its own
    saved = torch.load(fsdp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    data_state = saved["ShardDataModule"]
    assert len(data_state["stream_positions"]) == 2
    for rank, position in enumerate(data_state["stream_positions"]):
        now = json.loads((tmp_path / f"restored.rank{rank}.json").read_text())
        end_of_epoch = position["batches"] >= data_state["steps_per_epoch"]
        assert now["epoch"] == position["epoch"] + end_of_epoch
        assert now["batches"] == (1 if end_of_epoch else position["batches"] + 1)
        assert end_of_epoch or all(now["raw"][str(w)] >= r for w, r in position["raw"].items())
    assert_equal_work_with_a_text_only_rank(run_dir, steps=STEPS + 2, batches=2)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_equal_val_shares_give_every_rank_the_same_number_of_batches(data, tokenizer, monkeypatch):
    from lightning_sp.data.datamodule import ShardDataModule

    counts = {}
    for rank in range(3):  # 8 val samples over 3 ranks: 3/3/2 by striding, 2/2/2 with equal shares
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        dm = ShardDataModule(
            data["train"],
            data["val"],
            tokenizer,
            num_visual_tokens=582,
            image_size=336,
            batch_size=4,
            val_batch_size=1,
            num_workers=0,
            equal_val_shares=True,
        )
        counts[rank] = sum(len(b["ids"]) for b in dm.val_dataloader())
    assert counts == {0: 2, 1: 2, 2: 2}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT_S)
def test_two_nodes_one_process_each_over_localhost(data, tmp_path, ddp_run):
    """Two "nodes" on this machine, launched as a cluster would (NODE_RANK, MASTER_ADDR/PORT per node, one
    process each; README "Several nodes" gives the command): one world of 2, equal steps and batches per rank, and
    one checkpoint, written by global rank 0, whose weights equal those of the one-node 2-process DDP run."""
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "lightning_sp",
        "train",
        *overrides(data, run_dir, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2"),
    ]
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "LIGHTNING_SP_RUN_DIR")
    }
    base.update(
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    procs = [
        subprocess.Popen(
            args,
            cwd=REPO_ROOT,
            env={**base, "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("2-node run hung:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(o[-4000:] for o in outs)
    ranks = rank_summaries(run_dir)
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert [r["global_step"] for r in ranks] == [STEPS, STEPS] and [r["batches"] for r in ranks] == [STEPS, STEPS]
    assert "global batch 8 = 4 per device x 2 devices" in outs[0]  # nodes counted
    assert "resolved config in config.yaml" in outs[0] and "resolved config" not in outs[1]  # node 1 is not rank 0
    # Same world of 2, same data split by global rank, same gloo all-reduce of two gradients (a + b is the same
    # float either way round): splitting the ranks over two "nodes" must not change one bit of the result.
    state = trainable_state(run_dir / "checkpoints" / "last.ckpt")
    one_node = trainable_state(ddp_run / "checkpoints" / "last.ckpt")
    assert state and state.keys() == one_node.keys()
    assert all(torch.equal(state[k], one_node[k]) for k in state), max(
        ((state[k] - one_node[k]).abs().max().item(), k) for k in state
    )


@pytest.mark.slow
@pytest.mark.timeout(4 * LAUNCH_TIMEOUT_S)
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_full_finetuning_under_fsdp_resumes_from_a_kill_to_the_uninterrupted_result(data, tmp_path, sharded):
    """stage=finetune_full on 2 processes under FSDP2 (every decoder layer a trainable unit; the uneven shards and
    the text-only rank above), killed with SIGKILL once its mid-epoch step-2 checkpoint exists, then resume=auto:
    the final weights -- the whole LLM and the projector -- and the loss equal a run that was never killed. With
    trainer.sharded_checkpoints every checkpoint is a directory of per-rank DCP shards, resumed from as such, and
    `eval`/`export`'s loader rebuilds the model from it."""
    import time

    def args(run: str, *extra: str) -> list[str]:
        return [
            "-m",
            "lightning_sp",
            "train",
            *overrides(
                data,
                tmp_path / run,
                "trainer=fsdp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "trainer.precision=32-true",
                "stage=finetune_full",
                "optim.lr_llm=1e-3",
                "trainer.max_steps=8",
                "trainer.val_check_interval=2",
                f"trainer.sharded_checkpoints={str(sharded).lower()}",
            ),
            *extra,
        ]

    launch(args("whole"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT", "LIGHTNING_SP_RUN_DIR")
    }
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    victim = subprocess.Popen(
        [sys.executable, *args("killed")],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = tmp_path / "killed" / "checkpoints" / "step000002.ckpt"
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    from lightning_sp.checkpoint import checkpoint_step

    def saved() -> bool:  # readable, not merely present: a sharded save writes meta.pt last, in place
        try:
            return checkpoint_step(first) == 2
        except Exception:  # noqa: BLE001 -- absent or still being written
            return False

    while not saved() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # both ranks: the second is the first one's child
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "killed" / "metrics.json").exists()
    launch(args("killed", "resume=auto"))

    whole, resumed = (trainable_state(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("whole", "killed"))
    assert whole.keys() == resumed.keys()
    assert {k.split(".")[1] for k in whole} == {"llm", "projector"}  # the whole LLM is saved: it all trains
    assert any(k.endswith("layers.0.self_attn.q_proj.weight") for k in whole) and not any("lora_" in k for k in whole)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), max(
        (whole[k] - resumed[k]).abs().max().item() for k in whole
    )
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("whole", "killed")]
    assert metrics[0]["train/loss"] == metrics[1]["train/loss"] and metrics[1]["global_step"] == 8
    assert_equal_work_with_a_text_only_rank(tmp_path / "killed", steps=8, batches=6)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert last.is_dir() == sharded
    if sharded:  # one shard file per rank; the module is rebuilt from the directory without a process group
        from lightning_sp.module import load_module

        assert sorted(p.name for p in last.resolve().glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        module = load_module(tmp_path / "killed")
        params = dict(module.named_parameters())
        assert all(torch.equal(params[k], resumed[k]) for k in resumed)


@pytest.mark.slow
@pytest.mark.timeout(3 * LAUNCH_TIMEOUT_S)
def test_a_timm_backbone_under_fsdp_trains_as_under_ddp(data, tmp_path):
    """The SigLIP-style timm tower (27x27 grid, no CLS token; its blocks are FSDP units of their own) with the
    cropping projector on 2 processes: FSDP2 gives DDP's weights, as the CLIP tower does above."""
    not_vision = [item for item in overrides(data, tmp_path / "x") if not item.startswith("model.vision.")]
    runs = {}
    for strategy in ("ddp_cpu", "fsdp"):
        run_dir = tmp_path / strategy
        args = [a for a in not_vision if not a.startswith("run_dir=")]
        extra = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"] * (strategy == "fsdp")
        out = launch(
            ["-m", "lightning_sp", "train", *args, "vision=siglip_tiny", "variant=cropping", f"trainer={strategy}",
             *extra, f"run_dir={run_dir}"]
        )  # fmt: skip
        if strategy == "fsdp":
            assert "vision.model.blocks.1 " in out and "projector.sfe " in out, out[-3000:]  # timm blocks are units
        runs[strategy] = trainable_state(run_dir / "checkpoints" / "last.ckpt")
        assert [r["world_size"] for r in rank_summaries(run_dir)] == [2, 2]
    ddp, fsdp = runs["ddp_cpu"], runs["fsdp"]
    assert set(ddp) == set(fsdp) and any("projector.sfe" in k for k in ddp)
    worst = max(((ddp[k] - fsdp[k]).abs().max().item(), k) for k in ddp)
    assert worst[0] < 1e-5, worst
