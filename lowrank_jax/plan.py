"""``plan``: per-device memory and FLOPs of a sharded LLaMA train step, measured by XLA, nothing allocated.

Usage::

    python -m lowrank_jax.plan --model llama2-7b --method qlora --devices 8 --mesh fsdp=8 --seq-len 4096 --json
    python -m lowrank_jax.plan --model smollm2 --method lora --devices 1 --mesh fsdp=1 --remat nested

The real train step (:func:`lowrank_jax.make_train_step` with the method's adapter and
optimizer, the loss next-token cross-entropy of :func:`lowrank_jax.linen.apply` on a
:class:`~lowrank_jax.models.llama.LlamaForCausalLM` with scanned blocks) is jitted with
the shardings of :mod:`lowrank_jax.models.llama_sharding`, lowered from
``jax.ShapeDtypeStruct``s (params from ``jax.eval_shape`` of ``model.init``, the adapter's
from ``jax.eval_shape`` of ``adapter.init``, the optimizer state's likewise) and compiled
for ``--devices`` fake CPU devices. ``main`` re-executes itself in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` when the process has fewer devices
(the flag must be set before jax starts its backend).

What the figures are: XLA's ``memory_analysis()`` of the compiled SPMD program, per device:
``argument`` (params, adapter, optimizer state, batch: the inputs' shards), ``output``,
``temp`` (activations kept for the backward pass, gradients, collectives' buffers), and
``sum = argument + output + temp - alias``, the peak estimate used in the tables (``peak`` is
XLA's ``peak_memory_in_bytes``, which on XLA:CPU equals the argument bytes: it leaves temp
out). They leave out allocator fragmentation, the runtime's own buffers and the input
pipeline; they are XLA:CPU's fusion and scheduling (attention is materialised, ``[B, N, T, T]``
per block, no flash attention; ``offload`` keeps its residuals in the same memory on CPU), so
treat them as estimates of a GPU/TPU run, not its measurement. FLOPs: XLA's
``cost_analysis()`` counts a scan (while-loop) body once, so ``flops_scanned`` counts one
block; ``flops_per_device`` counts every block, from the same step lowered for unscanned 1- and
2-block twins, ``f(L) = f(1) + (L - 1) (f(2) - f(1))`` (``--no-flops`` skips them).

Methods (``--rank`` default 16 for the LoRA family, 128 for GaLore; targets every linear
layer of the blocks, the QLoRA paper's setting; base weights in bfloat16):

* ``lora``: ``lrj.lora`` + AdamW on the adapter;
* ``qlora``: the block kernels NF4 with double quantisation (block 64), ``lrj.lora`` on them;
* ``dora``: ``lrj.dora`` + AdamW;
* ``galore``: every parameter trained, ``lrj.optim.galore`` (moments in the rank-r subspace
  for the block kernels, AdamW for embeddings and norms);
* ``full``: every parameter trained with AdamW (bfloat16 moments: pure bf16 training, no
  float32 master copy).

Remat (``--remat``, :data:`REMAT`): ``none``; ``full`` (each block recomputed in the backward
pass, only block inputs saved); ``dots`` (saves matmul outputs without batch dims,
``dots_with_no_batch_dims_saveable``); ``offload`` (those saved dots offloaded to host
memory, ``offload_dot_with_no_batch_dims("device", "pinned_host")``: they appear as host
bytes); ``nested`` (a two-level scan of ``sqrt(L)`` groups, each rematerialised:
:attr:`LlamaForCausalLM.remat_groups`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lowrank_jax.run_config import REMAT, remat_groups  # re-exported: the presets are also finetune's --remat

__all__ = ["MODELS", "METHODS", "REMAT", "Setup", "main", "model_config", "plan", "setup"]

_CHILD_ENV = "LOWRANK_JAX_PLAN_CHILD"

#: Architectures by name (Hugging Face configs of meta-llama/Llama-2-*-hf and SmolLM2-135M).
MODELS = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0,
                      max_position_embeddings=4096, tie_word_embeddings=False),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "smollm2": {},  # LlamaConfig's defaults: SmolLM2-135M
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256),
}

METHODS = ("lora", "qlora", "dora", "galore", "full")

BLOCK_KERNELS = r".*/(self_attn|mlp)/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel"


def model_config(name: str, *, remat: str = "full", dtype=jnp.bfloat16, **changes):
    """``(LlamaConfig, remat_groups)`` of a named model with scanned blocks and a ``--remat`` preset."""
    from lowrank_jax.models.llama import LlamaConfig

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if remat not in REMAT:
        raise ValueError(f"unknown remat {remat!r}; choose from {sorted(REMAT)}")
    remat_changes, _ = REMAT[remat]
    config = LlamaConfig(**{**MODELS[name], "scan_layers": True, "dtype": dtype, "param_dtype": dtype,
                            **remat_changes, **changes})
    return config, remat_groups(remat, config.num_hidden_layers)


class Setup(NamedTuple):
    """A method's jittable step and its inputs: ``step(trainable, opt_state, frozen, batch, rng)``."""

    step: Any
    trainable: Any
    opt_state: Any
    frozen: Any
    adapter: Any
    optimizer: Any


