"""LoRA train-step cost: full fine-tuning vs factored LoRA vs merge-then-call LoRA.

Run from the repository root::

    python benchmarks/bench_lora.py            # ~2.5 min on 2 CPU cores
    python benchmarks/bench_lora.py --quick    # same shapes, fewer timed rounds
    python benchmarks/bench_lora.py --no-torch # skip the torch/peft rows

It prints a table and writes ``benchmarks/results/lora.json``.

Model: a stack of ``layers`` (6) bias-free Dense layers ``d -> d`` (d = 1024), each
followed by ReLU, on an input ``[batch, seq, d]`` (``[4, 512, 1024]`` = 2048
tokens), loss = mean of the squared output. One train step = forward +
backward + ``optax.adamw`` update of the trainable tree, jitted, with the
trainable tree, the optimizer state, the frozen params and the batch all passed
as arguments (nothing is a compile-time constant). Families, each compared with
its own full fine-tuning:

* ``linen``: plain stack of ``nn.Dense``: full FT; ``lrj.linen.apply`` (factored
  LoRA, grads w.r.t. the adapter tree only); "merge" LoRA (``adapter.merge`` then
  ``model.apply``, grads w.r.t. the adapter tree through the dense ``W + s A B``).
* ``linen-scan``: the same model as ``nn.scan(nn.remat(Block))`` over the layers:
  full FT; ``lrj.linen.apply``.
* ``nnx``: the same stack of ``nnx.Linear``: full FT; flax's own
  ``nnx.LoRALinear`` (grads w.r.t. ``nnx.LoRAParam`` via ``nnx.DiffState``);
  ``lrj.nnx.apply`` on the plain ``nnx.Linear`` model.
* ``torch``: the same stack of ``torch.nn.Linear`` on CPU (2 threads): full FT and
  peft LoRA with ``torch.optim.AdamW``; wall-clock only. Skipped with a note when
  torch or peft is not installed.

Measured for each JAX variant: XLA's FLOP count of the compiled step
(``cost_analysis()["flops"]``), its memory (``memory_analysis()``: temp, output,
argument bytes), the wall-clock of ``runs`` timed rounds after ``warmup`` rounds
(variants run round-robin; each row's time ratio is the median over rounds of its
time over the full-FT time of the same round, so load from other processes
cancels), and the number of dot ops in the optimized HLO whose result is a ``d x d`` matrix
(a full-size weight gradient, or the dense ``A B`` of the merge variant; static
count, so a dot inside the scan body counts once although it runs per layer).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowrank_jax as lrj
from _report import add_size_flags, markdown_table, memory_bytes, with_sizes, write_json  # benchmarks/_report.py
from _machine import machine  # benchmarks/_machine.py

RESULTS = Path(__file__).resolve().parent / "results" / "lora.json"
LOOP_NOTE = (
    "linen-scan GFLOP: XLA's cost analysis counts a while-loop body once, so the first number is "
    "roughly one layer's forward + backward; in parentheses, the same step compiled with the scan "
    "unrolled (unroll=True), i.e. the whole step (FLOPs only; time and memory are the scanned program's)."
)


@dataclasses.dataclass(frozen=True)
class Config:
    d: int = 1024
    layers: int = 6
    batch: int = 4
    seq: int = 512
    rank: int = 16
    alpha: float = 32.0
    learning_rate: float = 1e-4
    warmup: int = 2
    runs: int = 10
    torch_threads: int = 2

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


FULL = Config()
QUICK = dataclasses.replace(FULL, warmup=1, runs=3)


@dataclasses.dataclass
class Variant:
    """A jittable train step ``step(*args) -> (trainable, opt_state, loss)`` and its arguments."""

    family: str
    name: str
    step: Callable
    args: tuple
    baseline: bool = False
    trainable_params: int = 0
    #: the same step with every loop unrolled (same args), compiled only for its FLOP count,
    #: since XLA's cost analysis counts a while-loop body once, not once per iteration
    unrolled_step: Callable | None = None


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, x, _=None):
        return nn.relu(nn.Dense(self.d, use_bias=False, name="dense")(x)), None


class LinenStack(nn.Module):
    d: int
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x, _ = Block(self.d, name=f"block_{i}")(x)
        return x


class LinenScanStack(nn.Module):
    d: int
    layers: int
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=self.layers,
            unroll=self.unroll,
        )
        x, _ = stack(self.d, name="blocks")(x, None)
        return x


class NNXStack(nnx.Module):
    """``layers`` bias-free ``nnx.Linear`` (or ``nnx.LoRALinear`` with ``lora_rank``) with ReLU."""

    def __init__(self, d: int, layers: int, *, rngs: nnx.Rngs, lora_rank: int | None = None):
        if lora_rank is None:
            make = lambda: nnx.Linear(d, d, use_bias=False, rngs=rngs)  # noqa: E731
        else:
            make = lambda: nnx.LoRALinear(d, d, lora_rank=lora_rank, use_bias=False, rngs=rngs)  # noqa: E731
        self.layers = nnx.List([make() for _ in range(layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return x


# --------------------------------------------------------------------------- steps


def mse(y):
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


def functional_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """``step(trainable, opt_state, frozen, x)``: grads of ``loss_fn(trainable, frozen, x)`` w.r.t. ``trainable``."""

    def step(trainable, opt_state, frozen, x):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def make_input(cfg: Config):
    return jax.random.normal(jax.random.key(0), (cfg.batch, cfg.seq, cfg.d), jnp.float32)


def linen_variants(cfg: Config, x) -> list[Variant]:
    opt = optax.adamw(cfg.learning_rate)
    out = []
    families = (
        ("linen", LinenStack(cfg.d, cfg.layers), None),
        ("linen-scan", LinenScanStack(cfg.d, cfg.layers), LinenScanStack(cfg.d, cfg.layers, unroll=True)),
    )
    for family, model, unrolled in families:
        variables = model.init(jax.random.key(1), x)
        adapter = lrj.lora(
            rank=cfg.rank, alpha=cfg.alpha, targets=r".*/kernel", layouts=lrj.linen.kernel_layouts(model, x)
        )
        lora_params = adapter.init(jax.random.key(2), variables)

        def full_step(model):
            return functional_step(lambda params, _, x: mse(model.apply(params, x)), opt)

        def factored_step(model, adapter=adapter):
            return functional_step(lambda lp, params, x: mse(lrj.linen.apply(model, adapter, params, lp, x)), opt)

        twin = (lambda make: make(unrolled)) if unrolled is not None else (lambda make: None)
        out.append(Variant(family, "full FT", full_step(model), (variables, opt.init(variables), None, x),
                           baseline=True, trainable_params=count_params(variables), unrolled_step=twin(full_step)))
        out.append(Variant(family, "lowrank_jax LoRA (factored)", factored_step(model),
                           (lora_params, opt.init(lora_params), variables, x),
                           trainable_params=count_params(lora_params), unrolled_step=twin(factored_step)))
        if family == "linen":

            def merge_loss(lp, params, x, model=model, adapter=adapter):
                return mse(model.apply(adapter.merge(params, lp), x))

            out.append(Variant(family, "merge W + sAB, then call", functional_step(merge_loss, opt),
                               (lora_params, opt.init(lora_params), variables, x),
                               trainable_params=count_params(lora_params)))
    return out


def nnx_variants(cfg: Config, x) -> list[Variant]:
    opt = optax.adamw(cfg.learning_rate)
    out = []

    # full fine-tuning: every nnx.Param differentiated
    model = NNXStack(cfg.d, cfg.layers, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)

    def full_step(params, opt_state, _, x):
        model = nnx.merge(graphdef, params)
        loss, grads = nnx.value_and_grad(lambda m: mse(m(x)), argnums=nnx.DiffState(0, nnx.Param))(model)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    out.append(Variant("nnx", "full FT", full_step, (params, opt.init(params), None, x), baseline=True,
                       trainable_params=count_params(params)))

    # flax's own LoRA: nnx.LoRALinear, only nnx.LoRAParam differentiated
    lora_model = NNXStack(cfg.d, cfg.layers, rngs=nnx.Rngs(1), lora_rank=cfg.rank)
    lora_graphdef, lora_state, base_state = nnx.split(lora_model, nnx.LoRAParam, nnx.Param)

    def flax_lora_step(lora_state, opt_state, base_state, x):
        model = nnx.merge(lora_graphdef, lora_state, base_state)
        loss, grads = nnx.value_and_grad(lambda m: mse(m(x)), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        updates, opt_state = opt.update(grads, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, loss

    out.append(Variant("nnx", "flax nnx.LoRALinear", flax_lora_step,
                       (lora_state, opt.init(lora_state), base_state, x),
                       trainable_params=count_params(lora_state)))

    # lowrank_jax's NNX bridge on the plain nnx.Linear model
    adapter = lrj.lora(rank=cfg.rank, alpha=cfg.alpha, targets=r".*/kernel")
    lp = adapter.init(jax.random.key(2), lrj.nnx.params(model))

    def lrj_loss(lp, params, x):
        return mse(lrj.nnx.apply(nnx.merge(graphdef, params), adapter, lp, x))

    out.append(Variant("nnx", "lowrank_jax LoRA (lrj.nnx)", functional_step(lrj_loss, opt),
                       (lp, opt.init(lp), params, x), trainable_params=count_params(lp)))
    return out


# --------------------------------------------------------------------------- measurement


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
        cost = cost[0]
    return cost or {}


_DOT = re.compile(r"=\s*[a-z0-9]+\[([0-9,]*)\][^=]*?\b(dot|convolution)\(")


def square_dots(hlo_text: str, d: int) -> int:
    """Number of dot ops in ``hlo_text`` whose result is ``[..., d, d]`` with at most one more axis."""
    n = 0
    for m in _DOT.finditer(hlo_text):
        dims = [int(s) for s in m.group(1).split(",") if s]
        if len(dims) in (2, 3) and dims[-2:] == [d, d]:
            n += 1
    return n


def interleaved_times(fns: list[Callable[[], Any]], warmup: int, runs: int) -> list[list[float]]:
    """Wall-clock seconds of each ``fn``, called round-robin (``warmup`` untimed rounds, then ``runs``
    timed ones), so slow drifts of the machine hit every variant alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return times


