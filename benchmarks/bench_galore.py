"""GaLore: optimizer-state memory vs AdamW on SmolLM2-135M, and the SVD refresh cost amortised over the gap.

Run from the repository root::

    python benchmarks/bench_galore.py            # ~3 min on 2 CPU cores
    python benchmarks/bench_galore.py --quick    # fewer timed rounds
    python benchmarks/bench_galore.py --tiny     # a small synthetic LLaMA instead of SmolLM2 (smoke test)
    python benchmarks/bench_galore.py --no-torch # skip timing torch.linalg.svd for comparison

It prints tables and writes ``benchmarks/results/galore.json``.

*Memory.* The parameter shapes come from SmolLM2-135M-Instruct's GGUF file
(``lowrank_jax.io.gguf.load_smollm2()``: 30 blocks, d = 576, tied 49152 x 576
embedding, float32). Optimizer states are measured with
``jax.eval_shape(optimizer.init, params)`` (no arrays allocated) and summed over
leaves: AdamW (``optax.adamw``: m and v of every parameter) against
``lrj.optim.galore`` at rank 128 (moments of the projected gradients plus the
projector, 1-D norms with full moments), for two target sets -- every 2-D
matrix including the tied embedding, and galore-torch's recipe (the attention and
MLP linears only, embedding and norms with plain AdamW) -- and with 8-bit moments.

*Time.* One SmolLM2 block's seven matrices (q, k, v, o: 576 x {576, 192}; gate, up,
down: 576 x 1536), random gradients, rank 128. The same compiled GaLore update is
timed with the step counter at a refresh (``count % gap == 0``: an SVD per matrix
under ``lax.cond``) and between refreshes, next to ``optax.adamw``'s update;
variants run round-robin and each ratio is the median over rounds of the ratio
measured in the same round (so load from other processes mostly cancels); the
ratio of the fastest runs is reported too. The amortised
GaLore step over a gap ``T`` is ``(t_refresh + (T - 1) t_normal) / T``.

For context, the seven SVDs alone are timed with ``jnp.linalg.svd`` (jitted) and,
when torch is installed, with ``torch.linalg.svd`` (what galore-torch calls).

*Parity.* If ``tests/fixtures/optim_galore.npz`` is present, the GaLore
trajectories recorded from galore-torch are replayed with ``lrj.optim.galore`` and
with ``optax.contrib.galore`` (same hyper-parameters), and the largest parameter
error is reported in units of the reference's step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank_jax.optim as lo
from _report import write_json  # benchmarks/_report.py
from _machine import machine  # benchmarks/_machine.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "galore.json"
FIXTURE = ROOT / "tests" / "fixtures" / "optim_galore.npz"
FIXTURE_INFO = ROOT / "tests" / "fixtures" / "optim_references.json"
ATTN_MLP = r".*/(self_attn|mlp)/.*/kernel"
PAPER_REDUCTION = 0.655  # Zhao et al. 2024: "reduces memory usage by up to 65.5% in optimizer states"


@dataclasses.dataclass(frozen=True)
class Config:
    rank: int = 128
    gap: int = 200
    runs: int = 10
    warmup: int = 2
    tiny: bool = False
    torch: bool = True


QUICK = dict(runs=3, warmup=1)


# ----------------------------------------------------------------------------- shapes

def smollm2_params():
    """SmolLM2-135M's params as ``ShapeDtypeStruct``s (loads and dequantises the GGUF file once)."""
    from lowrank_jax.io import gguf

    config, params = gguf.load_smollm2()
    return config, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def tiny_params(d=32, inter=64, layers=2, vocab=96, kv=16):
    """A small LLaMA-shaped tree with SmolLM2's paths, for the smoke test."""
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    layer = {
        "input_layernorm": {"scale": s(d)}, "post_attention_layernorm": {"scale": s(d)},
        "self_attn": {"q_proj": {"kernel": s(d, d)}, "k_proj": {"kernel": s(d, kv)}, "v_proj": {"kernel": s(d, kv)},
                      "o_proj": {"kernel": s(d, d)}},
        "mlp": {"gate_proj": {"kernel": s(d, inter)}, "up_proj": {"kernel": s(d, inter)},
                "down_proj": {"kernel": s(inter, d)}},
    }
    tree = {"embed_tokens": {"embedding": s(vocab, d)}, "norm": {"scale": s(d)}}
    tree |= {f"layers_{i}": layer for i in range(layers)}
    return {"hidden_size": d, "intermediate_size": inter, "num_hidden_layers": layers, "vocab_size": vocab}, tree


def nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- memory

