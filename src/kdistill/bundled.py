"""Data that ships inside the kdistill package (``kdistill/resources/``; sources, licenses and how each file was
derived are in that folder's README). These are the defaults of the built-in evaluation tasks and of the
quickstart, so they work offline from any folder after ``pip install kdistill``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kdistill.errors import MissingFileError

__all__ = ["BUNDLED_ROWS", "HATE_SPEECH", "QUICKSTART_SENTENCES", "STSB_DEV", "bundled_path"]

STSB_DEV = "stsb_dev_ccbysa.jsonl"
"""STS Benchmark dev, the 375 pairs whose sentences are CC BY-SA (sources `images` and `track5.en-en`)."""
HATE_SPEECH = "hate_speech_stormfront_400.jsonl"
"""de Gibert et al. 2018 (Stormfront), 200 `hate` + 200 `noHate` sentences of the balanced training split."""
QUICKSTART_SENTENCES = "esnli_sentences.txt.gz"
"""42,205 SNLI / e-SNLI sentences, the quickstart's unlabeled training text."""

BUNDLED_ROWS = {STSB_DEV: 375, HATE_SPEECH: 400, QUICKSTART_SENTENCES: 42205}


def bundled_path(filename: str) -> str:
    """Filesystem path of a bundled file (the package is installed as a folder, never zipped)."""
    path = Path(str(resources.files("kdistill.resources").joinpath(filename)))
    if not path.is_file():
        raise MissingFileError(f"{path}: bundled file missing; the kdistill installation is incomplete "
                               f"(reinstall with pip install --force-reinstall kdistill)")
    return str(path)
