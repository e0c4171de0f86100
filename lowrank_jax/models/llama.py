"""A LLaMA-family decoder in flax.linen (LLaMA 2/3, SmolLM, TinyLlama, ...).

The module tree mirrors Hugging Face's ``LlamaForCausalLM`` without its
``model.`` prefix, so parameter paths read like the checkpoint names::

    params/embed_tokens/embedding                [V, D]       (nn.Embed)
    params/layers_{i}/input_layernorm/scale      [D]
    params/layers_{i}/self_attn/q_proj/kernel    [D, N*H]     (nn.Dense, no bias)
    params/layers_{i}/self_attn/k_proj/kernel    [D, K*H]
    params/layers_{i}/self_attn/v_proj/kernel    [D, K*H]
    params/layers_{i}/self_attn/o_proj/kernel    [N*H, D]
    params/layers_{i}/post_attention_layernorm/scale
    params/layers_{i}/mlp/{gate_proj,up_proj}/kernel   [D, F]
    params/layers_{i}/mlp/down_proj/kernel             [F, D]
    params/norm/scale                            [D]
    params/lm_head/kernel                        [D, V]  (only when embeddings are untied)
    params/layers_{i}/self_attn/q_proj/bias      [N*H]   (only for projections named in
                                                          ``config.bias_projections``, e.g. Qwen2's q/k/v)

Kernels are in Flax orientation ``[in, out]`` (the transpose of torch's
``[out, in]``). With ``config.scan_layers=True`` the blocks are one
``nn.scan`` named ``layers`` and every block leaf gains a leading layer axis:
``params/layers/self_attn/q_proj/kernel`` is ``[L, D, N*H]``
(:func:`stack_layers` / :func:`unstack_layers` convert between the two).
Every projection is a plain ``nn.Dense``, so method interception on
``nn.Dense`` (the LoRA bridges) sees all of them.

Shape letters: B batch, T query length, S key length, N query heads,
K key/value heads, H head dim, D model width, F MLP width, V vocabulary.

Calling the model::

    model = LlamaForCausalLM(config)
    logits = model.apply({"params": params}, input_ids)        # [B, T, V]

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig.tiny()
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.zeros((1, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids).shape
    (1, 5, 128)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.io import hf_names

__all__ = [
    "ARCHITECTURES",
    "PROJECTIONS",
    "ROPE_TYPES",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RMSNorm",
    "apply_rope",
    "dot_product_attention",
    "generate",
    "init_cache",
    "masked_nll",
    "mean_nll",
    "perplexity",
    "rope_cos_sin",
    "rope_inverse_frequencies",
    "stack_layers",
    "unstack_layers",
]

#: ``attention_fn(query, key, value, *, mask=None, is_causal=False) -> (BTNH)``
#: with query ``(BTNH)`` and key/value ``(BSKH)``; the signature conventions of
#: :func:`jax.nn.dot_product_attention`, which is the default.
AttentionFn = Callable[..., jax.Array]

#: The ``rope_type`` values :class:`LlamaConfig` runs (transformers' names).
ROPE_TYPES = ("default", "linear", "llama3")
#: Every ``nn.Dense`` of a block; ``LlamaConfig.bias_projections`` picks from these.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHITECTURES = hf_names.ARCHITECTURES  # the LLaMA family's transformers model types (owned by hf_names)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and execution options of a LLaMA-family decoder.

    Frozen and hashable, so a model built from it can be a static jit argument.
    Field names follow transformers' ``LlamaConfig``. The defaults are the
    SmolLM2-135M architecture.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_hidden_layers: sizes V, D,
        F and L.
      num_attention_heads: N, query heads.
      num_key_value_heads: K, key/value heads (grouped-query attention when
        K < N; N must be a multiple of K).
      head_dim: H; ``None`` means ``hidden_size // num_attention_heads``.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: RoPE base.
      rope_type: how the rotary inverse frequencies are scaled, as transformers'
        ``rope_parameters["rope_type"]`` (``modeling_rope_utils.py``):
        ``"default"`` / ``"linear"``: all divided by ``rope_scaling_factor``
        (linear position interpolation; ``"default"`` as transformers writes it
        has factor 1.0, and LongLoRA's extension sets the factor on it);
        ``"llama3"``: Llama 3.1's frequency-dependent scaling
        (``_compute_llama3_parameters``; see :func:`rope_inverse_frequencies`).
        Any other type raises.
      rope_scaling_factor: the ``factor`` of ``"linear"``/``"llama3"``; 1.0 means no scaling.
      rope_low_freq_factor, rope_high_freq_factor, rope_original_max_position_embeddings:
        ``"llama3"``'s ``low_freq_factor``, ``high_freq_factor`` and
        ``original_max_position_embeddings`` (the pre-training context; required for llama3).
      max_position_embeddings: the context length the model was trained for
        (informational; nothing is allocated from it).
      sliding_window: Mistral's sliding-window attention width (keys within the
        last ``sliding_window`` positions). Only the case where it changes nothing
        runs: a sequence (or KV cache) longer than the window raises instead of
        silently attending wider. ``None``: full causal attention.
      bias_projections: the projections that carry a bias (``nn.Dense(use_bias=True)``,
        param ``.../<name>/bias`` ``[out]``), out of ``q_proj k_proj v_proj o_proj
        gate_proj up_proj down_proj``: Qwen2 ``("q_proj", "k_proj", "v_proj")``, LLaMA's
        ``attention_bias`` the four attention ones, ``mlp_bias`` the three MLP ones.
      architecture: the transformers ``model_type`` the weights come from (``"llama"``,
        ``"mistral"``, ``"qwen2"``): what a written ``config.json`` declares.
      tie_word_embeddings: logits are ``x @ embed_tokens.embedding.T``
        (``nn.Embed.attend``); otherwise a separate ``lm_head`` Dense.
      dtype: computation dtype of activations. param_dtype: dtype of new params.
      scan_layers: run the blocks as one ``nn.scan`` (params stacked ``[L, ...]``).
      scan_unroll: blocks per iteration of that loop (``lax.scan``'s ``unroll``); params stay
        stacked. ``num_hidden_layers`` unrolls it fully (benchmarks/bench_smollm2_profile.py).
      remat: wrap each block in ``nn.remat`` (recompute activations in the
        backward pass).
      remat_policy: name of a ``jax.checkpoint_policies`` member, e.g.
        ``"dots_with_no_batch_dims_saveable"``; ``None`` saves nothing.
      attention_fn: replaces :func:`jax.nn.dot_product_attention`. It gets
        query ``(BTNH)`` and key/value ``(BSKH)`` with the *K* key/value heads
        passed through (not repeated: an implementation without grouped-query
        support must repeat them itself), after RoPE, and is called as
        ``attention_fn(q, k, v, is_causal=True)`` for a plain forward pass or
        ``attention_fn(q, k, v, mask=mask)`` with a boolean ``(B1TS)`` mask
        when there is an attention mask or a KV cache. The softmax scale is
        the function's default, ``1/sqrt(H)``. Use ``functools.partial`` to
        bind options (e.g. ``lrj.attention.s2_attention`` with ``group_size``).
      initializer_range: std of the normal init of new kernels and embeddings.
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_type: str = "default"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 8192
    sliding_window: int | None = None
    bias_projections: tuple[str, ...] = ()
    architecture: str = "llama"
    tie_word_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    scan_unroll: int = 1
    remat: bool = False
    remat_policy: str | None = None
    attention_fn: AttentionFn | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({self.num_key_value_heads})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) is not divisible by `num_attention_heads` "
                f"({self.num_attention_heads}); set `head_dim` explicitly")
        if self.resolved_head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.resolved_head_dim}")
        if self.rope_scaling_factor <= 0:
            raise ValueError(f"`rope_scaling_factor` must be positive, got {self.rope_scaling_factor}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type == "llama3":
            if self.rope_original_max_position_embeddings is None or self.rope_original_max_position_embeddings <= 0:
                raise ValueError("RoPE type 'llama3' needs a positive `rope_original_max_position_embeddings`, got "
                                 f"{self.rope_original_max_position_embeddings!r}")
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ValueError(f"RoPE type 'llama3' needs 0 < rope_low_freq_factor < rope_high_freq_factor, got "
                                 f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, (int, np.integer))
                                                or self.sliding_window <= 0):
            raise ValueError(f"`sliding_window` must be a positive integer or None, got {self.sliding_window!r}")
        if not isinstance(self.bias_projections, tuple):
            raise ValueError(f"`bias_projections` must be a tuple (the config is hashable), got "
                             f"{self.bias_projections!r}")
        unknown = [p for p in self.bias_projections if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"`bias_projections` names {unknown}, not projections of the model; "
                             f"known: {', '.join(PROJECTIONS)}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"`architecture` {self.architecture!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)}")
        if self.remat_policy is not None and not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(
                f"`remat_policy` {self.remat_policy!r} is not a member of jax.checkpoint_policies")

    @property
    def resolved_head_dim(self) -> int:
        """H: ``head_dim``, or ``hidden_size // num_attention_heads`` when unset."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> LlamaConfig:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **changes) -> LlamaConfig:
        """A 2-layer, 64-wide config with GQA 4/2 heads for tests and examples."""
        base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                    max_position_embeddings=256)
        base.update(changes)
        return cls(**base)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], **overrides) -> LlamaConfig:
        """Builds a config from GGUF key/value metadata (llama.cpp key names).

        Args:
          metadata: ``{key: value}`` as read by
            :func:`lowrank_jax.io.gguf.read_metadata`, e.g. ``"llama.block_count"``.
          **overrides: fields to set explicitly (``dtype``, ``scan_layers``,
            ``tie_word_embeddings``, ...). A GGUF file states tied embeddings only by
            lacking an ``output.weight`` tensor, so the loader passes that here.

        Raises:
          ValueError: an architecture other than the LLaMA family, partial rotary
            embeddings, or an unsupported RoPE scaling type.
        """
        arch = metadata.get("general.architecture", "llama")
        if arch not in ("llama", "mistral"):
            raise ValueError(f"GGUF architecture {arch!r} is not a LLaMA-family decoder")

        def get(key, default=None):
            value = metadata.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks the required key {arch}.{key!s}")
            return value

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden // heads))
        rope_dim = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ValueError(f"partial rotary embeddings are not supported "
                             f"(rope.dimension_count={rope_dim}, head_dim={head_dim})")
        scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
        factor = float(metadata.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
        if scaling_type not in ("none", "linear") and factor != 1.0:
            raise ValueError(f"RoPE scaling type {scaling_type!r} is not supported (only 'linear')")
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(metadata["tokenizer.ggml.tokens"])
        fields = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=None if head_dim * heads == hidden else head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling_factor=factor if scaling_type == "linear" else 1.0,
            max_position_embeddings=int(metadata.get(f"{arch}.context_length", 2048)),
            architecture=arch,
        )
        fields.update(overrides)
        return cls(**fields)


    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], **overrides) -> LlamaConfig:
        """Builds a config from a transformers ``config.json`` dict (LLaMA, Mistral, Qwen2).

        Reads ``model_type`` (or ``architectures[0]``), the sizes, ``head_dim``, GQA heads,
        ``rms_norm_eps``, ``tie_word_embeddings``, ``max_position_embeddings``, RoPE as
        ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older files),
        Mistral's ``sliding_window`` (Qwen2's only with ``use_sliding_window``) and the biases
        (Qwen2: q/k/v; LLaMA ``attention_bias``: q/k/v/o, ``mlp_bias``: gate/up/down). Missing
        optional keys take transformers' defaults for that model type.

        Args:
          config: the parsed ``config.json``.
          **overrides: fields to set explicitly (``dtype``, ``param_dtype``, ``scan_layers``, ...).

        Raises:
          ValueError: an unsupported ``model_type``/architecture (named, with the supported
            ones), an unsupported ``rope_type`` (named, with the supported ones), partial
            rotary embeddings, an activation other than SiLU, or a missing size key.
        """
        model_type = hf_names.model_type(config)
        biases = hf_names.bias_projections(config)

        def need(key):
            if config.get(key) is None:
                raise ValueError(f"config.json of a {model_type} model lacks {key!r}")
            return int(config[key])

        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (the LLaMA MLP is SwiGLU: 'silu')")
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        if rope and all(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError(f"per-layer RoPE parameters ({sorted(rope)}) are not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        partial = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) or 1.0)
        if partial != 1.0:
            raise ValueError(f"partial rotary embeddings are not supported (partial_rotary_factor={partial})")
        defaults = {"llama": (32000, 2048), "mistral": (32000, 131072), "qwen2": (151936, 32768)}[model_type]
        max_positions = int(config.get("max_position_embeddings") or defaults[1])
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        head_dim = config.get("head_dim")
        if model_type == "llama":
            window = None
        elif model_type == "qwen2":
            window = config.get("sliding_window") if config.get("use_sliding_window") else None
        else:
            window = config.get("sliding_window", 4096)
        fields = dict(
            vocab_size=int(config.get("vocab_size") or defaults[0]),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=None if head_dim is None or int(head_dim) * heads == hidden else int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rope_scaling_factor=float(rope.get("factor", 1.0)) if rope_type != "default" else 1.0,
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=(
                int(rope.get("original_max_position_embeddings") or max_positions) if rope_type == "llama3" else None),
            max_position_embeddings=max_positions,
            sliding_window=None if window is None else int(window),
            bias_projections=biases,
            architecture=model_type,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        fields.update(overrides)
        return cls(**fields)

    @property
    def rope_inverse_frequencies(self) -> np.ndarray:
        """``[H / 2]`` float32 rotary inverse frequencies of this config (:func:`rope_inverse_frequencies`)."""
        return rope_inverse_frequencies(
            self.resolved_head_dim, self.rope_theta, self.rope_type, self.rope_scaling_factor,
            low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
            original_max_position_embeddings=self.rope_original_max_position_embeddings)


# --------------------------------------------------------------------------- layers


def dot_product_attention(query, key, value, *, mask=None, is_causal=False, **kwargs):
    """The default ``attention_fn``: :func:`jax.nn.dot_product_attention` (GQA-aware).

    Query ``(BTNH)``, key/value ``(BSKH)`` with ``N % K == 0``. jax promotes bf16
    logits to float32 internally (``jnp.promote_types(bf16, f32)``), which strict
    dtype promotion rejects, so that internal step runs under standard promotion;
    inputs and output keep their dtype.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=is_causal, **kwargs)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, normalised in float32 (as transformers)."""

    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                             scaling_factor: float = 1.0, *, low_freq_factor: float = 1.0,
                             high_freq_factor: float = 4.0,
                             original_max_position_embeddings: int | None = None) -> np.ndarray:
    """``[head_dim / 2]`` float32 rotary inverse frequencies, as transformers' ``ROPE_INIT_FUNCTIONS``.

    .. math:: \\omega_j = \\theta^{-2j/H}

    ``"default"``/``"linear"``: ``omega / s`` (position interpolation, Chen et al. 2023,
    https://arxiv.org/abs/2306.15595). ``"llama3"`` (``_compute_llama3_parameters``,
    https://github.com/huggingface/transformers/blob/main/src/transformers/modeling_rope_utils.py):
    with wavelength ``lambda = 2 pi / omega`` and ``L`` the original context,
    ``omega`` is kept where ``lambda < L / high``, divided by ``s`` where ``lambda > L / low``,
    and in between ``(1 - g) omega / s + g omega`` with ``g = (L / lambda - low) / (high - low)``.
    Computed in float32 numpy, as torch computes it in float32.

    Raises:
      ValueError: a ``rope_type`` not in :data:`ROPE_TYPES` (named).
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    f32 = np.float32
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim)
    inv_freq = (f32(1.0) / (f32(theta) ** exponent)).astype(f32)
    factor = f32(scaling_factor)
    if rope_type != "llama3":
        return (inv_freq / factor).astype(f32)
    if original_max_position_embeddings is None:
        raise ValueError("RoPE type 'llama3' needs `original_max_position_embeddings`")
    old_len, low, high = f32(original_max_position_embeddings), f32(low_freq_factor), f32(high_freq_factor)
    wavelen = (f32(2 * np.pi) / inv_freq).astype(f32)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq).astype(f32)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(f32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, scaling_factor: float = 1.0, *,
                 inverse_frequencies: np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
    """Rotary tables ``cos, sin`` of shape ``positions.shape + (head_dim,)`` in float32.

    .. math:: \\omega_j = \\theta^{-2j/H} / s, \\quad
              \\mathrm{emb} = [p\\,\\omega, p\\,\\omega]

    in transformers' "rotate_half" layout (both halves carry the same
    frequencies), with ``s`` the linear position-interpolation factor.
    ``inverse_frequencies`` (``[H / 2]``, e.g. ``config.rope_inverse_frequencies`` for
    llama3 scaling) replaces ``omega`` and then ``theta``/``scaling_factor`` are unused.
    """
    if inverse_frequencies is None:
        inverse_frequencies = rope_inverse_frequencies(head_dim, theta, "linear", scaling_factor)
    inv_freq = jnp.asarray(inverse_frequencies, jnp.float32)
    if inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"`inverse_frequencies` must have shape ({head_dim // 2},), got {inv_freq.shape}")
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x (BTNH)`` by tables ``(BTH)``: ``x cos + rotate_half(x) sin``."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _dense(config: LlamaConfig, features: int, name: str) -> nn.Dense:
    """A projection: ``nn.Dense``, with a (zero-initialised) bias when ``name`` is in ``config.bias_projections``."""
    return nn.Dense(features, use_bias=name in config.bias_projections, dtype=config.dtype,
                    param_dtype=config.param_dtype, kernel_init=nn.initializers.normal(config.initializer_range),
                    name=name)


def _missing_cache():
    raise ValueError("decode=True needs a KV cache: pass variables {'params': ..., "
                     "'cache': init_cache(config, batch, max_length)} and mutable=['cache']")


def _check_window(config: LlamaConfig, length: int, what: str) -> None:
    """Sliding-window attention equals full causal attention only up to the window: refuse longer."""
    if config.sliding_window is not None and length > config.sliding_window:
        raise ValueError(f"{what} has {length} positions, more than the model's sliding_window "
                         f"{config.sliding_window}: sliding-window attention is not implemented, and full "
                         f"attention would silently differ from the model's")


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache.

    Raises ``ValueError`` when ``config.sliding_window`` is shorter than the sequence (or cache).
    """

    config: LlamaConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, cache_index):
        c = self.config
        n, k_heads, h = c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim
        b, t, _ = x.shape
        q = _dense(c, n * h, "q_proj")(x).reshape(b, t, n, h)
        k = _dense(c, k_heads * h, "k_proj")(x).reshape(b, t, k_heads, h)
        v = _dense(c, k_heads * h, "v_proj")(x).reshape(b, t, k_heads, h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attention_fn = c.attention_fn or dot_product_attention

        if self.decode:
            cached_k = self.variable("cache", "key", _missing_cache)
            cached_v = self.variable("cache", "value", _missing_cache)
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype),
                                             (zero, cache_index, zero, zero))
            v = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype),
                                             (zero, cache_index, zero, zero))
            cached_k.value, cached_v.value = k, v
            _check_window(c, k.shape[1], "the KV cache")
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            q_slot = cache_index + jnp.arange(t)
            mask = jnp.arange(k.shape[1])[None, :] <= q_slot[:, None]        # [T, S]
            mask = mask[None, None]
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :].astype(bool)
            out = attention_fn(q, k, v, mask=mask)
        elif key_mask is None:
            _check_window(c, t, "the sequence")
            out = attention_fn(q, k, v, is_causal=True)
        else:
            _check_window(c, t, "the sequence")
            mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & key_mask[:, None, None, :].astype(bool)
            out = attention_fn(q, k, v, mask=mask)
        return _dense(c, c.hidden_size, "o_proj")(out.reshape(b, t, n * h))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        gate = _dense(c, c.intermediate_size, "gate_proj")(x)
        up = _dense(c, c.intermediate_size, "up_proj")(x)
        return _dense(c, c.hidden_size, "down_proj")(nn.silu(gate) * up)


