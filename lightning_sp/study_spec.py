"""What a study is, as data: its arms (name, overrides), seeds and budget as read from its YAML, and each planned
run (arm, seed, overrides, run directory, composed config). `ablate` plans and runs them; `study_report` turns
their results into tables and a chart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, DictConfig

REFERENCE_ARM = "mlp"  # every other arm is compared with it, paired on the same questions
ALPHA = 0.05  # significance level of the paired comparisons


@dataclass
class ArmSpec:
    name: str = MISSING
    overrides: list[str] = field(default_factory=list)
    description: str = ""


@dataclass
class StudySpec:
    description: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    budget: list[str] = field(default_factory=list)
    arms: list[ArmSpec] = field(default_factory=list)


@dataclass
class PlannedRun:
    arm: str
    seed: int
    overrides: list[str]
    run_dir: Path
    cfg: DictConfig

    @property
    def finished(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()
