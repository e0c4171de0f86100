"""Instruction data for causal-LM fine-tuning: JSONL rows, chat templates, loss masks, packing.

Row formats (one JSON object per line; the formats of TRL's ``SFTTrainer``,
https://huggingface.co/docs/trl/dataset_formats)::

    {"text": "..."}                                    # language modelling: every token trained
    {"prompt": "...", "completion": "..."}             # loss on the completion (+ EOS) only
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
                                                       # loss on every assistant turn

Extra keys are ignored; a row with the keys of two formats is an error. One file
may mix formats: each row is encoded by its own.

Conventions (each as TRL's ``SFTTrainer``, ``trl/trainer/sft_trainer.py``,
https://github.com/huggingface/trl/blob/main/trl/trainer/sft_trainer.py):

* text and prompt/completion rows are tokenised with the tokenizer's own special
  tokens (``encode(..., add_special_tokens=True)``: BOS only if the tokenizer adds
  it) and get the EOS token appended (TRL's ``add_eos``); prompt/completion is
  tokenised as one string and the mask is ``[0] * len(ids(prompt)) + [1] * rest``
  (TRL's ``completion_mask``); where ``ids(prompt)`` is not a prefix of
  ``ids(prompt + completion)`` (a BPE merge across the boundary) TRL only warns,
  here it is an error naming the row.
* messages rows are rendered with the model's chat template (:func:`render_chat`,
  as transformers' ``apply_chat_template``) and tokenised without added special
  tokens. Assistant turn ``k`` trains the text between
  ``render(messages[:k], add_generation_prompt=True)`` and ``render(messages[:k+1])``:
  what the model generates after the generation prompt, *including the end-of-turn
  token* (SmolLM2/ChatML ``content<|im_end|>\\n``, Llama-3 ``content<|eot_id|>``).
  That is the span TRL's ``assistant_only_loss=True`` trains with its
  ``{% generation %}``-tagged templates (``trl/chat_templates/llama3_training.jinja``
  tags ``content | trim + '<|eot_id|>'``, the same span); ``qwen2_5_training.jinja``
  also tags the ``\n`` after ``<|im_start|>assistant``, which here belongs to the
  generation prompt (the model never generates it). Every assistant turn is
  trained, not only the last; the fixture checks the mask against transformers'
  ``return_assistant_tokens_mask`` for SmolLM2. A template whose rendering
  of ``messages[:k]`` is not a prefix of the whole conversation's, or whose turn
  boundaries fall inside a token (``ids(text[:cut])`` not a prefix of ``ids(text)``),
  is an error rather than a wrong mask.
* the first token of every row is never a target (TRL's padding-free collator sets
  ``labels[position_ids == 0] = -100``), so packing trains exactly what padding does.

Shapes (:class:`Encoded`): ``tokens`` ``[N, seq_len + 1]`` int32, ``loss_mask``
``[N, seq_len]`` float32 aligned with the *targets* ``tokens[:, 1:]``; the loss is
``sum(nll * loss_mask) / sum(loss_mask)`` over a batch (the mean over trained target
tokens). ``pack=False``: one right-padded row per sequence (pad id: the
tokenizer's, else EOS), rows longer than ``seq_len + 1`` tokens truncated and
counted. ``pack=True``: rows concatenated into one stream cut into windows of
``seq_len + 1`` tokens with stride ``seq_len``, so every stream token is a target
exactly once (no truncation; the last window is padded). Attention in the plain
causal model then crosses row boundaries ("packing without cross-document masking");
``positions`` (restarting at 0 for each row) and ``segment_ids`` (row number + 1,
0 on padding) are returned for a model that masks by document.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ROLES",
    "Encoded",
    "encode_row",
    "encode_rows",
    "read_jsonl",
    "render_chat",
    "row_format",
    "split_heldout",
]

#: message roles a ``messages`` row may use
ROLES = ("system", "user", "assistant")

#: format name -> the keys that define it
_FORMAT_KEYS = {"text": ("text",), "prompt_completion": ("prompt", "completion"),
                "messages": ("messages",)}

#: key under which :func:`read_jsonl` records ``"FILE:LINE"`` in each row
ORIGIN = "origin"

_NO_TEMPLATE = ("no chat template: `messages` rows need the model's chat template "
                "(tokenizer_config.json 'chat_template', chat_template.jinja, or the GGUF key "
                "'tokenizer.chat_template'); pass chat_template=... or use text / prompt+completion rows")


# --------------------------------------------------------------------------- reading


def _check_row(obj: Any) -> dict:
    """The row with only its format's keys; raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a row must be a JSON object, got {type(obj).__name__}")
    found = [name for name, keys in _FORMAT_KEYS.items() if any(k in obj for k in keys)]
    if not found:
        raise ValueError(f"a row needs 'text', 'prompt' + 'completion', or 'messages'; got keys {sorted(obj)}")
    if len(found) > 1:
        keys = sorted(k for name in found for k in _FORMAT_KEYS[name] if k in obj)
        raise ValueError(f"a row must have the keys of one format, got {keys}")
    fmt = found[0]
    if fmt == "text":
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError(f"'text' must be a non-empty string, got {obj['text']!r:.60}")
        return {"text": obj["text"]}
    if fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in obj:
                raise ValueError(f"a prompt/completion row needs both 'prompt' and 'completion'; '{key}' is missing")
            if not isinstance(obj[key], str):
                raise ValueError(f"'{key}' must be a string, got {type(obj[key]).__name__}")
        if not obj["completion"]:
            raise ValueError("'completion' is empty")
        return {"prompt": obj["prompt"], "completion": obj["completion"]}
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list, got {messages!r:.60}")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] needs 'role' and 'content', got keys {sorted(m)}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r}; roles: {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(m['content']).__name__}")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise ValueError("'messages' has no assistant turn, so nothing to train on")
    return {"messages": clean}


