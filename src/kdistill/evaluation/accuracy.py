"""Label accuracy of generated answers (distilling step-by-step: e-SNLI, ANLI, CQA, SVAMP).

Two ways of comparing a prediction with its gold label:

* **text** (``numeric=False``; e-SNLI, ANLI, CommonsenseQA): both sides go through
  :func:`normalize_answer` and must then be equal. The original distilling-step-by-step code compares
  the decoded strings exactly; normalisation only forgives case, spacing, a trailing full stop and
  surrounding quotes or brackets, none of which changes which answer was given.
* **numeric** (``numeric=True``; SVAMP): both sides are arithmetic expressions or plain numbers
  (``"( 84.0 / 2.0 )"``, ``"(84 / 2)"``, ``"42"``), evaluated by :func:`eval_equation` and compared with
  ``math.isclose(rel_tol=1e-4, abs_tol=1e-4)``. The original evaluates both sides with Python's
  ``eval`` and compares the floats exactly; we never call ``eval`` and allow float rounding.

:func:`eval_equation` accepts only ASCII digits, decimal points, whitespace, ``+ - * /`` (binary and
unary ``+``/``-``) and parentheses, parsed with :mod:`ast` and evaluated by walking the tree: no names,
calls, attributes, ``**``, ``//``, exponent notation, digit separators (``1_000``, ``1,000``) or complex
numbers. Anything else, a division by zero, or a non-finite result gives ``None``.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence

__all__ = ["answers_match", "eval_equation", "label_accuracy", "normalize_answer"]

REL_TOL = 1e-4
ABS_TOL = 1e-4
_MAX_EQUATION_CHARS = 2000  # a generated answer longer than this is not an equation we score
_EQUATION_CHARS = re.compile(r"^[0-9.\s+\-*/()]+$")
_TRAILING_PUNCT = ".,;:!?"
_PAIRS = {'"': '"', "'": "'", "`": "`", "(": ")", "[": "]", "{": "}", "“": "”", "‘": "’", "«": "»"}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _encloses_all(text: str) -> bool:
    """True when ``text[0]`` opens a pair that is closed by ``text[-1]`` and not before."""
    if len(text) < 2 or text[0] not in _PAIRS or text[-1] != _PAIRS[text[0]]:
        return False
    opening, closing = text[0], _PAIRS[text[0]]
    if opening == closing:  # quotes: no other occurrence inside
        return opening not in text[1:-1]
    depth = 0
    for i, ch in enumerate(text):
        if ch == opening:
            depth += 1
        elif ch == closing:
            depth -= 1
            if depth == 0 and i != len(text) - 1:
                return False  # "(a) x (b)": the first bracket closes early
    return depth == 0


def normalize_answer(text: str) -> str:
    """Lower-case, strip, collapse whitespace, and remove trailing punctuation (``. , ; : ! ?``) and
    quotes / brackets that enclose the whole answer, repeatedly (``'"(Neutral.)"'`` -> ``"neutral"``)."""
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string, got {type(text).__name__}")
    out = " ".join(text.lower().split())
    while True:
        before = out
        out = out.rstrip(_TRAILING_PUNCT).strip()
        if _encloses_all(out):
            out = out[1:-1].strip()
        if out == before:
            return out


class _Unsupported(Exception):
    pass


def _walk(node: ast.AST) -> float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Unsupported
        return float(value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_walk(node.left), _walk(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _walk(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    raise _Unsupported


def eval_equation(text: str) -> float | None:
    """The value of an arithmetic expression such as ``"( 84.0 / 2.0 )"`` or ``"-3 * (2 + .5)"``, or
    ``None`` when it is not one (see the module docstring for what is accepted). Never uses ``eval``.
    A plain ``int`` / ``float`` is returned as a float (``None`` when not finite)."""
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    s = text.strip()
    if not s or len(s) > _MAX_EQUATION_CHARS or not _EQUATION_CHARS.match(s):
        return None
    try:
        tree = ast.parse(s, mode="eval")
        value = _walk(tree.body)
    except (SyntaxError, ValueError, _Unsupported, ZeroDivisionError, OverflowError, RecursionError,
            MemoryError):
        return None
    return value if math.isfinite(value) else None


def answers_match(prediction: str, gold: str, numeric: bool = False) -> bool:
    """Whether ``prediction`` gives the ``gold`` answer (text or numeric comparison, see the module
    docstring). In numeric mode an unparseable prediction or gold is a mismatch."""
    if numeric:
        p, g = eval_equation(prediction), eval_equation(gold)
        if p is None or g is None:
            return False
        return math.isclose(p, g, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return normalize_answer(prediction) == normalize_answer(gold)


def label_accuracy(predictions: Sequence[str], golds: Sequence[str], numeric: bool = False) -> dict:
    """``{"accuracy", "correct", "total", "invalid"}`` of ``predictions`` against ``golds``.

    ``invalid`` counts predictions that cannot be scored, all of them also counted wrong: in numeric
    mode those :func:`eval_equation` cannot evaluate, in text mode those empty after normalisation.
    A gold label that does not evaluate in numeric mode is a data error (``ValueError``), as is a length
    mismatch. With no pairs at all the accuracy is ``0.0``.
    """
    predictions, golds = list(predictions), list(golds)
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold labels")
    correct = invalid = 0
    if numeric:
        gold_values = [eval_equation(g) for g in golds]
        bad = [i for i, v in enumerate(gold_values) if v is None]
        if bad:
            shown = ", ".join(f"[{i}] {golds[i]!r}" for i in bad[:10])
            raise ValueError(f"{len(bad)} gold label(s) are not arithmetic expressions: {shown}"
                             + (" ..." if len(bad) > 10 else ""))
        for prediction, gold_value in zip(predictions, gold_values):
            value = eval_equation(prediction)
            if value is None:
                invalid += 1
            elif math.isclose(value, gold_value, rel_tol=REL_TOL, abs_tol=ABS_TOL):
                correct += 1
    else:
        for prediction, gold in zip(predictions, golds):
            p = normalize_answer(prediction)
            if not p:
                invalid += 1
            elif p == normalize_answer(gold):
                correct += 1
    total = len(golds)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total,
            "invalid": invalid}