def compile_stats(variant: Variant, d: int):
    """``(compiled, stats)``: the compiled step and its XLA FLOPs, memory and ``d x d`` dot count."""
    t0 = time.perf_counter()
    compiled = jax.jit(variant.step).lower(*variant.args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    stats = {
        "family": variant.family,
        "variant": variant.name,
        "baseline": variant.baseline,
        "trainable_params": variant.trainable_params,
        "flops": float(_cost(compiled).get("flops", float("nan"))),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "square_dots": square_dots(compiled.as_text(), d),
        "compile_s": compile_s,
    }
    if variant.unrolled_step is not None:
        twin = jax.jit(variant.unrolled_step).lower(*variant.args).compile()
        stats["flops_unrolled"] = float(_cost(twin).get("flops", float("nan")))
    return compiled, stats


def run_jax(cfg: Config, families: tuple[str, ...] = ("linen", "linen-scan", "nnx")) -> list[dict]:
    x = make_input(cfg)
    variants = [v for v in linen_variants(cfg, x) + nnx_variants(cfg, x) if v.family in families]
    compiled, rows = [], []
    for v in variants:
        c, stats = compile_stats(v, cfg.d)
        compiled.append(c)
        rows.append(stats)
        print(f"  compiled {v.family:10s} {v.name}", file=sys.stderr, flush=True)
    fns = [lambda c=c, v=v: jax.block_until_ready(c(*v.args)) for c, v in zip(compiled, variants)]
    times = interleaved_times(fns, cfg.warmup, cfg.runs)
    for row, t, c, v in zip(rows, times, compiled, variants):
        row["time_s"] = statistics.median(t)
        row["times_s"] = t
        row["loss"] = float(c(*v.args)[2])
    return rows


def run_torch(cfg: Config) -> tuple[list[dict], str | None]:
    """Wall-clock of a torch CPU train step, full FT and peft LoRA; ``([], note)`` without torch/peft."""
    try:
        import peft
        import torch
    except ImportError as e:
        return [], f"torch rows skipped: {e}"

    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(0)

    def stack():
        layers = []
        for _ in range(cfg.layers):
            layers += [torch.nn.Linear(cfg.d, cfg.d, bias=False), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers)

    x = torch.randn(cfg.batch, cfg.seq, cfg.d)
    targets = [str(2 * i) for i in range(cfg.layers)]  # the Linear modules of the Sequential
    rows, steps = [], []
    for name, baseline in (("full FT", True), ("peft LoRA", False)):
        model = stack()
        if not baseline:
            config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets)
            model = peft.get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.learning_rate)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            return loss

        steps.append(step)
        rows.append({
            "family": "torch",
            "variant": name,
            "baseline": baseline,
            "trainable_params": int(sum(p.numel() for p in trainable)),
            "versions": {"torch": torch.__version__, "peft": peft.__version__},
        })
    for row, t in zip(rows, interleaved_times(steps, cfg.warmup, cfg.runs)):
        row["time_s"] = statistics.median(t)
        row["times_s"] = t
    return rows, None