def memory_rows(params, rank: int) -> list[dict]:
    variants = [
        ("AdamW (optax.adamw)", optax.adamw(1e-3)),
        (f"GaLore r={rank}, every 2-D matrix (incl. tied embedding)", lo.galore(1e-3, rank=rank)),
        (f"GaLore r={rank}, attention + MLP linears (galore-torch recipe)", lo.galore(1e-3, rank=rank, targets=ATTN_MLP)),
        (f"8-bit GaLore r={rank}, every 2-D matrix", lo.galore(1e-3, rank=rank, eight_bit=True)),
        (f"8-bit GaLore r={rank}, attention + MLP linears", lo.galore(1e-3, rank=rank, targets=ATTN_MLP, eight_bit=True)),
    ]
    rows = []
    for name, tx in variants:
        state = jax.eval_shape(tx.init, params)
        rows.append({"variant": name, "state_bytes": nbytes(state)})
    base = rows[0]["state_bytes"]
    for r in rows:
        r["ratio_to_adamw"] = r["state_bytes"] / base
        r["reduction"] = 1.0 - r["ratio_to_adamw"]
    return rows


def per_matrix_rows(params, rank: int) -> list[dict]:
    """State bytes of one matrix of each kind: AdamW vs GaLore (moments + projector)."""
    from lowrank_jax import tree as tree_lib

    seen, rows = {}, []
    for _, path, leaf in tree_lib.flatten_with_paths(params):
        kind = path.split("/")[-2] if path.endswith("kernel") or path.endswith("embedding") else None
        if kind is None or kind in seen or len(leaf.shape) != 2:
            continue
        seen[kind] = True
        one = {"w": leaf}
        adam = nbytes(jax.eval_shape(optax.adamw(1e-3).init, one))
        galore_state = jax.eval_shape(lo.galore(1e-3, rank=rank).init, one)
        rows.append({"matrix": kind, "flax_shape": list(leaf.shape), "adamw_bytes": adam,
                     "galore_bytes": nbytes(galore_state), "reduction": 1.0 - nbytes(galore_state) / adam})
    return rows


# ----------------------------------------------------------------------------- time

def block_matrices(hidden: int, inter: int, kv: int, seed: int = 0) -> dict:
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {k: jax.random.normal(key, s, jnp.float32) for key, (k, s) in zip(keys, shapes.items())}


def time_rows(cfg: Config, hidden: int, inter: int, kv: int) -> tuple[list[dict], dict]:
    params = block_matrices(hidden, inter, kv)
    grads = jax.tree.map(lambda x: x * 0.01 + 0.001, params)
    rank = min(cfg.rank, kv)
    adamw = optax.adamw(1e-3)
    galore = lo.galore(1e-3, rank=cfg.rank, update_proj_gap=cfg.gap)
    galore_rand = lo.galore(1e-3, rank=cfg.rank, update_proj_gap=cfg.gap, svd="randomized")
    fns = {}
    for name, tx in (("adamw", adamw), ("galore", galore), ("galore_rand", galore_rand)):
        fns[name] = (jax.jit(tx.update), tx.init(params))

    def at(state, count):  # the same compiled update, at a refresh (count 0) or between refreshes (count 1)
        first = state[0]._replace(count=jnp.asarray(count, jnp.int32))
        return (first, *state[1:])

    calls = {
        "AdamW (optax.adamw)": lambda: fns["adamw"][0](grads, fns["adamw"][1], params),
        "GaLore, between refreshes": lambda: fns["galore"][0](grads, at(fns["galore"][1], 1), params),
        "GaLore, refresh step (exact SVD)": lambda: fns["galore"][0](grads, at(fns["galore"][1], 0), params),
        "GaLore, refresh step (randomized SVD)": lambda: fns["galore_rand"][0](grads, at(fns["galore_rand"][1], 0),
                                                                                params),
    }
    # context: the SVDs alone, in JAX (what the refresh runs) and, when installed, in torch (what galore-torch
    # runs); torch is timed after the JAX rounds, since its idle OpenMP threads spin and would slow the next call
    mats = [jnp.swapaxes(g, 0, 1) for g in jax.tree.leaves(grads)]
    svds = jax.jit(lambda ms: [jnp.linalg.svd(m, full_matrices=False) for m in ms])
    calls["SVD only: jnp.linalg.svd of the 7 gradients"] = lambda: svds(mats)
    times = {k: [] for k in calls}
    for round_ in range(cfg.warmup + cfg.runs):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            if round_ >= cfg.warmup:
                times[name].append(time.perf_counter() - t0)
    torch_times = []
    try:
        if not cfg.torch:
            raise ImportError("--no-torch")
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
        torch_mats = [torch.tensor(np.asarray(m)) for m in mats]
        for round_ in range(cfg.warmup + cfg.runs):
            t0 = time.perf_counter()
            for m in torch_mats:
                torch.linalg.svd(m, full_matrices=False)
            if round_ >= cfg.warmup:
                torch_times.append(time.perf_counter() - t0)
    except ImportError:
        pass
    base = "AdamW (optax.adamw)"
    normal = "GaLore, between refreshes"
    rows = []
    for name, ts in times.items():
        rows.append({
            "variant": name, "time_s": statistics.median(ts), "times_s": ts,
            "ratio_to_adamw": statistics.median(t / b for t, b in zip(ts, times[base])),
            "ratio_to_galore_normal": statistics.median(t / b for t, b in zip(ts, times[normal])),
            "ratio_to_adamw_min": min(ts) / min(times[base]),
            "ratio_to_galore_normal_min": min(ts) / min(times[normal]),
        })
    if torch_times:  # not interleaved: ratios of medians and of minima only
        rows.append({
            "variant": "SVD only: torch.linalg.svd of the 7 gradients (timed separately)",
            "time_s": statistics.median(torch_times), "times_s": torch_times,
            "ratio_to_adamw": statistics.median(torch_times) / statistics.median(times[base]),
            "ratio_to_galore_normal": statistics.median(torch_times) / statistics.median(times[normal]),
            "ratio_to_adamw_min": min(torch_times) / min(times[base]),
            "ratio_to_galore_normal_min": min(torch_times) / min(times[normal]),
        })
    by = {r["variant"]: r for r in rows}
    amortised = {}
    for svd in ("exact", "randomized"):
        refresh = f"GaLore, refresh step ({svd} SVD)"
        r = by[refresh]["ratio_to_galore_normal"]  # t_refresh / t_normal, median over rounds
        r_min = by[refresh]["ratio_to_galore_normal_min"]  # fastest refresh / fastest normal step
        over_normal = (r + cfg.gap - 1) / cfg.gap
        amortised[svd] = {
            "refresh_over_normal": r,
            "amortised_over_normal": over_normal,
            "amortised_over_adamw": over_normal * by[normal]["ratio_to_adamw"],
            "refresh_over_normal_min": r_min,
            "amortised_over_normal_min": (r_min + cfg.gap - 1) / cfg.gap,
            "gap": cfg.gap,
        }
    info = {"matrices": {k: list(v.shape) for k, v in params.items()}, "rank": cfg.rank, "effective_rank_min": rank,
            "amortised": amortised}
    return rows, info


