"""Training metrics: a JSONL file (the record tests and reports read) plus TensorBoard scalars.

    with MetricWriter(workdir, enabled=jax.process_index() == 0) as writer:
        writer.truncate_after(resumed_step)      # when resuming: drop what the interrupted run wrote past it
        writer.write(step, {"loss": loss, "lr": lr})

Lines carry no wall time, so a resumed run's metrics.jsonl equals an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from w2s_jax.metrics import atomic_write_text, read_jsonl

METRICS_FILE = "metrics.jsonl"


def _to_number(key: str, value: Any) -> float | int:
    if isinstance(value, bool):
        return int(value)
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {key!r}: expected a scalar number, got {type(value).__name__} {value!r}") from e


def read_metrics(logdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of logdir/metrics.jsonl ([] when absent).

    A torn last line (a crash mid-write) is skipped; a bad line elsewhere raises ValueError naming file and line.
    """
    path = os.path.join(logdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    return read_jsonl(path, required=("step",), torn_tail_ok=True, what="metrics line")


class MetricWriter:
    """Appends `{"step": step, **scalars}` lines to logdir/metrics.jsonl and mirrors them to TensorBoard.

    `enabled=False` makes every method a no-op (non-zero processes of a multi-host run).
    """

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
        self.logdir = os.fspath(logdir)
        self.enabled = enabled
        self.path = os.path.join(self.logdir, METRICS_FILE)
        self._tb = None
        self._purge_step: int | None = None
        if enabled:
            os.makedirs(self.logdir, exist_ok=True)

    def _tensorboard(self):
        """The TensorBoard writer, created on first use so a `truncate_after` before it can purge later steps."""
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=self.logdir, purge_step=self._purge_step)
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Drop every recorded line with a step > `step` (and TensorBoard events past it) before resuming."""
        if not self.enabled:
            return
        rows = [row for row in read_metrics(self.logdir) if row["step"] <= step]
        if os.path.exists(self.path):
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        if self._tb is None:
            self._purge_step = int(step) + 1
        # A TensorBoard writer already open cannot purge; steps written by it stay as they are.

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record the scalars at `step` (numbers, numpy or jax scalars)."""
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("metric name 'step' is reserved for the step number")
        step = int(step)
        values = {key: _to_number(key, scalars[key]) for key in sorted(scalars)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        tb = self._tensorboard()
        for key, value in values.items():
            tb.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
