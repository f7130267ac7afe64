"""Ablation studies: study files, planning, the results table, and a tiny end-to-end study that re-runs."""

import csv
import json

import pytest
import yaml
from conftest import TINY
from evalkit import small_data

from lightning_sp import ablate
from lightning_sp.ablate import load_study, parse_ablate_args, plan_study, run_study, write_results
from lightning_sp.config import ConfigError


def test_default_study_composes_every_arm(tmp_path):
    name, spec = load_study("default")
    runs = plan_study(name, spec, ["trainer.max_steps=20"], root=tmp_path)
    assert len(runs) == len(spec.arms) * len(spec.seeds)
    first = runs[0]
    assert first.run_dir == tmp_path / "default" / spec.arms[0].name / f"seed{spec.seeds[0]}"
    assert first.cfg.seed == spec.seeds[0] and first.cfg.trainer.max_steps == 20
    # The command line beats the budget, and the last step still validates.
    assert all(r.cfg.trainer.max_steps % r.cfg.trainer.val_check_interval == 0 for r in runs)
    names = {r.arm: r.cfg.projector.name for r in runs}
    assert names["mlp"] == "mlp" and names["conv49"] == "conv49"
    assert {r.cfg.projector.dfi for r in runs if r.arm == "pooling_nodfi"} == {False}


def _study(tmp_path, arms, budget=(), seeds=(0,)):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"seeds": list(seeds), "budget": list(budget),
                                    "arms": [{"name": n, "overrides": o} for n, o in arms]}))
    return path


def test_study_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown study 'nope'.*default"):
        load_study("nope")
    with pytest.raises(ConfigError, match="repeated: a"):
        load_study(_study(tmp_path, [("a", []), ("a", [])]))
    name, spec = load_study(_study(tmp_path, [("a", ["variant=mlp"]), ("b", ["variant=nonesuch"])]))
    with pytest.raises(ConfigError, match="arm 'b'.*unknown variant 'nonesuch'"):
        plan_study(name, spec, root=tmp_path)
    with pytest.raises(ConfigError, match="use seeds="):
        plan_study(name, spec, ["seed=3"], root=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown arms \['c'\]"):
        plan_study(name, spec, root=tmp_path, arms=["c"])


def test_command_line_arguments_split_into_study_keys_and_overrides():
    kwargs, rest = parse_ablate_args(["study=default", "seeds=[0,2]", "arms=[mlp]", "root=/tmp/x",
                                      "trainer.max_steps=20", "variant=pooling"])
    assert kwargs == {"study": "default", "seeds": [0, 2], "arms": ["mlp"], "root": "/tmp/x"}
    assert rest == ["trainer.max_steps=20", "variant=pooling"]
    with pytest.raises(ConfigError, match="isolate"):
        parse_ablate_args(["isolate=maybe"])


def test_results_table_is_mean_and_std_over_seeds(tmp_path):
    study_dir = tmp_path / "s"
    metrics = {("a", 0): {"val/accuracy": 0.5, "val/accuracy_count": 0.25, "num_visual_tokens": 582.0,
                          "params/total": 1.5e6, "fit_time_s": 10.0},
               ("a", 1): {"val/accuracy": 0.7, "val/accuracy_count": 0.75, "num_visual_tokens": 582.0,
                          "params/total": 1.5e6, "fit_time_s": 12.0},
               ("b", 0): {"val/accuracy": 0.4, "num_visual_tokens": 576.0, "params/total": 1.2e6}}
    for (arm, seed), m in metrics.items():
        (study_dir / arm / f"seed{seed}").mkdir(parents=True)
        (study_dir / arm / f"seed{seed}" / "metrics.json").write_text(json.dumps(m))
    rows = ablate.summarize(study_dir, ["a", "b"], [0, 1])
    assert rows[0]["stats"]["val/accuracy"] == pytest.approx((0.6, 0.1414213), rel=1e-5)
    assert rows[1]["seeds"] == [0] and rows[1]["stats"]["val/accuracy"] == (0.4, None)
    spec = ablate.StudySpec(seeds=[0, 1], budget=["trainer.max_steps=5"])
    md = write_results(study_dir, "s", spec, rows, {"a": ["variant=pooling"], "b": ["variant=mlp"]}, [], [])
    assert "| a | 2 | **0.600 ± 0.141** | 0.500 ± 0.354 | 582 | 1.5M | 11.0 ± 1.4 |" in md
    assert "| b | 1 | 0.400 | – | 576 | 1.2M | – |" in md
    with open(study_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["arm"] for r in table] == ["a", "b"]
    assert float(table[0]["val/accuracy_mean"]) == pytest.approx(0.6) and table[1]["val/accuracy_std"] == ""


@pytest.mark.slow
def test_tiny_study_runs_writes_results_and_skips_finished_runs(tmp_path, monkeypatch, capsys):
    budget = [*TINY, *small_data(tmp_path / "data"), "trainer.max_steps=2", "trainer.val_check_interval=2",
              "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false"]
    arms = [("mlp", ["variant=mlp"]), ("pooling_nodfi", ["variant=pooling", "projector.dfi=false"]),
            ("sp1", ["variant=pooling", "projector.sides=[24]"])]
    study = _study(tmp_path, arms, budget)
    root = tmp_path / "runs"
    result = run_study(study, root=root, progress=False)
    assert result["failed"] == [] and len(result["ran"]) == 3 and result["skipped"] == []

    study_dir = root / "tiny"
    for arm, _ in arms:
        metrics = json.loads((study_dir / arm / "seed0" / "metrics.json").read_text())
        assert {"val/accuracy", "num_visual_tokens", "params/total", "params/trainable", "fit_samples_per_sec"} \
            <= set(metrics)
        assert list((study_dir / arm / "seed0" / "tb").rglob("events.out.tfevents.*"))
    md = (study_dir / "results.md").read_text()
    assert all(f"| {arm} | 1 |" in md for arm, _ in arms) and "acc count" in md
    with open(study_dir / "results.csv") as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    assert set(table) == {"mlp", "pooling_nodfi", "sp1"}
    tokens = {arm: float(r["num_visual_tokens_mean"]) for arm, r in table.items()}
    assert tokens == {"mlp": 576.0, "pooling_nodfi": 582.0, "sp1": 577.0}
    assert float(table["pooling_nodfi"]["params/projector_mean"]) > float(table["mlp"]["params/projector_mean"])
    capsys.readouterr()

    # Re-run through the command line: everything is finished, nothing trains.
    def no_training(run):
        raise AssertionError(f"{run.arm} trained again")

    monkeypatch.setattr(ablate, "_run_in_process", no_training)
    from lightning_sp.cli import main

    assert main(["ablate", f"study={study}", f"root={root}"]) == 0
    assert "(0 run, 3 skipped, 0 failed)" in capsys.readouterr().out

    # A run that lost its metrics.json (say, interrupted) is cleared and trained again; only it.
    monkeypatch.undo()
    (study_dir / "mlp" / "seed0" / "metrics.json").unlink()
    again = run_study(study, root=root, progress=False)
    assert again["ran"] == ["mlp/seed0"] and len(again["skipped"]) == 2

    # Asking for another budget over finished runs is an error that names the key.
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: 2 -> 4"):
        run_study(study, overrides=["trainer.max_steps=4"], root=root, progress=False)