# ----------------------------------------------------------------------------- parity with galore-torch

def parity() -> dict | None:
    if not FIXTURE.exists() or not FIXTURE_INFO.exists():
        return None
    ref = np.load(FIXTURE, allow_pickle=False)
    info = json.loads(FIXTURE_INFO.read_text())["galore"]
    hp = info["hyper_parameters"]
    flax = lambda x, n: x if n == "bias" else np.swapaxes(x, -1, -2)  # noqa: E731

    def replay(proj_type, tx):
        names = [f"w{i}" for i in range(len(info["shapes"][proj_type]))] + ["bias"]
        params = {n: jnp.asarray(flax(ref[f"{proj_type}/{n}/init"], n)) for n in names}
        state, update, prev, errs, first = tx.init(params), jax.jit(tx.update), None, [], None
        prev = {n: ref[f"{proj_type}/{n}/init"] for n in names}
        for t in range(hp["steps"]):
            g = {n: jnp.asarray(flax(ref[f"{proj_type}/{n}/grads"][t].astype(np.float32), n)) for n in names}
            u, state = update(g, state, params)
            params = optax.apply_updates(params, u)
            err = 0.0
            for n in names:
                want = ref[f"{proj_type}/{n}/after"][t]
                step = want - prev[n]
                if t == 0 and n == "w0":
                    first = float(np.linalg.norm(flax(np.asarray(u[n]), n) - step) / np.linalg.norm(step))
                err = max(err, float(np.max(np.abs(flax(np.asarray(params[n]), n) - want)) / np.max(np.abs(step))))
                prev[n] = want
            errs.append(err)
        return {"max_error_in_steps": max(errs), "per_step": errs, "first_update_rel_fro_w0": first}

    out = {"setup": f"{hp['steps']} steps, rank {hp['rank']}, gap {hp['update_proj_gap']}, scale {hp['scale']}, "
                    f"lr {hp['lr']}, weight decay {hp['weight_decay']}; errors = max |p - p_ref| / max |step_ref|"}
    for proj_type in info["shapes"]:
        tx = lo.galore(hp["lr"], rank=hp["rank"], update_proj_gap=hp["update_proj_gap"], scale=hp["scale"],
                       proj_type=proj_type, weight_decay=hp["weight_decay"])
        out[f"lowrank_jax/{proj_type}"] = replay(proj_type, tx)
    tx = optax.contrib.galore(hp["lr"], rank=hp["rank"], update_proj_gap=hp["update_proj_gap"], scale=hp["scale"],
                              weight_decay=hp["weight_decay"])
    out["optax.contrib.galore/std"] = replay("std", tx)
    return out


