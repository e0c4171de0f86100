"""Adapters built from adapters: trained base leaves (peft's ``modules_to_save``) and combinations.

``lrj.combine(lrj.lora(targets=qkvo), lrj.full_finetune(targets=embeddings_and_norms))``
is LongLoRA's trainable set as one adapter: one tree, one ``init``, one ``merge``,
run by the same bridges, split by the same roles.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

from lowrank_jax import tree as tree_lib
from lowrank_jax.adapters import base

__all__ = ["combine", "full_finetune"]

#: The role of a leaf that is the targeted parameter itself.
PARAM_ROLES = {"w": base.Leaf(("param",))}


def full_finetune(targets: tree_lib.Targets) -> base.Adapter:
    r"""Trains the targeted base leaves themselves (peft's ``modules_to_save``; BitFit on biases).

    .. math:: W' = W_0 + \Delta, \quad \text{trained directly: } w \leftarrow w - \eta \nabla_w L

    The adapter tree holds a copy ``w`` of each targeted leaf (so donating it never
    invalidates ``params``), role ``Leaf(("param",))``: it is sharded like the parameter,
    and the bridges substitute it for the parameter before the model runs, so any leaf
    (a norm's ``scale``, a bias, an embedding table) can be trained, not only kernels of
    layers the bridges intercept. ``merge`` writes the trained values in; ``unmerge``
    cannot recover the originals and raises.

    Args:
      targets: regex fullmatched against "/"-joined param paths, a list of them, or a
        callable ``(path, leaf) -> bool``.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"params": {"norm": {"scale": jnp.ones(3)}, "proj": {"kernel": jnp.ones((3, 2))}}}
      >>> lp = lrj.full_finetune(targets=r".*/scale").init(jax.random.key(0), params)
      >>> jax.tree.map(jnp.shape, lp)
      {'params': {'norm': {'scale': {'w': (3,)}}}}
    """
    names = frozenset(PARAM_ROLES)

    def init_fn(key, params):
        del key
        out = {}
        for keys, path, leaf in tree_lib.select_leaves(params, targets):
            if tree_lib.is_quantized(leaf):
                raise TypeError(f"cannot train the quantised leaf {path!r} directly; dequantise it first")
            # a copy, so donating the adapter tree never invalidates params (shapes stay shapes)
            out[keys] = {"w": leaf if isinstance(leaf, jax.ShapeDtypeStruct) else jnp.array(leaf, copy=True)}
        return tree_lib.nest(out)

    def apply_fn(leaves, site, x, y, *, path, dropout_key=None):
        raise RuntimeError(f"{path!r}: a fully fine-tuned leaf is substituted before the call, never applied at a site")

    def merge_fn(params, adapter_params):
        new = {keys: leaves["w"].astype(kernel.dtype)
               for keys, _, kernel, leaves in base.resolve_targets(adapter_params, params, names)}
        return base.replace_leaves(params, new)

    def unmerge_fn(params, adapter_params):
        raise ValueError("full_finetune's merge replaced the targeted leaves; their original values are not in "
                         "the adapter tree: keep the base params to undo it")

    def penalty_fn(params, adapter_params):
        return jnp.zeros((), jnp.float32)

    config = dict(method="full_finetune", **tree_lib.targets_config(targets))
    return base.Adapter(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, names, config, dict(PARAM_ROLES))


def _target_matcher(adapter: base.Adapter):
    targets = adapter.config.get("targets")
    if adapter.config.get("targets_callable"):
        return None
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        compiled = [re.compile(t) for t in targets]
        return lambda path: any(c.fullmatch(path) for c in compiled)
    return None


def combine(*adapters: base.Adapter) -> base.Adapter:
    r"""One adapter made of several, each on its own targets.

    ``init`` runs every component and joins their trees (a path targeted by two components
    is a ``ValueError`` naming it); at a layer call the component that owns the target
    applies (the one whose leaf names the target has, or, among components with the same
    leaf names, the one whose regex ``targets`` match the path); ``merge`` merges each,
    ``unmerge`` undoes them in reverse order; ``penalty`` is the sum. Roles are the union
    (two components declaring one leaf name with different roles are refused), so
    :func:`lrj.split`, shardings and :func:`lrj.freeze` work on the whole.

    Example:
      >>> import jax, jax.numpy as jnp, lowrank_jax as lrj
      >>> params = {"params": {"norm": {"scale": jnp.ones(3)}, "proj": {"kernel": jnp.ones((3, 2))}}}
      >>> both = lrj.combine(lrj.lora(rank=1, targets=r".*/kernel"), lrj.full_finetune(targets=r".*/scale"))
      >>> jax.tree.map(jnp.shape, both.init(jax.random.key(0), params))
      {'params': {'norm': {'scale': {'w': (3,)}}, 'proj': {'kernel': {'a': (3, 1), 'b': (1, 2)}}}}
    """
    if not adapters or not all(isinstance(a, base.Adapter) for a in adapters):
        raise TypeError(f"`combine` takes one or more lrj.Adapter, got {[type(a).__name__ for a in adapters]}")
    roles: dict[str, base.Leaf] = {}
    for adapter in adapters:
        for name, leaf in base.roles_of(adapter).items():
            if name in roles and roles[name] != leaf:
                raise ValueError(f"leaf {name!r} has different roles in the combined adapters: {roles[name]} and {leaf}")
            roles[name] = leaf
    shared_names = frozenset(n for n, leaf in roles.items() if leaf.shared)
    same_names: dict[frozenset, list[base.Adapter]] = {}
    for adapter in adapters:  # a target's own leaves (shared leaves are handed to every target) tell its owner
        same_names.setdefault(frozenset(adapter.leaf_names) - shared_names, []).append(adapter)
    matchers = {}
    for group in same_names.values():
        if len(group) > 1:
            for adapter in group:
                matchers[id(adapter)] = _target_matcher(adapter)
                if matchers[id(adapter)] is None:
                    raise ValueError(
                        f"combined adapters with the same leaves {sorted(adapter.leaf_names)} need regex `targets` "
                        f"to tell their layers apart; {adapter.config.get('method')!r} has {adapter.config.get('targets')!r}"
                    )

    def owner(path: str, leaves) -> base.Adapter:
        group = same_names.get(frozenset(leaves) - shared_names)
        if group is None:
            raise ValueError(f"adapter leaves {sorted(leaves)} at {path!r} belong to none of the combined adapters")
        if len(group) == 1:
            return group[0]
        found = [a for a in group if matchers[id(a)](path)]
        if len(found) != 1:
            raise ValueError(f"{path!r} is matched by {len(found)} of the combined adapters with leaves {sorted(leaves)}")
        return found[0]

    def parts(adapter_params) -> list[tuple[base.Adapter, Any]]:
        """The combined tree cut into each component's own tree."""
        by_component: dict[int, dict] = {id(a): {} for a in adapters}
        for keys, leaves in tree_lib.adapter_paths(adapter_params, frozenset(roles)):
            by_component[id(owner(tree_lib.path_str(keys), leaves))][keys] = leaves
        shared = tree_lib.shared_of(adapter_params)
        out = []
        for a in adapters:
            if by_component[id(a)]:
                tree = tree_lib.nest(by_component[id(a)])
                mine = {n: v for n, v in shared.items() if n in a.leaf_names}
                out.append((a, {**tree, tree_lib.SHARED: mine} if mine else tree))
        return out

    def init_fn(key, params):
        trees, seen, shared = {}, {}, {}
        for adapter, k in zip(adapters, jax.random.split(key, len(adapters))):
            tree = adapter.init(k, params)
            shared.update(tree_lib.shared_of(tree))
            for keys, leaves in tree_lib.adapter_paths(tree, adapter.leaf_names):
                path = tree_lib.path_str(keys)
                if keys in trees:
                    raise ValueError(f"{path!r} is targeted by both {seen[keys]!r} and {adapter.config.get('method')!r}; "
                                     f"combined adapters need disjoint targets")
                trees[keys], seen[keys] = leaves, adapter.config.get("method")
        out = tree_lib.nest(trees)
        if shared:
            out[tree_lib.SHARED] = shared
        return out

    def apply_fn(leaves, site, x, y, *, path, dropout_key=None, **call_args):
        component = owner(path, leaves)
        mine = {n: v for n, v in leaves.items() if n in component.leaf_names}
        theirs = {n: v for n, v in call_args.items() if n in component.call_args}
        return component.apply(mine, site, x, y, path=path, dropout_key=dropout_key, **theirs)

    def merge_fn(params, adapter_params):
        for adapter, tree in parts(adapter_params):
            params = adapter.merge(params, tree)
        return params

    def unmerge_fn(params, adapter_params):
        for adapter, tree in reversed(parts(adapter_params)):
            params = adapter.unmerge(params, tree)
        return params

    def penalty_fn(params, adapter_params):
        total = jnp.zeros((), jnp.float32)
        for adapter, tree in parts(adapter_params):
            total = total + adapter.penalty(params, tree)
        return total

    config = dict(method="combine", components=[a.config for a in adapters],
                  dropout=max(float(a.config.get("dropout", 0.0)) for a in adapters))
    call_args = frozenset().union(*(a.call_args for a in adapters))
    return base.Adapter(init_fn, apply_fn, merge_fn, unmerge_fn, penalty_fn, frozenset(roles), config, roles,
                        call_args=call_args)
