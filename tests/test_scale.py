"""Scale (issue 15): LLaMA sharding rules, 8 simulated devices = 1, a 2-process jax.distributed run, `plan`.

The multi-device and multi-process runs happen in subprocesses (tests/scale_worker.py): the simulated
device count must be set before jax is imported, and each jax.distributed process is its own program.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lowrank_jax import distributed, plan
from lowrank_jax.models import llama_sharding as ls
from lowrank_jax.models.llama import LlamaConfig, LlamaForCausalLM

WORKER = pathlib.Path(__file__).parent / "scale_worker.py"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _worker(*args, timeout=240):
    proc = subprocess.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- rules


def tiny_params(scan=True):
    model = LlamaForCausalLM(LlamaConfig.tiny(scan_layers=scan))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])


def test_logical_axes_name_every_llama_param():
    axes = ls.logical_axes(tiny_params())
    assert axes["embed_tokens"]["embedding"] == ("vocab", "embed")
    assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads")
    assert axes["layers"]["self_attn"]["k_proj"]["kernel"] == ("layers", "embed", "kv_heads")
    assert axes["layers"]["self_attn"]["o_proj"]["kernel"] == ("layers", "heads", "embed")
    assert axes["layers"]["mlp"]["up_proj"]["kernel"] == ("layers", "embed", "mlp")
    assert axes["layers"]["mlp"]["down_proj"]["kernel"] == ("layers", "mlp", "embed")
    assert axes["layers"]["input_layernorm"]["scale"] == ("layers", "norm")
    unrolled = ls.logical_axes(tiny_params(scan=False))
    assert unrolled["layers_1"]["mlp"]["gate_proj"]["kernel"] == ("embed", "mlp")


def test_logical_axes_refuse_an_unknown_param():
    with pytest.raises(ValueError, match="'params/extra/kernel'"):
        ls.logical_axes({"params": {"extra": {"kernel": jnp.zeros((2, 2))}}})


def test_rules_megatron_and_fsdp_specs():
    mesh = jax.sharding.AbstractMesh((4, 2), ("fsdp", "tensor"))
    to_spec = lambda axes: ls.logical_to_spec(axes, ls.DEFAULT_RULES, mesh)  # noqa: E731
    assert to_spec(("layers", "embed", "heads")) == P(None, "fsdp", "tensor")   # column-parallel
    assert to_spec(("layers", "heads", "embed")) == P(None, "tensor", "fsdp")   # row-parallel
    assert to_spec(("vocab", "embed")) == P("tensor", "fsdp")                   # vocab-parallel
    assert to_spec(("norm",)) == P(None)
    assert ls.batch_spec(mesh) == P("fsdp", None)
    # axes the mesh lacks are dropped; one mesh axis is used once
    data = jax.sharding.AbstractMesh((2,), ("data",))
    assert ls.logical_to_spec(("layers", "embed", "mlp"), ls.DEFAULT_RULES, data) == P(None, None, None)
    assert ls.batch_spec(jax.sharding.AbstractMesh((2, 2), ("data", "fsdp")), ndim=3) == P(("data", "fsdp"), None, None)
    assert ls.logical_to_spec(("batch", "embed"), ls.DEFAULT_RULES, mesh) == P("fsdp", None)


def test_param_shardings_on_one_device_mesh_and_quantised_nodes():
    from lowrank_jax import quant

    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tiny_params())
    q = quant.quantize_params(params, r".*/mlp/down_proj/kernel", stack_axes=1)
    sh = ls.param_shardings(q, mesh, config=LlamaConfig.tiny())
    node = sh["layers"]["mlp"]["down_proj"]["kernel"]
    assert type(node).__name__ == "QuantizedArray"
    assert node.packed.spec == P(None, ("tensor", "fsdp"))  # the flat codes over the kernel's mesh axes
    assert node.offset.spec == P()
    dense = ls.param_shardings(q, mesh, config=LlamaConfig.tiny(), dense=True)
    assert dense["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")


def test_axis_that_does_not_divide_a_dimension_is_named():
    smol = LlamaConfig(scan_layers=True)  # SmolLM2: 9 heads, 3 kv heads; tensor=2 splits neither
    shapes = {"layers": {"self_attn": {"k_proj": {"kernel": jax.ShapeDtypeStruct((30, 576, 192), jnp.float32)}}}}
    mesh2 = jax.sharding.AbstractMesh((1, 2), ("fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"tensor=2 does not divide axis 2 of 'layers/self_attn/k_proj/kernel'.*3 heads"):
        ls.param_shardings(shapes, mesh2, config=smol)
    mesh4 = jax.sharding.AbstractMesh((4, 1), ("fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"fsdp=4 does not divide axis 1 of 'embed_tokens/embedding'"):
        ls.param_shardings({"embed_tokens": {"embedding": jax.ShapeDtypeStruct((128, 30), jnp.float32)}}, mesh4)
    with pytest.raises(ValueError, match="batch 6 is not divisible by the batch mesh axes fsdp=4"):
        ls.divisible_batch(6, mesh4)


def test_mesh_parsing_and_size_check():
    assert ls.parse_mesh("data=2,fsdp=4,tensor=2") == {"data": 2, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="'fsdp4'"):
        ls.parse_mesh("fsdp4")
    with pytest.raises(ValueError, match="'fsdp' appears twice"):
        ls.parse_mesh("fsdp=2,fsdp=2")
    with pytest.raises(ValueError, match=f"mesh fsdp=16,tensor=4 has 64 devices but {jax.device_count()} are"):
        ls.make_mesh("fsdp=16,tensor=4")


def test_state_shardings_inherit_from_the_trainable_tree():
    import optax

    mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    params = tiny_params()
    sh = ls.param_shardings(params, mesh)
    state = ls.state_shardings(optax.adamw(1e-3).init, ls.abstract(params, sh), mesh)
    mu = state[0].mu["layers"]["self_attn"]["o_proj"]["kernel"]
    assert mu.spec == P(None, "tensor", "fsdp") and mu.mesh is mesh
    assert state[0].count.spec == P()


# --------------------------------------------------------------------------- model


@pytest.mark.slow
def test_remat_presets_and_nested_remat_equal_the_plain_model():
    import lowrank_jax as lrj

    config = LlamaConfig.tiny(scan_layers=True, num_hidden_layers=4)
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, config.vocab_size)
    params = LlamaForCausalLM(config).init(jax.random.key(1), ids)["params"]
    adapter = lrj.lora(rank=2, alpha=4.0, targets=r".*_proj/kernel",
                       layouts=lrj.linen.kernel_layouts(LlamaForCausalLM(config), ids))
    lp = jax.tree.map(lambda v: v + 0.1, adapter.init(jax.random.key(2), {"params": params}))

    def grads(model):
        return jax.jit(jax.grad(lambda lp: lrj.linen.apply(model, adapter, {"params": params}, lp, ids).sum()))(lp)

    want = grads(LlamaForCausalLM(config))
    for name in plan.REMAT:
        changes, groups = plan.REMAT[name]
        groups = plan.remat_groups(name, 4)
        model = LlamaForCausalLM(config.replace(**changes), remat_groups=groups)
        got = grads(model)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)))
        assert diff < 1e-5, name
    nested = LlamaForCausalLM(config.replace(remat=True), remat_groups=2)
    shapes = jax.eval_shape(lambda: nested.init(jax.random.key(1), ids)["params"])
    assert shapes["layers"]["mlp"]["up_proj"]["kernel"].shape == (4, 64, 128)  # params stay [L, ...]


def test_remat_groups_bad_values():
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="`remat_groups` 3 does not divide num_hidden_layers 4"):
        LlamaForCausalLM(LlamaConfig.tiny(scan_layers=True, remat=True, num_hidden_layers=4), remat_groups=3).init(
            jax.random.key(0), ids)
    with pytest.raises(ValueError, match="`remat_groups` 2 needs config.scan_layers and config.remat"):
        LlamaForCausalLM(LlamaConfig.tiny(scan_layers=True), remat_groups=2).init(jax.random.key(0), ids)


# --------------------------------------------------------------------------- 8 devices = 1


@pytest.fixture(scope="module", params=["explicit", "auto"])
def devices_report(request):
    # GaLore's refresh SVD of stacked [L, m, n] gradients deadlocked XLA:CPU on 8 simulated devices when it
    # ran batched (every device thread waiting in the LAPACK custom call); lrj.linalg.reduced_svd maps over
    # the batch on CPU. It runs under a plain timeout on both meshes now: a hang is a failure.
    return request.param, _worker("devices", request.param, "lora,qlora,galore")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora", "galore"])
def test_eight_devices_equal_one(devices_report, method):
    _, report = devices_report
    assert report["devices"] == 8
    r = report[method]
    np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=0, atol=3e-5)
    assert r["losses_1"][-1] < r["losses_1"][0]  # the steps train
    if "grad_rel_diff" in r:  # float32 reduction order only
        assert r["grad_rel_diff"] < 3e-4
    # after 3 AdamW steps: m / sqrt(v) amplifies the reduction-order noise of gradients near zero
    assert r["trainable_rel_diff"] < 1e-3
    assert r["state_rel_diff"] < 2e-2
    assert r["trainable_specs_stable"] and r["state_specs_stable"]


@pytest.mark.slow
def test_eight_devices_shardings_are_inherited(devices_report):
    _, report = devices_report
    for method in ("lora", "qlora"):
        specs = report[method]["specs"]
        assert specs["q_proj"] == {"a": "P(None, 'fsdp', None)", "b": "P(None, None, 'tensor')"}   # column-parallel
        assert specs["o_proj"] == {"a": "P(None, 'tensor', None)", "b": "P(None, None, 'fsdp')"}   # row-parallel
        assert report[method]["mu_down_b"] == "P(None, None, 'fsdp')"                              # AdamW moments
    assert report["qlora"]["packed_spec"] == "P(None, ('tensor', 'fsdp'))"
    assert report["galore"]["galore_mu_q"] == "P(None, 'tensor', None)"  # [L, out, r]: the kept side's spec
    assert report["galore"]["embed_spec"] == "P('tensor', 'fsdp')"


# --------------------------------------------------------------------------- 2 processes = 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_distributed_run_equals_one_process():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "dist", f"127.0.0.1:{port}", "2", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    single = _worker("single")
    assert single["devices"] == 1
    assert [r["process"] for r in reports] == [0, 1]
    for r in reports:
        assert r["processes"] == 2 and r["devices"] == 2 and r["local_devices"] == 1
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=0, atol=1e-4)
    assert [r["rows"] for r in reports] == [[0, 2], [2, 4]]  # each process fed its half of the batch


def test_unreachable_coordinator_times_out_clearly():
    code = ("from lowrank_jax import distributed\n"
            f"distributed.initialize('127.0.0.1:{_free_port()}', 2, 1, timeout_s=2)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert proc.returncode != 0
    assert "TimeoutError: coordinator 127.0.0.1:" in proc.stderr and "unreachable after 2 s" in proc.stderr
    assert time.monotonic() - t0 < 30


def test_bad_process_ids_and_addresses():
    with pytest.raises(ValueError, match=r"`process_id` must be in \[0, 2\), got 2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match=r"`process_id` must be in \[0, 2\), got -1"):
        distributed.initialize("127.0.0.1:1234", 2, -1)
    with pytest.raises(ValueError, match="`num_processes` must be a positive integer, got 0"):
        distributed.initialize("127.0.0.1:1234", 0, 0)
    with pytest.raises(ValueError, match="'localhost' is not HOST:PORT"):
        distributed.initialize("localhost", 2, 0)


def test_process_rows():
    assert distributed.process_rows(8, 1, 4) == slice(2, 4)
    assert distributed.process_rows(4, 0, 1) == slice(0, 4)
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the 4 processes"):
        distributed.process_rows(6, 0, 4)


# --------------------------------------------------------------------------- plan


def _plan(*args, timeout=240):
    proc = subprocess.run([sys.executable, "-m", "lowrank_jax.plan", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)
    return proc


@pytest.fixture(scope="module")
def tiny_plans():
    out = {}
    for method in ("lora", "full"):
        proc = _plan("--model", "tiny", "--method", method, "--devices", "8", "--mesh", "fsdp=4,tensor=2",
                     "--seq-len", "16", "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.slow
def test_plan_reports_memory_and_flops_per_device(tiny_plans):
    lora, full = tiny_plans["lora"], tiny_plans["full"]
    assert lora["devices"] == 8 and lora["mesh"] == {"fsdp": 4, "tensor": 2} and lora["batch"] == 4
    m = lora["bytes_per_device"]
    assert m["sum"] == m["argument"] + m["output"] + m["temp"] - m["alias"]
    # the tiny model: 82,240 params; LoRA r=16 on the 7 block kernels of 2 layers: 32,768 trainable
    assert full["trainable_params"] == 82240 and lora["trainable_params"] == 32768
    # full fine-tuning carries params + 2 AdamW moments of every weight (bf16), sharded 8 ways (norms replicated)
    assert full["bytes_per_device"]["argument"] >= 3 * 82240 * 2 // 8
    # every block counted: more than the scanned program's one-body count
    assert lora["flops_per_device"] > lora["flops_scanned"] > 0


def test_plan_bad_input_is_a_clear_error():
    proc = _plan("--model", "tiny", "--method", "lora", "--devices", "8", "--mesh", "fsdp=2,tensor=2")
    assert proc.returncode == 2 and "mesh fsdp=2,tensor=2 has 4 devices but --devices is 8" in proc.stderr
    proc = _plan("--model", "smollm2", "--method", "lora", "--devices", "2", "--mesh", "tensor=2", "--no-flops",
                 "--seq-len", "8")
    assert proc.returncode == 2 and "tensor=2 does not divide axis" in proc.stderr and "3 heads" in proc.stderr


def test_cli_plan_subcommand_is_plan_main():
    """``lowrank-jax plan ...`` is ``python -m lowrank_jax.plan ...``: same report, same exit codes."""
    proc = subprocess.run([sys.executable, "-m", "lowrank_jax.cli", "plan", "--model", "tiny", "--method", "lora",
                           "--devices", "2", "--mesh", "fsdp=2", "--seq-len", "16", "--no-flops", "--json"],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2 and report["mesh"] == {"fsdp": 2} and report["trainable_params"] == 32768
    bad = subprocess.run([sys.executable, "-m", "lowrank_jax.cli", "plan", "--model", "tiny", "--method", "lora",
                          "--devices", "8", "--mesh", "fsdp=2,tensor=2"], capture_output=True, text=True, timeout=300,
                         env=_env(), cwd=ROOT)
    assert bad.returncode == 2 and "mesh fsdp=2,tensor=2 has 4 devices but --devices is 8" in bad.stderr
