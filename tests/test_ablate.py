"""Ablation studies: study files, planning, the results table, and a tiny end-to-end study that re-runs."""

import csv
import json

import numpy as np
import pytest
import yaml
from conftest import TINY
from evalkit import small_data

from lightning_sp import study_report
from lightning_sp.ablate import load_study, parse_ablate_args, plan_study, run_study
from lightning_sp.study_report import write_results
from lightning_sp.study_spec import PlannedRun, StudySpec
from lightning_sp.config import ConfigError, compose
from lightning_sp.stats import VAL_QUESTIONS, accuracy_interval, sign_flip_p_value, write_questions


@pytest.mark.parametrize("study", ["default", "arms", "encoders"])
def test_shipped_studies_compose_every_arm(tmp_path, study):
    name, spec = load_study(study)
    runs = plan_study(name, spec, ["trainer.max_steps=20"], root=tmp_path)
    assert len(runs) == len(spec.arms) * len(spec.seeds)
    first = runs[0]
    assert first.run_dir == tmp_path / study / spec.arms[0].name / f"seed{spec.seeds[0]}"
    assert first.cfg.seed == spec.seeds[0] and first.cfg.trainer.max_steps == 20
    # The command line beats the budget, and the last step still validates.
    assert all(r.cfg.trainer.max_steps % r.cfg.trainer.val_check_interval == 0 for r in runs)
    if study == "encoders":  # the encoder as the axis: one projector, three backbones and grids
        assert {r.cfg.projector.name for r in runs} == {"pooling"}
        seen = {r.arm: (r.cfg.model.vision.backbone, r.cfg.model.vision.image_size // r.cfg.model.vision.patch_size)
                for r in runs}  # fmt: skip
        assert seen == {"clip": ("clip", 12), "siglip": ("timm", 27), "dinov2": ("timm", 16)}
        return
    names = {r.arm: r.cfg.projector.name for r in runs}
    assert (names["mlp"], names["pooling"], names["cropping"]) == ("mlp", "pooling", "cropping")
    if study == "arms":
        assert {r.cfg.projector.dfi for r in runs if r.arm == "pooling_nodfi"} == {False}
        assert {len(r.cfg.projector.sides) for r in runs if r.arm == "pooling_sp12"} == {12}


def _study(tmp_path, arms, budget=(), seeds=(0,)):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {"seeds": list(seeds), "budget": list(budget), "arms": [{"name": n, "overrides": o} for n, o in arms]}
        )
    )
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
    kwargs, rest = parse_ablate_args(
        ["study=default", "seeds=[0,2]", "arms=[mlp]", "root=/tmp/x", "trainer.max_steps=20", "variant=pooling"]
    )
    assert kwargs == {"study": "default", "seeds": [0, 2], "arms": ["mlp"], "root": "/tmp/x"}
    assert rest == ["trainer.max_steps=20", "variant=pooling"]
    with pytest.raises(ConfigError, match="isolate"):
        parse_ablate_args(["isolate=maybe"])


def test_results_table_is_mean_and_std_over_seeds(tmp_path):
    study_dir = tmp_path / "s"
    metrics = {
        ("a", 0): {
            "val/accuracy": 0.5,
            "val/accuracy_count": 0.25,
            "num_visual_tokens": 582.0,
            "params/total": 1.5e6,
            "fit_time_s": 10.0,
        },
        ("a", 1): {
            "val/accuracy": 0.7,
            "val/accuracy_count": 0.75,
            "num_visual_tokens": 582.0,
            "params/total": 1.5e6,
            "fit_time_s": 12.0,
        },
        ("b", 0): {"val/accuracy": 0.4, "num_visual_tokens": 576.0, "params/total": 1.2e6},
    }
    for (arm, seed), m in metrics.items():
        (study_dir / arm / f"seed{seed}").mkdir(parents=True)
        (study_dir / arm / f"seed{seed}" / "metrics.json").write_text(json.dumps(m))
    rows = study_report.summarize(study_dir, ["a", "b"], [0, 1])
    assert rows[0]["stats"]["val/accuracy"] == pytest.approx((0.6, 0.1414213), rel=1e-5)
    assert rows[1]["seeds"] == [0] and rows[1]["stats"]["val/accuracy"] == (0.4, None)
    spec = StudySpec(seeds=[0, 1], budget=["trainer.max_steps=5"])
    md = write_results(study_dir, "s", spec, rows, {"a": ["variant=pooling"], "b": ["variant=mlp"]}, [], [])
    assert "| a | 2 | **0.600 ± 0.141** | 0.500 ± 0.354 | 582 | 1.5M | 11.0 ± 1.4 |" in md
    assert "| b | 1 | 0.400 | – | 576 | 1.2M | – |" in md
    with open(study_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["arm"] for r in table] == ["a", "b"]
    assert float(table[0]["val/accuracy_mean"]) == pytest.approx(0.6) and table[1]["val/accuracy_std"] == ""


