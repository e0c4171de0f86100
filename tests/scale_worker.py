"""Subprocess entry points for tests/test_scale.py (the device count must be set before jax is imported).

Usage:
  ``python tests/scale_worker.py devices explicit|auto [lora,qlora,galore]`` -- LoRA, QLoRA and GaLore steps on a tiny LLaMA, an
  ``fsdp=4,tensor=2`` mesh of 8 simulated devices against one device; prints one JSON line.
  ``python tests/scale_worker.py dist COORDINATOR NUM_PROCESSES PROCESS_ID`` -- LoRA steps under
  ``jax.distributed`` (one CPU device per process, mesh ``data=N``), each process feeding its rows.
  ``python tests/scale_worker.py single`` -- the same LoRA steps on one device, one process.
"""

import json
import os
import sys

if len(sys.argv) > 1 and sys.argv[1] == "devices":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402

STEPS = 3
GLOBAL_BATCH, SEQ = 4, 16


def tiny(scan=True):
    from lowrank_jax.models.llama import LlamaConfig

    return LlamaConfig.tiny(scan_layers=scan)


def batch_ids(config):
    return np.asarray(jax.random.randint(jax.random.key(7), (GLOBAL_BATCH, SEQ + 1), 0, config.vocab_size, jnp.int32))


def make_setup(method, model, params):
    from lowrank_jax import plan

    s = plan.setup(method, model, params, rank=4, learning_rate=1e-3)
    if s.adapter is not None:  # b = 0 would leave `a` without gradient
        s = s._replace(trainable=jax.tree.map(lambda x: x + 0.05, s.trainable))
        s = s._replace(opt_state=s.optimizer.init(s.trainable))
    return s


def run_steps(step, trainable, state, frozen, batch):
    losses = []
    for _ in range(STEPS):
        trainable, state, metrics = step(trainable, state, frozen, batch, None)
        losses.append(float(metrics["loss"]))
    return trainable, state, losses


def max_diff(a, b):
    """The largest ``max|x - y| / max(max|x|, 1e-6)`` over the leaves (a relative difference per leaf)."""
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))
                     / max(float(np.max(np.abs(np.asarray(x, np.float32)))), 1e-6))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if np.size(x))


def spec_str(tree):
    return jax.tree.map(lambda a: str(a.sharding.spec), tree)