def add_ratios(rows: list[dict]) -> list[dict]:
    """Adds ``*_ratio`` fields: each row against its family's baseline (full FT) row."""
    base = {r["family"]: r for r in rows if r["baseline"]}
    for r in rows:
        b = base.get(r["family"])
        if b is None:
            continue
        # timing: the median over rounds of (this row's time / the baseline's time in the same round),
        # robust to other load on the machine; also the ratio of the fastest runs
        pairs = [t / tb for t, tb in zip(r["times_s"], b["times_s"])]
        r["time_ratio"] = statistics.median(pairs)
        r["time_ratio_min"] = min(r["times_s"]) / min(b["times_s"])
        if "flops" in r:
            r["flops_ratio"] = r["flops"] / b["flops"]
            r["mem_ratio"] = memory_bytes(r, "temp+out") / memory_bytes(b, "temp+out")
            r["total_mem_ratio"] = memory_bytes(r, "total") / memory_bytes(b, "total")
            r["temp_ratio"] = r["temp_bytes"] / b["temp_bytes"] if b["temp_bytes"] else float("nan")
        if "flops_unrolled" in r and "flops_unrolled" in b:
            r["flops_unrolled_ratio"] = r["flops_unrolled"] / b["flops_unrolled"]
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows (with ratios from :func:`add_ratios`)."""
    header = ("family", "variant", "GFLOP", "FLOPs x", "temp MiB", "out MiB", "temp+out x", "total MiB",
              "total x", "dxd dots", "median ms", "time x", "min x")
    lines = []
    for r in rows:
        xla = "flops" in r
        f = lambda fmt, key, r=r: fmt.format(r[key]) if key in r else "-"  # noqa: E731
        mib = lambda v: f"{v / 2**20:.1f}"  # noqa: E731
        gflop = f"{r['flops'] / 1e9:.2f}" if xla else "-"
        if "flops_unrolled" in r:
            gflop += f" ({r['flops_unrolled'] / 1e9:.2f})"
        ratio = f("{:.3f}", "flops_ratio")
        if "flops_unrolled_ratio" in r:
            ratio += f" ({r['flops_unrolled_ratio']:.3f})"
        lines.append((
            r["family"], r["variant"], gflop, ratio,
            mib(r["temp_bytes"]) if xla else "-", mib(r["output_bytes"]) if xla else "-", f("{:.3f}", "mem_ratio"),
            mib(memory_bytes(r, "total")) if xla else "-", f("{:.3f}", "total_mem_ratio"),
            str(r["square_dots"]) if xla else "-", f"{1e3 * r['time_s']:.0f}", f("{:.3f}", "time_ratio"),
            f("{:.3f}", "time_ratio_min"),
        ))
    return markdown_table(header, lines)


def check_expectations(rows: list[dict]) -> list[str]:
    """The bounds from ARCHITECTURE.md principles 4-5, as human-readable PASS/FAIL lines."""
    by = {(r["family"], r["variant"]): r for r in rows}
    checks = [
        ("linen", "lowrank_jax LoRA (factored)", "flops_ratio", "<=", 0.70),
        ("linen-scan", "lowrank_jax LoRA (factored)", "flops_ratio", "<=", 0.80),
        ("linen-scan", "lowrank_jax LoRA (factored)", "flops_unrolled_ratio", "<=", 0.80),
        ("nnx", "lowrank_jax LoRA (lrj.nnx)", "flops_ratio", "<=", 0.70),
        ("linen", "lowrank_jax LoRA (factored)", "mem_ratio", "<", 1.0),
        ("linen-scan", "lowrank_jax LoRA (factored)", "mem_ratio", "<", 1.0),
        ("nnx", "lowrank_jax LoRA (lrj.nnx)", "mem_ratio", "<", 1.0),
        ("linen", "merge W + sAB, then call", "flops_ratio", ">=", 0.95),
        # principle 2: no full-size weight gradient (no d x d dot) anywhere in the factored steps
        ("linen", "lowrank_jax LoRA (factored)", "square_dots", "==", 0),
        ("linen-scan", "lowrank_jax LoRA (factored)", "square_dots", "==", 0),
        ("nnx", "lowrank_jax LoRA (lrj.nnx)", "square_dots", "==", 0),
    ]
    compare = {"<=": float.__le__, "<": float.__lt__, ">=": float.__ge__, "==": float.__eq__}
    out = []
    for family, variant, key, op, bound in checks:
        r = by.get((family, variant))
        if r is None or key not in r:
            continue
        ok = compare[op](float(r[key]), float(bound))
        out.append(f"{'PASS' if ok else 'FAIL'}: {family} / {variant}: {key} = {r[key]:.3f} {op} {bound}")
    return out


def _default_shapes(cfg: Config) -> bool:
    return (cfg.d, cfg.layers, cfg.tokens, cfg.rank) == (FULL.d, FULL.layers, FULL.tokens, FULL.rank)


def run(cfg: Config, *, torch: bool = True, out: Path | None = RESULTS, command: str | None = None) -> dict:
    """Runs every variant, adds ratios and checks, writes ``out`` (JSON) unless ``None``; returns the result."""
    load_start = os.getloadavg()
    rows = run_jax(cfg)
    note = None
    if torch:
        torch_rows, note = run_torch(cfg)
        rows += torch_rows
    add_ratios(rows)
    result = {
        "command": command,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "config": dataclasses.asdict(cfg) | {"tokens": cfg.tokens, "bias": False, "activation": "relu",
                                            "loss": "mean(y**2)", "optimizer": "adamw"},
        "machine": machine(),
        "rows": rows,
        "notes": [n for n in [LOOP_NOTE if any("flops_unrolled" in r for r in rows) else None, note] if n],
        "checks": check_expectations(rows) if _default_shapes(cfg) else
        ["checks skipped: the bounds (ARCHITECTURE.md principles 4-5) apply to the default sizes"],
    }
    write_json(out, result)
    return result


#: The config fields the command line can override.
SIZES = ("d", "layers", "batch", "seq", "rank", "runs", "warmup")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK.warmup} warm-up + {QUICK.runs} timed runs")
    p.add_argument("--no-torch", action="store_true", help="skip the torch/peft rows")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    add_size_flags(p, SIZES)
    a = p.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    cfg = with_sizes(cfg, a, SIZES)
    print(f"config: {cfg}  tokens={cfg.tokens}", file=sys.stderr)
    command = " ".join(["python", "benchmarks/bench_lora.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, torch=not a.no_torch, out=a.out, command=command)
    print(format_table(result["rows"]))
    for line in result["notes"] + result["checks"]:
        print(line)
    if a.out is not None:
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