def _loss_fn(model, adapter):
    from lowrank_jax import linen
    from lowrank_jax.finetune import cross_entropy
    from lowrank_jax.models.llama_sharding import auto_axes

    if adapter is None:  # full-parameter methods: the trainable tree is the params
        def forward(params, _frozen, ids):
            return model.apply({"params": params}, ids)
    else:
        def forward(lp, variables, ids):
            return linen.apply(model, adapter, variables, lp, ids)

    def loss(trainable, frozen, batch, rng):
        return cross_entropy(forward(trainable, frozen, batch[:, :-1]), batch[:, 1:])

    return auto_axes(loss)


def setup(method: str, model, params, *, rank: int | None = None, learning_rate: float = 1e-4,
          abstract: bool = False, key=None) -> Setup:
    """The train step of ``method`` on ``model`` with base ``params`` (arrays, or shapes with ``abstract``).

    With ``abstract=True`` every tree is built by ``jax.eval_shape`` (nothing allocated).
    """
    from lowrank_jax import linen, quant
    from lowrank_jax import optim
    from lowrank_jax.adapters import base
    from lowrank_jax.adapters.dora import dora
    from lowrank_jax.adapters.lora import lora
    from lowrank_jax.training import make_train_step
    from lowrank_jax.tree import Layout

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    key = jax.random.key(0) if key is None else key
    run = (lambda f, *a: jax.eval_shape(f, *a)) if abstract else (lambda f, *a: f(*a))
    ids = jnp.zeros((1, 8), jnp.int32)
    adapter = None
    if method in ("lora", "qlora", "dora"):
        layouts = linen.kernel_layouts(model.clone(activation_sharding=None), ids)
        make = dora if method == "dora" else lora
        r = 16 if rank is None else rank
        adapter = make(rank=r, alpha=2.0 * r, targets=BLOCK_KERNELS, layouts=layouts)
        variables = {"params": params}
        if method == "qlora":
            variables = run(lambda v: quant.quantize_params(
                v, BLOCK_KERNELS, stack_axes=lambda path, leaf: layouts[path].stack), variables)
        lp = run(adapter.init, key, variables)
        optimizer = optax.adamw(learning_rate, weight_decay=0.0)
        trainable, frozen = lp, variables
    else:
        if method == "galore":
            optimizer = optim.galore(learning_rate, rank=128 if rank is None else rank, update_proj_gap=200,
                                     scale=0.25, targets=BLOCK_KERNELS,
                                     dimension_numbers=Layout(1, 1) if "layers" in params else None)
        else:
            optimizer = optax.adamw(learning_rate, weight_decay=0.0)
        trainable, frozen = params, {}
    state = run(optimizer.init, base.split(adapter, trainable)[0] if adapter is not None else trainable)
    step = make_train_step(_loss_fn(model, adapter), optimizer, adapter=adapter)
    return Setup(step, trainable, state, frozen, adapter, optimizer)


