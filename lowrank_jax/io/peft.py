"""Hugging Face peft adapter files in and out: ``adapter_model.safetensors`` + ``adapter_config.json``.

peft stores, per adapted torch module ``<name>`` (torch orientation, ``nn.Linear``
weight ``[out, in]``):

- ``base_model.model.<name>.lora_A.weight``: ``[r, in]`` = ``a.T`` (ours is ``a: [in, r]``),
- ``base_model.model.<name>.lora_B.weight``: ``[out, r]`` = ``b.T`` (ours is ``b: [r, out]``),
- embeddings: ``...lora_embedding_A`` ``[r, vocab]`` = ``a.T`` and ``...lora_embedding_B`` ``[dim, r]`` = ``b.T``.

N-D kernels are flattened to ``[prod(in), prod(out)]`` row-major (how a torch
``Linear`` sees a ``[D, N, H]`` projection), and scan-stacked kernels are split
into one module per layer. Which torch module a Flax kernel is, is the
caller's ``module_name(path, layer)`` (``layer`` is the index along the stack
axis, or ``None``); :func:`llama_module_name` (from :mod:`lowrank_jax.io.hf_names`) covers
``lowrank_jax.models.llama``.

Reference matched: peft's ``save_pretrained`` / ``PeftModel.from_pretrained``
for ``LoraConfig`` (tested against a directory written by peft 0.21.2).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable

import numpy as np

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters import scale as scale_lib
from lowrank_jax.adapters.lora import lora
from lowrank_jax.io.hf_names import llama_module_name as llama_module_name  # re-exported

__all__ = ["save_peft", "load_peft", "llama_module_name"]

PREFIX = "base_model.model."


def _lora_factors(adapter: base.Adapter) -> tuple[str, str]:
    """The names of ``adapter``'s A and B from its leaf roles; raises unless those are its only leaves.

    peft's LoRA format stores ``lora_A``/``lora_B`` only: a leaf of any other role (DoRA's
    magnitude ``m: ("stack", "out")``, which peft stores as ``lora_magnitude_vector``
    under ``use_dora=True``, a format not written here) cannot be exported.
    """
    roles = scale_lib.roles_or_lora(adapter)
    lora_axes = tuple(leaf.axes for leaf in base.LORA_ROLES.values())
    others = {n: leaf.axes for n, leaf in roles.items() if leaf.axes not in lora_axes}
    if others:
        raise ValueError(
            f"cannot export adapter {adapter.config.get('method', '?')!r} in peft's LoRA format: its leaves {others} "
            f"are not LoRA factors {lora_axes} (peft's DoRA format, use_dora=True, is not supported)"
        )
    return scale_lib.lora_factor_names(adapter)


def _targets(adapter: base.Adapter, params, adapter_params):
    """``(keys, path, kernel, a, b, layout)`` per target, the factors and layout found from the leaves' roles."""
    a_name, b_name = _lora_factors(adapter)
    roles = scale_lib.roles_or_lora(adapter)
    for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, frozenset(roles)):
        layout = base.layout_of(path, tree_lib.shape_of(kernel), leaves, roles)
        yield keys, path, kernel, leaves[a_name], leaves[b_name], layout


