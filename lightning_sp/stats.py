"""Accuracy with bootstrap confidence intervals, and paired comparisons of two arms on the same questions.

Inputs are 0/1 hit matrices: one row per validation question, one column per seed (a 1-D array is one seed).
Questions are the unit of resampling: the seeds of one question are not independent draws (the same image and
question, answered by models trained on the same data), so pooling over seeds keeps each question's hits
together (a cluster bootstrap by question id) rather than treating question x seed cells as independent.

- :func:`accuracy_interval`: mean accuracy over all cells and its percentile-bootstrap interval (resample
  questions with replacement, ``n_boot`` times, each question bringing its hits from every seed).
- :func:`paired_comparison`: arm minus reference on the same questions and seeds: the difference in accuracy,
  its paired percentile-bootstrap interval (the same resampled questions for both arms), and the p-value of
  :func:`sign_flip_p_value`, an exact paired sign-flip (randomisation) test at the question level. With one seed
  it is exactly McNemar's exact test on the discordant pairs (two-sided, min(1, 2 P(X <= min(b, c))) with
  X ~ Binomial(b + c, 1/2)); with several seeds it stays valid where a McNemar test on pooled question x seed
  pairs would not (the pairs of one question are not independent).

Every function draws from ``numpy.random.default_rng(seed)`` with a fixed default seed: a table is reproducible.

Validation writes the per-question hits of each run to ``<run_dir>/val_questions.jsonl`` (:data:`VAL_QUESTIONS`;
:func:`write_questions`, :func:`read_questions`), one ``{"id", "qtype", "hit"}`` per line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

VAL_QUESTIONS = "val_questions.jsonl"
LEVEL = 0.95
N_BOOT = 10_000
SEED = 0
_CHUNK_CELLS = 4_000_000  # resampled indices held at once (32 MB of int64): bounds memory for large sets


def write_questions(path: str | Path, questions: Iterable[dict]) -> None:
    Path(path).write_text(
        "".join(json.dumps({"id": q["id"], "qtype": q["qtype"], "hit": int(q["hit"])}) + "\n" for q in questions)
    )


def read_questions(path: str | Path) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not {"id", "qtype", "hit"} <= set(row) or row["hit"] not in (0, 1):
            raise ValueError(f'{path}:{number}: expected {{"id", "qtype", "hit": 0|1}}, got {line[:200]}')
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Interval:
    """An accuracy and its bootstrap interval over ``questions`` questions x ``seeds`` seeds."""

    estimate: float
    low: float
    high: float
    questions: int
    seeds: int


@dataclass(frozen=True)
class Paired:
    """Arm minus reference on the same questions and seeds. ``better``/``worse``: question x seed pairs where
    only the arm / only the reference was right (the discordant pairs)."""

    difference: float
    low: float
    high: float
    p_value: float
    questions: int
    seeds: int
    better: int
    worse: int

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def _as_matrix(hits) -> np.ndarray:
    h = np.asarray(hits)
    if h.ndim == 1:
        h = h[:, None]
    if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(f"hits must be a non-empty (questions,) or (questions, seeds) array, got shape {h.shape}")
    if not np.isin(h, (0, 1)).all():
        raise ValueError("hits must be 0/1 (or bool)")
    return h.astype(np.int64)


def bootstrap_means(values: np.ndarray, n_boot: int = N_BOOT, seed: int = SEED) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement, of the same size) of the 1-D ``values``. Resample ``b``
    takes the indices ``rng.integers(0, n, size=n)`` of the ``b``-th such draw, chunking aside."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        out[start : start + rows] = values[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    return out


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def accuracy_interval(hits, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED) -> Interval:
    """Accuracy over every question x seed cell, with the percentile-bootstrap interval over questions."""
    h = _as_matrix(hits)
    per_question = h.mean(axis=1)  # every question has every seed: the mean of rows is the mean of cells
    low, high = _percentiles(bootstrap_means(per_question, n_boot, seed), level)
    return Interval(float(per_question.mean()), low, high, h.shape[0], h.shape[1])


def paired_comparison(hits, reference_hits, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = SEED) -> Paired:
    """``hits`` minus ``reference_hits``, row for row the same question and column for column the same seed."""
    a, r = _as_matrix(hits), _as_matrix(reference_hits)
    if a.shape != r.shape:
        raise ValueError(f"paired arms need the same questions and seeds, got shapes {a.shape} and {r.shape}")
    per_question = (a - r).mean(axis=1)
    low, high = _percentiles(bootstrap_means(per_question, n_boot, seed), level)
    return Paired(
        float(per_question.mean()),
        low,
        high,
        sign_flip_p_value((a - r).sum(axis=1)),
        a.shape[0],
        a.shape[1],
        int(((a == 1) & (r == 0)).sum()),
        int(((a == 0) & (r == 1)).sum()),
    )


def _binomial_half_pmf(n: int) -> np.ndarray:
    """P(X = j), j = 0..n, for X ~ Binomial(n, 1/2), through log C(n, j) (no overflow for large n)."""
    j = np.arange(1, n + 1)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - j + 1) - np.log(j))])
    return np.exp(log_comb - n * np.log(2.0))


def sign_flip_p_value(differences) -> float:
    """Exact two-sided p-value of the paired sign-flip test: under the null (within each question the two arms'
    results are exchangeable) each question's integer difference ``m_i`` (arm's hits minus reference's, summed
    over seeds) is ``+|m_i|`` or ``-|m_i|`` with probability 1/2, independently. p = P(|sum s_i |m_i|| >= |sum
    m_i|), computed exactly by convolving, for each magnitude v, the law of v x (2 Binomial(n_v, 1/2) - n_v)."""
    m = np.asarray(differences)
    if m.ndim != 1 or not np.issubdtype(m.dtype, np.integer):
        raise ValueError("differences must be a 1-D integer array (hits of the arm minus hits of the reference)")
    observed = abs(int(m.sum()))
    magnitudes, counts = np.unique(np.abs(m[m != 0]), return_counts=True)
    # dist[t + total] = P(T = t) for t in [-total, total], total = sum |m_i|
    dist = np.ones(1)
    for v, n_v in zip(magnitudes.tolist(), counts.tolist()):
        spaced = np.zeros(2 * v * n_v + 1)
        spaced[:: 2 * v] = _binomial_half_pmf(n_v)  # value v * (2j - n_v) at offset 2vj
        dist = np.convolve(dist, spaced)
    total = (len(dist) - 1) // 2
    values = np.abs(np.arange(-total, total + 1))
    return float(min(1.0, dist[values >= observed].sum()))