def constrain(x: jax.Array, spec) -> jax.Array:
    """``x`` constrained to ``spec`` (a ``PartitionSpec``) on the current mesh; ``x`` when ``spec`` is None.

    Under an Explicit mesh this is a ``reshard``; otherwise ``with_sharding_constraint`` (a hint the
    compiler keeps, e.g. inside :func:`lowrank_jax.models.llama_sharding.auto_axes`).
    """
    if spec is None:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.axis_names and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Returns ``(x, None)`` so the same class works as an ``nn.scan`` body. With
    ``activation_sharding`` (a ``PartitionSpec`` of ``[B, T, D]``) the residual stream
    is constrained to it after each half-block.
    """

    config: LlamaConfig
    decode: bool = False
    activation_sharding: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, cache_index):
        c = self.config
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype)
        h = LlamaAttention(c, decode=self.decode, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, key_mask, cache_index)
        x = constrain(x + h, self.activation_sharding)
        x = x + LlamaMLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
        return constrain(x, self.activation_sharding), None


class LlamaForCausalLM(nn.Module):
    """Decoder-only LM returning next-token logits ``[B, T, V]`` (in ``config.dtype``).

    Call signature: ``model.apply({"params": p}, input_ids, positions=None,
    attention_mask=None, decode=False)``.

    Args (of ``__call__``):
      input_ids: ``[B, T]`` integer token ids.
      positions: ``[B, T]`` RoPE positions; default ``arange(T)`` (or, when
        decoding, the cache slot of each token).
      attention_mask: ``[B, T]`` (``[B, S]`` over the cache slots when decoding),
        1 for real tokens, 0 for padding keys. ``None`` is a plain causal mask.
      decode: read and append to the KV cache (variables
        ``{"cache": init_cache(...)}``, ``mutable=["cache"]``).

    Attributes:
      config: the architecture.
      activation_sharding: ``PartitionSpec`` of the ``[B, T, D]`` residual stream (e.g.
        ``P(("data", "fsdp"), None, None)``: batch-sharded activations under FSDP); applied
        after the embedding and every half-block. ``None``: no constraint.
      remat_groups: with ``scan_layers`` and ``config.remat``, ``G > 1`` runs the blocks as a
        two-level scan, ``G`` groups of ``L / G`` blocks, each group rematerialised as a
        whole (nested remat: about ``G + L / G`` saved block inputs, ``2 sqrt(L)`` at
        ``G = sqrt(L)``; Chen et al. 2016, https://arxiv.org/abs/1604.06174, as
        ``flax.linen.remat_scan``). Params stay ``[L, ...]``. ``G`` must divide ``L``.
      output: ``"logits"`` (default) returns ``[B, T, V]`` logits; ``"hidden"`` returns the final-norm
        hidden states ``[B, T, D]`` and leaves the head to the caller, e.g.
        :func:`lowrank_jax.losses.lm_cross_entropy`, which never materialises the whole logits.
    """

    config: LlamaConfig
    activation_sharding: Any = None
    remat_groups: int = 1
    output: str = "logits"

    def _remat_policy(self):
        """``config.remat_policy`` resolved: offloading policies are factories, called with
        ``("device", "pinned_host")`` (the saved dots go to host memory)."""
        c = self.config
        if not c.remat_policy:
            return None
        policy = getattr(jax.checkpoint_policies, c.remat_policy)
        if c.remat_policy == "offload_dot_with_no_batch_dims":
            policy = policy("device", "pinned_host")
        return policy

    def _grouped_block(self, decode: bool):
        """Two-level scan (nested remat) over ``remat_groups`` groups, params presented as ``[L, ...]``."""
        c, groups = self.config, self.remat_groups
        if c.num_hidden_layers % groups:
            raise ValueError(f"`remat_groups` {groups} does not divide num_hidden_layers {c.num_hidden_layers}")
        policy = self._remat_policy()
        scan = functools.partial(nn.scan, variable_axes={"params": 0, "cache": 0, "adapter_aux": 0},
                                 split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 4)
        inner = scan(nn.remat(LlamaDecoderLayer, prevent_cse=False, policy=policy),
                     length=c.num_hidden_layers // groups)
        outer = scan(nn.remat(inner, prevent_cse=False), length=groups)

        def to_groups(tree):
            return jax.tree.map(lambda a: a.reshape((groups, a.shape[0] // groups) + a.shape[1:]), tree)

        def from_groups(tree):
            return jax.tree.map(lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:]), tree)

        block = nn.map_variables(outer, "params", trans_in_fn=to_groups, trans_out_fn=from_groups,
                                 mutable=True, init=True)
        return functools.partial(block, c, decode=decode, activation_sharding=self.activation_sharding)

    def _block(self, decode: bool):
        c = self.config
        if self.remat_groups != 1:
            if not isinstance(self.remat_groups, int) or self.remat_groups < 1:
                raise ValueError(f"`remat_groups` must be a positive integer, got {self.remat_groups!r}")
            if not (c.scan_layers and c.remat):
                raise ValueError(f"`remat_groups` {self.remat_groups} needs config.scan_layers and config.remat")
            if not decode:
                return self._grouped_block(decode)
        block = LlamaDecoderLayer
        if c.remat:
            block = nn.remat(block, prevent_cse=not c.scan_layers, policy=self._remat_policy())
        if c.scan_layers:
            block = nn.scan(block, variable_axes={"params": 0, "cache": 0, "adapter_aux": 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast,) * 4, length=c.num_hidden_layers, unroll=c.scan_unroll)
        return functools.partial(block, c, decode=decode, activation_sharding=self.activation_sharding)

    @nn.compact
    def __call__(self, input_ids, positions=None, attention_mask=None, decode: bool = False):
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                         embedding_init=nn.initializers.normal(c.initializer_range),
                         name="embed_tokens")
        x = constrain(embed(input_ids), self.activation_sharding)

        cache_index = None
        if decode:
            index = self.variable("cache", "index", _missing_cache)
            cache_index = index.value
            index.value = cache_index + t
        if positions is None:
            positions = jnp.arange(t)[None, :] + (0 if cache_index is None else cache_index)
            positions = jnp.broadcast_to(positions, (b, t))
        cos, sin = rope_cos_sin(positions, c.resolved_head_dim, c.rope_theta,
                                inverse_frequencies=c.rope_inverse_frequencies)

        block = self._block(decode)
        if c.scan_layers:
            x, _ = block(name="layers")(x, cos, sin, attention_mask, cache_index)
        else:
            for i in range(c.num_hidden_layers):
                x, _ = block(name=f"layers_{i}")(x, cos, sin, attention_mask, cache_index)

        x = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="norm")(x)
        if self.output == "hidden":  # the head is the caller's (lowrank_jax.losses.lm_cross_entropy)
            return x
        if self.output != "logits":
            raise ValueError(f"`output` must be 'logits' or 'hidden', got {self.output!r}")
        if c.tie_word_embeddings:
            return embed.attend(x)
        return _dense(c, c.vocab_size, "lm_head")(x)


# --------------------------------------------------------------------------- layouts


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict:
    """``layers_{i}/...`` leaves -> one ``layers/...`` tree stacked on axis 0 (scan layout).

    Returns a new dict; the input is not modified.
    """
    params = dict(params)
    missing = [i for i in range(num_layers) if f"layers_{i}" not in params]
    if missing:
        raise ValueError(f"params lack blocks {missing}; top-level keys: {sorted(params)}")
    blocks = [params.pop(f"layers_{i}") for i in range(num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return params


def unstack_layers(params: Mapping[str, Any]) -> dict:
    """Inverse of :func:`stack_layers`: ``layers/...`` ``[L, ...]`` -> ``layers_{i}/...``."""
    params = dict(params)
    if "layers" not in params:
        raise ValueError(f"params have no stacked 'layers' entry; top-level keys: {sorted(params)}")
    stacked = params.pop("layers")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return params


# --------------------------------------------------------------------------- decoding


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype: Any = None) -> dict:
    """An empty KV cache for ``decode=True``: ``{"index", "layers_{i}" | "layers"}``.

    Keys and values are ``[B, S, K, H]`` per block (``[L, B, S, K, H]`` under
    scan), in ``dtype`` (default ``config.dtype``); ``index`` is the next slot.
    """
    dtype = dtype or config.dtype
    shape = (batch_size, max_length, config.num_key_value_heads, config.resolved_head_dim)
    if config.scan_layers:
        shape = (config.num_hidden_layers,) + shape
    kv = lambda: {"self_attn": {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}}
    cache = {"index": jnp.zeros((), jnp.int32)}
    if config.scan_layers:
        cache["layers"] = kv()
    else:
        cache.update({f"layers_{i}": kv() for i in range(config.num_hidden_layers)})
    return cache


def _sample(logits, key, temperature, top_k):
    """Greedy where ``temperature == 0`` (a traced scalar), else top-k/temperature sampling."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled.astype(jnp.int32), greedy)


