"""Session-wide offline fixtures: tokenizers trained from bundled text and tiny config-built models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca" / "alpaca_small_2000.jsonl"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def alpaca_small(tmp_path_factory, shared_data) -> Path:
    """The first 200 rows of the bundled Alpaca subset, with short outputs (keeps CPU tests fast)."""
    import json

    out = tmp_path_factory.mktemp("data") / "alpaca_200.jsonl"
    rows = []
    with ALPACA.open() as fh:
        for line in fh:
            row = json.loads(line)
            if len(row["output"]) < 300:
                rows.append(row)
            if len(rows) == 200:
                break
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _tiny_pair(tmp_path_factory, kind: str, data: Path, teacher_steps: int) -> dict[str, str]:
    from kdistill.apps.tiny import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp(f"tiny-{kind}"), kind=kind, data=data, vocab_size=400,
                          teacher_steps=teacher_steps, seed=0)


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory, alpaca_small) -> dict[str, str]:
    """{'teacher': path, 'student': path}: Qwen2-style, teacher briefly fine-tuned so it is peaked."""
    return _tiny_pair(tmp_path_factory, "causal", alpaca_small, teacher_steps=30)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory, alpaca_small) -> dict[str, str]:
    """{'teacher': path, 'student': path}: T5 v1.1-style, teacher briefly fine-tuned."""
    return _tiny_pair(tmp_path_factory, "t5", alpaca_small, teacher_steps=30)


def run_config(teacher: str | None, student: str, data: Path, output_dir: Path, **training) -> dict:
    """A small RunConfig dict for tests; callers adjust `objectives` etc."""
    cfg = {
        "student": {"name_or_path": student},
        "data": {"train": str(data), "max_length": 64},
        "training": {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "max_steps": 2,
                     "learning_rate": 1e-3, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
                     "dataloader_pin_memory": False, **training},
    }
    if teacher:
        cfg["teacher"] = {"name_or_path": teacher}
    return cfg


def launch_two(args, port) -> list[str]:
    """`accelerate launch` of `kdistill train ARGS` on two processes: `--multi_gpu` starts them with torchrun; with
    no GPU they run on the CPU (gloo)."""
    import shutil
    import sys

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate's launcher is installed with kdistill"
    return [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
            "-m", "kdistill.cli", "train", *args]


def run_checked(cmd, timeout=300):
    """Run a command from the repository root with one thread per process; it must succeed."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def summary_logs(out_dir) -> list[dict]:
    """The log history of a finished `kdistill train` run."""
    import json

    return json.loads((Path(out_dir) / "kdistill_summary.json").read_text())["log_history"]


def one_and_two_processes(raw: dict, tmp_path: Path, port: int, *sets: str):
    """Train `raw` once in one process (tmp_path/one) and once in two (tmp_path/two, 2 rows per process, plus the
    `--set` values `sets`): the same global batch when raw's per-device batch is 4. Returns (one, two, the two-process
    run's CompletedProcess)."""
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    one, two = tmp_path / "one", tmp_path / "two"
    run_checked([sys.executable, "-m", "kdistill.cli", "train", str(config), "--set", f"training.output_dir={one}"])
    args = [str(config), "--set", f"training.output_dir={two}", "--set", "training.per_device_train_batch_size=2"]
    for value in sets:
        args += ["--set", value]
    return one, two, run_checked(launch_two(args, port))


def assert_export_loads(out_dir, exported: dict, encoder_decoder: bool) -> None:
    """The exported folder loads with the stock Auto class and holds exactly the exported tensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    loaded = (AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM).from_pretrained(out_dir)
    for name, value in loaded.state_dict().items():
        if name in exported:
            torch.testing.assert_close(value, exported[name], atol=0, rtol=0)