# ----------------------------------------------------------------------------- report

def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    header = [c[0] for c in cols]
    lines = [[fmt.format(r[key]) if key in r else "-" for _, key, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    row = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([row(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(row(x) for x in lines)])


def run(cfg: Config, *, out: Path | None = RESULTS, command: str | None = None, with_parity: bool = True) -> dict:
    load_start = os.getloadavg()
    config, params = tiny_params() if cfg.tiny else smollm2_params()
    cdict = config if isinstance(config, dict) else {k: getattr(config, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
        "num_key_value_heads")}
    hidden, inter = cdict["hidden_size"], cdict["intermediate_size"]
    kv = params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape[1]
    memory = memory_rows(params, cfg.rank)
    result = {
        "command": command,
        "load_average": {"start": load_start},
        "config": dataclasses.asdict(cfg) | {"model": "tiny synthetic LLaMA" if cfg.tiny else "SmolLM2-135M-Instruct",
                                            "model_config": cdict},
        "machine": machine(),
        "params": {"count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))), "bytes": nbytes(params)},
        "memory": memory,
        "per_matrix": per_matrix_rows(params, cfg.rank),
        "paper_reduction": PAPER_REDUCTION,
    }
    rows, info = time_rows(cfg, hidden, inter, kv)
    result["time"] = rows
    result["time_info"] = info
    if with_parity:
        result["parity"] = parity()
    result["load_average"]["end"] = os.getloadavg()
    write_json(out, result)
    return result


def report(result: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    mem = [dict(r, mib=mib(r["state_bytes"])) for r in result["memory"]]
    parts = [
        f"model: {result['config']['model']}, {result['params']['count']:,} params "
        f"({mib(result['params']['bytes'])} MiB float32), rank {result['config']['rank']}",
        table(mem, [("optimizer", "variant", "{}"), ("state MiB", "mib", "{}"), ("x AdamW", "ratio_to_adamw", "{:.3f}"),
                    ("reduction", "reduction", "{:.1%}")]),
        table(result["per_matrix"], [("matrix", "matrix", "{}"), ("Flax shape", "flax_shape", "{}"),
                                     ("AdamW bytes", "adamw_bytes", "{:,}"), ("GaLore bytes", "galore_bytes", "{:,}"),
                                     ("reduction", "reduction", "{:.1%}")]),
        table([dict(r, ms=1e3 * r["time_s"]) for r in result["time"]],
              [("update (one block, 7 matrices)", "variant", "{}"), ("median ms", "ms", "{:.1f}"),
               ("x AdamW", "ratio_to_adamw", "{:.2f}"), ("x GaLore normal", "ratio_to_galore_normal", "{:.2f}"),
               ("min: x AdamW", "ratio_to_adamw_min", "{:.2f}"),
               ("min: x GaLore normal", "ratio_to_galore_normal_min", "{:.2f}")]),
    ]
    for svd, a in result["time_info"]["amortised"].items():
        parts.append(f"{svd} SVD: refresh = {a['refresh_over_normal']:.1f}x a normal GaLore step (fastest runs: "
                     f"{a['refresh_over_normal_min']:.1f}x); amortised over T = {a['gap']}: "
                     f"{a['amortised_over_normal']:.3f}x a normal step ({a['amortised_over_normal_min']:.3f}x), "
                     f"{a['amortised_over_adamw']:.2f}x AdamW")
    if result.get("parity"):
        for k, v in result["parity"].items():
            if k != "setup":
                parts.append(f"parity {k}: max error {v['max_error_in_steps']:.2e} steps; first update "
                             f"(w0, rel. Frobenius) {v['first_update_rel_fro_w0']:.2e}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed rounds")
    p.add_argument("--tiny", action="store_true", help="a small synthetic LLaMA instead of SmolLM2")
    p.add_argument("--no-parity", action="store_true", help="skip replaying the galore-torch fixture")
    p.add_argument("--no-torch", action="store_true", help="skip timing torch.linalg.svd")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    for field in ("rank", "gap", "runs", "warmup"):
        p.add_argument(f"--{field}", type=int, default=None)
    a = p.parse_args(argv)
    cfg = Config(tiny=a.tiny, torch=not a.no_torch, **(QUICK if a.quick else {}))
    cfg = dataclasses.replace(cfg, **{k: v for k in ("rank", "gap", "runs", "warmup") if (v := getattr(a, k)) is not None})
    command = " ".join(["python", "benchmarks/bench_galore.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, out=a.out, command=command, with_parity=not a.no_parity)
    print(report(result))
    if a.out is not None:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
