"""peft adapter directories in and out (safetensors + adapter_config.json)."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj
from lowrank_jax.io import peft as peft_io
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(40, name="proj")(x)


def proj_name(path, layer):
    assert path == "params/proj/kernel" and layer is None
    return "proj"


def test_load_a_directory_written_by_peft():
    ref = np.load(FIXTURES / "peft_lora.npz", allow_pickle=False)
    params = {"params": {"proj": {"kernel": jnp.asarray(ref["dense_W"].T), "bias": jnp.asarray(ref["dense_bias"])}}}
    adapter, lp = peft_io.load_peft(FIXTURES / "peft_adapter_dense", params, module_name=proj_name)
    assert adapter.config["rank"] == 4 and adapter.config["alpha"] == 8.0
    y = lrj.linen.apply(Proj(), adapter, params, lp, jnp.asarray(ref["dense_x"]))
    np.testing.assert_allclose(y, ref["dense_y"], atol=2e-6)


def test_save_then_load_round_trip_on_scanned_llama(tmp_path):
    config = LlamaConfig.tiny(scan_layers=True)
    model = LlamaForCausalLM(config)
    ids = jnp.arange(8)[None] % config.vocab_size
    variables = model.init(jax.random.key(0), ids)
    layouts = lrj.linen.kernel_layouts(model, ids)
    adapter = lrj.lora(rank=4, alpha=8.0, targets=r".*/(q_proj|v_proj|down_proj)/kernel", layouts=layouts,
                       rank_pattern={r".*/down_proj/kernel": 2}, alpha_pattern={r".*/v_proj/kernel": 3.0})
    lp = jax.tree.map(lambda x: x + 0.05, adapter.init(jax.random.key(1), variables))
    peft_io.save_peft(tmp_path / "ad", adapter, variables, lp)
    config_json = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config_json["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config_json["rank_pattern"] == {r"model\.layers\.0\.mlp\.down_proj": 2, r"model\.layers\.1\.mlp\.down_proj": 2}
    from safetensors.numpy import load_file
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, config.hidden_size)
    loaded_adapter, lp2 = peft_io.load_peft(tmp_path / "ad", variables, layouts=layouts)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), lp2, jax.tree.map(np.asarray, lp))
    y1 = lrj.linen.apply(model, adapter, variables, lp, ids)
    y2 = lrj.linen.apply(model, loaded_adapter, variables, lp2, ids)
    np.testing.assert_allclose(y1, y2, atol=1e-6)


def test_load_errors_name_the_problem(tmp_path):
    params = {"params": {"other": {"kernel": jnp.ones((24, 40))}}}
    with pytest.raises(ValueError, match=r"module 'proj' is not in these params \(is this adapter from another model\?\)"):
        peft_io.load_peft(FIXTURES / "peft_adapter_dense", params, module_name=lambda p, layer: p.split("/")[1])
    with pytest.raises(ValueError, match="is not a peft adapter directory"):
        peft_io.load_peft(tmp_path, params)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="only plain LoRA adapters are supported"):
        peft_io.load_peft(tmp_path, params)
