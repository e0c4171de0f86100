"""A finetune run out to the Hugging Face formats: a peft adapter directory, or a merged transformers model.

- :func:`export_peft` (``lowrank-jax export RUN_DIR --format peft --output DIR``) writes the run's
  adapter as peft's ``save_pretrained`` does (:mod:`lowrank_jax.io.peft`,
  :mod:`lowrank_jax.io.peft_adalora`), for the methods peft has (:data:`PEFT_FORMATS`). The
  adapter applies to the run's *original* base model, whatever the method did to the base:

  - the offset inits (PiSSA, OLoRA, LoRA-GA) train ``A, B`` on the residual base
    ``W_res = W - s A_0 B_0``; the update to ``W`` is ``s (A B - A_0 B_0)``, which is LoRA of rank
    ``2r`` with ``A' = [A, A_0]``, ``B' = [B; -B_0]`` and alpha ``2 alpha`` (so ``s`` is unchanged):
    peft's own conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``);
  - QLoRA and QDoRA train on the NF4-quantised base; their adapter is LoRA's / DoRA's, for peft to
    apply on a base quantised the same way (bitsandbytes' NF4 with double quantisation), as peft's
    QLoRA workflow does.

- :func:`merge_hf` (``lowrank-jax merge --format hf --output DIR``) writes base + adapter merged as a
  transformers directory (:func:`lowrank_jax.io.hf_checkpoint.save_pretrained`: ``config.json``,
  ``model.safetensors``, the tokenizer files).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from lowrank_jax.run_config import DEFAULT_MODEL, MIXTURES, OFFSET_INITS, UserError

__all__ = ["PEFT_FORMATS", "check_peft_method", "export_peft", "merge_hf", "write_peft"]

#: The run methods peft has -> the peft format their adapter is written in.
PEFT_FORMATS = {
    "lora": "LoRA", "rslora": "LoRA (use_rslora)", "lora_plus": "LoRA", "lora_fa": "LoRA", "lora_pro": "LoRA",
    "pissa": "LoRA of rank 2r", "olora": "LoRA of rank 2r", "lora_ga": "LoRA of rank 2r", "qlora": "LoRA",
    "dora": "LoRA (use_dora)", "qdora": "LoRA (use_dora)", "vera": "VeRA", "ia3": "IA3", "adalora": "AdaLoRA",
}
#: Why a method has no peft format (``--format peft`` refuses it, saying so).
NO_PEFT_FORMAT = {
    "bitfit": "peft has no BitFit",
    "longlora": "peft has no LongLoRA (its trained embeddings and norms are not LoRA)",
    "galore": "GaLore trains the full weights: there is no adapter",
    "lisa": "LISA trains the full weights of sampled layers: there is no adapter",
}


def _base_source(model: str) -> str:
    from lowrank_jax.io import gguf

    return os.fspath(gguf.smollm2_gguf_path()) if model == DEFAULT_MODEL else os.path.abspath(model)


def _check_output_dir(output: pathlib.Path, flag: str = "--output") -> None:
    from lowrank_jax.run_config import check_writable

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{flag} {str(output)!r} exists and is not an empty directory")
    check_writable(output.parent if not output.exists() else output, f"{flag} {str(output)!r}")


def check_peft_method(method: str) -> None:
    """Refuses a method without a peft format, saying why and what to use instead."""
    if method in PEFT_FORMATS:
        return
    why = NO_PEFT_FORMAT.get(method) or (
        f"peft has no {method}" + (" (a mixture routes each token to its experts)" if method in MIXTURES else ""))
    alternative = "" if method in MIXTURES else "; `lowrank-jax merge --format hf` writes the merged model"
    raise UserError(f"cannot export a {method} run in peft's format: {why}{alternative}. "
                    f"peft formats exist for: {', '.join(PEFT_FORMATS)}")


def _offset_as_rank_2r(adapter, trainable, offset):
    """LoRA ``(A, B)`` trained on ``W - s A_0 B_0`` -> the rank-``2r`` LoRA ``([A, A_0], [B; -B_0])`` of
    alpha ``2 alpha`` on ``W`` itself, and the adapter that describes it."""
    from lowrank_jax import tree as tree_lib
    from lowrank_jax.adapters import scale as scale_lib
    from lowrank_jax.adapters.lora import lora

    cfg = adapter.config
    if cfg.get("rslora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError("an offset init with rsLoRA or rank/alpha patterns has no rank-2r peft form here")
    a_name, b_name = scale_lib.lora_factor_names(adapter)
    initial = dict(tree_lib.adapter_paths(offset, frozenset((a_name, b_name))))
    doubled = {}
    for keys, leaves in tree_lib.adapter_paths(trainable, frozenset((a_name, b_name))):
        a0, b0 = initial[keys][a_name], initial[keys][b_name]
        doubled[keys] = {a_name: np.concatenate([np.asarray(leaves[a_name]), np.asarray(a0)], axis=-1),
                         b_name: np.concatenate([np.asarray(leaves[b_name]), -np.asarray(b0)], axis=-2)}
    wide = lora(rank=2 * cfg["rank"], alpha=2 * cfg["alpha"], targets=cfg["targets"], dropout=cfg["dropout"],
                layouts=adapter.layouts)
    return wide, tree_lib.nest(doubled)


def write_peft(output: str | os.PathLike, method: str, recipe, trainable, base_params, *, base_model: str | None = None,
               allocator_state=None) -> pathlib.Path:
    """Writes ``trainable``, the adapter tree of a ``method`` run's ``recipe`` (:data:`lowrank_jax.finetune.RECIPES`),
    as a peft adapter directory for the original ``base_params`` (see the module docstring for the offset
    inits). ``allocator_state``: AdaLoRA's (its masks prune the saved ranks, as peft's do).

    Raises:
      UserError: a method without a peft format, or an adapter tree the format cannot express.
    """
    from lowrank_jax.io import peft as peft_io
    from lowrank_jax.io import peft_adalora

    check_peft_method(method)
    variables, adapter = {"params": base_params}, recipe.adapter  # adapters target params/...
    try:
        if method == "adalora":
            return peft_adalora.save_peft_adalora(output, adapter, variables, trainable, allocator_state,
                                                  base_model_name_or_path=base_model, task_type="CAUSAL_LM")
        if method in OFFSET_INITS:
            adapter, trainable = _offset_as_rank_2r(adapter, trainable, recipe.offset)
        return peft_io.save_peft(output, adapter, variables, trainable, base_model_name_or_path=base_model,
                                 layouts=adapter.layouts)
    except ValueError as e:
        raise UserError(f"cannot write the {method} adapter in peft's format: {e}") from None


def export_peft(run_dir: str | os.PathLike, output: str | os.PathLike, *, progress=print) -> pathlib.Path:
    """Writes the adapter of the finetune run in ``run_dir`` as a peft adapter directory ``output``
    (:func:`write_peft`, for the run's base model).

    Raises:
      UserError: a method peft has no format for (named, with those it has), an ``output`` that is
        a file or a non-empty directory, or a run directory that does not load.
    """
    from lowrank_jax import checkpoint, run_config as rc

    output = pathlib.Path(output)
    stored = rc.stored_run(pathlib.Path(run_dir))
    if stored is None:
        raise UserError(f"{run_dir} is not a finetune output directory (no checkpoint inside)")
    method = stored[1].get("finetune", {}).get("method", "?")
    check_peft_method(method)
    _check_output_dir(output)
    from lowrank_jax.finetune import _init_state, restore_adapter

    recipe, trainable, run_config, loaded = restore_adapter(run_dir)
    base = _base_source(run_config["finetune"].get("model", DEFAULT_MODEL))
    state = None
    if method == "adalora":  # the allocator's masks are checkpointed with the optimizer state
        mngr = checkpoint.manager(pathlib.Path(run_dir) / "checkpoints")
        _, _, (_, state), _ = checkpoint.restore(mngr, checkpoint.abstract(trainable),
                                                 checkpoint.abstract(_init_state(recipe, trainable)))
    written = write_peft(output, method, recipe, trainable, loaded[2], base_model=base, allocator_state=state)
    note = {"qlora": "; apply it on the NF4 (double-quantised) base, as it was trained",
            "qdora": "; apply it on the NF4 (double-quantised) base, as it was trained"}.get(method, "")
    progress(f"wrote {written}: the {method} adapter as peft {PEFT_FORMATS[method]}, for the base {base}{note}")
    return written


def merge_hf(run_dir: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "float32",
             progress=print) -> pathlib.Path:
    """Writes base + the run's adapter, merged, as a transformers checkpoint directory ``output``.

    Raises:
      UserError: a mixture (routed per token: no merged weights), an ``output`` that is a file or a
        non-empty directory, or a run directory that does not load.
    """
    from lowrank_jax import run_config as rc
    from lowrank_jax.io import hf_checkpoint

    output = pathlib.Path(output)
    stored = rc.stored_run(pathlib.Path(run_dir))
    if stored is None:
        raise UserError(f"{run_dir} is not a finetune output directory (no checkpoint inside)")
    method = stored[1].get("finetune", {}).get("method", "?")
    if method in MIXTURES:
        raise UserError(f"{run_dir} holds a {method} run: a mixture routes each token to its experts, so it has no "
                        f"merged weights; use `lowrank-jax generate --adapter {run_dir}`")
    _check_output_dir(output)
    from lowrank_jax.finetune import restore_adapter

    recipe, trainable, run_config, loaded = restore_adapter(run_dir)
    config = loaded[1]
    source = _base_source(run_config["finetune"].get("model", DEFAULT_MODEL))
    try:
        written = hf_checkpoint.save_pretrained(output, config, recipe.eval_params(trainable), tokenizer_source=source,
                                                dtype=dtype)
    except ValueError as e:
        raise UserError(f"--output {str(output)!r}: {e}") from None
    progress(f"wrote {written}: config.json, model.safetensors and the tokenizer of {source} ({dtype})")
    return written
