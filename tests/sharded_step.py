"""Runs a LoRA train step on an 8-device mesh and on one device; prints JSON with the differences.

Usage: ``python tests/sharded_step.py explicit|auto``. Run in its own process
(``tests/test_sharding.py`` does): the device count must be set before jax is imported.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lowrank_jax as lrj  # noqa: E402

D, H = 16, 32


def is_explicit():
    mesh = jax.sharding.get_abstract_mesh()
    return bool(mesh.axis_names) and AxisType.Explicit in tuple(mesh.axis_types)


class LinenMLP(nn.Module):
    """Column-parallel up-projection, then (all-gathered) column-parallel down-projection."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(H, name="up")(x))
        if is_explicit():
            h = jax.sharding.reshard(h, P("data", None))
        return nn.Dense(D, name="down")(h)


class NNXMLP(nnx.Module):
    """Column-parallel up, row-parallel down (a contraction over a sharded axis)."""

    def __init__(self, rngs):
        self.up = nnx.Linear(D, H, rngs=rngs)
        self.down = nnx.Linear(H, D, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.up(x))
        kwargs = {"out_sharding": P("data", None)} if is_explicit() else {}
        return self.down(h, **kwargs)


LINEN_SPECS = {"params": {"up": {"kernel": P(None, "model"), "bias": P("model")}, "down": {"kernel": P(None, "model"), "bias": P("model")}}}
NNX_SPECS = {"up": {"kernel": P(None, "model"), "bias": P("model")}, "down": {"kernel": P("model", None), "bias": P()}}


def run(framework, mesh):
    x = jax.random.normal(jax.random.key(0), (8, D))
    target = jax.random.normal(jax.random.key(1), (8, D))
    adapter = lrj.lora(rank=4, alpha=8.0, targets=r".*(up|down)/kernel")
    opt = optax.adamw(1e-2)
    if framework == "linen":
        model = LinenMLP()
        params = model.init(jax.random.key(2), x)
        specs = LINEN_SPECS

        def forward(lp, params, xb):
            return lrj.linen.apply(model, adapter, params, lp, xb)
    else:
        model = NNXMLP(nnx.Rngs(2))
        params = lrj.nnx.params(model)
        specs = NNX_SPECS
        graphdef, _ = nnx.split(model)

        def forward(lp, params, xb):
            return lrj.nnx.apply(nnx.merge(graphdef, params, copy=True), adapter, lp, xb)

    lp = adapter.init(jax.random.key(3), params)
    lp = jax.tree.map(lambda v: v + 0.1, lp)  # b != 0 so both factors get gradients

    def loss_fn(lp, params, batch, rng):
        xb, yb = batch
        return jnp.mean((forward(lp, params, xb) - yb) ** 2)

    step = lrj.make_train_step(loss_fn, opt, adapter=adapter, penalty=1e-3)
    if mesh is None:
        state = opt.init(lp)
        out = jax.jit(step)(lp, state, params, (x, target), None)
        for _ in range(2):
            out = jax.jit(step)(out[0], out[1], params, (x, target), None)
        return out, None

    with jax.set_mesh(mesh):
        put = lambda tree, spec_tree: jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, spec_tree)  # noqa: E731
        if framework == "nnx":
            params = nnx.State(put(params.to_pure_dict(), specs))
        else:
            params = put(params, specs)
        lp_shardings = lrj.adapter_shardings(params, lp)
        lp = jax.device_put(lp, lp_shardings)
        state = jax.jit(opt.init)(lp)
        state_shardings = jax.tree.map(lambda a: a.sharding, state)
        batch = jax.device_put((x, target), NamedSharding(mesh, P("data", None)))
        params_shardings = jax.tree.map(lambda a: a.sharding, params)
        batch_shardings = jax.tree.map(lambda a: a.sharding, batch)
        jitted = jax.jit(step, in_shardings=(lp_shardings, state_shardings, params_shardings, batch_shardings, None),
                         out_shardings=(lp_shardings, state_shardings, None))
        out = jitted(lp, state, params, batch, None)
        for _ in range(2):
            out = jitted(out[0], out[1], params, batch, None)
        specs_after = {
            "lp": jax.tree.map(lambda a: str(a.sharding.spec), out[0]),
            "lp_in": jax.tree.map(lambda s: str(s.spec), lp_shardings),
            "state_stable": all(a.sharding == s for a, s in zip(jax.tree.leaves(out[1]), jax.tree.leaves(state_shardings))),
        }
        return out, specs_after


def main():
    kind = sys.argv[1]
    axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind]
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))
    report = {"devices": jax.device_count()}
    for framework in ("linen", "nnx"):
        (lp1, st1, m1), _ = run(framework, None)
        (lp8, st8, m8), specs = run(framework, mesh)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(lp1), jax.tree.leaves(lp8)))
        state_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(st1), jax.tree.leaves(st8)))
        report[framework] = {
            "adapter_max_abs_diff": diff,
            "opt_state_max_abs_diff": state_diff,
            "loss_1": float(m1["loss"]),
            "loss_8": float(m8["loss"]),
            **specs,
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