def save_peft(directory: str | os.PathLike, adapter: base.Adapter, params, adapter_params, *,
              module_name: Callable[[str, int | None], str] = llama_module_name,
              base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM") -> pathlib.Path:
    """Writes ``adapter_params`` as a peft LoRA adapter directory that ``PeftModel.from_pretrained`` loads."""
    from safetensors.numpy import save_file

    cfg = adapter.config
    missing = [k for k in ("rank", "alpha", "alpha_pattern", "rslora", "dropout") if k not in cfg]
    if missing:
        raise ValueError(f"cannot export adapter {cfg.get('method', '?')!r} in peft's LoRA format: "
                         f"its config lacks {missing}")
    tensors, rank_pattern, alpha_pattern, modules = {}, {}, {}, set()
    scale_default = cfg["alpha"]
    for keys, path, kernel, a, b, layout in _targets(adapter, params, adapter_params):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        r = a.shape[-1]
        stack = tuple(tree_lib.shape_of(kernel)[: layout.stack])
        a2 = a.reshape(*stack, -1, r)
        b2 = b.reshape(*stack, r, -1)
        alpha = tree_lib.first_match(cfg["alpha_pattern"], path, scale_default)
        for index in np.ndindex(*stack) if stack else [None]:
            layer = None if index is None else (index[0] if len(index) == 1 else "_".join(map(str, index)))
            name = module_name(path, layer)
            aa, bb = (a2, b2) if index is None else (a2[index], b2[index])
            embedding = keys[-1] in tree_lib.EMBEDDING_NAMES
            key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            tensors[f"{PREFIX}{name}.{key_a}"] = np.ascontiguousarray(aa.T)
            tensors[f"{PREFIX}{name}.{key_b}"] = np.ascontiguousarray(bb.T)
            modules.add(name.rsplit(".", 1)[-1])
            if r != cfg["rank"]:
                rank_pattern[re.escape(name)] = r
            if alpha != cfg["alpha"]:
                alpha_pattern[re.escape(name)] = alpha
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "use_rslora": cfg["rslora"],
        "target_modules": sorted(modules), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def _peft_pattern_value(patterns: dict, name: str, default):
    """peft's ``get_pattern_key``: the first key whose regex matches the end of ``name`` at a dot boundary."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft(directory: str | os.PathLike, params, *, layouts=None,
              module_name: Callable[[str, int | None], str] = llama_module_name):
    """``(adapter, adapter_params)`` from a peft LoRA directory, for the Flax ``params`` it adapts.

    Raises ``ValueError`` for a non-LoRA or DoRA config, for modules that do not
    exist in ``params``, and for shapes that do not fit.
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory} is not a peft adapter directory (needs adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise ValueError(f"{config_path}: only plain LoRA adapters are supported, got peft_type={config.get('peft_type')!r}, "
                         f"use_dora={config.get('use_dora')}")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: fan_in_fan_out=True (Conv1D layers) is not supported")
    tensors = load_file(str(weights_path))
    # Every kernel of params with its torch module names, per stacked layer.
    by_name, kernels = {}, {}
    for keys, path, leaf in tree_lib.flatten_with_paths(params):
        if keys[-1] not in ("kernel", *tree_lib.EMBEDDING_NAMES) or len(tree_lib.shape_of(leaf)) < 2:
            continue
        layout = tree_lib.select_targets(params, re.escape(path), layouts)[0].layout
        kernels[keys] = tree_lib.shape_of(leaf)[: layout.stack]
        for index in np.ndindex(*kernels[keys]) if kernels[keys] else [None]:
            layer = None if index is None else (index[0] if len(index) == 1 else "_".join(map(str, index)))
            try:
                by_name[module_name(path, layer)] = (keys, path, leaf, layout, index)
            except ValueError:
                continue
    grouped: dict[tuple, dict] = {}
    rank_pattern, alpha_pattern, pairs = {}, {}, {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", key)
        if not m:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r}")
        pairs.setdefault(m.group(1), {})["a" if m.group(2).startswith(("lora_A", "lora_embedding_A")) else "b"] = value
    for name, ab in pairs.items():
        if name not in by_name:
            known = sorted(by_name)[:6]
            raise ValueError(f"{weights_path}: module {name!r} is not in these params (is this adapter from another model?); "
                             f"modules include {known}")
        keys, path, leaf, layout, index = by_name[name]
        _, ins, outs = layout.split(tree_lib.shape_of(leaf))
        r = ab["a"].shape[0]
        a = ab["a"].T.reshape(*ins, r)
        b = ab["b"].T.reshape(r, *outs)
        grouped.setdefault(keys, {})[index] = (a, b)
        r_expected = _peft_pattern_value(config.get("rank_pattern"), name, config["r"])
        if r != r_expected:
            raise ValueError(f"{weights_path}: {name} has rank {r}, its config says {r_expected}")
        rank_pattern[re.escape(path)] = r
        alpha_pattern[re.escape(path)] = float(_peft_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
    out = {}
    for keys, per_layer in grouped.items():
        if None in per_layer:
            a, b = per_layer[None]
        else:
            stack = kernels[keys]
            missing = [i for i in np.ndindex(*stack) if i not in per_layer]
            if missing:
                raise ValueError(f"{weights_path}: stacked {tree_lib.path_str(keys)} lacks layers {missing[:5]}")
            layers = [per_layer[i] for i in np.ndindex(*stack)]
            a = np.stack([ab[0] for ab in layers]).reshape(*stack, *layers[0][0].shape)
            b = np.stack([ab[1] for ab in layers]).reshape(*stack, *layers[0][1].shape)
        out[keys] = {"a": a, "b": b}
    paths = [re.escape(tree_lib.path_str(k)) for k in out]
    adapter = lora(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=paths,
                   rslora=bool(config.get("use_rslora")), dropout=float(config.get("lora_dropout") or 0.0),
                   rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layouts=layouts)
    adapter_params = tree_lib.nest({k: {n: np.asarray(v, np.float32) for n, v in ab.items()} for k, ab in out.items()})
    return adapter, adapter_params
