"""One test harness for every adapter, in the spirit of optax's ``_common_test.py``.

Each adapter is a :class:`Case`; each check is a function ``check_*(case)`` (see
``CHECKS``); ``tests/test_harness.py`` runs every check on every case, and
``tests/harness_devices.py`` runs the 8-device check for all cases in one process.

Adding a method (3-5 lines): append a ``Case`` to ``CASES``::

    Case("vera", lambda **kw: lrj.vera(rank=2, **kw)),            # (a future method) kw: dropout=, layouts=
    Case("my_offset", lambda **kw: lrj.lora(rank=2, init="olora", **kw), offset=True),
    Case("dora_like", ..., unmerge_needs_norms=True, tol=5e-5),
    Case("conv", ..., models=CONV_MODELS),                         # its own linen/NNX builders
    Case("wip", ..., xfail={"scan": "why it fails (issue N)"}),    # strict xfail of one check

The factory must accept ``dropout=`` and ``layouts=`` keyword arguments (pass them on
to the adapter). Models are pluggable: a :class:`Models` gives the unrolled linen model,
its ``nn.scan`` + ``nn.remat`` twin, an NNX twin built from the linen params, the input,
the partition specs for the device check, and how to stack per-layer trees for the scan.
Adapter leaves are perturbed after init (LoRA's ``b`` starts at 0), so equalities compare
outputs the adapter really changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank_jax as lrj
from lowrank_jax import checkpoint
from lowrank_jax.mesh_ops import reshard_to

D, H, LAYERS, BATCH = 8, 16, 2, 8


# ----------------------------------------------------------------------------- default models


def _gather(h):
    """Replicates the feature axis under an Explicit mesh (the next kernel is row-parallel); else ``h``."""
    return reshard_to(h, ("data", None))


class LinenBlock(nn.Module):
    """``x + down(tanh(up(x)))``: up is column-parallel, down row-parallel in the device check."""

    @nn.compact
    def __call__(self, x, _=None):
        h = _gather(jnp.tanh(nn.Dense(H, name="up")(x)))
        return x + _gather(nn.Dense(D, name="down")(h)), None


class LinenMLP(nn.Module):
    """``LAYERS`` blocks, unrolled (``layers_0``, ``layers_1``...) or as ``nn.scan(nn.remat(block))``."""

    scan: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scan:
            stack = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
            return stack(name="layers")(x, None)[0]
        for i in range(LAYERS):
            x, _ = LinenBlock(name=f"layers_{i}")(x)
        return x


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, H, rngs=rngs)
        self.down = nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        return x + _gather(self.down(_gather(jnp.tanh(self.up(x)))))


class NNXMLP(nnx.Module):
    """The linen MLP in NNX, with the same parameter paths (``layers_0/up/kernel``...)."""

    def __init__(self, rngs):
        for i in range(LAYERS):
            setattr(self, f"layers_{i}", NNXBlock(rngs))

    def __call__(self, x):
        for i in range(LAYERS):
            x = getattr(self, f"layers_{i}")(x)
        return x


def nnx_with_params(make: Callable[[], nnx.Module], params) -> nnx.Module:
    """An NNX model from ``make()`` whose ``nnx.Param`` values are the (bare, same-path) ``params``."""
    model = make()
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def stack_layers(tree, axis: Callable[[str], int] = lambda leaf_name: 0):
    """The unrolled tree (params or adapter) of ``LinenMLP`` as the scanned model's: ``layers_i`` stacked
    into ``layers``, each leaf along ``axis(leaf name)``."""
    layers = [tree[f"layers_{i}"] for i in range(LAYERS)]
    out = {"layers": jax.tree_util.tree_map_with_path(lambda kp, *xs: jnp.stack(xs, axis(kp[-1].key)), *layers)}
    if lrj.tree.SHARED in tree:  # shared adapter leaves (VeRA's projections) are one array for every layer
        out[lrj.tree.SHARED] = tree[lrj.tree.SHARED]
    return out


def mlp_specs(params):
    """Partition specs for the device check: up kernels ``(None, "model")``, down kernels ``("model", None)``."""
    layer = {"up": {"kernel": P(None, "model"), "bias": P("model")}, "down": {"kernel": P("model", None), "bias": P()}}
    return {name: layer for name in params}


@dataclasses.dataclass(frozen=True)
class Models:
    """How a case builds its models (pluggable, e.g. for conv layers).

    linen: ``() -> nn.Module``, the unrolled model; scanned: ``() -> nn.Module`` running the same
    layers under ``nn.scan``/``nn.remat`` (``None``: no scan check); nnx: ``(bare linen params) ->
    nnx.Module`` with the same weights and paths (``None``: no NNX check); stack:
    ``(unrolled tree, axis of leaf name) -> scanned tree``; x: ``() -> input``; specs:
    ``(bare params) -> PartitionSpec tree`` over a ``("data", "model")`` mesh (``None``: no device check).
    """

    linen: Callable[[], nn.Module] = LinenMLP
    scanned: Callable[[], nn.Module] | None = lambda: LinenMLP(scan=True)
    nnx: Callable[[Any], nnx.Module] | None = lambda params: nnx_with_params(lambda: NNXMLP(nnx.Rngs(0)), params)
    stack: Callable[..., Any] = stack_layers
    x: Callable[[], Any] = lambda: jnp.asarray(np.random.default_rng(42).standard_normal((BATCH, D)), jnp.float32)
    specs: Callable[[Any], Any] | None = mlp_specs


MLP = Models()


class LinenConvNet(nn.Module):
    """Two 3x3 convs (the second strided and dilated) with a residual-free tanh between them."""

    @nn.compact
    def __call__(self, x):
        h = _gather4(jnp.tanh(nn.Conv(H, (3, 3), padding="SAME", name="conv_in")(x)))
        return nn.Conv(D, (3, 2), strides=2, kernel_dilation=(1, 2), padding=((1, 1), (2, 0)), name="conv_out")(h)


def _gather4(h):
    return reshard_to(h, ("data", None, None, None))


class NNXConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv_in = nnx.Conv(D, H, (3, 3), padding="SAME", rngs=rngs)
        self.conv_out = nnx.Conv(H, D, (3, 2), strides=2, kernel_dilation=(1, 2), padding=((1, 1), (2, 0)), rngs=rngs)

    def __call__(self, x):
        return self.conv_out(_gather4(jnp.tanh(self.conv_in(x))))


def conv_specs(params):
    return {"conv_in": {"kernel": P(None, None, None, "model"), "bias": P("model")},
            "conv_out": {"kernel": P(None, None, "model", None), "bias": P()}}


#: Conv LoRA (peft's Conv2d LoRA: a conv with the layer's window, then a 1x1 conv); no scanned twin.
CONVS = Models(
    linen=LinenConvNet, scanned=None,
    nnx=lambda params: nnx_with_params(lambda: NNXConvNet(nnx.Rngs(0)), params),
    x=lambda: jnp.asarray(np.random.default_rng(42).standard_normal((BATCH, 6, 7, D)), jnp.float32),
    specs=conv_specs,
)


def conv_layouts(path, leaf):
    """Conv kernels ``[kh, kw, in, out]``: the window and ``in`` contract (what ``kernel_layouts`` finds)."""
    return lrj.Layout(0, 3)


def readme_factory():
    """The ``gated_lora`` factory of README.md's "Adding a method" section, executed from the README."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Adding a method", 1)[1]
    namespace: dict = {}
    exec(compile(re.search(r"```python\n(.*?)```", section, flags=re.S).group(1), "README.md", "exec"), namespace)
    return namespace["gated_lora"]


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One adapter under test.

    adapter: ``(**kw) -> lrj.Adapter``, taking ``dropout=`` and ``layouts=``.
    init_kwargs: extra ``adapter.init`` arguments. offset: the init is an offset (PiSSA, OLoRA):
    the model runs on the residual base ``lrj.init_with_residual`` returns. unmerge_needs_norms:
    ``unmerge`` takes ``norms=lrj.dora_weight_norms(...)`` (DoRA). tol: absolute tolerance of the
    float comparisons. xfail: ``{check name: reason}``, run as strict xfails (check names: the keys of
    ``CHECKS``, and ``devices-explicit``/``devices-auto``). invertible: ``False`` when ``merge``
    replaces leaves (``lrj.full_finetune``, BitFit) and ``unmerge`` rightly raises: the round trip is skipped.
    """

    name: str
    adapter: Callable[..., lrj.Adapter]
    init_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    offset: bool = False
    unmerge_needs_norms: bool = False
    tol: float = 2e-5
    models: Models = MLP
    xfail: Mapping[str, str] = dataclasses.field(default_factory=dict)
    invertible: bool = True

    def __repr__(self):
        return f"Case({self.name})"


def _bank_on_slot(slot, **kw):
    """A one-adapter view of a bank of two (ranks 3 and 2, the second rsLoRA): every example on ``slot``."""
    bank = lrj.multi_lora([lrj.lora(rank=3, alpha=4.0, **kw), lrj.lora(rank=2, alpha=3.0, rslora=True, **kw)])
    ids = jnp.full((BATCH,), slot, jnp.int32)
    return bank._replace(apply=functools.partial(bank.apply, adapter_index=ids), merge=functools.partial(bank.merge, slot=slot),
                         unmerge=functools.partial(bank.unmerge, slot=slot), call_args=frozenset())


CASES = [
    Case("lora", lambda **kw: lrj.lora(rank=2, alpha=4.0, **kw)),
    Case("rslora", lambda **kw: lrj.lora(rank=2, alpha=4.0, rslora=True, **kw)),
    Case("dora", lambda **kw: lrj.dora(rank=2, alpha=4.0, **kw), unmerge_needs_norms=True),
    Case("pissa", lambda **kw: lrj.lora(rank=2, alpha=4.0, init="pissa", **kw), offset=True),
    Case("lora_fa", lambda **kw: lrj.freeze(lrj.lora(rank=2, alpha=4.0, **kw), {"a"})),
    Case("conv", lambda **kw: lrj.lora(rank=2, alpha=4.0, **{"layouts": conv_layouts, **kw}), models=CONVS, xfail={
        "devices-explicit": "flax's own nn.Conv fails under an Explicit mesh once its kernel is sharded (flax 0.12 "
                            "calls lax.conv_general_dilated without out_sharding): the base model cannot run there"}),
    Case("readme_gated_lora", lambda **kw: readme_factory()(rank=2, **kw)),
    Case("vera", lambda **kw: lrj.vera(rank=4, **kw)),  # shared frozen projections at the tree's root
    Case("ia3", lambda **kw: lrj.ia3(targets=r".*/kernel", feedforward=r".*/down/kernel", **kw),
         xfail={"dropout": "peft's IA3 has no dropout: ia3(dropout=0.5) raises"}),
    Case("bitfit", lambda **kw: lrj.bitfit(**kw), invertible=False, xfail={"dropout": "BitFit has no dropout: it raises"}),
    Case("lora_bias_lora_only", lambda **kw: lrj.lora(rank=2, alpha=4.0, bias="lora_only", **kw), invertible=False),
    Case("adalora", lambda **kw: lrj.adalora(init_r=4, target_r=2, total_step=10, **kw)),
    Case("multi_lora", lambda **kw: _bank_on_slot(1, **kw)),
]
CASES_BY_NAME = {c.name: c for c in CASES}


# ----------------------------------------------------------------------------- setup


class Setup(NamedTuple):
    model: nn.Module
    adapter: lrj.Adapter
    params: Any  # bare params the model runs on (the residual for offset inits)
    lp: Any  # perturbed adapter tree
    x: Any
    original: Any  # params before the residual (== params unless offset)
    lp0: Any  # the adapter tree as init returned it


def perturb(tree, seed: int = 7, std: float = 0.1):
    """``tree + std * normal`` (numpy noise: no per-shape compiles): nonzero factors, so no equality below is vacuous."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + std * rng.standard_normal(x.shape), x.dtype), tree)


