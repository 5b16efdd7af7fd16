"""Evaluation metrics and prediction files.

Predictions are candidate indices (int). An example counts as correct when its prediction is in its `accept` list
(every index that is correct, e.g. every mating move in chess); `accept` defaults to `[label]`.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np


def _as_accept(accept: int | Sequence[int]) -> set[int]:
    if isinstance(accept, (int, np.integer)):
        return {int(accept)}
    return {int(a) for a in accept}


def _check_same_length(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} entries but {name_b} has {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{name_a} is empty")


def correct(predictions: Sequence[int], accepts: Sequence[int | Sequence[int]]) -> list[bool]:
    """Per example: is the prediction among the accepted indices (an int accept means [int])."""
    _check_same_length("predictions", predictions, "accepts", accepts)
    return [int(p) in _as_accept(a) for p, a in zip(predictions, accepts)]


def accuracy(predictions: Sequence[int], accepts: Sequence[int | Sequence[int]]) -> float:
    """Fraction of predictions that are among their example's accepted indices."""
    return float(np.mean(correct(predictions, accepts)))


def pgr(acc_student: float, acc_weak: float, acc_ceiling: float) -> float | None:
    """Performance gap recovered, (student - weak) / (ceiling - weak).

    None when ceiling <= weak: the gap is then zero or negative and the ratio means nothing. The openai reference
    plots skip such pairs, and `median_pgr` ignores None.
    """
    gap = acc_ceiling - acc_weak
    if gap <= 0:
        return None
    return float((acc_student - acc_weak) / gap)


def agreement(student_answers: Sequence, supervisor_answers: Sequence) -> float:
    """Fraction of examples where the student gives the same answer as its supervisor (candidate indices, or
    answer texts when some predictions match no candidate: see pipeline.answer_keys)."""
    _check_same_length("student_answers", student_answers, "supervisor_answers", supervisor_answers)
    return float(np.mean([s == w for s, w in zip(student_answers, supervisor_answers)]))


def error_agreement(student_answers: Sequence, supervisor_answers: Sequence,
                    supervisor_correct: Sequence[bool]) -> float | None:
    """Agreement restricted to the examples the supervisor got wrong: how much of its errors the student imitates.

    None when the supervisor made no error.
    """
    _check_same_length("student_answers", student_answers, "supervisor_answers", supervisor_answers)
    _check_same_length("student_answers", student_answers, "supervisor_correct", supervisor_correct)
    wrong = [i for i, ok in enumerate(supervisor_correct) if not ok]
    if not wrong:
        return None
    return float(np.mean([student_answers[i] == supervisor_answers[i] for i in wrong]))


def median_pgr(values: Iterable[float | None]) -> float | None:
    """Median of the defined PGRs (None entries are skipped); None when none is defined."""
    defined = [float(v) for v in values if v is not None]
    return float(statistics.median(defined)) if defined else None


# ----------------------------------------------------------------------------------------------------------------
# Prediction files: JSONL, one line per test example {"id", "label", "prediction", ...}
# ----------------------------------------------------------------------------------------------------------------

REQUIRED_PREDICTION_KEYS = ("id", "label", "prediction")


def _json_default(value: Any) -> Any:
    """numpy / jax scalars and arrays -> plain Python for json."""
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def to_json(value: Any, **kwargs: Any) -> str:
    """json.dumps that also accepts numpy / jax values."""
    return json.dumps(value, default=_json_default, **kwargs)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same folder and a rename: no reader sees half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_predictions(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Write prediction rows as JSONL, atomically. Each row needs id, label and prediction; extra keys are kept."""
    lines = []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_PREDICTION_KEYS if k not in row]
        if missing:
            raise ValueError(f"prediction row {i} (id={row.get('id')!r}) lacks {', '.join(missing)}")
        lines.append(to_json(row) + "\n")
    atomic_write_text(path, "".join(lines))


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = (), torn_tail_ok: bool = False,
               what: str = "row") -> list[dict[str, Any]]:
    """Rows of a JSONL file. A bad line raises ValueError naming the file and line; with `torn_tail_ok`, an
    unterminated last line (a crash mid-write) is skipped instead."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_tail_ok and lineno == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: {what} lacks {', '.join(missing)}")
        rows.append(row)
    return rows


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL prediction file; bad lines raise ValueError naming the file and line."""
    return read_jsonl(path, REQUIRED_PREDICTION_KEYS, what="prediction row")


def accuracy_from_predictions(rows: Sequence[dict[str, Any]]) -> float:
    """Accuracy recomputed from prediction rows, using each row's `accept` when present, else [label]."""
    predictions = [row["prediction"] for row in rows]
    accepts = [row.get("accept", [row["label"]]) for row in rows]
    return accuracy(predictions, accepts)
