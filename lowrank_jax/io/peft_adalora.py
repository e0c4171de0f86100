"""Hugging Face peft AdaLoRA adapter directories in and out (``adapter_model.safetensors`` + ``adapter_config.json``).

peft stores, per adapted torch module ``<name>`` (torch orientation, no ``.weight`` suffix:
they are bare ``nn.Parameter``\\ s):

- ``base_model.model.<name>.lora_A``: ``[r, in]`` = ``a.T`` (ours: ``a: [in, r]``),
- ``base_model.model.<name>.lora_E``: ``[r, 1]`` = ``e[:, None]`` (ours: ``e: [r]``),
- ``base_model.model.<name>.lora_B``: ``[out, r]`` = ``b.T`` (ours: ``b: [r, out]``),

pruned by the config's ``rank_pattern`` (``{"<name>.lora_E": [bool] * init_r}``, the latest mask,
``null`` before the first) when one exists; ``ranknum`` is not saved. Loading, peft resizes each
module to ``sum(rank_pattern[...])`` ranks and keeps ``ranknum = init_r``, so the scale stays
``lora_alpha / (init_r + 1e-5)``: :func:`load_peft_adalora` does the same. N-D kernels are
flattened to ``[prod(in), prod(out)]`` and stacked (scan) kernels split into one module per layer,
named by ``module_name(path, layer)`` (as :mod:`lowrank_jax.io.peft`).

Reference matched: peft 0.21.2's ``save_pretrained`` / ``PeftModel.from_pretrained`` for
``AdaLoraConfig`` (tested against a directory written by peft after a 20-step run).
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
from lowrank_jax.adapters.adalora import ADALORA_ROLES, LEAVES, AdaLoraState, adalora
from lowrank_jax.io.hf_names import llama_module_name
from lowrank_jax.io.peft import PREFIX

__all__ = ["save_peft_adalora", "load_peft_adalora"]

_FACTORS = {"a": "lora_A", "e": "lora_E", "b": "lora_B"}


def _layer_names(stack: tuple) -> list:
    """The ``layer`` argument of ``module_name`` for each stacked index (``None`` when unstacked)."""
    if not stack:
        return [(None, None)]
    return [(i, i[0] if len(i) == 1 else "_".join(map(str, i))) for i in np.ndindex(*stack)]


def save_peft_adalora(directory: str | os.PathLike, adapter: base.Adapter, params, adapter_params,
                      state: AdaLoraState | None = None, *,
                      module_name: Callable[[str, int | None], str] = llama_module_name,
                      base_model_name_or_path: str | None = None, task_type: str | None = None) -> pathlib.Path:
    """Writes ``adapter_params`` as peft's ``save_pretrained`` does for AdaLoRA.

    ``state``: the :func:`lrj.adalora_allocator` state; once it has masked (``state.masked``) its
    pattern becomes the config's ``rank_pattern`` and prunes the saved tensors, as peft's does.
    Without one (or before the first mask) the tensors are saved whole, with ``rank_pattern`` null,
    unless some target has fewer than ``init_r`` ranks (an adapter read by
    :func:`load_peft_adalora`): then its pattern keeps its first ranks, so peft resizes it.
    """
    from safetensors.numpy import save_file

    cfg = adapter.config
    if cfg.get("method") != "adalora":
        raise ValueError(f"save_peft_adalora needs an lrj.adalora adapter, got method {cfg.get('method')!r}")
    init_r = cfg["init_r"]
    patterns = {}
    if state is not None and bool(state.masked):
        patterns = {keys: np.asarray(p["e"], bool) for keys, p in tree_lib.adapter_paths(state.pattern, frozenset("e"))}
    tensors, rank_pattern, modules = {}, {}, set()
    for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, LEAVES):
        shape = tree_lib.shape_of(kernel)
        layout = base.layout_of(path, shape, leaves, ADALORA_ROLES)
        stack = shape[: layout.stack]
        r = np.shape(leaves["e"])[-1]
        a = np.asarray(leaves["a"], np.float32).reshape(*stack, -1, r)
        e = np.asarray(leaves["e"], np.float32).reshape(*stack, r)
        b = np.asarray(leaves["b"], np.float32).reshape(*stack, r, -1)
        keep = patterns.get(keys)
        if patterns and keep is None:
            raise ValueError(f"`state` has no rank pattern for {path!r}: is it the state of another adapter tree?")
        for index, layer in _layer_names(stack):
            at = (lambda x: x) if index is None else (lambda x, i=index: x[i])
            name = module_name(path, layer)
            modules.add(name.rsplit(".", 1)[-1])
            if keep is not None:
                kept = at(keep)
                rank_pattern[f"{name}.lora_E"] = [bool(k) for k in kept]
            else:
                kept = np.ones(r, bool)
                if r < init_r:  # already pruned: peft resizes the module to its first r ranks
                    rank_pattern[f"{name}.lora_E"] = [True] * r + [False] * (init_r - r)
            for leaf, value in (("lora_A", at(a)[:, kept].T), ("lora_E", at(e)[kept][:, None]), ("lora_B", at(b)[kept].T)):
                tensors[f"{PREFIX}{name}.{leaf}"] = np.ascontiguousarray(value)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "ADALORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "init_r": init_r, "target_r": cfg["target_r"], "r": 8, "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
        "total_step": cfg["total_step"], "tinit": cfg["tinit"], "tfinal": cfg["tfinal"], "deltaT": cfg["delta_t"],
        "beta1": cfg["beta1"], "beta2": cfg["beta2"], "orth_reg_weight": cfg["orth_reg_weight"],
        "rank_pattern": rank_pattern or None, "target_modules": sorted(modules), "alpha_pattern": {},
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def _modules(params, layouts, module_name) -> dict:
    """``{torch module name: (keys, path, kernel, layout, stacked index)}`` of every kernel of ``params``."""
    out = {}
    for keys, path, leaf in tree_lib.flatten_with_paths(params):
        if keys[-1] != "kernel" or len(tree_lib.shape_of(leaf)) < 2:
            continue
        layout = tree_lib.select_targets(params, re.escape(path), layouts)[0].layout
        for index, layer in _layer_names(tree_lib.shape_of(leaf)[: layout.stack]):
            try:
                out[module_name(path, layer)] = (keys, path, leaf, layout, index)
            except ValueError:
                continue
    return out


def load_peft_adalora(directory: str | os.PathLike, params, *, layouts=None,
                      module_name: Callable[[str, int | None], str] = llama_module_name):
    """``(adapter, adapter_params)`` from a peft AdaLoRA directory, for the Flax ``params`` it adapts.

    Each module has the ranks its file holds (``sum(rank_pattern)`` when pruned) and the scale of
    ``init_r`` (peft's ``ranknum``). Stacked layers of different ranks are padded to the largest
    with zero ``a``/``e``/``b`` (the same function; the orthogonal penalty of padded ranks differs).
    Raises ``ValueError`` for a non-AdaLoRA config, modules not in ``params`` and ranks that
    disagree with ``rank_pattern``.
    """
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory} is not a peft adapter directory (needs adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "ADALORA":
        raise ValueError(f"{config_path}: not an AdaLoRA adapter (peft_type={config.get('peft_type')!r})")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: fan_in_fan_out=True (Conv1D layers) is not supported")
    by_name = _modules(params, layouts, module_name)
    found: dict[str, dict] = {}
    for key, value in load_file(str(weights_path)).items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_E|lora_B)", key)
        if not m:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r}")
        found.setdefault(m.group(1), {})[m.group(2)] = value
    init_r, rank_pattern = int(config["init_r"]), config.get("rank_pattern") or {}
    grouped: dict[tuple, dict] = {}
    for name, factors in found.items():
        if name not in by_name:
            raise ValueError(f"{weights_path}: module {name!r} is not in these params (is this adapter from another "
                             f"model?); modules include {sorted(by_name)[:6]}")
        missing = sorted(set(_FACTORS.values()) - set(factors))
        if missing:
            raise ValueError(f"{weights_path}: module {name!r} lacks {missing}")
        keys, path, leaf, layout, index = by_name[name]
        _, ins, outs = layout.split(tree_lib.shape_of(leaf))
        r = factors["lora_E"].shape[0]
        pattern = rank_pattern.get(f"{name}.lora_E")
        expected = init_r if pattern is None else int(sum(pattern))
        if r != expected:
            raise ValueError(f"{weights_path}: {name} has rank {r}, its config says {expected} (init_r={init_r}, "
                             f"rank_pattern {pattern})")
        grouped.setdefault(keys, {})[index] = {"a": factors["lora_A"].T.reshape(*ins, r), "e": factors["lora_E"][:, 0],
                                              "b": factors["lora_B"].T.reshape(r, *outs)}
    out = {}
    for keys, per_layer in grouped.items():
        if None in per_layer:
            out[keys] = per_layer[None]
            continue
        _, _, leaf, layout, _ = next(v for v in by_name.values() if v[0] == keys)
        stack = tree_lib.shape_of(leaf)[: layout.stack]
        missing = [i for i in np.ndindex(*stack) if i not in per_layer]
        if missing:
            raise ValueError(f"{weights_path}: stacked {tree_lib.path_str(keys)} lacks layers {missing[:5]}")
        r = max(v["e"].shape[0] for v in per_layer.values())
        pad = {"a": lambda x: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, r - x.shape[-1])]),
               "e": lambda x: np.pad(x, [(0, r - x.shape[0])]),
               "b": lambda x: np.pad(x, [(0, r - x.shape[0])] + [(0, 0)] * (x.ndim - 1))}
        layers = [per_layer[i] for i in np.ndindex(*stack)]
        out[keys] = {n: np.stack([pad[n](layer[n]) for layer in layers]).reshape(*stack, *pad[n](layers[0][n]).shape)
                     for n in "aeb"}
    adapter = adalora(init_r=init_r, target_r=int(config["target_r"]), total_step=config.get("total_step"),
                      tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)),
                      delta_t=int(config.get("deltaT", 1)), beta1=float(config.get("beta1", 0.85)),
                      beta2=float(config.get("beta2", 0.85)), alpha=float(config["lora_alpha"]),
                      orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
                      targets=[re.escape(tree_lib.path_str(k)) for k in out],
                      dropout=float(config.get("lora_dropout") or 0.0), layouts=layouts)
    adapter_params = tree_lib.nest({k: {n: np.asarray(v, np.float32) for n, v in f.items()} for k, f in out.items()})
    return adapter, adapter_params
