"""Adapter-only checkpoints with orbax: the adapter tree, the optimizer state, the config.

The base model is never written: a checkpoint holds what ``adapter.init``
returned (after training), the optax state, and the adapter's hyper-parameters
as JSON. Saves go through ``orbax.checkpoint.CheckpointManager``, which writes
each step to a temporary directory and renames it when complete, so a process
killed in the middle of a save leaves the previous step restorable.
Restore targets are abstract trees (``jax.eval_shape(adapter.init, key, params)``,
``jax.eval_shape(optimizer.init, abstract_adapter)``) whose leaves may carry
shardings: each host reads only its shards.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["manager", "save", "restore", "read_config", "abstract"]


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
            enable_async: bool = False) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` for adapter checkpoints in ``directory`` (created if missing)."""
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"`max_to_keep` must be >= 1 or None, got {max_to_keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
        enable_async_checkpointing=enable_async,
    )
    handlers = {
        "adapter": ocp.StandardCheckpointHandler(),
        "opt_state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, adapter_params, opt_state=None, *, config: dict | None = None,
         force: bool = False) -> bool:
    """Saves one step; returns whether it was saved (``save_interval_steps`` may skip it)."""
    items = {"adapter": ocp.args.StandardSave(adapter_params)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    if config is not None:
        items["config"] = ocp.args.JsonSave(config)
    saved = mngr.save(step, args=ocp.args.Composite(**items), force=force)
    mngr.wait_until_finished()
    return saved


def abstract(tree) -> Any:
    """``jax.ShapeDtypeStruct``s (with shardings) for a tree of arrays: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def restore(mngr: ocp.CheckpointManager, adapter_target, opt_state_target=None, *, step: int | None = None):
    """``(step, adapter_params, opt_state, config)`` of ``step`` (default: the latest).

    Targets are abstract trees; raises ``FileNotFoundError`` when there is no
    checkpoint and ``ValueError`` when the stored tree does not fit the target.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {mngr.directory}; steps: {mngr.all_steps()}")
    items = {"adapter": ocp.args.StandardRestore(adapter_target)}
    step_dir = os.path.join(os.fspath(mngr.directory), str(step))
    stored = {name for name in ("opt_state", "config") if os.path.isdir(os.path.join(step_dir, name))}
    if opt_state_target is not None:
        if "opt_state" not in stored:
            raise ValueError(f"checkpoint step {step} in {mngr.directory} has no optimizer state")
        items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
    if "config" in stored:
        items["config"] = ocp.args.JsonRestore()
    try:
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint step {step} in {mngr.directory} does not fit the restore target: {e}") from e
    return step, out["adapter"], out.get("opt_state") if opt_state_target is not None else None, out.get("config") if "config" in stored else None


def read_config(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The JSON config saved with ``step`` (default: the latest), or ``None`` if there is none."""
    step = mngr.latest_step() if step is None else step
    if step is None or not os.path.isdir(os.path.join(os.fspath(mngr.directory), str(step), "config")):
        return None
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