@functools.cache
def base_model(models: Models):
    """``(model, x, params)`` of a case's models, shared by every case using them (one init compile)."""
    model, x = models.linen(), models.x()
    return model, x, jax.jit(model.init)(jax.random.key(0), x)["params"]


_SETUPS: dict = {}


def setup(case: Case, dropout: float = 0.0) -> Setup:
    """The case's model, adapter, params and perturbed adapter tree (cached: treat as read-only).

    With ``dropout`` the same weights with the adapter made with that dropout rate."""
    if (case, dropout) not in _SETUPS:
        if dropout:
            _SETUPS[case, dropout] = setup(case)._replace(adapter=case.adapter(dropout=dropout))
            return _SETUPS[case, dropout]
        model, x, original = base_model(case.models)
        adapter = case.adapter(dropout=dropout)
        if case.offset:
            lp0, params = lrj.init_with_residual(adapter, jax.random.key(1), original, **case.init_kwargs)
        else:
            lp0, params = adapter.init(jax.random.key(1), original, **case.init_kwargs), original
        _SETUPS[case, dropout] = Setup(model, adapter, params, perturb(lp0), x, original, lp0)
    return _SETUPS[case, dropout]


@functools.cache
def jitted_run(case: Case):
    """``jax.jit(lp -> run(setup(case), lp))``, compiled once per case for the checks that share it."""
    s = setup(case)
    return jax.jit(lambda lp: run(s, lp))


