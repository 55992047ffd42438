"""A CSV log that survives resumes: one ``metrics.csv`` per run, continued rather than replaced.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when a new trainer starts in the same
folder, which would silently drop the history of a resumed run. Here a resumed run keeps the rows
logged before its checkpoint and replaces the ones after it (the crashed run's steps that are about
to be redone); a fresh run into a folder with an old log moves that log aside, never deletes it.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.resume_step is None:
            path.rename(path.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.csv"))
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") and int(row["step"]) < self.resume_step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/<name>/metrics.csv``, continued across resumes.

    ``resume_step``: the optimizer step of the checkpoint the run resumes from (rows logged at that
    step or later are dropped, as the resumed run logs them again); None for a fresh run.
    """

    def __init__(self, save_dir: str, name: str, resume_step: int | None) -> None:
        super().__init__(save_dir=save_dir, name=name, version="")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._resume_step)
        return self._experiment


def loss_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{"train": [(step, loss), ...], "val": [...]}`` from a run's ``logs/metrics.csv``, by optimizer
    step (1-based: Lightning logs the 0-based step); a resumed run's log reads as one history."""
    out: dict[str, list[tuple[int, float]]] = {"train": [], "val": []}
    with open(Path(run_dir) / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, name in (("train/loss", "train"), ("val/loss", "val")):
                if row.get(key):
                    out[name].append((int(row["step"]) + 1, float(row[key])))
    return out
