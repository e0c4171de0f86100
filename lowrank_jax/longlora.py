r"""LongLoRA: extend a LLaMA model's context with S2-Attn, position interpolation and LoRA on q/k/v/o + embed/norm.

The recipe of Chen et al. (2023), on the reference LLaMA model
(:mod:`lowrank_jax.models.llama`):

1. **Position interpolation.** RoPE frequencies are divided by
   ``s = ceil(target_len / original_len)`` (linear interpolation), so positions
   up to ``target_len`` map into the range the model was trained on:
   :math:`\theta_j(p) = p\,\omega_j / s`.
2. **S2-Attn during training only.** The train config's ``attention_fn`` is
   :class:`lowrank_jax.attention.S2Attention` (groups of ``G = T/4`` tokens,
   half the heads shifted by ``G/2``), ``G/T`` of full attention's cost; the
   eval config keeps full attention, so the trained model is used unchanged
   at inference (:func:`configure`).
3. **The trainable set** (the paper's "LoRA+", unrelated to the LoRA+
   optimizer of Hayou et al.): LoRA ``r = 8``, ``alpha = 16`` on the q/k/v/o
   projections, plus trainable embeddings and normalisation layers
   (:func:`recipe`); the paper shows the embeddings and norms are what close
   the gap to full fine-tuning at long context.

Evaluation as in the paper: perplexity at the target length
(:func:`perplexity`) and passkey retrieval (:func:`passkey_prompt`,
:func:`passkey_retrieval`, :func:`passkey_accuracy`).

Training both trainable sets. :func:`recipe` is one adapter (``lrj.combine`` of
LoRA and ``lrj.full_finetune``): its tree holds the LoRA factors and copies of the
selected base leaves (embedding table, norm scales), which the bridge substitutes
into the frozen params inside the loss, so gradients and optimizer state cover
exactly those leaves and the LoRA factors::

    adapter = lrj.longlora.recipe(layouts=lrj.linen.kernel_layouts(model, ids))
    adapter_params = adapter.init(key, variables)
    def loss_fn(adapter_params, variables, batch, rng):
        logits = lrj.linen.apply(train_model, adapter, variables, adapter_params, batch[:, :-1], dropout_rng=rng)
        return cross_entropy(logits, batch[:, 1:])
    step = lrj.make_train_step(loss_fn, optax.adamw(2e-5), adapter=adapter)
    ...
    eval_variables = adapter.merge(variables, adapter_params)  # dense weights for full-attention inference

References:
  Chen et al, `LongLoRA: Efficient Fine-tuning of Long-Context Large Language
  Models <https://arxiv.org/abs/2309.12307>`_, 2023.
  Chen et al, `Extending Context Window of Large Language Models via Positional
  Interpolation <https://arxiv.org/abs/2306.15595>`_, 2023.
  Mohtashami & Jaggi, `Landmark Attention: Random-Access Infinite Context Length
  for Transformers <https://arxiv.org/abs/2305.16300>`_, 2023 (the passkey prompt).
Reference implementation matched: dvlab-research/LongLoRA (``fine-tune.py``:
``rope_scaling = {"type": "linear", "factor": ceil(model_max_length /
orig_ctx_len)}``, ``LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj",
"k_proj", "v_proj", "o_proj"])``, ``trainable_params="embed,norm"``;
``passkey_retrivial.py``: ``generate_prompt_landmark``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters.combinators import combine, full_finetune
from lowrank_jax.adapters.lora import lora
from lowrank_jax.attention.s2 import S2Attention

if TYPE_CHECKING:  # annotations only: `import lowrank_jax` must not import the models (the application)
    from lowrank_jax.models import llama

__all__ = [
    "EXTRA_TRAINABLE",
    "QKVO_TARGETS",
    "PasskeyPrompt",
    "PasskeyResult",
    "Recipe",
    "configure",
    "interpolate_positions",
    "interpolation_factor",
    "passkey_accuracy",
    "passkey_prompt",
    "passkey_retrieval",
    "perplexity",
    "recipe",
]

#: LoRA targets of the recipe: the attention projections q, k, v, o (LLaMA paths).
QKVO_TARGETS = r".*/self_attn/(q_proj|k_proj|v_proj|o_proj)/kernel"

#: Extra trainable base leaves: the reference's ``trainable_params="embed,norm"``
#: (substrings of torch names) as path regexes: embedding tables and norm scales.
EXTRA_TRAINABLE = (r"(?i).*embed[^/]*/embedding", r"(?i).*norm[^/]*/(scale|bias)")


# --------------------------------------------------------------------------- configs


def interpolation_factor(target_len: int, original_len: int) -> int:
    """``ceil(target_len / original_len)``, at least 1 (no scaling when the target fits).

    Example:
      >>> from lowrank_jax.longlora import interpolation_factor
      >>> interpolation_factor(32768, 4096), interpolation_factor(10000, 4096), interpolation_factor(2048, 4096)
      (8, 3, 1)
    """
    for name, value in (("target_len", target_len), ("original_len", original_len)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return max(1, math.ceil(target_len / original_len))


def interpolate_positions(config: llama.LlamaConfig, target_len: int, *,
                          original_len: int | None = None) -> llama.LlamaConfig:
    """``config`` with RoPE linear position interpolation for ``target_len`` tokens.

    The factor ``ceil(target_len / original_len)`` multiplies the config's
    ``rope_scaling_factor`` (``original_len`` defaults to
    ``config.max_position_embeddings``, the context the config already handles,
    so an already-interpolated config is extended consistently), and
    ``max_position_embeddings`` becomes ``max(target_len, original_len)``. The
    reference sets the factor only when ``target_len > original_len``, as here.

    Example:
      >>> from lowrank_jax.models.llama import LlamaConfig
      >>> from lowrank_jax.longlora import interpolate_positions
      >>> c = interpolate_positions(LlamaConfig.tiny(max_position_embeddings=256), 1024)
      >>> c.rope_scaling_factor, c.max_position_embeddings
      (4.0, 1024)
    """
    original_len = config.max_position_embeddings if original_len is None else original_len
    factor = interpolation_factor(target_len, original_len)
    return config.replace(rope_scaling_factor=float(config.rope_scaling_factor * factor),
                          max_position_embeddings=int(max(target_len, original_len)))


def configure(config: llama.LlamaConfig, target_len: int, *, original_len: int | None = None,
              group_size: int | None = None, group_size_ratio: float = 0.25, variant: str = "no_wrap",
              implementation: str | None = None) -> tuple[llama.LlamaConfig, llama.LlamaConfig]:
    """``(train_config, eval_config)`` for LongLoRA at ``target_len`` tokens.

    Both configs get RoPE linear interpolation (:func:`interpolate_positions`).
    Only ``train_config`` uses S2-Attn: its ``attention_fn`` is
    ``S2Attention(group_size, group_size_ratio, variant, implementation)``, so
    each training sequence of T tokens uses groups of ``group_size`` or
    ``int(T * group_size_ratio)`` tokens (as the reference, which computes G per
    forward pass). ``eval_config`` keeps the config's own attention (full
    attention by default): perplexity, generation and KV-cache decoding run
    unchanged. Both share one params tree.

    Example:
      >>> from lowrank_jax.models.llama import LlamaConfig
      >>> from lowrank_jax.longlora import configure
      >>> train, evaluate = configure(LlamaConfig.tiny(max_position_embeddings=256), 1024)
      >>> train.attention_fn
      S2Attention(group_size=None, group_size_ratio=0.25, variant='no_wrap', implementation=None)
      >>> evaluate.attention_fn is None, train.rope_scaling_factor == evaluate.rope_scaling_factor == 4.0
      (True, True)
    """
    if isinstance(config.attention_fn, S2Attention):
        raise ValueError("`config` already uses S2-Attn; pass the inference config (full attention)")
    extended = interpolate_positions(config, target_len, original_len=original_len)
    s2 = S2Attention(group_size=group_size, group_size_ratio=group_size_ratio, variant=variant,
                     implementation=implementation)
    return extended.replace(attention_fn=s2), extended


# --------------------------------------------------------------------------- the trainable set


def recipe(rank: int = 8, alpha: float = 16.0, *, targets: tree_lib.Targets = QKVO_TARGETS,
           trainable: tree_lib.Targets = EXTRA_TRAINABLE, layouts=None, dropout: float = 0.0) -> base.Adapter:
    r"""LongLoRA's fine-tuning set as one adapter: LoRA on q/k/v/o combined with trained embeddings and norms.

    .. math::
        y = x W + \tfrac{\alpha}{r} (x A) B \ \text{on } W_q, W_k, W_v, W_o,
        \qquad E, \gamma \text{ (embeddings, norm scales) trained directly}

    with the paper's ``r = 8``, ``alpha = 16``. Everything else is frozen. It is
    ``lrj.combine(lrj.lora(rank, alpha, targets, ...), lrj.full_finetune(trainable))``: one
    tree holding the LoRA factors and copies of the selected base leaves, run by
    ``lrj.linen.apply`` (which substitutes the trained leaves), merged by ``merge``.

    Args:
      rank, alpha: LoRA rank and alpha (scale ``alpha / rank``).
      targets: LoRA targets (regex / list / callable on "/"-joined paths).
      trainable: the base leaves to train directly, same forms; the default
        :data:`EXTRA_TRAINABLE` matches ``.../embed_tokens/embedding`` and every
        ``...norm/scale`` (``input_layernorm``, ``post_attention_layernorm``, ``norm``).
      layouts: kernel layouts for scanned (stacked) models, as in :func:`lrj.lora`
        (``lrj.linen.kernel_layouts(model, ids)``).
      dropout: LoRA dropout (the reference uses 0.05 for SFT, 0 otherwise).

    Returns:
      An :class:`lrj.Adapter` (``config["method"] == "combine"``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM
      >>> from lowrank_jax.longlora import recipe
      >>> model = LlamaForCausalLM(LlamaConfig.tiny(num_hidden_layers=1))
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
      >>> tree = recipe().init(jax.random.key(1), variables)
      >>> sorted(tree["params"]["layers_0"]["self_attn"])
      ['k_proj', 'o_proj', 'q_proj', 'v_proj']
      >>> jax.tree.map(jnp.shape, tree["params"]["layers_0"]["input_layernorm"])
      {'scale': {'w': (64,)}}
    """
    return combine(lora(rank=rank, alpha=alpha, targets=targets, layouts=layouts, dropout=dropout),
                   full_finetune(trainable))


# --------------------------------------------------------------------------- evaluation


def perplexity(model: llama.LlamaForCausalLM, params, token_ids, target_len: int, *, batch_size: int = 1) -> float:
    """Perplexity at the target context length: :func:`lowrank_jax.models.llama.perplexity` with
    ``window = target_len`` (non-overlapping windows of ``target_len`` tokens, each scored from its own
    prefix only), as the paper's proof-pile/PG19 evaluation. Use the *eval* config (full attention).

    Raises:
      ValueError: fewer than ``target_len`` tokens.
    """
    n = int(np.size(token_ids))
    if n < target_len:
        raise ValueError(f"perplexity at {target_len} tokens needs at least {target_len} tokens, got {n}")
    from lowrank_jax.models import llama

    return llama.perplexity(model, params, token_ids, window=target_len, batch_size=batch_size)


_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_QUESTION = "What is the pass key? The pass key is"


class PasskeyPrompt(NamedTuple):
    """A passkey-retrieval prompt.

    ids: ``[target_len]`` int32 token ids. passkey: the number hidden in it.
    depth: fraction of the filler placed before the key line.
    key_position: index in ``ids`` of the first token of the key line.
    """

    ids: np.ndarray
    passkey: int
    depth: float
    key_position: int


class PasskeyResult(NamedTuple):
    """correct: the first number in the generated text equals the passkey; predicted: that number (or None);
    text: the decoded continuation; length: the prompt length in tokens."""

    correct: bool
    passkey: int
    predicted: int | None
    text: str
    length: int


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=special))
    except TypeError:  # tokenizers without the keyword
        return list(tokenizer.encode(text))


def passkey_prompt(tokenizer, target_len: int, *, seed: int = 0, passkey: int | None = None,
                   depth: float | None = None) -> PasskeyPrompt:
    """A passkey-retrieval prompt of exactly ``target_len`` tokens (landmark-attention / LongLoRA test).

    The text is the reference's ``generate_prompt_landmark``, joined by newlines::

        There is an important info hidden inside a lot of irrelevant text. Find it and memorize
        them. I will quiz you about the important information there.
        The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ...
        The pass key is 12345. Remember it. 12345 is the pass key.
        The grass is green. ... (the rest of the filler)
        What is the pass key? The pass key is

    The filler is repeated at the token level (``encode(" " + filler)``) and cut
    to make the total exactly ``target_len``; ``depth`` (default: uniform
    random, as the reference's random split) of it goes before the key line.
    ``passkey`` defaults to a random integer in ``[1, 50000)`` (the reference's
    ``randint(1, 50000)``). Deterministic for a given ``seed``.

    Args:
      tokenizer: anything with ``encode(text, add_special_tokens=...) -> list[int]``
        (the library's tokenizers); special tokens (BOS) are added to the first
        piece only.
      target_len: prompt length in tokens.

    Raises:
      ValueError: ``target_len`` too small for the fixed text, or a bad ``depth``.
    """
    rng = np.random.default_rng(seed)
    depth = float(rng.uniform()) if depth is None else float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1], got {depth}")
    passkey = int(rng.integers(1, 50000)) if passkey is None else int(passkey)
    head = _encode(tokenizer, _TASK + "\n", True)
    key_line = _encode(tokenizer, f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n", False)
    question = _encode(tokenizer, "\n" + _QUESTION, False)
    n_fill = target_len - len(head) - len(key_line) - len(question)
    if n_fill < 0:
        raise ValueError(f"`target_len` {target_len} is too short: the task, key line and question alone take "
                         f"{target_len - n_fill} tokens")
    unit = _encode(tokenizer, " " + _FILLER, False)
    filler = (unit * (n_fill // max(len(unit), 1) + 1))[:n_fill]
    n_before = int(round(depth * n_fill))
    ids = head + filler[:n_before] + key_line + filler[n_before:] + question
    return PasskeyPrompt(np.asarray(ids, np.int32), passkey, depth, len(head) + n_before)


def passkey_retrieval(model: llama.LlamaForCausalLM, params, tokenizer, prompt: PasskeyPrompt, *,
                      max_new_tokens: int | None = None,
                      generate: Callable[..., np.ndarray] | None = None) -> PasskeyResult:
    """Greedy-generates after a :func:`passkey_prompt` and checks the number.

    The continuation (``max_new_tokens``, default: the token count of
    ``" <passkey>"`` plus 2) is decoded and its first integer compared with the
    passkey. The reference compares token ids with the answer's own
    tokenisation; comparing the number is tokenizer-independent and equal for
    a continuation that starts with the key. Use the *eval* config (full
    attention, KV cache).

    Args:
      generate: defaults to :func:`lowrank_jax.models.llama.generate` (greedy);
        any function with its signature.
    """
    if generate is None:
        from lowrank_jax.models.llama import generate
    if max_new_tokens is None:
        max_new_tokens = len(_encode(tokenizer, f" {prompt.passkey}", False)) + 2
    new = generate(model, params, [prompt.ids.tolist()], max_new_tokens=max_new_tokens)
    text = tokenizer.decode([int(t) for t in np.asarray(new)[0]])
    found = re.search(r"\d+", text)
    predicted = int(found.group()) if found else None
    return PasskeyResult(predicted == prompt.passkey, prompt.passkey, predicted, text, len(prompt.ids))


def passkey_accuracy(model: llama.LlamaForCausalLM, params, tokenizer, lengths: Sequence[int], *,
                     num_tests: int = 5, seed: int = 0,
                     generate: Callable[..., np.ndarray] | None = None) -> dict[int, float]:
    """Passkey-retrieval accuracy at each prompt length, ``{length: fraction correct}``.

    ``num_tests`` prompts per length with seeds ``seed, seed + 1, ...`` (random
    key and depth each, as the reference's ``num_tests`` loop), scored by
    :func:`passkey_retrieval`. One compiled program per length.
    """
    if num_tests <= 0:
        raise ValueError(f"`num_tests` must be positive, got {num_tests}")
    out = {}
    for length in lengths:
        prompts = [passkey_prompt(tokenizer, int(length), seed=seed + i) for i in range(num_tests)]
        hits = [passkey_retrieval(model, params, tokenizer, p, generate=generate).correct for p in prompts]
        out[int(length)] = float(np.mean(hits))
    return out
