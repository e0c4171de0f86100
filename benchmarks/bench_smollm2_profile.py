"""Where the SmolLM2 LoRA step's time goes: the main job's step under variants, in one process, round-robin.

Run from the repository root::

    python benchmarks/bench_smollm2_profile.py                       # the default variants
    python benchmarks/bench_smollm2_profile.py --config lora-qv --variants plain,fused,fused-unroll30

A variant is ``LOSS[-unrollN][-rematNAME]``: LOSS ``plain`` (the model's ``[B, T, V]`` logits, then
``finetune.cross_entropy``) or ``fused`` (``lowrank_jax.losses``, the chunked head loss; the main job's
default); ``unrollN``: ``LlamaConfig.scan_unroll = N`` (30 unrolls the scan over the 30 blocks);
``rematNAME``: a ``--remat`` preset. Each is compiled (compile seconds, XLA ``cost_analysis`` FLOPs,
``memory_analysis`` temp bytes), then all are timed round-robin, ``--rounds`` rounds of ``--steps``
steps, so load on the machine hits every variant alike. Reported: each variant's median and its
ratio to the first variant's median (per round, then the median of those). Workload as
bench_smollm2.py (4 x 128 Shakespeare tokens, r = 8, alpha 16, dropout 0). Writes
``benchmarks/results/smollm2_profile.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "smollm2_profile.json"


def parse_variant(name: str) -> dict:
    parts = name.split("-")
    out = {"loss": parts[0], "unroll": 1, "remat": None}
    if out["loss"] not in ("plain", "fused"):
        raise SystemExit(f"variant {name!r}: the loss must be plain or fused")
    for part in parts[1:]:
        if part.startswith("unroll"):
            out["unroll"] = int(part[len("unroll"):])
        elif part.startswith("remat"):
            out["remat"] = part[len("remat"):]
        else:
            raise SystemExit(f"variant {name!r}: unknown part {part!r}")
    return out


def build(config: str, variant: dict, lconfig, params, batch):
    """``(step, info)``: the main job's jitted train step (as bench_smollm2's ``our_step``) for a variant."""
    from bench_smollm2 import ALPHA, LR, METHOD, RANK

    from lowrank_jax import finetune, training
    from lowrank_jax.models.llama import LlamaForCausalLM

    method, targets = METHOD[config]
    model = LlamaForCausalLM(lconfig.replace(scan_unroll=variant["unroll"]))
    cfg = finetune.FinetuneConfig(method=method, targets=targets, rank=RANK, alpha=ALPHA, dropout=0.0, lr=LR, steps=60,
                                  plain_loss=variant["loss"] == "plain", remat=variant["remat"])
    cfg.validate()
    model = finetune.with_remat(model, cfg.remat)
    recipe = finetune.RECIPES[method](cfg, model, params)
    opt_state = finetune._init_state(recipe)
    step_update = training.make_train_step(recipe.loss_fn, recipe.optimizer, adapter=recipe.adapter)

    def train_step(trainable, opt_state, frozen, batch, t):
        rng = jax.random.fold_in(jax.random.key(cfg.seed), t + 1)
        trainable, opt_state, metrics = step_update(trainable, opt_state, frozen, batch, rng)
        return trainable, opt_state, metrics["loss"]

    t0 = time.perf_counter()
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        recipe.trainable, opt_state, recipe.frozen, batch, np.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    memory = finetune.memory_summary(compiled)
    state = {"trainable": jax.tree.map(jnp.copy, recipe.trainable), "opt": opt_state, "t": 0, "loss0": None}

    def step():
        trainable, opt, loss = compiled(state["trainable"], state["opt"], recipe.frozen, batch, np.int32(state["t"]))
        loss = float(loss)
        if state["loss0"] is None:
            state["loss0"] = loss
        state.update(trainable=trainable, opt=opt, t=state["t"] + 1)

    step()
    return step, {"compile_s": compile_s, "loss0": state["loss0"], "flops": memory["flops_per_step"],
                  "temp_mib": memory["temp_size_in_bytes"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="lora-all")
    parser.add_argument("--variants", default="plain,fused,fused-unroll30")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import os

    from _machine import machine
    from _report import markdown_table, write_json
    from bench_smollm2 import the_batch
    from lowrank_jax.io import gguf

    lconfig, params = gguf.load_smollm2(scan_layers=True)
    batch = jnp.asarray(the_batch(4, 128))
    names = args.variants.split(",")
    steps, infos = [], []
    for name in names:
        print(f"compiling {name} ...", file=sys.stderr, flush=True)
        step, info = build(args.config, parse_variant(name), lconfig, params, batch)
        step()  # a second warm-up step
        steps.append(step)
        infos.append(info)
    times = [[] for _ in names]
    ratios = [[] for _ in names]
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        medians = []
        for i, step in enumerate(steps):
            ts = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                ts.append(time.perf_counter() - t0)
            times[i] += ts
            medians.append(statistics.median(ts))
        for i in range(len(names)):
            ratios[i].append(medians[i] / medians[0])
        loads.append(os.getloadavg()[0])
    rows = []
    for name, info, ts, rs in zip(names, infos, times, ratios):
        rows.append({"variant": name, **info, "median_s": statistics.median(ts), "min_s": min(ts),
                     "ratio_to_first": statistics.median(rs), "times": ts})
    text = markdown_table(
        ["variant", "median s", "min s", f"/ {names[0]}", "compile s", "XLA GFLOP*", "XLA temp MiB", "loss0"],
        [[r["variant"], f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['ratio_to_first']:.3f}",
          f"{r['compile_s']:.1f}", f"{r['flops'] / 1e9:.1f}", f"{r['temp_mib']:.0f}", f"{r['loss0']:.6f}"]
         for r in rows])
    print(text)
    print(f"load average (1 min) over the timing: {loads}")
    write_json(args.out, {"command": "python benchmarks/bench_smollm2_profile.py " + " ".join(sys.argv[1:]),
                          "config": args.config, "machine": machine(), "load_average_1min": loads, "table": text,
                          "rows": rows, "note": "XLA GFLOP: a rolled scan body counts once (one layer of 30)."})


if __name__ == "__main__":
    main()
