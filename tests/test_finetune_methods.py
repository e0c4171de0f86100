"""``lowrank-jax finetune --method lamda|lamda++|aflora|lisa|molora|mixlora|malora`` (issue 13) run the main
job end to end on a tiny LLaMA (tests/finetune_worker.py's): each trains (held-out perplexity falls), saves
and restores, and keeps what the method freezes frozen; the mixtures evaluate in factored form."""

import sys
import pathlib

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import finetune_worker  # noqa: E402

from lowrank_jax import data, linen  # noqa: E402
from lowrank_jax import finetune as ft  # noqa: E402
from lowrank_jax import run_config as rc  # noqa: E402
from lowrank_jax import tree as tree_lib  # noqa: E402

STEPS = 12


def run(method, tmp_path):
    loaded = finetune_worker.tiny_model(scan_layers=method != "lamda++")
    cfg = finetune_worker.config(str(tmp_path / method), STEPS, False, method=method, batch=4, progress=False)
    summary = ft.finetune(cfg, loaded=loaded)
    recipe, trainable, run_config, _ = ft.restore_adapter(tmp_path / method, loaded=loaded)
    return summary, recipe, trainable, run_config


def leaves(tree, name):
    return {path: np.asarray(leaf) for _, path, leaf in tree_lib.flatten_with_paths(tree) if path.endswith("/" + name)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lamda", "lamda++", "aflora", "lisa", "molora", "mixlora", "malora"])
def test_method_trains_saves_and_restores(method, tmp_path):
    summary, recipe, trainable, run_config = run(method, tmp_path)
    assert summary["perplexity_after"] < summary["perplexity_before"]
    assert len(summary["losses"]) == STEPS and all(np.isfinite(summary["losses"]))
    initial = recipe.trainable  # restore_adapter rebuilds the recipe: the same seed gives the initial tree
    if method in ("lamda", "lamda++"):
        assert run_config["adapter"]["method"] == method
        a0, a1 = leaves(initial, "a"), leaves(trainable, "a")
        assert a0 and all(np.array_equal(a0[p], a1[p]) for p in a0)  # A is frozen adapter state
    if method == "lamda++":
        ranks = {p: v.shape[-1] for p, v in leaves(trainable, "a").items()}
        assert len(set(ranks.values())) > 1 and sum(ranks.values()) == 8 * len(ranks)  # per-layer ranks, the budget of r=8
    if method == "lisa":
        assert summary["trainable_params"] == summary["all_params"]
    if method == "aflora":
        lb0, lb1 = leaves(initial, "lambda_b"), leaves(trainable, "lambda_b")
        assert lb0 and all(np.all(lb0[p] == 0) for p in lb0) and sorted(lb1) == sorted(lb0)  # starts at 0, as the code
    if method in rc.MIXTURES:  # no merge: the held-out perplexity is the factored model's own
        assert recipe.eval_adapter is recipe.adapter and run_config["finetune"]["experts"] == 4
        model, params = recipe.eval_model, recipe.eval_params(trainable)
        ids = finetune_worker.smollm2_tokenizer().encode(data.load_corpus("shakespeare", split="heldout")[:1024],
                                                         add_special_tokens=False)
        windows = np.asarray(ids[:128], np.int32).reshape(2, 64)
        logits = linen.apply(model, recipe.adapter, {"params": params}, trainable, windows)
        logp = jax.nn.log_softmax(np.asarray(logits, np.float32)[:, :-1], -1)
        nll = -np.take_along_axis(np.asarray(logp), windows[:, 1:, None], -1).mean()
        assert summary["perplexity_after"] == pytest.approx(float(np.exp(nll)), rel=1e-4)
        with pytest.raises(ValueError, match="merge"):
            recipe.adapter.merge({"params": params}, trainable)
    jax.clear_caches()


def test_a_mixture_run_refuses_merge_before_loading(tmp_path, capsys, monkeypatch):
    from test_run_dir import error_of, fake_run

    run = fake_run(tmp_path / "run", method="molora")
    monkeypatch.setattr(ft, "load_model", lambda cfg: pytest.fail("the model was loaded before the input was checked"))
    line = error_of(["merge", "--adapter", str(run), "--output", str(tmp_path / "m.safetensors")], capsys)
    assert line == (f"error: {run} holds a molora run: a mixture routes each token to its experts, so it has no merged "
                    f"weights; use `lowrank-jax generate --adapter {run}`")


@pytest.mark.parametrize("argv, message", [
    (["--method", "lora", "--experts", "4"], "error: --experts applies to the mixtures (molora, mixlora, malora), not --method lora"),
    (["--method", "molora", "--experts", "1"], "error: --experts must be an integer >= 2, got 1"),
    (["--method", "lisa", "--targets", "qv"], "error: --targets does not apply to --method lisa"),
])
def test_new_methods_bad_input(argv, message, tmp_path, capsys):
    from test_run_dir import error_of

    assert error_of(["finetune", *argv, "--output-dir", str(tmp_path / "new")], capsys).startswith(message)
