"""A BERT encoder in flax.linen, plus sentence-transformers' mean pooling.

Enough of BERT for sentence embeddings (all-MiniLM-L6-v2 and other
``BertModel`` checkpoints; the next-sentence pooler is not modelled). The
module tree mirrors transformers' ``BertModel`` names, with ``layer.{i}``
written ``layer_{i}``; every linear layer is a plain ``nn.Dense`` (with bias),
kernels in Flax orientation ``[in, out]``::

    params/embeddings/{word,position,token_type}_embeddings/embedding
    params/embeddings/LayerNorm/{scale,bias}
    params/encoder/layer_{i}/attention/self/{query,key,value}/{kernel,bias}
    params/encoder/layer_{i}/attention/output/dense/{kernel,bias}
    params/encoder/layer_{i}/attention/output/LayerNorm/{scale,bias}
    params/encoder/layer_{i}/intermediate/dense/{kernel,bias}     [D, F]
    params/encoder/layer_{i}/output/dense/{kernel,bias}           [F, D]
    params/encoder/layer_{i}/output/LayerNorm/{scale,bias}

Calling: ``model.apply({"params": p}, input_ids, attention_mask)`` returns the
last hidden state ``[B, T, D]``; :func:`sentence_embeddings` pools it as
sentence-transformers does (masked mean, then L2 normalisation).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lowrank_jax.models.bert import BertConfig, BertModel
    >>> cfg = BertConfig.tiny()
    >>> ids = jnp.ones((2, 6), jnp.int32)
    >>> params = BertModel(cfg).init(jax.random.key(0), ids)["params"]
    >>> BertModel(cfg).apply({"params": params}, ids).shape
    (2, 6, 32)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.models.llama import dot_product_attention

__all__ = ["BertConfig", "BertModel", "l2_normalize", "mean_pooling", "sentence_embeddings"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT sizes and options; field names follow transformers' ``BertConfig``.

    Defaults are all-MiniLM-L6-v2's. ``hidden_act`` is ``"gelu"`` (exact, erf)
    or ``"gelu_new"``/``"gelu_pytorch_tanh"`` (tanh approximation).
    ``attention_fn`` is as in :class:`lowrank_jax.models.llama.LlamaConfig`,
    called as ``attention_fn(q, k, v, mask=mask)`` with a ``(B11S)`` padding mask.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_fn: Any = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"`hidden_size` ({self.hidden_size}) must be a multiple of "
                             f"`num_attention_heads` ({self.num_attention_heads})")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is not supported")

    def replace(self, **changes) -> BertConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **changes) -> BertConfig:
        """2 layers, width 32, 4 heads, vocabulary 100: for tests and examples."""
        base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64)
        base.update(changes)
        return cls(**base)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], **overrides) -> BertConfig:
        """From a transformers ``config.json`` dict (``model_type`` ``"bert"``)."""
        if config.get("model_type", "bert") != "bert":
            raise ValueError(f"expected a BERT config, got model_type={config.get('model_type')!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("dtype", "param_dtype", "attention_fn")]
        fields = {k: config[k] for k in names if k in config}
        fields.update(overrides)
        return cls(**fields)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic):
        c = self.config
        embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                  embedding_init=nn.initializers.normal(c.initializer_range))
        x = (embed(c.vocab_size, name="word_embeddings")(input_ids)
             + embed(c.max_position_embeddings, name="position_embeddings")(position_ids)
             + embed(c.type_vocab_size, name="token_type_embeddings")(token_type_ids))
        x = _layer_norm(c, "LayerNorm")(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias``, statistics in float32.

    Written out (instead of ``nn.LayerNorm``) so a bf16 model has no implicit
    bf16 -> f32 promotion (it runs under strict dtype promotion); params are
    ``scale`` and ``bias`` like ``nn.LayerNorm``.
    """

    epsilon: float = 1e-12
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _layer_norm(c: BertConfig, name: str) -> LayerNorm:
    return LayerNorm(c.layer_norm_eps, c.dtype, c.param_dtype, name=name)


def _dense(c: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=c.dtype, param_dtype=c.param_dtype,
                    kernel_init=nn.initializers.normal(c.initializer_range), name=name)


class BertSelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, deterministic):
        c = self.config
        b, t, _ = x.shape
        n = c.num_attention_heads
        h = c.hidden_size // n
        q = _dense(c, c.hidden_size, "query")(x).reshape(b, t, n, h)
        k = _dense(c, c.hidden_size, "key")(x).reshape(b, t, n, h)
        v = _dense(c, c.hidden_size, "value")(x).reshape(b, t, n, h)
        if not deterministic and c.attention_probs_dropout_prob > 0:
            # Dropout on the attention probabilities needs the explicit softmax.
            logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(h).astype(q.dtype)
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            probs = nn.Dropout(c.attention_probs_dropout_prob)(
                jax.nn.softmax(logits.astype(jnp.float32)).astype(q.dtype), deterministic=False)
            out = jnp.einsum("bnts,bsnh->btnh", probs, v)
        else:
            attention_fn = c.attention_fn or dot_product_attention
            out = attention_fn(q, k, v, mask=mask)
        return out.reshape(b, t, c.hidden_size)


class BertAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, deterministic):
        c = self.config
        h = BertSelfAttention(c, name="self")(x, mask, deterministic)
        return BertOutput(c, name="output")(h, x, deterministic)


class BertOutput(nn.Module):
    """``LayerNorm(residual + dropout(dense(h)))`` (both ``attention/output`` and ``output``)."""

    config: BertConfig

    @nn.compact
    def __call__(self, h, residual, deterministic):
        c = self.config
        h = _dense(c, c.hidden_size, "dense")(h)
        h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return _layer_norm(c, "LayerNorm")(h + residual)


class BertIntermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = _dense(c, c.intermediate_size, "dense")(x)
        return nn.gelu(h, approximate=c.hidden_act != "gelu")


class BertLayer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, deterministic):
        c = self.config
        x = BertAttention(c, name="attention")(x, mask, deterministic)
        h = BertIntermediate(c, name="intermediate")(x)
        return BertOutput(c, name="output")(h, x, deterministic)


class BertEncoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, mask, deterministic):
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(x, mask, deterministic)
        return x


class BertModel(nn.Module):
    """BERT encoder returning the last hidden state ``[B, T, D]``.

    ``__call__(input_ids, attention_mask=None, token_type_ids=None,
    position_ids=None, deterministic=True)``; ``attention_mask`` is 1 for real
    tokens and 0 for padding (default all ones). Dropout needs
    ``deterministic=False`` and a ``"dropout"`` rng.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 deterministic: bool = True):
        c = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
        mask = attention_mask.astype(bool)[:, None, None, :]
        return BertEncoder(c, name="encoder")(x, mask, deterministic)


def mean_pooling(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Masked mean over tokens: ``sum(h * m) / max(sum(m), 1e-9)`` (sentence-transformers)."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along the last axis (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("model", "normalize"))
def _embed(model, params, ids, mask, normalize):
    hidden = model.apply({"params": params}, ids, mask)
    pooled = mean_pooling(hidden.astype(jnp.float32), mask)
    return l2_normalize(pooled) if normalize else pooled


def sentence_embeddings(model: BertModel, params, tokenizer, sentences: Sequence[str], *,
                        max_length: int = 256, batch_size: int = 32,
                        normalize: bool = True) -> np.ndarray:
    """Sentence embeddings as sentence-transformers' Transformer -> Pooling(mean) -> Normalize.

    Args:
      model, params: a :class:`BertModel` and its params.
      tokenizer: a :class:`lowrank_jax.io.tokenizer.WordPieceTokenizer`.
      sentences: the texts.
      max_length: truncation length including ``[CLS]``/``[SEP]``
        (all-MiniLM-L6-v2's ``max_seq_length`` is 256).
      batch_size: sentences per forward pass (each batch is padded to its longest).
      normalize: L2-normalise (all-MiniLM-L6-v2 does).

    Returns:
      ``[len(sentences), D]`` float32 numpy array.
    """
    if isinstance(sentences, str):
        raise TypeError("`sentences` must be a sequence of strings, not one string")
    out = []
    for start in range(0, len(sentences), batch_size):
        encoded = [tokenizer.encode(s, max_length=max_length) for s in sentences[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = np.full((len(encoded), width), tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(encoded), width), np.int32)
        for i, e in enumerate(encoded):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = 1
        out.append(np.asarray(_embed(model, params, jnp.asarray(ids), jnp.asarray(mask), normalize)))
    if not out:
        return np.zeros((0, model.config.hidden_size), np.float32)
    return np.concatenate(out)
