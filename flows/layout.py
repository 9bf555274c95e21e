"""Where each stage reads and writes, relative to the project root: one table for DVC and Prefect alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def raw_record(self) -> Path:
        """The raw stage's record: what the raw data files are now."""
        return self.root / "data" / "raw.json"

    @property
    def data_record(self) -> Path:
        return self.data / "record.json"

    def task_meta(self, task: str) -> Path:
        """One task's metadata (`source` or `target`), beside its `.npz`: what later stages depend on."""
        return self.data / f"{task}.json"

    @property
    def downloads(self) -> Path:
        return self.root / ".cache" / "fashion-mnist"

    @property
    def source_model(self) -> Path:
        return self.root / "models" / "source"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def weights_record(self) -> Path:
        return self.weights / "record.json"

    def source_weights(self, source: str) -> Path:
        """One source's verified weights (what extract@<source> depends on)."""
        return self.weights / f"{source}.json"

    @property
    def weights_cache(self) -> Path:
        return self.root / ".cache" / "weights"

    def store_root(self, source: str) -> Path:
        return self.root / "features" / source

    def extract_record(self, source: str) -> Path:
        return self.root / "features" / f"{source}.json"

    def run_model(self, run: str) -> Path:
        return self.root / "models" / "runs" / run

    def train_record(self, run: str) -> Path:
        return self.run_model(run) / "record.json"

    def evaluate_record(self, run: str) -> Path:
        return self.reports / run / "record.json"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def advice(self, source: str) -> Path:
        """The advise stage's `advice.json` and `probe.png` for one source."""
        return self.root / "reports" / "advise" / source

    def advice_record(self, source: str) -> Path:
        """The advise stage's record, also its `dvc metrics` file."""
        return self.advice(source) / "advice.json"

    def compare_init(self, run: str) -> Path:
        """A `headstart compare-init` run's model and history (not a pipeline output)."""
        return self.root / "models" / "compare-init" / run

    @property
    def sweep(self) -> Path:
        """The sweep's table, figures and summary (DVC outs)."""
        return self.root / "reports" / "sweep"

    @property
    def sweep_cells(self) -> Path:
        """One JSON per finished sweep cell; kept across reruns (DVC `persist`) so a stopped sweep resumes."""
        return self.root / "reports" / "sweep" / "cells"
