"""How the benchmarks report: a markdown table, the JSON results file, memory sums and the size flags."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """``header`` and ``lines`` (strings) as a markdown table with padded columns."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *(fmt(line) for line in lines)])


def write_json(out: Path | None, result: dict) -> None:
    """Writes ``result`` to ``out`` (parents made; numpy scalars as floats); nothing when ``out`` is ``None``."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=float) + "\n")


def memory_bytes(row: dict, which: str) -> int:
    """``"temp+out"``: temp + output bytes; ``"total"``: argument + temp + output - aliased, of a row's XLA memory."""
    if which == "temp+out":
        return row["temp_bytes"] + row["output_bytes"]
    return row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"] - row["alias_bytes"]


def add_size_flags(parser, fields) -> None:
    """``--<field> N`` integer flags that override the chosen config's sizes."""
    for field in fields:
        parser.add_argument(f"--{field}", type=int, default=None)


def with_sizes(cfg, args, fields):
    """``cfg`` with the size flags the user gave."""
    return dataclasses.replace(cfg, **{k: v for k in fields if (v := getattr(args, k)) is not None})
