"""Adapters written by ``lowrank_jax.export.write_peft`` give, loaded in peft, our logits (issue 16).

peft's logits were recorded by ``tests/fixtures/make_export_logits.py`` (needs torch); here ours are
recomputed from the same perturbed adapter trees, and the written directories are checked."""

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent / "fixtures"))
import make_export_logits as gen  # noqa: E402

from lowrank_jax.export import write_peft  # noqa: E402
from lowrank_jax.run_config import UserError  # noqa: E402

RECORDED = np.load(gen.OUT)


@pytest.mark.parametrize("method", gen.METHODS)
def test_peft_loads_our_adapter_with_our_logits(method, tmp_path):
    recipe, tree, params, model = gen.recipe_and_tree(method)
    ours = np.asarray(model.apply({"params": recipe.eval_params(tree)}, jnp.asarray(gen.IDS)), np.float32)
    theirs, base = RECORDED[method], RECORDED["base"]
    assert np.abs(ours - theirs).max() < 1e-4  # observed at most 2.0e-5 (PiSSA: merged on the residual base)
    assert np.abs(ours - base).max() > 0.2  # the adapter moves the logits far beyond the tolerance
    if method in gen.QUANTIZED:  # peft's base was ours dequantised, not the float checkpoint
        start = np.asarray(recipe.eval_params(recipe.trainable)["layers"]["self_attn"]["q_proj"]["kernel"])
        w = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"])
        nf4_error = np.abs(start - w).max() / np.abs(w).max()  # NF4 rounds by <= 0.14 of a block's absmax
        assert 1e-3 < nf4_error < 0.15
    written = write_peft(tmp_path / "adapter", method, recipe, tree, params)
    config = json.loads((written / "adapter_config.json").read_text())
    expected_type = {"vera": "VERA", "ia3": "IA3", "adalora": "ADALORA"}.get(method, "LORA")
    assert config["peft_type"] == expected_type
    if expected_type == "LORA":
        rank, alpha = recipe.adapter.config["rank"], recipe.adapter.config["alpha"]
        doubled = method == "pissa"  # the offset init as peft's rank-2r conversion
        assert (config["r"], config["lora_alpha"]) == ((2 * rank, 2 * alpha) if doubled else (rank, alpha))
        assert config["use_dora"] is (method in ("dora", "qdora"))
    if expected_type in ("LORA", "ADALORA"):
        assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    if expected_type == "ADALORA":
        cfg = recipe.adapter.config
        assert (config["init_r"], config["target_r"], config["lora_alpha"], config["total_step"]) == (
            cfg["init_r"], cfg["target_r"], cfg["alpha"], cfg["total_step"])


@pytest.mark.parametrize("method", ["bitfit", "galore", "longlora", "molora", "lisa"])
def test_methods_peft_lacks_are_refused_by_name(method):
    from lowrank_jax.export import check_peft_method

    with pytest.raises(UserError, match=rf"cannot export a {method} run in peft's format: .*peft formats exist for: "
                                        r"lora, rslora, lora_plus"):
        check_peft_method(method)
