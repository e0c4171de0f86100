"""The main job for several methods in one run: SmolLM2-135M, the same data, steps and seed for each.

For each ``--methods`` entry :func:`lowrank_jax.finetune.finetune` runs with its defaults (as
``lowrank-jax finetune --method M --steps N``), and the table gives trainable parameters, the XLA
memory analysis of the compiled train step (temp bytes) and the median step time, each as a ratio
to the first method (LoRA by default), and held-out perplexity before and after.

    python benchmarks/bench_finetune.py --methods lora,lamda,lamda++,aflora,lisa --steps 30

Writes ``benchmarks/results/finetune_<steps>.json``; runs go to a temporary directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from _report import markdown_table, write_json  # noqa: E402

from lowrank_jax import finetune as ft  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,lamda,lamda++,aflora,lisa")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    for method in methods:
        ft.FinetuneConfig(method=method, steps=args.steps).validate()  # every name checked before any run
    loaded = {}  # by the model layout the method loads (LaMDA++: unstacked layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            cfg = ft.FinetuneConfig(method=method, steps=args.steps, output_dir=f"{tmp}/{method}", progress=False)
            cfg.validate()
            key = method == "lamda++"
            if key not in loaded:
                loaded[key] = ft.load_model(cfg)
            summary = ft.finetune(cfg, loaded=loaded[key])
            rows.append({k: summary[k] for k in ("method", "rank", "trainable_params", "all_params", "perplexity_before",
                                                 "perplexity_after", "loss_first", "loss_last", "step_time_median_s",
                                                 "xla_memory")})
            print(f"{method}: perplexity {summary['perplexity_before']:.2f} -> {summary['perplexity_after']:.2f}", flush=True)
    base = rows[0]
    lines = [[r["method"], str(r["rank"]), f"{r['trainable_params']:,}",
              f"{base['trainable_params'] / r['trainable_params']:.2f}",
              f"{r['xla_memory']['temp_size_in_bytes'] / base['xla_memory']['temp_size_in_bytes']:.3f}",
              f"{r['step_time_median_s'] / base['step_time_median_s']:.2f}",
              f"{r['perplexity_before']:.2f}", f"{r['perplexity_after']:.2f}"] for r in rows]
    print(markdown_table(["method", "r", "trainable", f"{base['method']} / method", "step temp x", "step time x",
                          "ppl before", f"after {args.steps} steps"], lines))
    out = args.out or Path(__file__).parent / "results" / f"finetune_{args.steps}.json"
    write_json(out, {"steps": args.steps, "rows": rows, "jax": jax.__version__, "backend": jax.default_backend()})


if __name__ == "__main__":
    main()