def shard(s: Setup, mesh, config, batch, rules=None, *, state_init=None):
    """``(in_shardings, abstract inputs)`` of ``s.step`` on ``mesh`` (inputs as ShapeDtypeStructs).

    ``state_init(trainable) -> opt_state`` gives the state's shardings when ``s.opt_state`` is more
    than ``s.optimizer.init`` of the trainable leaves (the main job's post-step state).
    """
    from lowrank_jax.models import llama_sharding as ls
    from lowrank_jax.sharding import adapter_shardings

    rules = ls.DEFAULT_RULES if rules is None else rules
    if s.adapter is not None:
        frozen_sh = ls.param_shardings(s.frozen, mesh, rules, config=config)
        frozen = ls.abstract(s.frozen, frozen_sh)
        # the adapter inherits from the dense kernel a quantised node stands for ([*stack, in, out])
        dense_sh = ls.param_shardings(s.frozen, mesh, rules, config=config, dense=True)
        trainable_sh = adapter_shardings(frozen, s.trainable, dense_sh, adapter=s.adapter)
        from lowrank_jax.adapters import base
        state_of = lambda t: s.optimizer.init(base.split(s.adapter, t)[0])  # noqa: E731
    else:
        trainable_sh = ls.param_shardings(s.trainable, mesh, rules, config=config)
        frozen_sh, frozen = {}, {}
        state_of = s.optimizer.init
    trainable = ls.abstract(s.trainable, trainable_sh)
    state_sh = ls.state_shardings(state_of if state_init is None else state_init, trainable, mesh)
    state = ls.abstract(s.opt_state, state_sh)
    ls.divisible_batch(batch.shape[0], mesh, rules)
    batch_sh = NamedSharding(mesh, ls.batch_spec(mesh, rules, batch.ndim))
    return (trainable_sh, state_sh, frozen_sh, batch_sh), (trainable, state, frozen,
                                                           jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=batch_sh))


def _memory(compiled) -> dict:
    """Per-device bytes: :func:`lowrank_jax.finetune.memory_summary`'s fields, XLA's own peak and host temp."""
    from lowrank_jax.finetune import memory_summary

    summary, mem = memory_summary(compiled), compiled.memory_analysis()
    out = {name: summary[f"{name}_size_in_bytes"] for name in ("argument", "output", "temp", "alias")}
    out["sum"] = summary["peak_estimate_bytes"]  # argument + output + temp - alias
    out["peak"] = int(getattr(mem, "peak_memory_in_bytes", 0))
    out["host_temp"] = int(getattr(mem, "host_temp_size_in_bytes", 0))
    return out


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float((cost or {}).get("flops", float("nan")))