def devices(kind, methods=("lora", "qlora", "galore")):
    from lowrank_jax import plan
    from lowrank_jax.models import llama_sharding as ls
    from lowrank_jax.models.llama import LlamaForCausalLM

    config = tiny()
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    ids = batch_ids(config)
    axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[kind]
    mesh = ls.make_mesh({"fsdp": 4, "tensor": 2}, axis_type=axis_type)
    report = {"devices": jax.device_count()}
    for method in methods:
        s1 = make_setup(method, model, params)
        t1, st1, losses1 = run_steps(jax.jit(s1.step), s1.trainable, s1.opt_state, s1.frozen, ids)
        sharded_model = LlamaForCausalLM(config, activation_sharding=ls.batch_spec(mesh, ls.DEFAULT_RULES, 3))
        with jax.set_mesh(mesh):
            s8 = make_setup(method, sharded_model, params)
            shardings, _ = plan.shard(s8, mesh, config, jax.ShapeDtypeStruct(ids.shape, ids.dtype))
            tr_sh, st_sh, fr_sh, b_sh = shardings
            trainable = jax.device_put(s8.trainable, tr_sh)
            state = jax.device_put(s8.opt_state, st_sh)
            frozen = jax.device_put(s8.frozen, fr_sh)
            batch = jax.device_put(ids, b_sh)
            step = jax.jit(s8.step, in_shardings=(tr_sh, st_sh, fr_sh, b_sh, None),
                           out_shardings=(tr_sh, st_sh, None))
            t8, st8, losses8 = run_steps(step, trainable, state, frozen, batch)
            row = {"losses_1": losses1, "losses_8": losses8, "trainable_rel_diff": max_diff(t1, t8),
                   "state_rel_diff": max_diff(st1, st8),
                   "trainable_specs_stable": spec_str(t8) == jax.tree.map(lambda s: str(s.spec), tr_sh),
                   "state_specs_stable": spec_str(st8) == jax.tree.map(lambda s: str(s.spec), st_sh)}
            if method in ("lora", "qlora"):  # the first step's gradients, before Adam rescales them
                loss1, loss8 = plan._loss_fn(model, s1.adapter), plan._loss_fn(sharded_model, s8.adapter)
                g8 = jax.jit(jax.grad(loss8), in_shardings=(tr_sh, fr_sh, b_sh, None))(
                    jax.device_put(s8.trainable, tr_sh), frozen, batch, None)
                row["grad_rel_diff"] = max_diff(jax.jit(jax.grad(loss1))(s1.trainable, s1.frozen, ids, None), g8)
                layers = t8["params"]["layers"]
                row["specs"] = {name: spec_str(layers[group][name]["kernel"])
                                for group, name in (("self_attn", "q_proj"), ("self_attn", "o_proj"),
                                                    ("mlp", "down_proj"))}
                mu = st8[0].mu["params"]["layers"]["mlp"]["down_proj"]["kernel"]
                row["mu_down_b"] = str(mu["b"].sharding.spec)
            if method == "qlora":
                q = frozen["params"]["layers"]["mlp"]["down_proj"]["kernel"]
                row["packed_spec"] = str(q.packed.sharding.spec)
            if method == "galore":
                inner = st8[0].inner_state
                row["galore_mu_q"] = str(inner.mu["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec)
                row["embed_spec"] = str(t8["embed_tokens"]["embedding"].sharding.spec)
            report[method] = row
    print(json.dumps(report))


def lora_losses(mesh=None, process_rows=None):
    """LoRA steps on the tiny LLaMA; with ``mesh`` the batch is sharded over ``data`` and each
    process passes only ``process_rows`` of it."""
    from lowrank_jax import distributed
    from lowrank_jax.models import llama_sharding as ls
    from lowrank_jax.models.llama import LlamaForCausalLM

    config = tiny()
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    ids = batch_ids(config)
    s = make_setup("lora", model, params)
    if mesh is None:
        return run_steps(jax.jit(s.step), s.trainable, s.opt_state, s.frozen, ids)[2]
    from lowrank_jax import plan

    with jax.set_mesh(mesh):
        shardings, _ = plan.shard(s, mesh, config, jax.ShapeDtypeStruct(ids.shape, ids.dtype))
        tr_sh, st_sh, fr_sh, b_sh = shardings
        put = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda x, s_: jax.make_array_from_callback(x.shape, s_, lambda idx: np.asarray(x)[idx]), tree, sh)
        batch = distributed.global_batch(ids[process_rows], b_sh, GLOBAL_BATCH)
        step = jax.jit(s.step, in_shardings=(tr_sh, st_sh, fr_sh, b_sh, None), out_shardings=(tr_sh, st_sh, None))
        return run_steps(step, put(s.trainable, tr_sh), put(s.opt_state, st_sh), put(s.frozen, fr_sh), batch)[2]


def dist(coordinator, num_processes, process_id):
    from lowrank_jax import distributed
    from lowrank_jax.models import llama_sharding as ls

    distributed.initialize(coordinator, int(num_processes), int(process_id), timeout_s=20)
    mesh = ls.make_mesh({"data": jax.process_count()})
    rows = distributed.process_rows(GLOBAL_BATCH)
    losses = lora_losses(mesh, rows)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                      "rows": [rows.start, rows.stop], "losses": losses}), flush=True)
    jax.distributed.shutdown()


def main():
    mode = sys.argv[1]
    if mode == "devices":
        devices(sys.argv[2], *([sys.argv[3].split(",")] if len(sys.argv) > 3 else []))
    elif mode == "dist":
        dist(*sys.argv[2:5])
    elif mode == "single":
        print(json.dumps({"devices": jax.device_count(), "losses": lora_losses()}))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
