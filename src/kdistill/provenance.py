"""What a checkpoint was trained with, so that resuming never continues a different run.

Every checkpoint kdistill writes holds ``kdistill_fingerprint.json``: the resolved config (as flat dotted keys, less
the keys a resume may change, :data:`RESUMABLE`) and a hash of the encoded training examples (token ids and labels
of every row, so a changed file, tokenizer, template or max_length shows). Resuming compares the newest checkpoint's
fingerprint with the current run's and refuses, naming every difference, when they differ or when the checkpoint
has none. The fingerprint is written last, after the weights, optimizer and trainer state, so a checkpoint without
one next to older checkpoints with one is a save that was killed midway: :func:`last_checkpoint` passes over it. ``kdistill train --no-resume`` starts over and deletes the old ``checkpoint-*`` folders first, so no later
run can pick them up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kdistill.errors import UserError

__all__ = ["FINGERPRINT_FILE", "RESUMABLE", "FingerprintCallback", "ResumeMismatchError", "check_resume",
           "clear_checkpoints", "config_fingerprint", "data_fingerprint", "last_checkpoint"]

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "kdistill_fingerprint.json"

RESUMABLE = frozenset({
    # how long and how often: extending a finished run or changing its logging is what resuming is for
    "training.max_steps", "training.num_train_epochs", "training.logging_steps", "training.logging_strategy",
    "training.save_steps", "training.save_strategy", "training.save_total_limit", "training.eval_steps",
    "training.eval_strategy", "training.report_to", "training.run_name", "training.logging_dir",
    "training.disable_tqdm", "training.dataloader_num_workers", "training.dataloader_pin_memory",
    "training.output_dir", "data.eval", "data.eval_split", "data.eval_limit",
})


class ResumeMismatchError(UserError, ValueError):
    """The checkpoint in output_dir belongs to a run with other settings or data."""


def _flatten(value: Any, prefix: str, out: dict) -> dict:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value
    return out


def config_fingerprint(config: dict) -> dict:
    """The resolved config (a plain dict, `kdistill.config.to_dict`) as {dotted key: value}, less RESUMABLE."""
    flat = _flatten(json.loads(json.dumps(config, default=str)), "", {})
    return {k: v for k, v in sorted(flat.items()) if k not in RESUMABLE}


def data_fingerprint(rows) -> str:
    """sha256 over every training row's token fields (ids and labels; precomputed teacher vectors left out)."""
    digest = hashlib.sha256()
    for row in rows:
        token_fields = {k: v for k, v in sorted(row.items()) if not k.startswith("teacher_")}
        digest.update(json.dumps(token_fields, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


class FingerprintCallback(TrainerCallback):
    """Writes the run's fingerprint into every checkpoint folder right after it is saved."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            tmp = folder / (FINGERPRINT_FILE + ".tmp")
            tmp.write_text(json.dumps(self.fingerprint, indent=1, sort_keys=True))
            tmp.replace(folder / FINGERPRINT_FILE)
        return control


def _step(folder: Path) -> int:
    suffix = folder.name[len("checkpoint-"):]
    return int(suffix) if suffix.isdigit() else -1


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The checkpoint a resumed run continues from: the newest `checkpoint-<step>` folder that carries a
    fingerprint. Newer folders without one were being written when the run was killed (the fingerprint is the
    last file of a checkpoint): they are skipped with a warning. When no folder has a fingerprint, the newest one
    is returned (and `check_resume` refuses it); None when there is no checkpoint."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = sorted((c for c in folder.glob("checkpoint-*") if c.is_dir() and _step(c) >= 0), key=_step)
    complete = [c for c in found if (c / FINGERPRINT_FILE).is_file()]
    if not complete:
        return str(found[-1]) if found else None
    skipped = [c.name for c in found if _step(c) > _step(complete[-1])]
    if skipped:
        logger.warning("%s: passing over %s, written only partly when the run stopped (no %s); resuming from %s",
                       folder, ", ".join(skipped), FINGERPRINT_FILE, complete[-1].name)
    return str(complete[-1])


def check_resume(checkpoint: str | Path, fingerprint: dict) -> None:
    """Refuse to resume from `checkpoint` unless it was written by a run with this fingerprint. `fingerprint` may
    lack "data" (checked before the data is encoded); then only the config is compared."""
    path = Path(checkpoint) / FINGERPRINT_FILE
    restart = "rerun with --no-resume to start over (it deletes the old checkpoints) or choose another output_dir"
    if not path.is_file():
        raise ResumeMismatchError(f"{checkpoint}: this checkpoint carries no kdistill fingerprint (another tool or "
                                  f"an older kdistill wrote it, or the run was killed while saving it), so it cannot be checked against this run; {restart}")
    saved = json.loads(path.read_text())
    differences = []
    old, new = saved.get("config", {}), fingerprint["config"]
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            was, now = old.get(key, "<absent>"), new.get(key, "<absent>")
            differences.append(f"{key}: {was!r} in the checkpoint, {now!r} now")
    if "data" in fingerprint and saved.get("data") != fingerprint["data"]:
        differences.append("the encoded training data differs (file, tokenizer, template or max_length changed)")
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise ResumeMismatchError(f"{checkpoint}: the checkpoint in output_dir is from a run with other settings, "
                                  f"resuming would continue that run: {shown}; {restart}")


def clear_checkpoints(output_dir: str | Path) -> list[str]:
    """Delete the `checkpoint-*` folders of output_dir (for a run that starts over); returns what was deleted."""
    folder = Path(output_dir)
    removed = []
    if folder.is_dir():
        for child in sorted(folder.glob("checkpoint-*")):
            if child.is_dir():
                shutil.rmtree(child)
                removed.append(str(child))
    if removed:
        logger.warning("starting over: deleted %d old checkpoint(s) in %s", len(removed), folder)
    return removed
