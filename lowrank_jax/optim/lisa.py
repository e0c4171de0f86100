r"""LISA: full-parameter training of a few layers at a time, chosen by layerwise importance sampling.

Reference: Pan et al, `LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning <https://arxiv.org/abs/2403.17919>`_, 2024. Reference implementation matched:
OptimalScale/LMFlow ``src/lmflow/pipeline/utils/lisa_trainer.py`` ``DynamicLayerActivationCallback``
(HEAD f3597dba), as ``finetuner.py`` uses it with the Trainer's ``torch.optim.AdamW``.

What LMFlow does: at every step ``t`` with ``t mod interval == 0`` it sets ``requires_grad=False`` on
every parameter of the decoder layers (``model.model.layers``), then samples ``n_layers`` of the ``L``
layers uniformly without replacement (``np.random.choice(L, n_layers, replace=False)``) and sets
``requires_grad=True`` on theirs. Everything outside the layers (embeddings, the final norm, the head)
is never frozen. The optimizer is built once, before the first switch, over all parameters; AdamW skips
a parameter without ``.grad``, so an unsampled layer is not updated (no weight decay either) and keeps
its moments and its own step count, which resume when it is sampled again (``state_on_switch="keep"``,
the default). ``"reset"`` drops the layers' optimizer state at every switch, so each interval starts a
fresh Adam on the sampled layers (the paper's Algorithm 1, "run AdamW for K iterations"; a revision of
the callback in the code index, whose repository the index does not name, deletes ``optimizer.state``
of every layer parameter at each switch, the embeddings' and head's state kept, which is what this does).

Here the layers are the leaves stacked on a leading layer axis ``[L, ...]`` (``nn.scan``, as
:mod:`lowrank_jax.models.llama` with ``scan_layers=True``); the inner optimizer runs per layer (vmapped
over the layer axis, so each layer has its own step count, as torch's per-parameter ``step``).

Memory, honestly: in one jitted step with static shapes, ``jax.grad`` still computes the gradient of
every layer (the sampled set is data, not shape), so gradient memory and backward FLOPs are those of full
fine-tuning. ``"keep"`` also holds every layer's Adam moments (as torch does, once each layer has been
sampled once). ``"reset"`` holds moments for ``n_layers`` slots only: it saves
``2 (L - n_layers) / L`` of the layers' parameter bytes of Adam state. See ``benchmarks/bench_lisa.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import tree as tree_lib

__all__ = ["lisa", "scale_by_lisa", "ScaleByLisaState", "LAYERS", "STATE_ON_SWITCH"]

#: The stacked decoder layers of :class:`lowrank_jax.models.llama.LlamaForCausalLM` (``scan_layers=True``).
LAYERS = r"(.*/)?layers/.*"
STATE_ON_SWITCH = ("keep", "reset")


class ScaleByLisaState(NamedTuple):
    """State of :func:`scale_by_lisa`.

    count: steps taken. key: the PRNG key the layers are drawn from. layers: int32 ``[n_layers]``,
    the (sorted) layers sampled for the current interval. inner_layers: the inner optimizer's state
    for the layer leaves, with a leading axis of ``L`` (``"keep"``) or ``n_layers`` slots, slot ``i``
    holding layer ``layers[i]`` (``"reset"``). inner_rest: its state for the other leaves.
    """

    count: Any
    key: Any
    layers: Any
    inner_layers: Any
    inner_rest: Any


def _check_int(name: str, value, minimum: int):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {name}={value!r}")


def scale_by_lisa(inner: optax.GradientTransformation, n_layers: int = 2, interval: int = 20, *,
                  layers: tree_lib.Targets = LAYERS, key: Any = 0, state_on_switch: str = "keep") -> optax.GradientTransformation:
    r"""``inner`` restricted to ``n_layers`` of the ``L`` stacked layers, resampled every ``interval`` steps.

    At step ``t`` (``state.count``) with ``t mod interval == 0`` the layers are drawn as
    ``jax.random.choice(fold_in(key, t // interval), L, (n_layers,), replace=False)`` (uniform, no
    replacement, jit-able: the draw is data, the shapes are static). The updates of the other layers
    are exactly 0 and their inner state is untouched; leaves outside ``layers`` (embeddings, head,
    final norm) always get ``inner``'s update.

    Args:
      inner: the per-parameter optimizer (e.g. ``optax.scale_by_adam()``). Its state is kept per layer,
        so a count-based schedule inside it counts the layer's own steps; put learning-rate schedules
        after this transformation (:func:`lisa` does).
      n_layers: ``gamma``, the layers trained at a time (LMFlow's ``lisa_activated_layers``, 2), ``1..L``.
      interval: ``K``, steps between draws (LMFlow's ``lisa_interval_steps``, 20), ``>= 1``.
      layers: which leaves are the stacked layers (regex / list / callable on "/"-joined paths, as
        :func:`lrj.lora`'s ``targets``); each has the layer axis first, all of the same length ``L``.
      key: a ``jax.random`` key or an int seed (LMFlow draws from numpy's global generator: the layers
        cannot equal its draws, only their distribution).
      state_on_switch: ``"keep"`` (LMFlow's code, default) or ``"reset"`` (the paper), see the module docstring.

    Raises:
      ValueError: ``n_layers < 1`` or ``> L``, ``interval < 1``, an unknown ``state_on_switch``, a
        ``layers`` leaf without the common leading axis (naming it), or ``layers`` matching nothing.
    """
    _check_int("n_layers", n_layers, 1)
    _check_int("interval", interval, 1)
    if state_on_switch not in STATE_ON_SWITCH:
        raise ValueError(f"`state_on_switch` must be one of {STATE_ON_SWITCH}, got state_on_switch={state_on_switch!r}")
    reset = state_on_switch == "reset"

    def selected(params) -> tuple[frozenset, int]:
        found = tree_lib.select_leaves(params, layers)
        sizes = {path: tree_lib.shape_of(leaf) for _, path, leaf in found}
        bad = {p: s for p, s in sizes.items() if not s}
        if bad:
            raise ValueError(f"`layers` leaves need a leading layer axis; {bad} have none")
        counts = {s[0] for s in sizes.values()}
        if len(counts) != 1:
            raise ValueError(f"`layers` leaves must share one leading layer axis; their shapes are {sizes}")
        total = counts.pop()
        if n_layers > total:
            raise ValueError(f"n_layers={n_layers} > L={total}, the number of layers the `layers` leaves stack")
        return frozenset(keys for keys, _, _ in found), total

    def part(tree, chosen: frozenset, inside: bool):
        """``tree`` with the leaves (not) in ``chosen`` replaced by ``optax.MaskedNode()``."""
        items = tree_lib.flatten_with_paths(tree)
        kept = [leaf if (keys in chosen) == inside else optax.MaskedNode() for keys, _, leaf in items]
        return jax.tree.unflatten(jax.tree.structure(tree), kept)

    def combine(like, layer_tree, rest_tree):
        picked = {keys: leaf for keys, _, leaf in tree_lib.flatten_with_paths(rest_tree)}
        picked.update({keys: leaf for keys, _, leaf in tree_lib.flatten_with_paths(layer_tree)})
        return jax.tree.unflatten(jax.tree.structure(like), [picked[keys] for keys, _, _ in tree_lib.flatten_with_paths(like)])

    def draw(key_data, count, total):
        k = jax.random.fold_in(key_data, count // interval)
        return jnp.sort(jax.random.choice(k, total, (n_layers,), replace=False)).astype(jnp.int32)

    def init_fn(params):
        chosen, total = selected(params)
        key_data = jax.random.key(key) if isinstance(key, (int, np.integer)) else key
        layer_params = part(params, chosen, True)
        first = draw(key_data, jnp.zeros((), jnp.int32), total)
        if reset:
            inner_layers = jax.vmap(inner.init)(jax.tree.map(lambda x: x[first], layer_params))
        else:
            inner_layers = jax.vmap(inner.init)(layer_params)
        return ScaleByLisaState(jnp.zeros((), jnp.int32), key_data, first, inner_layers, inner.init(part(params, chosen, False)))

    def update_fn(updates, state: ScaleByLisaState, params=None):
        if params is None:
            raise ValueError("scale_by_lisa needs `params` in update(updates, state, params) (to find the layers)")
        chosen, total = selected(params)
        switch = state.count % interval == 0
        idx = jnp.where(switch, draw(state.key, state.count, total), state.layers)
        active = jnp.zeros((total,), bool).at[idx].set(True)
        g_layers, p_layers = part(updates, chosen, True), part(params, chosen, True)
        rest_updates, inner_rest = inner.update(part(updates, chosen, False), state.inner_rest, part(params, chosen, False))

        def per_layer(mask, new, old):
            return jnp.where(jnp.reshape(mask, mask.shape + (1,) * (new.ndim - 1)), new, old)

        if reset:
            gathered = lambda tree: jax.tree.map(lambda x: x[idx], tree)  # noqa: E731
            fresh = jax.vmap(inner.init)(gathered(p_layers))
            slots = jax.tree.map(lambda f, o: jnp.where(switch, f, o), fresh, state.inner_layers)
            slot_updates, inner_layers = jax.vmap(inner.update)(gathered(g_layers), slots, gathered(p_layers))
            slot_of = jnp.zeros((total,), jnp.int32).at[idx].set(jnp.arange(n_layers, dtype=jnp.int32))
            # a gather from the slots (fusible into the consumer), not a scatter into zeros
            layer_updates = jax.tree.map(lambda u: per_layer(active, u[slot_of], jnp.zeros((), u.dtype)), slot_updates)
        else:
            new_updates, new_state = jax.vmap(inner.update)(g_layers, state.inner_layers, p_layers)
            inner_layers = jax.tree.map(lambda n, o: per_layer(active, n, o), new_state, state.inner_layers)
            layer_updates = jax.tree.map(lambda u: per_layer(active, u, jnp.zeros_like(u)), new_updates)
        out = combine(updates, layer_updates, rest_updates)
        return out, ScaleByLisaState(state.count + 1, state.key, idx, inner_layers, inner_rest)

    return optax.GradientTransformation(init_fn, update_fn)


def lisa(learning_rate: optax.ScalarOrSchedule, n_layers: int = 2, interval: int = 20, *, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, layers: tree_lib.Targets = LAYERS,
         key: Any = 0, state_on_switch: str = "keep") -> optax.GradientTransformation:
    r"""LISA with AdamW, as LMFlow trains it (``torch.optim.AdamW``, the Trainer's default, decay 0).

    Per sampled layer and for the always-trained leaves, torch's AdamW: ``p <- p (1 - lr wd) - lr
    mhat / (sqrt(vhat) + eps)`` with the parameter's own step count in the bias corrections; the
    learning rate (or schedule) counts global steps. Other layers: update 0. See :func:`scale_by_lisa`
    for ``n_layers``, ``interval``, ``layers``, ``key``, ``state_on_switch``.

    Example (a scanned LLaMA: ``params["layers"]`` leaves are ``[L, ...]``):

      >>> import jax, jax.numpy as jnp
      >>> from lowrank_jax.optim.lisa import lisa
      >>> params = {"embed": jnp.ones((4, 2)), "layers": {"kernel": jnp.ones((3, 2, 2))}}
      >>> opt = lisa(0.1, n_layers=1, interval=2)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
      >>> [int(jnp.count_nonzero(updates["layers"]["kernel"][i])) for i in range(3)].count(0)
      2
    """
    adamw = optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=eps), optax.add_decayed_weights(weight_decay))
    return optax.chain(scale_by_lisa(adamw, n_layers, interval, layers=layers, key=key, state_on_switch=state_on_switch),
                       optax.scale_by_learning_rate(learning_rate))
