"""Cross-entropy pre-training of the tiny teacher that `kdistill tiny` writes (`--teacher-steps` and friends).

The teacher is trained by kdistill itself (`run_training` with the `ce` objective and no teacher), on one or more
local .jsonl/.json files, and saved in place. `pretrain` returns what `tiny.json` records about the run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.config import config_from_dict
from kdistill.data.io import read_rows
from kdistill.errors import ConfigError, MissingFileError
from kdistill.pipeline import run_training

__all__ = ["TeacherTraining", "pretrain"]

logger = logging.getLogger(__name__)

COMBINED = "teacher-data.jsonl"  # several --teacher-data files, concatenated for the run and removed after it


@dataclass(frozen=True)
class TeacherTraining:
    """How the tiny teacher is pre-trained; each field is a `--teacher-*` option of `kdistill tiny`."""

    steps: int = 0
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 128
    warmup: int | None = None  # default: a tenth of the steps, at least 1
    data: tuple[str, ...] = ()
    data_flag: str = "--teacher-data"  # the option that named `data`, for errors

    @property
    def warmup_steps(self) -> int:
        return max(self.steps // 10, 1) if self.warmup is None else self.warmup

    def check(self) -> None:
        """Refuse a setting that cannot train, naming its option; with steps > 0 also every data file."""
        for flag, value, low in (("--teacher-steps", self.steps, 0), ("--teacher-batch-size", self.batch_size, 1),
                                 ("--teacher-max-length", self.max_length, 2),
                                 ("--teacher-warmup", self.warmup_steps, 0)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{flag}: must be a whole number >= {low}, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"--teacher-lr: must be a number > 0, got {self.lr!r}")
        if not self.steps:
            return
        if self.warmup_steps > self.steps:
            raise ConfigError(f"--teacher-warmup {self.warmup_steps} exceeds --teacher-steps {self.steps}")
        if not self.data:
            raise ConfigError(f"{self.data_flag}: no file to pre-train the teacher on")
        for path in self.data:
            if not Path(path).is_file():
                raise MissingFileError(f"{self.data_flag}: file not found: {path!r}")
            if Path(path).suffix.lower() not in (".jsonl", ".json"):
                raise ConfigError(f"{self.data_flag} {path}: teacher pre-training reads .jsonl/.json rows (alpaca, "
                                  f"prompt/completion or messages); give --teacher-data such a file")

    def settings(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "max_length": self.max_length,
                "warmup": self.warmup_steps if self.steps else None}


def pretrain(model_path: str, training: TeacherTraining, out: Path, seed: int, progress: bool = True
             ) -> dict[str, Any]:
    """Plain SFT of a tiny model with kdistill's own trainer (objective `ce`, no teacher), saved in place.

    Several data files are concatenated into `out/teacher-data.jsonl` for the run. The loss is logged every tenth
    of the steps; `progress` shows the transformers progress bar. Returns the settings and, when it trained,
    `train_seconds`, `final_loss` (the last logged loss), `examples` (valid rows used) and `data`
    ([{"path", "rows"}] per file).
    """
    report: dict[str, Any] = {**training.settings(), "train_seconds": None, "final_loss": None,
                              "examples": None, "data": []}
    if not training.steps:
        return report
    files = [(path, read_rows(path)) for path in training.data]
    report["data"] = [{"path": path, "rows": len(rows)} for path, rows in files]
    combined = out / COMBINED
    if len(files) == 1:
        train_file = files[0][0]
    else:
        with combined.open("w", encoding="utf-8") as fh:
            for _, rows in files:
                fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for _, row in rows)
        train_file = str(combined)
    work_dir = out / "teacher-sft"
    cfg = config_from_dict({
        "student": {"name_or_path": model_path},
        "data": {"train": train_file, "max_length": training.max_length, "skip_invalid": True},
        "objectives": {"ce": {"weight": 1.0}},
        "training": {"output_dir": str(work_dir), "max_steps": training.steps,
                     "per_device_train_batch_size": training.batch_size, "learning_rate": training.lr,
                     "lr_scheduler_type": "cosine", "warmup_steps": training.warmup_steps,
                     "logging_steps": max(training.steps // 10, 1), "save_strategy": "no",
                     "disable_tqdm": not progress},
        "seed": seed,
    }, source="tiny teacher pre-training")
    logger.info("pre-training the teacher: %d steps on %s", training.steps,
                ", ".join(f"{d['path']} ({d['rows']} rows)" for d in report["data"]))
    start = time.perf_counter()
    try:
        summary = run_training(cfg, resume=False)
    finally:
        if len(files) > 1:
            combined.unlink(missing_ok=True)
    report["train_seconds"] = round(time.perf_counter() - start, 2)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        if (work_dir / name).exists():
            shutil.copy(work_dir / name, Path(model_path) / name)
    shutil.rmtree(work_dir)
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    report["final_loss"] = round(losses[-1], 4) if losses else None
    report["examples"] = summary["data"][0]["examples"] if summary["data"] else None
    logger.info("teacher pre-trained in %.1f s, final loss %s", report["train_seconds"], report["final_loss"])
    return report