def row_format(row: Mapping) -> str:
    """``"text"``, ``"prompt_completion"`` or ``"messages"`` (a row from :func:`read_jsonl`)."""
    for name, keys in _FORMAT_KEYS.items():
        if keys[0] in row:
            return name
    raise ValueError(f"not a data row: keys {sorted(row)}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Validated rows of a JSONL file, each with only its format's keys plus ``"origin": "FILE:LINE"``.

    Blank lines are skipped. Raises ValueError ``"FILE:LINE: <what is wrong>"``
    (1-based line) for a line that is not JSON, not an object, has missing or
    mixed format keys, wrong types, empty ``messages``, an unknown role or no
    assistant turn; and for a file with no rows.
    """
    path = os.fspath(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                row = _check_row(obj)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            row[ORIGIN] = where
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    return rows


def split_heldout(rows: Sequence[dict], fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(train_rows, heldout_rows)``: ``round(fraction * n)`` rows (at least one if
    ``fraction > 0``) chosen by ``numpy.random.default_rng(seed).permutation``; both
    lists keep the input order. Raises ValueError for a fraction outside ``[0, 1)``
    or a split that leaves no training row.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`fraction` must be in [0, 1), got {fraction}")
    n = len(rows)
    n_held = 0 if fraction == 0 else max(1, round(fraction * n))
    if n - n_held < 1:
        raise ValueError(f"holding out {n_held} of {n} rows leaves no training rows")
    held = set(np.random.default_rng(seed).permutation(n)[:n_held].tolist())
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])


# --------------------------------------------------------------------------- chat templates


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """The template compiled in the environment of transformers' ``apply_chat_template``.

    ``transformers/utils/chat_template_utils.py`` (``_cached_compile_jinja_template``):
    ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with
    ``loopcontrols``, a ``tojson`` filter that does not HTML-escape,
    ``raise_exception`` and ``strftime_now``. ``{% generation %}`` blocks render
    their body (transformers uses them only to return assistant masks).
    """
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = False, bos_token: str = "", eos_token: str = "",
                **extra) -> str:
    """The text of ``messages`` under a jinja2 chat template, as transformers'
    ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders it
    (``render_jinja_template`` in transformers 5.x ``utils/chat_template_utils.py``,
    https://github.com/huggingface/transformers/blob/main/src/transformers/utils/chat_template_utils.py):
    the template sees ``messages``, ``tools=None``, ``documents=None``,
    ``add_generation_prompt``, ``bos_token``, ``eos_token`` and ``extra``.

    Raises:
      ValueError: no template (``None`` or blank), or a template error (syntax, or
        the template's own ``raise_exception``, e.g. roles that do not alternate).

    Example:
        >>> from lowrank_jax.instruct import render_chat
        >>> t = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\\n{% endfor %}"
        >>> render_chat(t, [{"role": "user", "content": "Hi"}])
        '<user>Hi\\n'
    """
    if template is None or not template.strip():
        raise ValueError(_NO_TEMPLATE)
    import jinja2

    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages], tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
            **extra)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


# --------------------------------------------------------------------------- encoding


class Encoded(NamedTuple):
    """Token windows for the training loop (see the module docstring for the conventions).

    ``tokens`` ``[N, seq_len + 1]`` int32 (inputs ``[:, :-1]``, targets ``[:, 1:]``);
    ``loss_mask`` ``[N, seq_len]`` float32 on the targets; ``positions`` and
    ``segment_ids`` ``[N, seq_len + 1]`` int32 (position in its row; row number + 1,
    0 on padding). Counts: ``n_rows`` rows encoded, ``n_truncated`` rows cut to
    ``seq_len + 1`` tokens, ``n_dropped`` rows left with no trained target by the
    cut (left out), ``n_target_tokens`` = ``loss_mask.sum()``.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray
    n_rows: int
    n_truncated: int
    n_dropped: int
    n_target_tokens: int


def _special_string(tokenizer, token_id) -> str:
    if token_id is None or not hasattr(tokenizer, "id_to_token"):
        return ""
    return tokenizer.id_to_token(int(token_id))


def _row_error(row: Mapping, index: int, message: str) -> ValueError:
    return ValueError(f"{row.get(ORIGIN, f'row {index}')}: {message}")


def _encode_messages(row, tokenizer, template, template_kwargs) -> tuple[list[int], list[int]]:
    messages = row["messages"]
    full = render_chat(template, messages, **template_kwargs)
    cuts = [0]      # character offsets; pieces alternate untrained / trained
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render_chat(template, messages[:k], add_generation_prompt=True, **template_kwargs)
        end = render_chat(template, messages[: k + 1], **template_kwargs)
        if not (end.startswith(start) and full.startswith(end) and len(start) >= cuts[-1]):
            raise ValueError(
                f"the chat template's rendering of messages[:{k}] (+ generation prompt) and "
                f"messages[:{k + 1}] are not prefixes of the whole conversation's rendering, "
                f"so assistant turn {k} cannot be located")
        cuts += [len(start), len(end)]
    whole = tokenizer.encode(full, add_special_tokens=False)
    token_cuts = [0]
    for cut in cuts[1:]:
        # a prefix (not a piece) of the text, so tokenizers that mark the start of a text
        # (sentencepiece's leading "▁") tokenise it as they do inside the whole text
        prefix = tokenizer.encode(full[:cut], add_special_tokens=False)
        if whole[: len(prefix)] != prefix:
            raise ValueError(
                f"a turn boundary of the chat template falls inside a token (at "
                f"{full[max(cut - 12, 0): cut]!r} | {full[cut: cut + 12]!r}), so the assistant "
                f"tokens cannot be masked exactly")
        token_cuts.append(len(prefix))
    mask = [0] * len(whole)
    for start, end in zip(token_cuts[1::2], token_cuts[2::2]):
        mask[start:end] = [1] * (end - start)
    return whole, mask


def encode_row(row: Mapping, tokenizer, *, chat_template: str | None = None,
               template_kwargs: Mapping[str, Any] | None = None, eos_token_id: int | None = None,
               add_eos: bool = True) -> tuple[list[int], list[int]]:
    """``(ids, trained)`` of one row: token ids and a 0/1 per token (1 = trained
    when it is a target); the first token is never trained. See the module
    docstring for each format's convention. Raises ValueError (with the row's
    origin when it has one) as :func:`encode_rows`."""
    kwargs = dict(template_kwargs or {})
    fmt = row_format(row)
    if fmt == "messages":
        ids, mask = _encode_messages(row, tokenizer, chat_template, kwargs)
    elif fmt == "text":
        ids = tokenizer.encode(row["text"], add_special_tokens=True)
        mask = [1] * len(ids)
    else:
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=True)
        ids = tokenizer.encode(row["prompt"] + row["completion"], add_special_tokens=True)
        if ids[: len(prompt)] != prompt:
            raise ValueError(
                f"the prompt's tokens are not a prefix of prompt + completion's: the boundary "
                f"{row['prompt'][-12:]!r} | {row['completion'][:12]!r} merges into one token "
                f"(move the whitespace to the start of the completion)")
        mask = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    if add_eos and fmt != "messages":
        if eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token to end text / completion rows; "
                             "pass eos_token_id=... or add_eos=False")
        if not ids or ids[-1] != eos_token_id:
            ids, mask = ids + [int(eos_token_id)], mask + [1]
    if mask:
        mask[0] = 0
    return ids, mask


def encode_rows(rows: Sequence[Mapping], tokenizer, *, seq_len: int, chat_template: str | None = None,
                bos_token: str | None = None, eos_token: str | None = None, pack: bool = False,
                add_eos: bool = True, pad_token_id: int | None = None,
                template_kwargs: Mapping[str, Any] | None = None) -> Encoded:
    """Rows (from :func:`read_jsonl`) as :class:`Encoded` token windows with loss masks.

    Args:
      rows: validated rows.
      tokenizer: ``encode(text, add_special_tokens=...)``, ``decode``, ``eos_token_id``,
        ``pad_token_id`` (and ``id_to_token`` for the default ``bos_token`` / ``eos_token``),
        as :class:`lowrank_jax.io.tokenizer.ByteLevelBPETokenizer`.
      seq_len: the training sequence length; windows hold ``seq_len + 1`` tokens.
      chat_template: the model's template (``io.hf_checkpoint.load_pretrained(...).chat_template``:
        ``tokenizer_config.json`` / ``chat_template.jinja``, or a GGUF's ``tokenizer.chat_template``);
        needed by ``messages`` rows.
      bos_token, eos_token: the strings the template sees (default: the tokenizer's).
      pack: concatenate rows into full windows instead of one padded row each.
      add_eos: end text and prompt/completion rows with EOS (TRL's default).
      pad_token_id: padding id (default: the tokenizer's, else its EOS).
      template_kwargs: extra variables for the template.

    Raises:
      ValueError: ``seq_len < 1``; a ``messages`` row without a template; a row
        whose tokens cannot be masked exactly (named by its ``FILE:LINE``); no pad
        or EOS id; no trained token left.
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"`seq_len` must be a positive integer, got {seq_len!r}")
    if not rows:
        raise ValueError("no rows to encode")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    pad_id = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    pad_id = eos_id if pad_id is None else pad_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token; pass pad_token_id=...")
    kwargs = {"bos_token": _special_string(tokenizer, getattr(tokenizer, "bos_token_id", None))
              if bos_token is None else bos_token,
              "eos_token": _special_string(tokenizer, eos_id) if eos_token is None else eos_token,
              **(template_kwargs or {})}
    if chat_template is None and any("messages" in r for r in rows):
        first = next(i for i, r in enumerate(rows) if "messages" in r)
        raise _row_error(rows[first], first, _NO_TEMPLATE)

    encoded = []
    for i, row in enumerate(rows):
        try:
            encoded.append(encode_row(row, tokenizer, chat_template=chat_template, template_kwargs=kwargs,
                                      eos_token_id=eos_id, add_eos=add_eos))
        except ValueError as e:
            raise _row_error(row, i, str(e)) from None
    width = seq_len + 1
    n_truncated = n_dropped = 0
    if pack:
        stream = np.concatenate([np.asarray(ids, np.int32) for ids, _ in encoded])
        trained = np.concatenate([np.asarray(m, np.float32) for _, m in encoded])
        positions = np.concatenate([np.arange(len(ids), dtype=np.int32) for ids, _ in encoded])
        segments = np.concatenate([np.full(len(ids), i + 1, np.int32) for i, (ids, _) in enumerate(encoded)])
        n_windows = max(1, -(-(len(stream) - 1) // seq_len))
        total = n_windows * seq_len + 1

        def padded(a, value):
            return np.concatenate([a, np.full(total - len(a), value, a.dtype)])

        stream, trained = padded(stream, pad_id), padded(trained, 0.0)
        positions, segments = padded(positions, 0), padded(segments, 0)
        index = np.arange(n_windows)[:, None] * seq_len + np.arange(width)[None, :]
        tokens, mask = stream[index], trained[index][:, 1:]
        pos, seg = positions[index], segments[index]
    else:
        kept = []
        for ids, m in encoded:
            if len(ids) > width:
                n_truncated += 1
                ids, m = ids[:width], m[:width]
            if sum(m[1:]) == 0:
                n_dropped += 1
                continue
            kept.append((ids, m))
        if not kept:
            raise ValueError(f"no row has a trained token within seq_len + 1 = {width} tokens "
                             f"({n_dropped} rows dropped); raise --seq-len")
        tokens = np.full((len(kept), width), pad_id, np.int32)
        mask = np.zeros((len(kept), seq_len), np.float32)
        pos = np.zeros((len(kept), width), np.int32)
        seg = np.zeros((len(kept), width), np.int32)
        for i, (ids, m) in enumerate(kept):
            tokens[i, : len(ids)] = ids
            mask[i, : len(ids) - 1] = m[1:]
            pos[i, : len(ids)] = np.arange(len(ids))
            seg[i, : len(ids)] = i + 1
    if mask.sum() == 0:
        raise ValueError("the rows have no trained token")
    return Encoded(tokens.astype(np.int32), mask.astype(np.float32), pos.astype(np.int32),
                   seg.astype(np.int32), len(encoded) - n_dropped, n_truncated, n_dropped,
                   int(mask.sum()))
