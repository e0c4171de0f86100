"""(IA)^3: learned vectors that rescale a layer's outputs or inputs.

Reference:
  Liu et al, `Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
  Learning <https://arxiv.org/abs/2205.05638>`_, 2022.
Reference implementation matched: Hugging Face peft 0.21.2 ``tuners/ia3`` (``Linear``; the
output-scaling ``Conv2d``/``Conv3d`` case follows from the same formula); tests compare outputs,
merged weights and biases with values recorded from peft (``tests/fixtures/make_peft_ia3.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["ia3", "IA3_ROLES", "UNMERGE_EPS"]

#: ``l_out`` scales an ordinary target's outputs, ``l_in`` a feedforward target's inputs (peft's
#: ``ia3_l``, stored ``[out, 1]`` and ``[1, in]`` for a torch ``nn.Linear``).
IA3_ROLES = {"l_out": base.Leaf(("stack", "out")), "l_in": base.Leaf(("stack", "in"))}

#: peft's ``unmerge`` divides by ``l + 1e-8`` (weights and biases); so does ours.
UNMERGE_EPS = 1e-8

_LLAMA_TARGETS = r".*/(k_proj|v_proj|down_proj)/kernel"
_LLAMA_FEEDFORWARD = r".*/down_proj/kernel"


def _expand(v, first: int, count: int):
    """``v`` with ``count`` unit axes inserted from axis ``first`` (a vector over some of a kernel's axes,
    broadcast over the others)."""
    return jnp.reshape(v, (*v.shape[:first], *(1,) * count, *v.shape[first:]))


def ia3(
    targets: tree_lib.Targets = _LLAMA_TARGETS,
    feedforward: tree_lib.Targets | None = _LLAMA_FEEDFORWARD,
    *,
    layouts: Mapping[str, Any] | Callable | None = None,
    dropout: float = 0.0,
    param_dtype: Any = None,
) -> base.Adapter:
    r"""(IA)^3 on the targeted kernels: a learned vector ``l`` (init 1) per target.

    .. math::
        \text{ordinary target: } y = l \odot (x W + b), \qquad
        \text{feedforward target: } y = (l \odot x) W + b

    in Flax orientation (``W: [in, out]``). As in peft, an ordinary target's ``l`` also scales
    the bias, in the forward pass and in ``merge`` (``W' = W \operatorname{diag}(l)``,
    ``b' = l \odot b``); a feedforward target's ``l`` scales ``W``'s rows (``W' = \operatorname{diag}(l) W``)
    and leaves the bias alone. ``unmerge`` divides by ``l + 1e-8``, as peft does.

    Leaves: ``l_out = Leaf(("stack", "out"))`` on ordinary targets and
    ``l_in = Leaf(("stack", "in"))`` on feedforward targets, both peft's ``ia3_l``
    (``[out, 1]`` and ``[1, in]`` for a torch ``nn.Linear``; see ``lowrank_jax.io.peft``).

    Args:
      targets: regex fullmatched against "/"-joined param paths, a list of them, or a callable
        ``(path, leaf) -> bool``; the default is peft's llama default (``k_proj``, ``v_proj``,
        ``down_proj``).
      feedforward: the targets whose inputs are scaled (peft's ``feedforward_modules``), same
        forms; must select a subset of ``targets`` (a ``ValueError`` names the others). Default:
        peft's llama default (``down_proj``); ``None``: no feedforward targets.
      layouts: ``{path: Layout}`` or ``(path, leaf) -> Layout`` for kernels that are not 2-D
        (see ``lrj.linen.kernel_layouts``).
      dropout: must be 0: peft's IA3 has no dropout (accepted for the common factory signature).
      param_dtype: dtype of the vectors; default: the kernel's dtype.

    Linear layers only, and convolutions for ordinary targets (their outputs are per channel);
    embeddings, tied heads and feedforward convolutions raise ``NotImplementedError``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.adapters.ia3 import ia3
      >>> params = {"up": {"kernel": jnp.ones((4, 6))}, "down": {"kernel": jnp.ones((6, 4))}}
      >>> lp = ia3(targets=r".*/kernel", feedforward=r"down/kernel").init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, lp)
      {'down': {'kernel': {'l_in': (6,)}}, 'up': {'kernel': {'l_out': (6,)}}}
    """
    if not isinstance(dropout, (int, float)) or dropout != 0.0:
        raise ValueError(f"`dropout` must be 0 for IA3 (peft's IA3 has no dropout), got {dropout!r}")
    names = frozenset(IA3_ROLES)
    is_feedforward = tree_lib._matcher(feedforward) if feedforward is not None else (lambda path, leaf: False)

    def init_fn(key, params):
        del key
        found = tree_lib.select_targets(params, targets, layouts)
        targeted = {t.path for t in found}
        outside = [p for _, p, leaf in tree_lib.flatten_with_paths(params) if is_feedforward(p, leaf) and p not in targeted]
        if outside:
            raise ValueError(f"`feedforward` {feedforward!r} must select a subset of `targets` {targets!r}; "
                             f"it also selects {outside[:8]}")
        out = {}
        for t in found:
            if t.is_embedding:
                raise NotImplementedError(f"IA3 (as peft) supports linear and conv layers; {t.path!r} is an embedding")
            stack, ins, outs = t.layout.split(tree_lib.shape_of(t.leaf))
            name, dims = ("l_in", ins) if is_feedforward(t.path, t.leaf) else ("l_out", outs)
            out[t.keys] = {name: jnp.ones((*stack, *dims), param_dtype or t.leaf.dtype)}
        return tree_lib.nest(out)

    def apply_fn(leaves, site: base.Site, x, y, *, path: str, dropout_key=None):
        if site.kind not in ("linear", "conv") or (site.kind == "conv" and "l_in" in leaves):
            raise NotImplementedError(f"IA3 supports linear layers (and output-scaled convs); {path!r} is called as "
                                      f"{site.kind!r}{' with input scaling' if 'l_in' in leaves else ''}")
        if "l_out" in leaves:  # peft: base_layer(x) * l, the bias included
            return (y * leaves["l_out"]).astype(y.dtype)
        dtype = site.dtype or jnp.result_type(x, site.kernel)
        scaled = (x * leaves["l_in"]).astype(dtype)  # peft: base_layer(x * l)
        out = base.contract(scaled, site.kernel.astype(dtype), site.inputs)
        if site.bias is not None:
            out = out + site.bias.astype(out.dtype)
        return base.match_sharding(out.astype(y.dtype), y)

    def layout(params, path):  # the factory's layouts: a vector over stack+in axes also fits other layouts
        return tree_lib.select_targets(params, lambda p, leaf: p == path, layouts)[0].layout

    def scaled(params, adapter_params, invert: bool):
        new = {}
        flat = {keys: leaf for keys, _, leaf in tree_lib.flatten_with_paths(params)}
        for keys, path, kernel, leaves in base.resolve_targets(adapter_params, params, names):
            (name, vec), = leaves.items()
            shape = tree_lib.shape_of(kernel)
            lay = layout(params, path)
            n_out = len(shape) - lay.stack - lay.inputs
            vec = vec.astype(jnp.float32) + (UNMERGE_EPS if invert else 0.0)
            if name == "l_out":
                factor = _expand(vec, lay.stack, lay.inputs)
            else:
                factor = _expand(vec, vec.ndim, n_out)
            w = base.dense(kernel)
            new[keys] = (w / factor if invert else w * factor).astype(kernel.dtype)
            bias_keys = keys[:-1] + ("bias",)
            if name == "l_out" and bias_keys in flat:  # peft scales the bias of output-scaled layers only
                b = flat[bias_keys]
                v = vec.reshape(b.shape)
                new[bias_keys] = ((b.astype(jnp.float32) / v) if invert else (b.astype(jnp.float32) * v)).astype(b.dtype)
        return base.replace_leaves(params, new)

    def penalty_fn(params, adapter_params):
        return jnp.zeros((), jnp.float32)

    config = dict(method="ia3", **tree_lib.targets_config(targets),
                  feedforward=tree_lib.targets_config(feedforward)["targets"] if feedforward is not None else None,
                  dropout=float(dropout))
    return base.Adapter(init_fn, apply_fn, lambda p, ap: scaled(p, ap, False), lambda p, ap: scaled(p, ap, True),
                        penalty_fn, names, config, dict(IA3_ROLES), layouts)
