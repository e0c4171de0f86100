"""BitFit: train the biases only.

Reference:
  Ben Zaken, Ravfogel and Goldberg, `BitFit: Simple Parameter-efficient Fine-tuning for
  Transformer-based Masked Language-models <https://arxiv.org/abs/2106.10199>`_, 2022.
The trained set is exactly the targeted bias leaves (as peft's LoRA ``bias="all"`` trains
every parameter named ``bias``); the task head, which the paper also trains, is a separate
:func:`lrj.full_finetune` to :func:`lrj.combine` with it.
"""

from __future__ import annotations

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base
from lowrank_jax.adapters.combinators import full_finetune

__all__ = ["bitfit"]


def bitfit(targets: tree_lib.Targets = r".*/bias", *, layouts=None, dropout: float = 0.0) -> base.Adapter:
    r"""Trains the targeted biases themselves: ``b \leftarrow b - \eta \nabla_b L``, every other weight frozen.

    :func:`lrj.full_finetune` restricted to leaves named ``bias``: the adapter tree holds a
    copy ``w`` of each (role ``Leaf(("param",))``), which the bridges substitute for the bias;
    ``merge`` writes the trained biases in, ``unmerge`` raises (keep the base params).

    Args:
      targets: regex fullmatched against "/"-joined param paths, a list of them, or a callable
        ``(path, leaf) -> bool``; must select bias leaves only, and at least one (a
        ``ValueError`` names the pattern and the biases there are).
      layouts, dropout: accepted for the common factory signature; biases need no layout, and
        BitFit has no dropout (``dropout`` must be 0).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.adapters.bitfit import bitfit
      >>> params = {"params": {"proj": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}
      >>> jax.tree.map(jnp.shape, bitfit().init(jax.random.key(0), params))
      {'params': {'proj': {'bias': {'w': (2,)}}}}
    """
    del layouts
    if not isinstance(dropout, (int, float)) or dropout != 0.0:
        raise ValueError(f"`dropout` must be 0 for BitFit (it trains the biases themselves), got {dropout!r}")
    inner = full_finetune(targets)
    match = tree_lib._matcher(targets)

    def init_fn(key, params):
        leaves = tree_lib.flatten_with_paths(params)
        matched = [(keys, path) for keys, path, leaf in leaves if match(path, leaf)]
        others = [path for keys, path in matched if keys[-1] != "bias"]
        if others:
            raise ValueError(f"bitfit trains biases only; `targets` {targets!r} also selects {others[:8]}")
        if not matched:
            biases = [path for keys, path, _ in leaves if keys[-1] == "bias"]
            there = f"biases in params: {biases[:12]}" if biases else f"params has no bias; paths include {[p for _, p, _ in leaves][:12]}"
            raise ValueError(f"bitfit `targets` {targets!r} matched no bias; {there}")
        return inner.init(key, params)

    return inner._replace(init=init_fn, config={**inner.config, "method": "bitfit"})