def _compile(method, config, groups, mesh, batch_size, seq_len, rank, rules=None):
    from lowrank_jax.models import llama_sharding as ls
    from lowrank_jax.models.llama import LlamaForCausalLM

    rules = ls.DEFAULT_RULES if rules is None else rules
    model = LlamaForCausalLM(config, activation_sharding=ls.batch_spec(mesh, rules, 3), remat_groups=groups)
    with jax.set_mesh(mesh):
        init_model = model.clone(activation_sharding=None)
        params = jax.eval_shape(lambda: init_model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        s = setup(method, model, params, rank=rank, abstract=True)
        batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
        shardings, args = shard(s, mesh, config, batch, rules)
        rng = jax.eval_shape(lambda: jax.random.key(0))
        jitted = jax.jit(s.step, in_shardings=(*shardings, None),
                         out_shardings=(shardings[0], shardings[1], None), donate_argnums=(0, 1))
        return jitted.lower(*args, rng).compile(), s


def plan(model: str, method: str, mesh_shape: dict[str, int] | str, *, seq_len: int = 4096, batch: int | None = None,
         remat: str = "full", rank: int | None = None, flops: bool = True,
         axis_type: AxisType = AxisType.Explicit) -> dict:
    """Compiles ``method``'s train step for ``model`` on a mesh of the available devices; returns the figures.

    Raises:
      ValueError: unknown model/method/remat, a mesh whose size differs from the device count, a
        mesh axis that does not divide a dimension (heads, batch...).
    """
    from lowrank_jax.models import llama_sharding as ls

    mesh = ls.make_mesh(mesh_shape, axis_type=axis_type)
    config, groups = model_config(model, remat=remat)
    if batch is None:
        batch = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape)
    t0 = time.perf_counter()
    compiled, s = _compile(method, config, groups, mesh, batch, seq_len, rank)
    compile_s = time.perf_counter() - t0
    report = {
        "model": model, "method": method, "devices": jax.device_count(), "mesh": dict(mesh.shape),
        "seq_len": seq_len, "batch": batch, "remat": remat, "remat_groups": groups,
        "rank": rank if rank is not None else (128 if method == "galore" else None if method == "full" else 16),
        "trainable_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(
            s.trainable if s.adapter is None else __import__("lowrank_jax").split(s.adapter, s.trainable)[0]))),
        "bytes_per_device": _memory(compiled), "flops_scanned": _flops(compiled), "compile_s": round(compile_s, 1),
    }
    if flops:  # unscanned 1- and 2-block twins on the same mesh: every block counted
        twins = []
        for n in (1, 2):
            cfg_n = config.replace(scan_layers=False, num_hidden_layers=n)
            twins.append(_flops(_compile(method, cfg_n, 1, mesh, batch, seq_len, rank)[0]))
        report["flops_per_device"] = twins[0] + (config.num_hidden_layers - 1) * (twins[1] - twins[0])
        report["flops_note"] = ("cost_analysis counts a scan body once: flops_per_device = f(1) + (L - 1)(f(2) - f(1)) "
                                "from unscanned 1- and 2-block twins; flops_scanned is the scanned program's own count")
    return report


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv=None) -> int:
    """``python -m lowrank_jax.plan ...``; prints the report (``--json``: one JSON line). Returns the exit code."""
    parser = argparse.ArgumentParser(prog="lowrank-jax plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--mesh", default=None, help="e.g. fsdp=16,tensor=4 (default fsdp=DEVICES)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the batch axes' size)")
    parser.add_argument("--remat", default="full", choices=sorted(REMAT))
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--auto", action="store_true", help="an Auto mesh instead of Explicit")
    parser.add_argument("--no-flops", action="store_true", help="skip the unscanned twins (FLOPs of every block)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    mesh_text = args.mesh or f"fsdp={args.devices}"
    try:
        from lowrank_jax.models.llama_sharding import parse_mesh
        shape = parse_mesh(mesh_text)
        if math.prod(shape.values()) != args.devices:
            raise ValueError(f"mesh {mesh_text} has {math.prod(shape.values())} devices but --devices is {args.devices}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.device_count() != args.devices and not os.environ.get(_CHILD_ENV):
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
        env = {**os.environ, _CHILD_ENV: "1", "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()}
        argv = list(sys.argv[1:] if argv is None else argv)
        return subprocess.run([sys.executable, "-m", "lowrank_jax.plan", *argv], env=env).returncode
    try:
        report = plan(args.model, args.method, shape, seq_len=args.seq_len, batch=args.batch, remat=args.remat,
                      rank=args.rank, flops=not args.no_flops,
                      axis_type=AxisType.Auto if args.auto else AxisType.Explicit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        m = report["bytes_per_device"]
        print(f"{args.model} {args.method} on {report['devices']} devices, mesh {mesh_text}, batch {report['batch']} "
              f"x {args.seq_len}, remat {args.remat}: per device peak estimate {_gib(m['sum'])} (argument {_gib(m['argument'])}, "
              f"output {_gib(m['output'])}, temp {_gib(m['temp'])}, alias {_gib(m['alias'])}); "
              f"FLOPs/device {report.get('flops_per_device', report['flops_scanned']):.3e}; compiled in "
              f"{report['compile_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
