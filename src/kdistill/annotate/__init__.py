"""Teacher annotation: have a teacher answer, label or explain every row, resumably.

Three tasks:

``output``
    The teacher's answer, for sequence-level KD (SeqKD: the student is then trained on the teacher's
    outputs). LM rows (alpaca / prompt_completion / messages) are by default sent as a chat: a
    :class:`~kdistill.generators.ChatClient` gets the messages (the row's final assistant turn, if any, is
    dropped), a :class:`~kdistill.generators.LocalTeacher` gets
    :func:`~kdistill.data.formatting.prompt_text`. Other rows are sent as their main text (see
    :data:`TEXT_KEYS`) unless a ``template`` says otherwise. An empty answer is ``unparsable``.
``label``
    Classification into a fixed label set (``labels``, required): the answer is read with
    :func:`parse_label`; no single label -> ``unparsable``.
``rationale``
    Few-shot chain of thought: the prompt asks for reasoning that ends with "So the answer is X"; the
    answer is split by :func:`parse_rationale` into ``rationale`` and ``label`` (validated against
    ``labels`` when given; free-form answers such as numbers or equations otherwise).

Prompts are Python ``str.format`` templates over the row's fields plus ``{text}`` (the row's main text:
:func:`main_text`), ``{labels}`` (comma-separated), ``{choices}`` (a row's ``choices`` list as
``"(a) ...\\n(b) ..."``) and ``{few_shot}`` (the rendered few-shot examples, ending in a blank line, or
empty). Defaults: :data:`LABEL_TEMPLATE`, :data:`RATIONALE_TEMPLATE` / :data:`RATIONALE_TEMPLATE_LABELS`.

Records (append-only JSON Lines at ``out_path``, one line per attempt)::

    {"key", "status": "ok" | "failed" | "unparsable", "task", "row": <the input row>, "prompt": <what the
     teacher was sent: a messages list (API) or a string (local model)>, "query"?: <the formatted template
     text, when a template made the prompt>, "teacher": <teacher id>, "params": <generation parameters>,
     "output": <raw answer text or null>, "label"?, "rationale"?, "error"?: <reason>, "time": <UTC ISO
     8601>, "elapsed_s"}

``key`` is the SHA-256 of the canonical JSON (sorted keys, no spaces) of ``{"row", "template", "teacher",
"params", "task", "labels", "few_shot", "prompt"}`` (``prompt``: what the teacher is sent, so a changed chat
template or rendering also counts), so changing any of them re-annotates. A rerun reads the file
first: a key whose LAST record is ``ok`` is skipped, ``failed`` / ``unparsable`` keys are tried again
(new records are appended; nothing is rewritten). Lines that cannot be read (a line cut short by a kill)
are ignored with a warning. The file is a :mod:`kdistill.jobs` record store: each record is one ``os.write``
of a full line on an ``O_APPEND`` descriptor, under a lock, ``fsync``-ed every ``fsync_every`` records and at
the end.

Modules: :mod:`.tasks` (the task table), :mod:`.parse` (reading answers), :mod:`.prompts` (main text,
few-shot examples, templates, keys), :mod:`.shapes` (LM row shapes), :mod:`.run` (:func:`annotate`),
:mod:`.export`, :mod:`.cli` (``kdistill annotate`` and ``python -m kdistill.annotate``).
"""

from kdistill.data.io import read_rows

from .cli import add_parser, main, run_cli
from .export import EXPORT_FORMATS, export
from .parse import match_label, parse_label, parse_rationale
from .prompts import TEXT_KEYS, annotation_key, main_text, render_few_shot
from .run import AnnotationAborted, Summary, annotate, load_annotations
from .tasks import LABEL_TEMPLATE, RATIONALE_TEMPLATE, RATIONALE_TEMPLATE_LABELS, TASKS

__all__ = [
    "TASKS",
    "TEXT_KEYS",
    "EXPORT_FORMATS",
    "LABEL_TEMPLATE",
    "RATIONALE_TEMPLATE",
    "RATIONALE_TEMPLATE_LABELS",
    "AnnotationAborted",
    "Summary",
    "add_parser",
    "annotate",
    "annotation_key",
    "export",
    "load_annotations",
    "main",
    "main_text",
    "match_label",
    "parse_label",
    "parse_rationale",
    "read_rows",
    "render_few_shot",
    "run_cli",
]