def _fake_study(tmp_path, rates: dict, seeds=(0, 1), n_per_type: int = 30):
    """Finished runs without training: metrics.json and per-question hits (count and locate questions, drawn at
    the arm's rate per type), plus the synthetic train/val JSON the priors come from. Returns (study_dir,
    {arm: {seed: {qid: hit}}}, qtype by id, planned runs, val records, train records)."""
    rng = np.random.default_rng(0)
    study_dir, raw = tmp_path / "study", tmp_path / "raw"
    raw.mkdir(parents=True)
    qtype = {f"val_{i:06d}": ("count", "locate")[i % 2] for i in range(2 * n_per_type)}
    answers = {"count": ["1", "2", "2", "3"], "locate": ["top", "left", "top left", "center"]}
    val = [
        {
            "id": qid,
            "qtype": qt,
            "conversations": [
                {"from": "human", "value": "<image>\nq"},
                {"from": "gpt", "value": answers[qt][i // 2 % 4]},
            ],
        }
        for i, (qid, qt) in enumerate(qtype.items())
    ]
    train = [
        {
            "id": f"t{i}",
            "qtypes": ["count", "locate"],
            "conversations": [
                {"from": "human", "value": "<image>\nq"},
                {"from": "gpt", "value": answers["count"][i % 3]},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": answers["locate"][(i % 5) % 4]},
            ],
        }
        for i in range(20)
    ]
    (raw / "val.json").write_text(json.dumps(val))
    (raw / "train.json").write_text(json.dumps(train))
    hits, runs = {}, []
    for arm, by_type in rates.items():
        hits[arm] = {}
        for seed in seeds:
            run_dir = study_dir / arm / f"seed{seed}"
            run_dir.mkdir(parents=True)
            hits[arm][seed] = {q: int(rng.random() < by_type[qt]) for q, qt in qtype.items()}
            write_questions(
                run_dir / VAL_QUESTIONS, [{"id": q, "qtype": qtype[q], "hit": h} for q, h in hits[arm][seed].items()]
            )
            (run_dir / "metrics.json").write_text(
                json.dumps({"val/accuracy": float(np.mean(list(hits[arm][seed].values()))), "num_visual_tokens": 576.0})
            )
            runs.append(PlannedRun(arm, seed, [], run_dir, compose([f"data.synthetic.raw_dir={raw}"])))
    return study_dir, hits, qtype, runs, val, train


def test_results_give_pooled_intervals_priors_paired_comparisons_and_a_chart(tmp_path):
    rates = {
        "mlp": {"count": 0.4, "locate": 0.3},
        "pooling": {"count": 0.95, "locate": 0.9},
        "cropping": {"count": 0.4, "locate": 0.35},
    }
    study_dir, hits, qtype, runs, val, train = _fake_study(tmp_path, rates)
    rows = study_report.summarize(study_dir, list(rates), [0, 1])
    priors = study_report.priors(runs, rows)
    md = write_results(study_dir, "study", StudySpec(seeds=[0, 1]), rows, {}, [], [], priors=priors)
    with open(study_dir / "results.csv") as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    ids = sorted(qtype)

    def matrix(arm, qt=None):
        return np.array([[hits[arm][s][q] for s in (0, 1)] for q in ids if qt is None or qtype[q] == qt])

    # Priors, directly: each type's most frequent training answer (count "2": 13 of 20; locate "top": 8 of 20),
    # scored on the val questions.
    majority = {"count": "2", "locate": "top"}
    prior = {
        qt: np.mean([r["conversations"][1]["value"] == majority[qt] for r in val if r["qtype"] == qt])
        for qt in ("count", "locate")
    }
    prior_all = np.mean([r["conversations"][1]["value"] == majority[r["qtype"]] for r in val])
    assert f"| prior | – | – | {prior_all:.3f} | {prior['count']:.3f} | {prior['locate']:.3f} |" in md
    for arm in rates:
        overall, by_type = matrix(arm), {qt: matrix(arm, qt) for qt in ("count", "locate")}
        iv = accuracy_interval(overall)
        assert iv.estimate == pytest.approx(overall.mean())  # pooled: every question x seed
        cells = [f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"]
        for qt, m in by_type.items():
            t = accuracy_interval(m)
            cells.append(f"{t.estimate:.3f} [{t.low:.3f}, {t.high:.3f}]")
            assert float(table[arm][f"val/accuracy_{qt}_pooled"]) == pytest.approx(m.mean())
            assert (
                float(table[arm][f"val/accuracy_{qt}_ci_low"]),
                float(table[arm][f"val/accuracy_{qt}_ci_high"]),
            ) == pytest.approx((t.low, t.high))
            assert float(table[arm][f"val/accuracy_{qt}_prior"]) == pytest.approx(prior[qt])
        assert f"| {arm} | 2 | 60 | " + " | ".join(cells) + " |" in md
        assert table[arm]["n_questions"] == "60"

    # Paired with mlp, directly: the difference of pooled accuracies, the sign-flip p of per-question sums.
    for arm in ("pooling", "cropping"):
        diff = matrix(arm).mean() - matrix("mlp").mean()
        p = sign_flip_p_value((matrix(arm) - matrix("mlp")).sum(axis=1))
        better = int(((matrix(arm) == 1) & (matrix("mlp") == 0)).sum())
        worse = int(((matrix(arm) == 0) & (matrix("mlp") == 1)).sum())
        assert float(table[arm]["diff"]) == pytest.approx(diff) and float(table[arm]["p_value"]) == pytest.approx(p)
        assert table[arm]["reference"] == "mlp" and table[arm]["significant"] == str(p < 0.05)
        assert f"| {arm} | 60 x 2 | {diff:+.3f} |" in md and f"| {better} / {worse} |" in md
    assert float(table["pooling"]["p_value"]) < 1e-6 and table["pooling"]["significant"] == "True"
    assert table["mlp"]["diff"] == "" and "| mlp | 60 x 2 |" not in md

    # The chart: a PNG, bars at the pooled accuracies with their intervals, priors drawn as ticks.
    from PIL import Image

    with Image.open(study_dir / "results.png") as png:
        assert png.format == "PNG" and png.width > 300
    assert "![per-type accuracy with 95 % intervals](results.png)" in md
    ax = study_report.chart(rows, priors).axes[0]
    bars = [c for c in ax.containers if c.__class__.__name__ == "BarContainer"]
    assert [b.get_label() for b in bars] == list(rates)
    for container, row in zip(bars, rows):
        keys = ["val/accuracy", "val/accuracy_count", "val/accuracy_locate"]
        assert [p.get_height() for p in container.patches] == pytest.approx(
            [row["intervals"][k].estimate for k in keys]
        )
        segments = container.errorbar.lines[2][0].get_segments()
        assert [y for s in segments for y in (s[0][1], s[1][1])] == pytest.approx(
            [y for k in keys for y in (row["intervals"][k].low, row["intervals"][k].high)]
        )
    ticks = [c for c in ax.collections if c.get_label().startswith("prior")]
    assert sorted({round(s[0][1], 9) for s in ticks[0].get_segments()}) == sorted(
        round(v, 9) for v in (prior_all, prior["count"], prior["locate"])
    )


def test_without_an_mlp_arm_the_paired_comparison_is_skipped_with_a_note(tmp_path):
    study_dir, *_ = _fake_study(
        tmp_path, {"pooling": {"count": 0.5, "locate": 0.5}, "cropping": {"count": 0.5, "locate": 0.5}}, seeds=(0,)
    )
    rows = study_report.summarize(study_dir, ["pooling", "cropping"], [0])
    md = write_results(study_dir, "study", StudySpec(seeds=[0]), rows, {}, [], [])
    assert "No paired comparison: the study has no `mlp` arm" in md and "| prior |" not in md
    with open(study_dir / "results.csv") as f:
        assert all(r["diff"] == "" and r["val/accuracy_pooled"] for r in csv.DictReader(f))


@pytest.mark.slow
def test_tiny_study_runs_writes_results_and_skips_finished_runs(tmp_path, capsys):
    budget = [
        *TINY,
        *small_data(tmp_path / "data"),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    arms = [
        ("mlp", ["variant=mlp"]),
        ("pooling_nodfi", ["variant=pooling", "projector.dfi=false"]),
        ("sp1", ["variant=pooling", "projector.sides=[24]"]),
    ]
    study = _study(tmp_path, arms, budget)
    root = tmp_path / "runs"
    result = run_study(study, root=root, progress=False)
    assert result["failed"] == [] and len(result["ran"]) == 3 and result["skipped"] == []

    study_dir = root / "tiny"
    for arm, _ in arms:
        metrics = json.loads((study_dir / arm / "seed0" / "metrics.json").read_text())
        assert {"val/accuracy", "num_visual_tokens", "params/total", "params/trainable", "fit_samples_per_sec"} <= set(
            metrics
        )
        assert list((study_dir / arm / "seed0" / "tb").rglob("events.out.tfevents.*"))
    md = (study_dir / "results.md").read_text()
    assert all(f"| {arm} | 1 |" in md for arm, _ in arms) and "acc count" in md
    with open(study_dir / "results.csv") as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    assert set(table) == {"mlp", "pooling_nodfi", "sp1"}
    tokens = {arm: float(r["num_visual_tokens_mean"]) for arm, r in table.items()}
    assert tokens == {"mlp": 576.0, "pooling_nodfi": 582.0, "sp1": 577.0}
    assert float(table["pooling_nodfi"]["params/projector_mean"]) > float(table["mlp"]["params/projector_mean"])
    # Per-question results (4 val questions: limit_val_batches=1) feed the intervals, priors and the comparison.
    for arm, r in table.items():
        assert r["n_questions"] == "4" and float(r["val/accuracy_pooled"]) == pytest.approx(
            float(r["val/accuracy_mean"])
        )
        assert r["val/accuracy_prior"] != "" and (r["reference"] == "mlp") == (arm != "mlp")
    assert "## Paired comparison with `mlp`" in md and (study_dir / "results.png").is_file()
    capsys.readouterr()

    # Re-run through the command line: everything is finished, nothing trains (no file of a run is rewritten).
    def run_files():
        return {p: p.stat().st_mtime_ns for arm, _ in arms for p in (study_dir / arm).rglob("*") if p.is_file()}

    before = run_files()
    from lightning_sp.cli import main

    assert main(["ablate", f"study={study}", f"root={root}"]) == 0
    assert "(0 run, 3 skipped, 0 failed)" in capsys.readouterr().out
    assert run_files() == before

    # A run that lost its metrics.json (say, interrupted) is cleared and trained again; only it.
    (study_dir / "mlp" / "seed0" / "metrics.json").unlink()
    again = run_study(study, root=root, progress=False)
    assert again["ran"] == ["mlp/seed0"] and len(again["skipped"]) == 2

    # Asking for another budget over finished runs is an error that names the key.
    with pytest.raises(ConfigError, match=r"trainer\.max_steps: 2 -> 4"):
        run_study(study, overrides=["trainer.max_steps=4"], root=root, progress=False)
