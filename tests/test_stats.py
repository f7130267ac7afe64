"""Bootstrap intervals and paired tests of lightning_sp/stats.py against direct, slow computations."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from lightning_sp.stats import accuracy_interval, paired_comparison, read_questions, sign_flip_p_value, write_questions


def _loop_percentile(samples: list[float], q: float) -> float:
    """numpy's default ("linear") quantile, written out: interpolate between the order statistics around
    (n - 1) q."""
    s = sorted(samples)
    h = (len(s) - 1) * q
    lo = math.floor(h)
    return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


def _loop_cluster_bootstrap(hits: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Resample questions one draw at a time; each drawn question brings all its seeds' hits; pool the cells."""
    rng = np.random.default_rng(seed)
    n = hits.shape[0]
    means = []
    for _ in range(n_boot):
        cells = []
        for i in rng.integers(0, n, size=n):
            cells.extend(int(x) for x in hits[i])
        means.append(sum(cells) / len(cells))
    return _loop_percentile(means, 0.025), _loop_percentile(means, 0.975)


def test_interval_equals_a_slow_loop_bootstrap_with_the_same_generator():
    rng = np.random.default_rng(7)
    for shape in ((37,), (41, 3)):  # one seed, and pooled over three seeds
        hits = (rng.random(shape) < 0.6).astype(int)
        got = accuracy_interval(hits, n_boot=300, seed=11)
        low, high = _loop_cluster_bootstrap(hits.reshape(shape[0], -1), 300, seed=11)
        assert got.estimate == pytest.approx(hits.mean())
        assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
        assert (got.questions, got.seeds) == (shape[0], 1 if len(shape) == 1 else shape[1])


def test_interval_matches_binomial_width_and_covers_at_the_nominal_rate():
    # Large n: the percentile interval is the normal one, p +- 1.96 sqrt(p(1-p)/n).
    rng = np.random.default_rng(1)
    hits = (rng.random(4000) < 0.3).astype(int)
    got = accuracy_interval(hits, n_boot=4000)
    p = hits.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(hits))
    assert got.low == pytest.approx(p - half, abs=0.002) and got.high == pytest.approx(p + half, abs=0.002)
    # Coverage of the true p over repeated experiments: ~95 % (300 experiments: +- 2.5 points is 2 sd).
    covered = 0
    for k in range(300):
        sample = (rng.random(300) < 0.4).astype(int)
        ci = accuracy_interval(sample, n_boot=1000, seed=k)
        covered += ci.low <= 0.4 <= ci.high
    assert 0.90 <= covered / 300 <= 0.99, covered


def test_pooling_seeds_resamples_questions_not_cells():
    # Seeds that agree on every question carry no more information than one seed: the interval must not shrink.
    rng = np.random.default_rng(3)
    one = (rng.random(200) < 0.5).astype(int)
    single = accuracy_interval(one)
    tripled = accuracy_interval(np.stack([one, one, one], axis=1))
    assert (tripled.low, tripled.high) == pytest.approx((single.low, single.high))


def _mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar: 2 P(X <= min(b, c)), X ~ Bin(b + c, 1/2), capped at 1, as exact fractions."""
    n = b + c
    tail = sum(Fraction(math.comb(n, j), 2**n) for j in range(min(b, c) + 1))
    return float(min(Fraction(1), 2 * tail))


def _brute_force_sign_flip(m: list[int]) -> float:
    observed = abs(sum(m))
    extreme = sum(
        abs(sum(s * x for s, x in zip(signs, m))) >= observed for signs in itertools.product((1, -1), repeat=len(m))
    )
    return extreme / 2 ** len(m)


@pytest.mark.parametrize("b,c,ties", [(0, 0, 5), (3, 3, 4), (12, 4, 30), (1, 9, 0), (40, 22, 100), (250, 190, 7)])
def test_one_seed_p_value_is_exact_mcnemar(b, c, ties):
    arm = np.array([1] * b + [0] * c + [1] * ties)
    ref = np.array([0] * b + [1] * c + [1] * ties)
    got = paired_comparison(arm, ref, n_boot=200)
    assert (got.better, got.worse) == (b, c)
    assert got.p_value == pytest.approx(_mcnemar(b, c), rel=1e-9)


def test_several_seeds_p_value_equals_enumerating_every_sign_flip():
    rng = np.random.default_rng(5)
    for _ in range(4):
        m = rng.integers(-3, 4, size=13)  # three seeds: per-question differences in -3..3
        assert sign_flip_p_value(m) == pytest.approx(_brute_force_sign_flip(m.tolist()), rel=1e-9)


def test_paired_difference_is_the_difference_of_accuracies_and_identical_arms_give_zero():
    rng = np.random.default_rng(9)
    arm = (rng.random((150, 2)) < 0.55).astype(int)
    ref = (rng.random((150, 2)) < 0.45).astype(int)
    got = paired_comparison(arm, ref, n_boot=2000)
    assert got.difference == pytest.approx(accuracy_interval(arm).estimate - accuracy_interval(ref).estimate)
    assert got.low < got.difference < got.high
    assert (got.questions, got.seeds) == (150, 2)
    same = paired_comparison(arm, arm)
    assert (same.difference, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not same.significant()
    with pytest.raises(ValueError, match="same questions and seeds"):
        paired_comparison(arm, ref[:, :1])


def test_paired_interval_equals_a_slow_loop_over_the_same_resampled_questions():
    rng = np.random.default_rng(2)
    arm, ref = (rng.random((60, 2)) < 0.7).astype(int), (rng.random((60, 2)) < 0.5).astype(int)
    got = paired_comparison(arm, ref, n_boot=300, seed=4)
    draws = np.random.default_rng(4)
    diffs = []
    for _ in range(300):
        idx = draws.integers(0, 60, size=60)
        diffs.append(sum(int(arm[i].sum()) for i in idx) / 120 - sum(int(ref[i].sum()) for i in idx) / 120)
    assert (got.low, got.high) == pytest.approx((_loop_percentile(diffs, 0.025), _loop_percentile(diffs, 0.975)))


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="0/1"):
        accuracy_interval([0, 1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        accuracy_interval([])
    with pytest.raises(ValueError, match="integer"):
        sign_flip_p_value(np.array([0.5, 1.0]))


def test_question_files_round_trip_and_name_a_bad_line(tmp_path):
    rows = [{"id": "val_000001", "qtype": "count", "hit": 1}, {"id": "val_000002", "qtype": "locate", "hit": 0}]
    write_questions(tmp_path / "q.jsonl", [{**rows[0], "hit": True}, rows[1]])
    assert read_questions(tmp_path / "q.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "qtype": "count", "hit": 1}\n{"id": "b", "hit": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        read_questions(tmp_path / "bad.jsonl")
