"""Remat policies on SmolLM2-135M shapes: XLA's temp memory and the measured step time of each (issue 15).

Run from the repository root::

    python benchmarks/bench_plan.py                  # batch 2 x 512, 1 warm-up + 3 timed steps per policy
    python benchmarks/bench_plan.py --batch 1 --seq 256 --runs 2

The step is :func:`lowrank_jax.plan.setup`'s LoRA step (r=16 on every block kernel, AdamW) on the
SmolLM2-135M architecture (random init, bfloat16 weights, 30 scanned blocks), one CPU device, for each
``--remat`` preset of :data:`lowrank_jax.plan.REMAT` (none, full, dots, offload, nested). Memory from
``memory_analysis()`` of the compiled step (host bytes: the offloaded residuals), time the median
of ``runs`` steps after a warm-up step. Writes ``benchmarks/results/remat.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lowrank_jax import plan
from lowrank_jax.models.llama import LlamaForCausalLM

RESULTS = Path(__file__).resolve().parent / "results" / "remat.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import markdown_table, write_json  # benchmarks/_report.py

    ids = jax.random.randint(jax.random.key(2), (args.batch, args.seq + 1), 0, 49152, jnp.int32)
    rows = []
    for name in plan.REMAT:
        config, groups = plan.model_config("smollm2", remat=name)
        model = LlamaForCausalLM(config, remat_groups=groups)
        params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        s = plan.setup("lora", model, params)
        compiled = jax.jit(s.step, donate_argnums=(0, 1)).lower(s.trainable, s.opt_state, s.frozen, ids, None).compile()
        mem = plan._memory(compiled)
        state = (s.trainable, s.opt_state)
        times = []
        for i in range(1 + args.runs):
            t0 = time.perf_counter()
            lp, st, metrics = jax.block_until_ready(compiled(*state, s.frozen, ids, None))
            if i:
                times.append(time.perf_counter() - t0)
            state = (lp, st)
        rows.append({"remat": name, "remat_groups": groups, "temp_bytes": mem["temp"], "host_temp_bytes": mem["host_temp"],
                     "argument_bytes": mem["argument"], "step_s": statistics.median(times), "loss": float(metrics["loss"])})
        print(f"  {name}: temp {mem['temp'] / 2**20:.0f} MiB, step {rows[-1]['step_s']:.2f} s", file=sys.stderr, flush=True)
    base = rows[0]
    table = [[r["remat"], str(r["remat_groups"]), f"{r['temp_bytes'] / 2**20:.0f}", f"{r['host_temp_bytes'] / 2**20:.0f}",
              f"{r['temp_bytes'] / base['temp_bytes']:.2f}", f"{r['step_s']:.2f}", f"{r['step_s'] / base['step_s']:.2f}"]
             for r in rows]
    print(markdown_table(["remat", "groups", "temp MiB", "host MiB", "temp / none", "step s", "time / none"], table))
    write_json(RESULTS, {"batch": args.batch, "seq": args.seq, "runs": args.runs, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
