"""A per-step metrics log, ``metrics.jsonl``: one JSON object per line, crash-safe and resumable.

Train rows are ``{"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"}`` (plus any
extra numbers given); eval rows are ``{"step", "eval_loss", "eval_perplexity"}``. Every row is
flushed and fsynced as it is written, so a crash loses at most the row in flight, and a torn
last line is dropped by the reader. A resumed run passes the step it restored
(``resume_from_step``): rows after it are removed before anything is appended, so no step
appears twice. Non-finite numbers are written as ``null`` (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
import pathlib

__all__ = ["MetricsLog", "read_metrics"]

TRAIN_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s")


def _number(name: str, value):
    """``value`` as a JSON number: Python/numpy/jax scalars become float, non-finite ones ``None``."""
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} must be a number, got {value!r}") from None
    return v if math.isfinite(v) else None


def _step(value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError(f"`step` must be a non-negative integer, got {value!r}")
    return int(value)


def _parse(lines: list[str], path) -> list[dict]:
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break  # the row in flight when a run was killed
            raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}: line {number} is not a metrics row with an integer 'step': {line[:80]!r}")
        rows.append(row)
    return rows


def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` in file order (a torn last line is skipped).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the line number of
    any other line that is not a JSON object with an integer ``step``.
    """
    path = pathlib.Path(path)
    with open(path, encoding="utf-8") as f:
        return _parse(f.readlines(), path)


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsLog:
    """Appends metric rows to ``path`` (a ``metrics.jsonl``), each one flushed and fsynced.

    ``resume_from_step=None`` starts a new log (an existing file is replaced); ``resume_from_step=k``
    keeps the existing rows with ``step <= k`` and drops the rest (and a torn last line), so a run
    resumed from its step-``k`` checkpoint does not repeat steps ``k+1 ..``. Train steps must
    increase: writing a step at or before the last one raises ``ValueError``. Use as a context
    manager or call :meth:`close`.
    """

    def __init__(self, path, *, resume_from_step: int | None = None):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_from_step is not None:
            limit = _step(resume_from_step)
            if self.path.exists():
                kept = [r for r in read_metrics(self.path) if r["step"] <= limit]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        train_steps = [r["step"] for r in kept if "loss" in r]
        self.last_step = max(train_steps) if train_steps else None
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, row: dict) -> dict:
        if self._file.closed:
            raise ValueError(f"{self.path}: the log is closed")
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return row

    def log_step(self, step: int, *, loss, lr=None, grad_norm=None, tokens_per_s=None, step_time_s=None,
                 **extra) -> dict:
        """Writes the train row of ``step`` and returns it; ``extra`` holds further numbers (e.g. ``aux_loss``)."""
        step = _step(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"step {step} is not after the last logged step {self.last_step} in {self.path}")
        row = {"step": step}
        values = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, step_time_s=step_time_s, **extra)
        for name, value in values.items():
            row[name] = _number(name, value)
        self.last_step = step
        return self._write(row)

    def log_eval(self, step: int, *, eval_loss, eval_perplexity=None) -> dict:
        """Writes a held-out row at ``step``; the perplexity defaults to ``exp(eval_loss)``."""
        loss = _number("eval_loss", eval_loss)
        if eval_perplexity is None and loss is not None:
            eval_perplexity = math.exp(loss) if loss < 700 else math.inf
        return self._write({"step": _step(step), "eval_loss": loss,
                            "eval_perplexity": _number("eval_perplexity", eval_perplexity)})

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