class _ByIdentity:
    """A jit-static wrapper of an adapter (whose config dict is unhashable), equal only to itself."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.value is self.value


def _forward(model, adapter, params, adapter_params, adapter_index):
    """``(variables, *args, **kwargs) -> model.apply(...)``, through ``lrj.linen.apply`` when an adapter is given
    (a bank also gets each row's ``adapter_index``)."""
    if adapter is None:
        return model.apply
    from lowrank_jax import linen  # lazily: the model does not depend on the adapters

    extra = {"adapter_index": adapter_index} if "adapter_index" in adapter.call_args else {}
    _, adapter_params, _ = linen._with_collection(params, adapter_params)  # a tree made for bare params
    return lambda variables, *args, **kwargs: linen.apply(model, adapter, variables, adapter_params, *args, **extra, **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "adapter"))
def _generate(model, params, prompt, prompt_mask, key, eos_token_id, pad_token_id, temperature, *,
              max_new_tokens, top_k, adapter=None, adapter_params=None, adapter_index=None):
    b, p = prompt.shape
    total = p + max_new_tokens
    forward = _forward(model, None if adapter is None else adapter.value, params, adapter_params, adapter_index)
    cache = init_cache(model.config, b, total)
    key_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, max_new_tokens), prompt_mask.dtype)], 1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    logits, state = forward({"params": params, "cache": cache}, prompt, positions=positions,
                            attention_mask=key_mask, decode=True, mutable=["cache"])
    key, sub = jax.random.split(key)
    token = _sample(logits[:, -1], sub, temperature, top_k)
    done = token == eos_token_id
    next_pos = positions[:, -1] + 1

    def step(carry, slot):
        cache, token, pos, key_mask, done, key = carry
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((b, 1), key_mask.dtype),
                                                (jnp.zeros((), jnp.int32), slot))
        logits, state = forward({"params": params, "cache": cache}, token[:, None],
                                positions=pos[:, None], attention_mask=key_mask, decode=True,
                                mutable=["cache"])
        key, sub = jax.random.split(key)
        new = _sample(logits[:, -1], sub, temperature, top_k)
        new = jnp.where(done, pad_token_id, new)
        done = done | (new == eos_token_id)
        return (state["cache"], new, pos + 1, key_mask, done, key), new

    slots = p + jnp.arange(max_new_tokens - 1, dtype=jnp.int32)
    _, rest = jax.lax.scan(step, (state["cache"], token, next_pos, key_mask, done, key), slots)
    return jnp.concatenate([token[:, None], rest.T], axis=1)


