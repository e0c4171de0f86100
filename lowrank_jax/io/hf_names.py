"""The names transformers' ``LlamaForCausalLM`` gives the params of :mod:`lowrank_jax.models.llama`.

The one place the naming rules live (string work only, no model import); used
by :mod:`lowrank_jax.io.peft` (adapter module names) and ``lowrank-jax merge``
(full state dicts). Flax param paths, with or without a leading ``params/``:

==========================================  ============================================
Flax path                                   transformers name
==========================================  ============================================
``embed_tokens/embedding``                  ``model.embed_tokens.weight``
``layers_3/self_attn/q_proj/kernel``        ``model.layers.3.self_attn.q_proj.weight``
``layers/self_attn/q_proj/kernel``, layer 3 ``model.layers.3.self_attn.q_proj.weight``
``layers_3/input_layernorm/scale``          ``model.layers.3.input_layernorm.weight``
``norm/scale``                              ``model.norm.weight``
``lm_head/kernel``                          ``lm_head.weight``
``layers_3/self_attn/q_proj/bias``          ``model.layers.3.self_attn.q_proj.bias``
==========================================  ============================================

The same table serves LLaMA, Mistral and Qwen2 (transformers names their
modules alike); :func:`llama_param_path` is the inverse, for loading.

``layers/...`` is the scan-stacked form (``scan_layers=True``): the layer is the
index along the stack axis and must be given. Dense kernels are stored
``[in, out]``, torch ``nn.Linear`` weights ``[out, in]`` (:func:`is_transposed`).

Example:
  >>> from lowrank_jax.io.hf_names import llama_module_name, llama_tensor_name
  >>> llama_module_name("params/layers/self_attn/q_proj/kernel", 3)
  'model.layers.3.self_attn.q_proj'
  >>> llama_tensor_name("norm/scale"), llama_tensor_name("lm_head/kernel")
  ('model.norm.weight', 'lm_head.weight')
  >>> llama_param_path("model.layers.3.self_attn.q_proj.bias")
  'layers_3/self_attn/q_proj/bias'
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "bias_projections", "is_transposed", "llama_module_name", "llama_param_path",
           "llama_tensor_name", "model_type"]

#: transformers ``model_type``s of the LLaMA family this library's model reproduces -> their ``architectures`` class.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def model_type(config) -> str:
    """The LLaMA-family ``model_type`` of a transformers ``config.json`` dict (or of its ``architectures``).

    Raises:
      ValueError: any other architecture, named, with the supported ones.
    """
    kind = config.get("model_type")
    if kind is None:
        by_class = {v: k for k, v in ARCHITECTURES.items()}
        archs = config.get("architectures") or []
        kind = next((by_class[a] for a in archs if a in by_class), archs[0] if archs else None)
    if kind not in ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in ARCHITECTURES.items())
        raise ValueError(f"unsupported architecture {kind!r} (model_type / architectures "
                         f"{config.get('architectures')}); supported: {supported}")
    return kind


def bias_projections(config) -> tuple[str, ...]:
    """The projections with a bias in a transformers ``config.json`` dict: Qwen2's q/k/v; LLaMA's
    ``attention_bias`` (q/k/v/o) and ``mlp_bias`` (gate/up/down); none in Mistral."""
    kind = model_type(config)
    if kind == "qwen2":
        return ("q_proj", "k_proj", "v_proj")
    if kind == "llama":
        return ((("q_proj", "k_proj", "v_proj", "o_proj") if config.get("attention_bias") else ())
                + (("gate_proj", "up_proj", "down_proj") if config.get("mlp_bias") else ()))
    return ()

_MODULE_LEAVES = ("kernel", "embedding")  # leaves of torch modules an adapter can target
_WEIGHT_LEAVES = (*_MODULE_LEAVES, "scale")  # each is the torch module's ``.weight``
_TENSOR_LEAVES = (*_WEIGHT_LEAVES, "bias")  # every LLaMA param (a Dense bias is ``.bias``)
_GROUPS = ("embed_tokens", "layers", "norm", "lm_head")  # top-level groups, besides ``layers_{i}``


def _split(path: str) -> tuple[list[str], str]:
    parts = path.split("/")
    if parts[0] == "params":
        parts = parts[1:]
    leaf = parts.pop()
    return parts, leaf


def _module(path: str, parts: list[str], layer: int | str | None) -> str:
    parts = list(parts)
    if parts[0] == "layers":
        if layer is None:
            raise ValueError(f"{path!r} is stacked: a layer index is needed")
        parts[0] = f"layers.{layer}"
    elif parts[0].startswith("layers_"):
        parts[0] = "layers." + parts[0].removeprefix("layers_")
    if parts == ["lm_head"]:
        return "lm_head"
    return "model." + ".".join(parts)


def llama_module_name(path: str, layer: int | str | None = None) -> str:
    """``params/layers_3/self_attn/q_proj/kernel`` (or stacked ``params/layers/...`` with ``layer=3``)
    -> ``model.layers.3.self_attn.q_proj``, as transformers' ``LlamaForCausalLM`` names it.

    Raises:
      ValueError: the leaf is not a ``kernel`` or ``embedding``, or a stacked path has no ``layer``.
    """
    parts, leaf = _split(path)
    if leaf not in _MODULE_LEAVES:
        raise ValueError(f"{path!r} is not a kernel or embedding")
    return _module(path, parts, layer)


def llama_tensor_name(path: str, layer: int | str | None = None) -> str:
    """The state-dict key of a LLaMA param: ``layers_3/mlp/down_proj/kernel`` -> ``model.layers.3.mlp.down_proj.weight``.

    Covers kernels, the embedding and RMSNorm scales (all ``.weight`` in torch).

    Raises:
      ValueError: an unknown leaf or top-level group, or a stacked path has no ``layer``.
    """
    parts, leaf = _split(path)
    if leaf not in _TENSOR_LEAVES:
        raise ValueError(f"{path!r} is not a kernel, bias, embedding or norm scale")
    group = parts[0] if parts else ""
    if group not in _GROUPS and not (group.startswith("layers_") and group.removeprefix("layers_").isdigit()):
        raise ValueError(f"unexpected parameter group {group!r}")
    return _module(path, parts, layer) + (".bias" if leaf == "bias" else ".weight")


_BLOCK_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def llama_param_path(name: str) -> str:
    """Inverse of :func:`llama_tensor_name`: ``model.layers.3.mlp.down_proj.weight`` -> ``layers_3/mlp/down_proj/kernel``.

    A ``.weight`` becomes ``embedding`` (``embed_tokens``), ``scale`` (a norm) or ``kernel``;
    a ``.bias`` stays ``bias`` (projections only).

    Raises:
      ValueError: a name that is no parameter of a LLaMA/Mistral/Qwen2 ``*ForCausalLM`` (named).
    """
    module, _, kind = name.rpartition(".")
    path = None
    if module in ("model.embed_tokens", "model.norm", "lm_head") and kind == "weight":
        path = {"model.embed_tokens": "embed_tokens/embedding", "model.norm": "norm/scale",
                "lm_head": "lm_head/kernel"}[module]
    elif module.startswith("model.layers.") and kind in ("weight", "bias"):
        index, _, rest = module.removeprefix("model.layers.").partition(".")
        norm = rest.endswith("layernorm")
        if index.isdigit() and rest in _BLOCK_MODULES and not (norm and kind == "bias"):
            leaf = "bias" if kind == "bias" else "scale" if norm else "kernel"
            path = f"layers_{int(index)}/{rest.replace('.', '/')}/{leaf}"
    if path is None:
        raise ValueError(f"tensor {name!r} is not a parameter of a LLaMA-family causal LM")
    return path


def is_transposed(path: str) -> bool:
    """Whether the torch tensor is the transpose of the Flax leaf (Dense ``kernel`` ``[in, out]`` vs ``[out, in]``)."""
    return path.rsplit("/", 1)[-1] == "kernel"