def run(s: Setup, lp=None, params=None, x=None, **kwargs):
    """The adapted linen model's output, in factored form (``s``'s own trees by default)."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return lrj.linen.apply(s.model, s.adapter, pick(params, s.params), pick(lp, s.lp), pick(x, s.x), **kwargs)


def loss(s: Setup, lp, params=None, x=None):
    return jnp.mean(jnp.square(run(s, lp, params, x)))


def unmerge(case: Case, s: Setup, merged, lp):
    """``adapter.unmerge``, with the norms of ``s.params`` when the case needs them."""
    if case.unmerge_needs_norms:
        return s.adapter.unmerge(merged, lp, norms=lrj.dora_weight_norms(s.adapter, s.params, lp))
    return s.adapter.unmerge(merged, lp)


def stack_axis(adapter: lrj.Adapter, leaf_name: str) -> int:
    """The axis of a leaf that ``nn.scan`` slices: where ``"stack"`` stands in its role (before in/out axes)."""
    axes = adapter.roles[leaf_name].axes
    return axes.index("stack") if "stack" in axes else 0


def max_diff(a, b) -> float:
    """The largest absolute difference between two trees of arrays (same structure)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def assert_close(a, b, tol: float, what: str = ""):
    diff = max_diff(a, b)
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def assert_changes(a, b, what: str, at_least: float = 1e-4):
    diff = max_diff(a, b)
    assert diff > at_least, f"{what}: outputs differ by only {diff:.3g}; the check would be vacuous"


def assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def leaf_names(tree) -> set:
    return {kp[-1].key for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- checks


def check_jit(case: Case):
    """1. jit and eager give the same output."""
    s = setup(case)
    assert_close(jitted_run(case)(s.lp), run(s), case.tol, "jit vs eager")


def check_nnx(case: Case):
    """2. The linen and NNX bridges agree on the same model with the same weights."""
    s = setup(case)
    model = case.models.nnx(s.params)
    shapes = jax.tree.map(jnp.shape, s.adapter.init(jax.random.key(1), lrj.nnx.params(model), **case.init_kwargs))
    assert shapes == jax.tree.map(jnp.shape, s.lp)  # same paths and shapes from NNX params
    y_nnx = lrj.nnx.apply(model, s.adapter, s.lp, s.x)
    assert_changes(y_nnx, model(s.x), "NNX adapter vs base")
    assert_close(y_nnx, run(s), case.tol, "NNX vs linen")


def check_scan(case: Case):
    """3. ``nn.scan(nn.remat(block))`` over stacked layers equals the unrolled model with the same weights."""
    s = setup(case)
    models = case.models
    scanned = models.scanned()
    layouts = lrj.linen.kernel_layouts(scanned, s.x)
    adapter = case.adapter(layouts=layouts)
    params = models.stack(s.params)
    lp = models.stack(s.lp, lambda name: stack_axis(adapter, name))
    abstract = jax.eval_shape(lambda: scanned.init(jax.random.key(0), s.x)["params"])
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, params)
    init = functools.partial(adapter.init, **case.init_kwargs)  # the discovered layouts give the stacked adapter's shapes
    assert jax.tree.map(jnp.shape, jax.eval_shape(init, jax.random.key(1), params)) == jax.tree.map(jnp.shape, lp)
    y_scan = jax.jit(lambda lp: lrj.linen.apply(scanned, adapter, params, lp, s.x))(lp)
    assert_close(y_scan, jitted_run(case)(s.lp), case.tol, "scan+remat vs unrolled")


def check_merge(case: Case):
    """4. Factored equals merged; unmerge(merge(W)) gives back W; an offset init starts at the original W."""
    s = setup(case)
    y = run(s)
    assert_changes(y, s.model.apply({"params": s.params}, s.x), "adapter vs base")
    merged = s.adapter.merge(s.params, s.lp)
    assert_close(s.model.apply({"params": merged}, s.x), y, case.tol, "merged vs factored")
    assert_changes(merged, s.params, "merged kernels")
    if case.invertible:
        assert_close(unmerge(case, s, merged, s.lp), s.params, case.tol, "unmerge round trip")
    if case.offset:
        assert_changes(s.params, s.original, "residual kernels")
        assert_close(s.adapter.merge(s.params, s.lp0), s.original, case.tol, "residual + initial adapter vs original")