def generate(model: LlamaForCausalLM, params, prompts: Sequence[Sequence[int]] | np.ndarray, *,
             max_new_tokens: int, eos_token_id: int | None = None, pad_token_id: int = 0,
             temperature: float = 0.0, top_k: int | None = None,
             key: jax.Array | None = None, adapter=None, adapter_params=None,
             adapter_index=None) -> np.ndarray:
    """Greedy (``temperature=0``) or sampled continuation with a KV cache.

    Prompts of different lengths are left-padded; their RoPE positions start at
    0 at each prompt's first real token and padding keys are masked, so each
    row decodes as if alone. One jitted program runs the prefill and a
    ``lax.scan`` over the new tokens (fixed shapes; recompiles only for a new
    batch size, prompt length, ``max_new_tokens`` or ``top_k``, not for a new
    temperature).

    Args:
      model: a :class:`LlamaForCausalLM` (any ``scan_layers``/``remat`` setting).
      params: its params (plain arrays).
      prompts: token-id lists, or a ``[B, P]`` array.
      max_new_tokens: number of tokens to produce per row.
      eos_token_id: stop token; after it a row produces ``pad_token_id``.
      temperature: 0 for greedy, else softmax temperature for sampling.
      top_k: sample only among the ``top_k`` most likely tokens.
      key: PRNG key for sampling (``jax.random.key``); default ``key(0)``.
      adapter, adapter_params: run an adapter in factored form (``lrj.linen.apply``) instead of
        merged weights; with a bank (``lrj.multi_lora``) each row names its adapter in
        ``adapter_index`` (``[B]``, ``-1``: the base model), so one batch serves many adapters
        (S-LoRA/punica serving; the decode steps take the gather path). The program is compiled
        once per adapter object: hot-swapping a bank's slots (``bank.put``) does not recompile.
      adapter_index: ``[B]`` adapter of each prompt; required with a bank, refused without one.

    Returns:
      ``[B, max_new_tokens]`` int32 numpy array of the new tokens (prompt excluded).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"`max_new_tokens` must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"`temperature` must be >= 0, got {temperature}")
    rows = [list(map(int, r)) for r in np.asarray(prompts).reshape(-1, np.shape(prompts)[-1])] \
        if isinstance(prompts, np.ndarray) else [list(map(int, r)) for r in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    prompt = np.full((len(rows), width), pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        prompt[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    key = jax.random.key(0) if key is None else key
    eos = -1 if eos_token_id is None else int(eos_token_id)
    bank = adapter is not None and "adapter_index" in adapter.call_args
    if adapter is not None and adapter_params is None:
        raise ValueError("`adapter` needs its `adapter_params`")
    if bank:
        if adapter_index is None:
            raise ValueError("a bank of adapters needs `adapter_index` (one adapter per prompt, -1 for the base model)")
        from lowrank_jax.adapters.multi import check_index  # lazily: the model does not depend on the adapters

        adapter_index = check_index(adapter_index, adapter_params)
        if adapter_index.shape != (len(rows),):
            raise ValueError(f"`adapter_index` needs one entry per prompt: {adapter_index.shape[0]} for {len(rows)} prompts")
        adapter_index = jnp.asarray(adapter_index)
    elif adapter_index is not None:
        raise ValueError("`adapter_index` is for a bank of adapters (lrj.multi_lora); this call has "
                         f"{'no adapter' if adapter is None else 'a single adapter'}")
    out = _generate(model, params, jnp.asarray(prompt), jnp.asarray(mask), key,
                    jnp.int32(eos), jnp.int32(pad_token_id), jnp.float32(temperature),
                    max_new_tokens=int(max_new_tokens), top_k=None if top_k is None else int(top_k),
                    adapter=None if adapter is None else _ByIdentity(adapter), adapter_params=adapter_params,
                    adapter_index=adapter_index)
    return np.asarray(out)


# --------------------------------------------------------------------------- evaluation


@functools.partial(jax.jit, static_argnames=("model", "adapter"))
def _masked_nll_sums(model, params, rows, loss_mask, adapter=None, adapter_params=None):
    """``[B]`` next-token NLL of each row ``[T + 1]`` summed over the targets ``loss_mask [B, T]`` weights
    (through the adapter in factored form when given)."""
    forward = _forward(model, None if adapter is None else adapter.value, params, adapter_params, None)
    logits = forward({"params": params}, rows[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * loss_mask.astype(jnp.float32), axis=-1)


def masked_nll(model: LlamaForCausalLM, params, rows, loss_mask, *, batch_size: int = 4, adapter=None,
               adapter_params=None) -> tuple[float, float]:
    r"""``(sum of NLL, sum of weights)`` of next-token prediction over ``rows [N, T + 1]``, each target
    ``rows[:, 1:]`` weighted by ``loss_mask [N, T]`` (1 for the tokens a run trains on, 0 for prompts
    and padding): :math:`\sum_{n,t} m_{nt} \, (-\log p(x_{n,t+1} \mid x_{n,\le t}))`.

    Rows run ``batch_size`` at a time through one jitted program (the last batch is padded with
    zero-weight rows, not recompiled); sums are accumulated in float64. ``adapter``, ``adapter_params``:
    evaluate with the adapter in factored form (``lrj.linen.apply``), for adapters with no dense merge.
    """
    rows, weights = np.asarray(rows, np.int32), np.asarray(loss_mask, np.float32)
    if rows.ndim != 2 or weights.shape != (rows.shape[0], rows.shape[1] - 1):
        raise ValueError(f"`rows` must be [N, T + 1] and `loss_mask` [N, T]; got {rows.shape} and {weights.shape}")
    if len(rows) == 0:
        raise ValueError("no rows to evaluate")
    batch_size = min(batch_size, len(rows))
    total = 0.0
    for start in range(0, len(rows), batch_size):
        batch, mask = rows[start:start + batch_size], weights[start:start + batch_size]
        if len(batch) < batch_size:  # pad the last batch (one compiled shape) with zero-weight rows
            pad = batch_size - len(batch)
            batch = np.concatenate([batch, np.repeat(batch[:1], pad, axis=0)])
            mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), np.float32)])
        sums = _masked_nll_sums(model, params, jnp.asarray(batch), jnp.asarray(mask),
                                None if adapter is None else _ByIdentity(adapter), adapter_params)
        total += float(np.asarray(sums, np.float64).sum())
    return total, float(weights.astype(np.float64).sum())


def mean_nll(model: LlamaForCausalLM, params, token_ids, *, window: int = 512,
             batch_size: int = 4, adapter=None, adapter_params=None) -> float:
    """Mean next-token negative log-likelihood (nats) over non-overlapping windows.

    ``token_ids`` (1-D) is cut into ``len // window`` windows of ``window``
    tokens (the ragged tail is dropped); each window predicts its tokens
    ``1..window-1`` from its own prefix only (:func:`masked_nll` with every target weighted 1).
    ``adapter``, ``adapter_params``: evaluate with the adapter in factored form
    (``lrj.linen.apply``), for adapters that have no dense merge (a routed mixture).
    """
    ids = np.asarray(token_ids, dtype=np.int32).ravel()
    if window < 2:
        raise ValueError(f"`window` must be at least 2, got {window}")
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"need at least one window of {window} tokens, got {len(ids)} tokens")
    windows = ids[: n * window].reshape(n, window)
    total, count = masked_nll(model, params, windows, np.ones((n, window - 1), np.float32), batch_size=batch_size,
                              adapter=adapter, adapter_params=adapter_params)
    return total / count


def perplexity(model: LlamaForCausalLM, params, token_ids, *, window: int = 512,
               batch_size: int = 4, adapter=None, adapter_params=None) -> float:
    """``exp(mean_nll(...))``: perplexity over non-overlapping windows (see :func:`mean_nll`)."""
    return float(np.exp(mean_nll(model, params, token_ids, window=window, batch_size=batch_size, adapter=adapter,
                                 adapter_params=adapter_params)))
