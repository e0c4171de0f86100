"""Hugging Face peft adapter files in and out: ``adapter_model.safetensors`` + ``adapter_config.json``.

peft stores, per adapted torch module ``<name>`` (torch orientation, ``nn.Linear``
weight ``[out, in]``):

- LoRA: ``base_model.model.<name>.lora_A.weight``: ``[r, in]`` = ``a.T`` (ours is ``a: [in, r]``),
  ``base_model.model.<name>.lora_B.weight``: ``[out, r]`` = ``b.T`` (ours is ``b: [r, out]``),
  embeddings: ``...lora_embedding_A`` ``[r, vocab]`` = ``a.T`` and ``...lora_embedding_B`` ``[dim, r]`` = ``b.T``;
  with ``bias="all"``/``"lora_only"`` the trained biases (ours: :func:`lrj.full_finetune` leaves ``w``
  at ``.../bias``), a LoRA-targeted layer's as ``<name>.base_layer.bias``, any other as ``<name>.bias``
  (peft <= 0.20 dropped the ``lora_only`` ones on saving; peft 0.21 and this module keep them);
- IA3 (``peft_type: "IA3"``, :func:`lrj.ia3`): ``base_model.model.<name>.ia3_l``, ``[out, 1]`` for an
  ordinary target (ours ``l_out: [out]``) and ``[1, in]`` for a ``feedforward_modules`` one (ours ``l_in: [in]``);
- VeRA (``peft_type: "VERA"``, :func:`lrj.vera`): ``base_model.model.<name>.vera_lambda_d`` ``[r]`` and
  ``...vera_lambda_b`` ``[out]`` per module (ours ``lambda_d``/``lambda_b``), and the shared projections once,
  ``base_model.vera_A``: ``[r, max_in]`` = ``vera_a.T`` and ``base_model.vera_B``: ``[max_out, r]`` = ``vera_b.T``
  (ours at the tree's ``lrj.tree.SHARED``). peft sizes them by the largest targeted module, so they are written
  cut to that size; a directory saved with ``save_projection=False`` has none and cannot be loaded (peft
  draws them from torch's RNG).

N-D kernels are flattened to ``[prod(in), prod(out)]`` row-major (how a torch
``Linear`` sees a ``[D, N, H]`` projection), and scan-stacked kernels are split
into one module per layer. Which torch module a Flax kernel is, is the
caller's ``module_name(path, layer)`` (``layer`` is the index along the stack
axis, or ``None``); :func:`llama_module_name` (from :mod:`lowrank_jax.io.hf_names`) covers
``lowrank_jax.models.llama``. A bias is named after its layer's kernel (``.../bias`` -> the module
of ``.../kernel``); a stacked bias's stack is its kernel's, or all but its last axis.

Reference matched: peft's ``save_pretrained`` / ``PeftModel.from_pretrained``
for ``LoraConfig``, ``IA3Config`` and ``VeraConfig`` (tested against directories written by peft 0.21.2).
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
from lowrank_jax.adapters.ia3 import IA3_ROLES, ia3
from lowrank_jax.adapters.lora import lora
from lowrank_jax.adapters.vera import ROLES as VERA_ROLES, vera
from lowrank_jax.io.hf_names import llama_module_name as llama_module_name  # re-exported

__all__ = ["save_peft", "load_peft", "llama_module_name"]

PREFIX = "base_model.model."
BIAS_LEAF = "w"  # the leaf of a trained bias (lrj.full_finetune)
VERA_OWN = {n: leaf for n, leaf in VERA_ROLES.items() if not leaf.shared}  # per-target leaves (lambda_d, lambda_b)
VERA_SHARED = {"vera_a": "vera_A", "vera_b": "vera_B"}  # ours -> peft's (base_model.<name>, transposed)


def _bias_mode(adapter: base.Adapter) -> str:
    return adapter.config.get("bias", "none")


#: The axes of DoRA's magnitude (one per output unit and stacked layer), peft's ``lora_magnitude_vector``.
MAGNITUDE_AXES = ("stack", "out")


def _magnitude_name(adapter: base.Adapter) -> str | None:
    """The name of ``adapter``'s DoRA magnitude leaf (its role's axes are :data:`MAGNITUDE_AXES`), or None."""
    if adapter.config.get("method") != "dora":
        return None
    return next(n for n, leaf in scale_lib.roles_or_lora(adapter).items() if leaf.axes == MAGNITUDE_AXES)


def _lora_factors(adapter: base.Adapter) -> tuple[str, str]:
    """The names of ``adapter``'s A and B from its leaf roles; raises unless those are its only leaves
    (besides the trained biases of ``lrj.lora(bias=...)`` and DoRA's magnitude, peft's
    ``lora_magnitude_vector`` under ``use_dora=True``)."""
    roles = scale_lib.roles_or_lora(adapter)
    lora_axes = tuple(leaf.axes for leaf in base.LORA_ROLES.values())
    allowed = (*lora_axes, ("param",)) if _bias_mode(adapter) != "none" else lora_axes
    magnitude = _magnitude_name(adapter)
    others = {n: leaf.axes for n, leaf in roles.items() if leaf.axes not in allowed and n != magnitude}
    if others:
        raise ValueError(
            f"cannot export adapter {adapter.config.get('method', '?')!r} in peft's LoRA format: its leaves {others} "
            f"are not LoRA factors {lora_axes} or DoRA's magnitude {MAGNITUDE_AXES}"
        )
    return scale_lib.lora_factor_names(adapter)


def _layers(stack: tuple) -> list:
    """``(index, layer)`` per stacked layer (``[(None, None)]`` unstacked); ``layer`` is what ``module_name`` gets."""
    if not stack:
        return [(None, None)]
    return [(i, i[0] if len(i) == 1 else "_".join(map(str, i))) for i in np.ndindex(*stack)]


def _sibling(keys: tuple, leaf: str) -> tuple:
    return keys[:-1] + (leaf,)


def _layout(params, path: str, kernel, leaves: dict, roles: dict, layouts):
    """The kernel's layout: from ``layouts`` when given, else the one its leaves' shapes fit."""
    if layouts is not None:
        return tree_lib.select_targets(params, lambda p, leaf: p == path, layouts)[0].layout
    try:
        return base.layout_of(path, tree_lib.shape_of(kernel), leaves, roles)
    except ValueError as e:
        raise ValueError(f"{e}; pass layouts= (lrj.linen.kernel_layouts) to tell") from None


def _write(directory, tensors: dict, config: dict) -> pathlib.Path:
    from safetensors.numpy import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def _bias_tensors(trained: dict, lora_kernels: dict, module_name) -> dict:
    """peft's tensors of the trained biases (``{keys: {"w": value}}`` at ``.../bias``), per layer and flattened.

    ``lora_kernels``: ``{kernel keys: stack}`` of the LoRA targets (their biases are ``base_layer.bias``)."""
    tensors = {}
    for keys, leaves in trained.items():
        if keys[-1] != "bias":
            raise ValueError(f"cannot export the trained leaf {tree_lib.path_str(keys)!r} in peft's LoRA format: only "
                             f"biases (bias='all'/'lora_only') are written, not modules_to_save")
        value = np.asarray(leaves[BIAS_LEAF], np.float32)
        kernel = _sibling(keys, "kernel")
        stack = lora_kernels.get(kernel, value.shape[:-1])
        suffix = "base_layer.bias" if kernel in lora_kernels else "bias"
        for index, layer in _layers(tuple(stack)):
            name = module_name(tree_lib.path_str(kernel), layer)
            tensors[f"{PREFIX}{name}.{suffix}"] = np.ascontiguousarray((value if index is None else value[index]).reshape(-1))
    return tensors


def save_peft(directory: str | os.PathLike, adapter: base.Adapter, params, adapter_params, *,
              module_name: Callable[[str, int | None], str] = llama_module_name,
              base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM",
              layouts=None) -> pathlib.Path:
    """Writes ``adapter_params`` as a peft adapter directory that ``PeftModel.from_pretrained`` loads.

    LoRA (``lrj.lora``, with its trained biases under ``bias=``), DoRA (``lrj.dora``: ``use_dora=True``,
    the magnitude as ``lora_magnitude_vector``), IA3 (``lrj.ia3``) or VeRA (``lrj.vera``,
    written with its shared projections: ``save_projection=True``); ``layouts`` (optional, as given to
    the adapter) settles a stacked kernel's layout where its leaves fit several.
    """
    savers = {"ia3": _save_ia3, "vera": _save_vera}
    if adapter.config.get("method") in savers:
        return savers[adapter.config["method"]](directory, adapter, params, adapter_params, module_name,
                                                base_model_name_or_path, task_type, layouts)
    cfg = adapter.config
    missing = [k for k in ("rank", "alpha", "alpha_pattern", "rslora", "dropout") if k not in cfg]
    if missing:
        raise ValueError(f"cannot export adapter {cfg.get('method', '?')!r} in peft's LoRA format: "
                         f"its config lacks {missing}")
    a_name, b_name = _lora_factors(adapter)
    magnitude = _magnitude_name(adapter)
    roles = scale_lib.roles_or_lora(adapter)
    found = tree_lib.adapter_paths(adapter_params, frozenset(roles))
    factor_trees = {k: v for k, v in found if BIAS_LEAF not in v}
    tensors, rank_pattern, alpha_pattern, modules, lora_kernels = {}, {}, {}, set(), {}
    for keys, path, kernel, leaves in base.resolve_targets(tree_lib.nest(factor_trees), params, frozenset(roles)):
        layout = _layout(params, path, kernel, leaves, roles, layouts)
        a, b = np.asarray(leaves[a_name], np.float32), np.asarray(leaves[b_name], np.float32)
        r = a.shape[-1]
        stack = tuple(tree_lib.shape_of(kernel)[: layout.stack])
        lora_kernels[keys] = stack
        a2, b2 = a.reshape(*stack, -1, r), b.reshape(*stack, r, -1)
        alpha = tree_lib.first_match(cfg["alpha_pattern"], path, cfg["alpha"])
        for index, layer in _layers(stack):
            name = module_name(path, layer)
            aa, bb = (a2, b2) if index is None else (a2[index], b2[index])
            embedding = keys[-1] in tree_lib.EMBEDDING_NAMES
            key_a, key_b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            tensors[f"{PREFIX}{name}.{key_a}"] = np.ascontiguousarray(aa.T)
            tensors[f"{PREFIX}{name}.{key_b}"] = np.ascontiguousarray(bb.T)
            if magnitude is not None:  # [*stack, *out] -> one [out] vector per layer
                m = np.asarray(leaves[magnitude], np.float32).reshape(*stack, -1)
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.ascontiguousarray(m if index is None else m[index])
            modules.add(name.rsplit(".", 1)[-1])
            if r != cfg["rank"]:
                rank_pattern[re.escape(name)] = r
            if alpha != cfg["alpha"]:
                alpha_pattern[re.escape(name)] = alpha
    tensors.update(_bias_tensors({k: v for k, v in found if BIAS_LEAF in v}, lora_kernels, module_name))
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"], "use_rslora": cfg["rslora"],
        "target_modules": sorted(modules), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": _bias_mode(adapter), "fan_in_fan_out": False, "use_dora": magnitude is not None, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    return _write(directory, tensors, config)


def _target_layers(params, adapter_params, roles: dict, layouts, module_name):
    """``(torch module name, path, (ins, outs), {leaf: float32 vector})`` per target of ``adapter_params`` and
    stacked layer; each leaf is flattened past the stack axes."""
    for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, frozenset(roles)):
        layout = _layout(params, path, kernel, leaves, roles, layouts)
        stack, ins, outs = layout.split(tree_lib.shape_of(kernel))
        flat = {n: np.asarray(v, np.float32).reshape(*stack, -1) for n, v in leaves.items()}
        for index, layer in _layers(tuple(stack)):
            yield module_name(path, layer), path, (ins, outs), {n: v if index is None else v[index] for n, v in flat.items()}


def _save_ia3(directory, adapter, params, adapter_params, module_name, base_model_name_or_path, task_type, layouts):
    tensors, kinds = {}, {}
    for name, _, _, leaves in _target_layers(params, adapter_params, IA3_ROLES, layouts, module_name):
        (leaf, v), = leaves.items()
        tensors[f"{PREFIX}{name}.ia3_l"] = np.ascontiguousarray(v[None, :] if leaf == "l_in" else v[:, None])
        kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(leaf)
    mixed = sorted(k for k, v in kinds.items() if len(v) > 1)
    if mixed:
        raise ValueError(f"cannot export: peft names IA3 modules by suffix, and {mixed} are feedforward targets in some "
                         f"layers but not in others")
    config = {
        "peft_type": "IA3", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "target_modules": sorted(kinds), "feedforward_modules": sorted(k for k, v in kinds.items() if "l_in" in v),
        "fan_in_fan_out": False, "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None,
        "exclude_modules": None,
    }
    return _write(directory, tensors, config)


def _check_vera_fits(path: str, ins, outs, max_in: int, max_out: int, where) -> None:
    n_in, n_out = tree_lib.prod(ins), tree_lib.prod(outs)
    if n_in > max_in or n_out > max_out:
        raise ValueError(f"{where}: VeRA target {path!r} ({n_in} in, {n_out} out) is larger than the shared projections "
                         f"(max_in {max_in}, max_out {max_out}): they were made for other layers")


def _save_vera(directory, adapter, params, adapter_params, module_name, base_model_name_or_path, task_type, layouts):
    cfg = adapter.config
    shared = tree_lib.shared_of(adapter_params)
    if set(VERA_SHARED) - set(shared):
        raise ValueError(f"cannot export VeRA: the adapter tree lacks the shared projections {sorted(VERA_SHARED)} "
                         f"at {tree_lib.SHARED!r} (has {sorted(shared)})")
    a, b = (np.asarray(shared[n], np.float32) for n in VERA_SHARED)  # [max_in, r], [r, max_out]
    tensors, modules, sizes = {}, set(), []
    for name, path, (ins, outs), leaves in _target_layers(params, adapter_params, VERA_OWN, layouts, module_name):
        _check_vera_fits(path, ins, outs, a.shape[0], b.shape[1], "cannot export")
        sizes.append((tree_lib.prod(ins), tree_lib.prod(outs)))
        for leaf in VERA_OWN:
            tensors[f"{PREFIX}{name}.vera_{leaf}"] = np.ascontiguousarray(leaves[leaf])
        modules.add(name.rsplit(".", 1)[-1])
    if not sizes:
        raise ValueError("cannot export VeRA: the adapter tree has no targets")
    # peft allocates vera_A [r, max_in] / vera_B [max_out, r] from the largest targeted module and loads the saved
    # ones into exactly those shapes: write the top-left corner every target slices, nothing more
    max_in, max_out = max(i for i, _ in sizes), max(o for _, o in sizes)
    tensors["base_model.vera_A"] = np.ascontiguousarray(a[:max_in].T)
    tensors["base_model.vera_B"] = np.ascontiguousarray(b[:, :max_out].T)
    config = {
        "peft_type": "VERA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": int(a.shape[1]), "target_modules": sorted(modules), "projection_prng_key": int(cfg.get("projection_key", 0)),
        "save_projection": True, "vera_dropout": float(cfg.get("dropout", 0.0)), "d_initial": float(cfg.get("d_initial", 0.1)),
        "fan_in_fan_out": False, "bias": "none", "init_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    return _write(directory, tensors, config)


def _peft_pattern_value(patterns: dict, name: str, default):
    """peft's ``get_pattern_key``: the first key whose regex matches the end of ``name`` at a dot boundary."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read(directory) -> tuple[dict, pathlib.Path]:
    directory = pathlib.Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ValueError(f"{directory} is not a peft adapter directory (needs adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_path.read_text())
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: fan_in_fan_out=True (Conv1D layers) is not supported")
    return config, weights_path


def _modules(params, layouts, module_name) -> tuple[dict, dict]:
    """``({torch module name: (keys, path, leaf, layout, index)}, {bias module name: (keys, index)})`` for
    every kernel/embedding of ``params`` per stacked layer, and every bias (named after its kernel)."""
    by_name, biases, stacks = {}, {}, {}
    flat = tree_lib.flatten_with_paths(params)

    def name_of(path, layer):
        try:
            return module_name(path, layer)
        except ValueError:
            return None

    for keys, path, leaf in flat:
        if keys[-1] not in ("kernel", *tree_lib.EMBEDDING_NAMES) or len(tree_lib.shape_of(leaf)) < 2:
            continue
        layout = tree_lib.select_targets(params, re.escape(path), layouts)[0].layout
        stacks[keys] = tree_lib.shape_of(leaf)[: layout.stack]
        for index, layer in _layers(stacks[keys]):
            name = name_of(path, layer)
            if name is not None:
                by_name[name] = (keys, path, leaf, layout, index)
    for keys, path, leaf in flat:
        if keys[-1] != "bias":
            continue
        kernel = _sibling(keys, "kernel")
        for index, layer in _layers(tuple(stacks.get(kernel, tree_lib.shape_of(leaf)[:-1]))):
            name = name_of(tree_lib.path_str(kernel), layer)
            if name is not None:
                biases[name] = (keys, leaf, index)
    return by_name, biases


def _module(by_name: dict, name: str, weights_path):
    if name not in by_name:
        raise ValueError(f"{weights_path}: module {name!r} is not in these params (is this adapter from another model?); "
                         f"modules include {sorted(by_name)[:6]}")
    return by_name[name]


def _restack(grouped: dict, shape_of: Callable, weights_path) -> dict:
    """``{keys: {leaf: array}}`` from ``{keys: {index: {leaf: per-layer array}}}``: stacked layers stacked again."""
    out = {}
    for keys, per_layer in grouped.items():
        if None in per_layer:
            out[keys] = per_layer[None]
            continue
        stack = shape_of(keys)
        missing = [i for i in np.ndindex(*stack) if i not in per_layer]
        if missing:
            raise ValueError(f"{weights_path}: stacked {tree_lib.path_str(keys)} lacks layers {missing[:5]}")
        layers = [per_layer[i] for i in np.ndindex(*stack)]
        out[keys] = {n: np.stack([lv[n] for lv in layers]).reshape(*stack, *layers[0][n].shape) for n in layers[0]}
    return out


def load_peft(directory: str | os.PathLike, params, *, layouts=None,
              module_name: Callable[[str, int | None], str] = llama_module_name):
    """``(adapter, adapter_params)`` from a peft LoRA (trained biases included), IA3 or VeRA directory, for
    the Flax ``params`` it adapts.

    Raises ``ValueError`` for other peft types or DoRA, for modules that do not exist in
    ``params``, for shapes that do not fit, and for a VeRA directory without its projections.
    """
    from safetensors.numpy import load_file

    config, weights_path = _read(directory)
    if config.get("peft_type") not in ("LORA", "IA3", "VERA") or config.get("use_dora"):
        raise ValueError(f"{weights_path.parent / 'adapter_config.json'}: only plain LoRA adapters are supported (and IA3, VeRA), "
                         f"got peft_type={config.get('peft_type')!r}, use_dora={config.get('use_dora')}")
    tensors = load_file(str(weights_path))
    loaders = {"IA3": _load_ia3, "VERA": _load_vera}
    if config["peft_type"] in loaders:
        return loaders[config["peft_type"]](config, tensors, weights_path, params, layouts, module_name)
    bias = config.get("bias", "none") or "none"
    by_name, bias_modules = _modules(params, layouts, module_name)
    shapes = {keys: tree_lib.shape_of(leaf) for keys, _, leaf, _, _ in by_name.values()}
    shapes.update({keys: tree_lib.shape_of(leaf) for keys, leaf, _ in bias_modules.values()})
    stacks = {keys: shapes[keys][: layout.stack] for keys, _, _, layout, _ in by_name.values()}
    grouped: dict[tuple, dict] = {}
    rank_pattern, alpha_pattern, pairs = {}, {}, {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+?)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                         rf"base_layer\.bias|bias)", key)
        if not m or (m.group(2).endswith("bias") and bias == "none"):
            raise ValueError(f"{weights_path}: unexpected tensor {key!r}")
        if m.group(2).endswith("bias"):
            keys, leaf, index = _module(bias_modules, m.group(1), weights_path)
            per_layer_shape = tree_lib.shape_of(leaf)[len(index or ()):]
            grouped.setdefault(keys, {})[index] = {BIAS_LEAF: value.reshape(per_layer_shape)}
            stacks.setdefault(keys, tree_lib.shape_of(leaf)[: len(index or ())])
            continue
        pairs.setdefault(m.group(1), {})["a" if m.group(2).startswith(("lora_A", "lora_embedding_A")) else "b"] = value
    for name, ab in pairs.items():
        keys, path, leaf, layout, index = _module(by_name, name, weights_path)
        _, ins, outs = layout.split(tree_lib.shape_of(leaf))
        r = ab["a"].shape[0]
        grouped.setdefault(keys, {})[index] = {"a": ab["a"].T.reshape(*ins, r), "b": ab["b"].T.reshape(r, *outs)}
        r_expected = _peft_pattern_value(config.get("rank_pattern"), name, config["r"])
        if r != r_expected:
            raise ValueError(f"{weights_path}: {name} has rank {r}, its config says {r_expected}")
        rank_pattern[re.escape(path)] = r
        alpha_pattern[re.escape(path)] = float(_peft_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
    out = _restack(grouped, stacks.__getitem__, weights_path)
    paths = [re.escape(tree_lib.path_str(k)) for k, v in out.items() if BIAS_LEAF not in v]
    adapter = lora(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=paths,
                   rslora=bool(config.get("use_rslora")), dropout=float(config.get("lora_dropout") or 0.0),
                   rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, layouts=layouts, bias=bias)
    adapter_params = tree_lib.nest({k: {n: np.asarray(v, np.float32) for n, v in ab.items()} for k, ab in out.items()})
    return adapter, adapter_params


def _peft_feedforward(config: dict, name: str) -> bool:
    """peft's ``IA3Model._check_target_module_feedforward``: a regex fullmatch, or a suffix of a list entry."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return bool(re.fullmatch(ff, name))
    return any(name.endswith(t) for t in ff)


def _module_tensors(tensors: dict, suffix: str, weights_path, params, layouts, module_name):
    """``(key, value, match, keys, path, kernel, index, (stack, ins, outs))`` per tensor ``<PREFIX><name>.<suffix>``
    (``suffix`` a regex; ``match.group(1)`` is the module name), raising for any other tensor or unknown module."""
    by_name, _ = _modules(params, layouts, module_name)
    for key, value in tensors.items():
        m = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.{suffix}", key)
        if not m:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r}")
        keys, path, leaf, layout, index = _module(by_name, m.group(1), weights_path)
        yield key, value, m, keys, path, leaf, index, layout.split(tree_lib.shape_of(leaf))


def _load_ia3(config, tensors, weights_path, params, layouts, module_name):
    grouped, stacks, feedforward = {}, {}, set()
    for key, value, m, keys, path, leaf, index, (stack, ins, outs) in _module_tensors(
            tensors, "ia3_l", weights_path, params, layouts, module_name):
        ff = _peft_feedforward(config, m.group(1))
        want = (1, tree_lib.prod(ins)) if ff else (tree_lib.prod(outs), 1)
        if tuple(value.shape) != want:
            raise ValueError(f"{weights_path}: {key} has shape {tuple(value.shape)}; a {'feedforward' if ff else 'output'} "
                             f"target of kernel {tree_lib.shape_of(leaf)} needs {want} (only Linear layers are supported)")
        grouped.setdefault(keys, {})[index] = {"l_in": value.reshape(ins)} if ff else {"l_out": value.reshape(outs)}
        stacks[keys] = stack
        if ff:
            feedforward.add(re.escape(path))
    out = _restack(grouped, stacks.__getitem__, weights_path)
    adapter = ia3(targets=[re.escape(tree_lib.path_str(k)) for k in out], feedforward=sorted(feedforward) or None,
                  layouts=layouts)
    return adapter, tree_lib.nest({k: {n: np.asarray(v, np.float32) for n, v in lv.items()} for k, lv in out.items()})



def _load_vera(config, tensors, weights_path, params, layouts, module_name):
    tensors = dict(tensors)
    projections = {ours: tensors.pop(f"base_model.{theirs}", None) for ours, theirs in VERA_SHARED.items()}
    if any(v is None for v in projections.values()):
        raise ValueError(
            f"{weights_path}: no shared projections (base_model.vera_A / base_model.vera_B; the adapter was saved with "
            f"save_projection={config.get('save_projection')}): peft draws them from torch's RNG "
            f"(projection_prng_key={config.get('projection_prng_key')}), which JAX cannot regenerate; "
            f"save it again with save_projection=True")
    a, b = projections["vera_a"].T, projections["vera_b"].T  # ours: [max_in, r], [r, max_out]
    r = int(config["r"])
    if a.shape[1] != r or b.shape[0] != r:
        raise ValueError(f"{weights_path}: vera_A {tuple(a.T.shape)} / vera_B {tuple(b.T.shape)} do not have the "
                         f"config's rank r={r}")
    grouped, stacks = {}, {}
    for key, value, m, keys, path, leaf, index, (stack, ins, outs) in _module_tensors(
            tensors, "vera_(lambda_d|lambda_b)", weights_path, params, layouts, module_name):
        _check_vera_fits(path, ins, outs, a.shape[0], b.shape[1], weights_path)
        shape = (r,) if m.group(2) == "lambda_d" else tuple(outs)
        if value.size != tree_lib.prod(shape):
            raise ValueError(f"{weights_path}: {key} has shape {tuple(value.shape)}; kernel {tree_lib.shape_of(leaf)} "
                             f"needs {tree_lib.prod(shape)} values (only Linear layers are supported)")
        grouped.setdefault(keys, {}).setdefault(index, {})[m.group(2)] = value.reshape(shape)
        stacks[keys] = stack
    for keys, per_layer in grouped.items():
        for index, leaves in per_layer.items():
            if set(leaves) != set(VERA_OWN):
                raise ValueError(f"{weights_path}: {tree_lib.path_str(keys)} (layer {index}) has only {sorted(leaves)}")
    out = _restack(grouped, stacks.__getitem__, weights_path)
    adapter = vera(rank=r, targets=[re.escape(tree_lib.path_str(k)) for k in out],
                   d_initial=float(config.get("d_initial", 0.1)), projection_key=int(config.get("projection_prng_key") or 0),
                   dropout=float(config.get("vera_dropout") or 0.0), layouts=layouts)
    tree = tree_lib.nest({k: {n: np.asarray(v, np.float32) for n, v in lv.items()} for k, lv in out.items()})
    tree[tree_lib.SHARED] = {"vera_a": np.asarray(a, np.float32), "vera_b": np.asarray(b, np.float32)}
    return adapter, tree