def check_split(case: Case):
    """5. split/join is exact; every trainable leaf gets a nonzero gradient; a train step leaves frozen leaves alone."""
    s = setup(case)
    trainable, frozen = lrj.split(s.adapter, s.lp)
    assert_equal(lrj.join(s.adapter, trainable, frozen), s.lp)
    roles = s.adapter.roles
    assert leaf_names(trainable) == {n for n, leaf in roles.items() if leaf.trainable}
    assert leaf_names(frozen) == {n for n, leaf in roles.items() if not leaf.trainable}
    opt = optax.adamw(1e-2, weight_decay=0.1)  # weight decay would move a frozen leaf that got an update
    step = lrj.make_train_step(lambda lp, params, x, rng: loss(s, lp, params, x), opt, adapter=s.adapter)

    def grads_and_step(lp):
        grads = jax.grad(lambda t: loss(s, lrj.join(s.adapter, t, frozen)))(lrj.split(s.adapter, lp)[0])
        return grads, step(lp, opt.init(lrj.split(s.adapter, lp)[0]), s.params, s.x, None)[0]  # state: trainable only

    grads, new = jax.jit(grads_and_step)(s.lp)  # one compile for both
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    for kp, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 1e-6, f"zero gradient at {jax.tree_util.keystr(kp)}"
    new_trainable, new_frozen = lrj.split(s.adapter, new)
    assert_equal(new_frozen, frozen)
    for (kp, a), b in zip(jax.tree_util.tree_flatten_with_path(new_trainable)[0], jax.tree.leaves(trainable)):
        assert float(jnp.max(jnp.abs(a - b))) > 1e-4, f"trainable leaf {jax.tree_util.keystr(kp)} was not updated"


def check_dropout(case: Case):
    """6. With dropout and an rng the output differs from eval and is a function of the rng; no rng is eval."""
    eval_setup = setup(case)
    s = setup(case, dropout=0.5)
    y_eval = run(eval_setup)
    np.testing.assert_array_equal(run(s), y_eval)  # dropout_rng=None
    fn = lambda rng: run(s, dropout_rng=rng)  # noqa: E731  (eager: its kernels are shared by the cases)
    y7 = fn(jax.random.key(7))
    np.testing.assert_array_equal(fn(jax.random.key(7)), y7)
    assert_changes(y7, y_eval, "dropout vs eval", at_least=1e-3)
    assert_changes(fn(jax.random.key(8)), y7, "dropout rng 8 vs 7", at_least=1e-3)


def check_checkpoint(case: Case, directory):
    """7. An orbax round trip of the adapter tree (``lowrank_jax.checkpoint``) restores identical leaves and outputs."""
    s = setup(case)
    mngr = checkpoint.manager(directory)
    assert checkpoint.save(mngr, 3, s.lp, config=s.adapter.config)
    step, restored, _, config = checkpoint.restore(mngr, checkpoint.abstract(s.lp))
    mngr.close()
    assert step == 3
    assert_equal(restored, s.lp)
    assert config == s.adapter.config
    np.testing.assert_array_equal(run(s, restored), run(s))


#: check name -> function; ``devices`` runs in ``harness_devices.py`` (one process for all cases).
CHECKS = {
    "jit": check_jit,
    "nnx": check_nnx,
    "scan": check_scan,
    "merge": check_merge,
    "split": check_split,
    "dropout": check_dropout,
    "checkpoint": check_checkpoint,
}


# ----------------------------------------------------------------------------- devices (run by harness_devices.py)


def _loss_and_grads(s: Setup):
    def fn(trainable, frozen, params, x):
        return jax.value_and_grad(lambda t: loss(s, lrj.join(s.adapter, t, frozen), params, x))(trainable)

    return jax.jit(fn)


@functools.cache
def one_device(case: Case):
    """The jitted loss and trainable gradients on one device (computed once per case)."""
    s = setup(case)
    return _loss_and_grads(s)(*lrj.split(s.adapter, s.lp), s.params, s.x)


def device_diffs(case: Case, mesh) -> dict:
    """Max abs differences of the jitted loss and trainable gradients on ``mesh`` vs :func:`one_device`.

    Params get ``case.models.specs``, the adapter ``lrj.adapter_shardings``, the batch ``("data", None)``."""
    s = setup(case)
    loss1, grads1 = one_device(case)
    with jax.set_mesh(mesh):
        put = lambda tree, spec: jax.device_put(tree, jax.tree.map(lambda p: NamedSharding(mesh, p), spec))  # noqa: E731
        params = put(s.params, case.models.specs(s.params))
        lp = jax.device_put(s.lp, lrj.adapter_shardings(params, s.lp, adapter=s.adapter))
        loss8, grads8 = _loss_and_grads(s)(*lrj.split(s.adapter, lp), params, put(s.x, P("data", None)))
        lp_specs = jax.tree.map(lambda a: str(a.sharding.spec), lp)
    return {"loss": abs(float(loss1) - float(loss8)), "grads": max_diff(grads1, grads8), "lp_specs": lp_specs,
            "devices": len(mesh.devices.flat)}
