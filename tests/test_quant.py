"""lowrank_jax.quant: NF4/FP4 (+ double quantisation) and int8 against bitsandbytes, pytree behaviour, bad input.

References are recorded from bitsandbytes 0.50.2 by ``tests/fixtures/make_bnb_references.py``
(``bnb_references.npz``, ``bnb_linear4bit.safetensors``); torch is never needed here.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lowrank_jax import quant
from lowrank_jax.quant import blockwise, codes, int8, nf4

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REF = dict(np.load(FIXTURES / "bnb_references.npz", allow_pickle=False))
VARIANTS = sorted({k.rsplit("/", 1)[0] for k in REF if k.startswith("quant4/") and k.endswith("/packed")})


def bf16(bits: np.ndarray) -> np.ndarray:
    return bits.view(ml_dtypes.bfloat16)


def nibbles(packed) -> np.ndarray:
    packed = np.asarray(packed).reshape(-1)
    return np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)


def case_input(case: str):
    if f"quant4/{case}/x" in REF:
        return REF[f"quant4/{case}/x"]
    return jnp.asarray(bf16(REF[f"quant4/{case}/x_bf16"]))


def test_code_books_are_bitsandbytes():
    np.testing.assert_array_equal(codes.NF4, REF["nf4_map"])
    np.testing.assert_array_equal(codes.FP4, REF["fp4_map"])
    np.testing.assert_array_equal(codes.DYNAMIC, REF["dynamic_map"])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.removeprefix("quant4/"))
def test_4bit_matches_bitsandbytes(variant):
    """Same packed bytes, absmax, nested absmax, offset and dequantised values as bnb's quantize_4bit."""
    _, case, name = variant.split("/")
    quant_type, block, mode = name.split("_")
    x = case_input(case)
    q = nf4.quantize(x, int(block[2:]), mode == "dq", quant_type)
    ref = {k.rsplit("/", 1)[1]: REF[k] for k in REF if k.startswith(variant + "/")}

    ours, theirs = nibbles(q.packed), nibbles(ref["packed"])
    same = slice(None)  # where the dequantised values must be equal
    if quant_type == "nf4":
        np.testing.assert_array_equal(np.asarray(q.packed), ref["packed"])
    else:
        # FP4 follows CUDA's dQuantizeFP4 (sign bit from x < 0, nearest magnitude, ties to the smaller one);
        # the portable backend searches the signed code: +-0 swapped, negative exact ties to the larger magnitude
        flat = np.asarray(jnp.asarray(x, jnp.float32)).reshape(-1)
        n = flat.size
        differ = (ours != theirs)[:n]
        zero = np.isin(theirs[:n], (0, 8)) & np.isin(ours[:n], (0, 8)) & differ
        np.testing.assert_array_equal(ours[:n][zero] == 8, flat[zero] < 0)
        scaled = np.abs(np.asarray(blockwise.absmax_scale(jnp.asarray(flat), int(block[2:]))[0]))
        tie = differ & ~zero
        mine, other = np.abs(codes.FP4[ours[:n][tie]]), np.abs(codes.FP4[theirs[:n][tie]])
        assert np.all(mine < other) and np.all(flat[tie] < 0)
        np.testing.assert_array_equal(scaled[tie], (mine + other) / np.float32(2))  # exactly at the midpoint
        same = ~tie.reshape(np.shape(x))
    if mode == "dq":
        np.testing.assert_array_equal(np.asarray(q.absmax), ref["absmax"])  # nested codes: nearest by midpoint
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), ref["nested_absmax"])
        assert np.asarray(q.offset) == ref["offset"]  # torch.mean's float32 summation order
        assert np.abs(np.asarray(q.absmax).astype(int) - ref["absmax_cpu"].astype(int)).max() <= 1  # CPU build: +-1
    else:
        np.testing.assert_array_equal(np.asarray(q.absmax), ref["absmax"])
        assert q.nested_absmax is None and q.offset is None
    if "dequant_f32" in ref:
        np.testing.assert_array_equal(np.asarray(nf4.dequantize(q, jnp.float32))[same], ref["dequant_f32"][same])
    if "dequant_f32_cpu" in ref:
        # bitsandbytes 0.50.2's CPU kernel reads the absmax of (r, c) at r * (cols // B) + c // B: right only
        # when the last dimension is a multiple of the block size B
        rows, cols = ref["dequant_f32"].shape
        r, c = np.divmod(np.arange(rows * cols), cols)
        code, absmax = codes.code_book(quant_type)[ours], np.asarray(nf4.dequantize_absmax(q))
        B = q.block_size
        np.testing.assert_array_equal((code * absmax[np.minimum(r * (cols // B) + c // B, absmax.size - 1)]).reshape(
            rows, cols), ref["dequant_f32_cpu"])
        assert np.array_equal(ref["dequant_f32_cpu"], ref["dequant_f32"]) == (cols % B == 0)
    if "dequant_bf16" in ref:
        out = nf4.dequantize(q)  # default dtype: bfloat16
        assert out.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(out, np.float32)[same],
                                      bf16(ref["dequant_bf16"]).astype(np.float32)[same])


def test_fp4_zero_sign_and_ties():
    x = np.array([1.0, 1e-3, -1e-3, 0.0, -0.0, 0.3, -0.3], np.float32)
    q = nf4.quantize(x, quant_type="fp4", double_quant=False)
    assert nibbles(q.packed)[:7].tolist() == [3, 0, 8, 0, 0, 4, 12]
    # NF4 ties at an exact float32 midpoint go to the lower code (torch.bucketize(right=False), CUDA's `x > t`)
    mid = (codes.NF4[:-1] + codes.NF4[1:]) / np.float32(2)
    q = nf4.quantize(np.concatenate([[1.0], mid]).astype(np.float32), double_quant=False)
    assert nibbles(q.packed)[1:16].tolist() == list(range(15))


def test_dynamic_map_cpu_build_differences():
    """The nested 8-bit step: nearest code (portable backend, CUDA); bnb's CPU build is off by one code at times."""
    x = REF["dynamic/x"]
    got, absmax = jax.jit(lambda v: blockwise.quantize_codebook(v, codes.DYNAMIC, 256))(x)
    got = np.asarray(got)
    np.testing.assert_array_equal(got, REF["dynamic/codes_portable"])
    np.testing.assert_array_equal(np.asarray(absmax), REF["dynamic/absmax"])
    cpu = REF["dynamic/codes_cpu"]
    differ = got != cpu
    assert 0 < differ.sum() < 0.01 * x.size, differ.sum()  # 7 of 4196 codes with bitsandbytes 0.50.2
    assert np.all(np.abs(got[differ].astype(int) - cpu[differ].astype(int)) == 1)
    scaled = x / np.repeat(REF["dynamic/absmax"], 256)[: x.size]
    # ours is never farther from the scaled value than the CPU build's choice
    dist = lambda c: np.abs(scaled[differ] - codes.DYNAMIC[c[differ]])  # noqa: E731
    assert np.all(dist(got) <= dist(cpu) + 1e-7)


def hash_values(n: int) -> np.ndarray:
    i = np.arange(n, dtype=np.uint64)
    x = ((i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)).astype(np.float64) / 2**32 * 0.1
    return x.astype(np.float32)


def test_torch_mean_order():
    """The double-quantisation offset: torch.mean's float32 summation order (on 1, 2 and 4 threads)."""
    keys = [k for k in REF if k.startswith("torch_mean/")]
    assert len(keys) == 12
    for key in keys:
        n, threads = (int(v) for v in key.split("/")[1:])
        got = jax.jit(functools.partial(blockwise.torch_mean, threads=threads))(hash_values(n))
        assert np.float32(got) == REF[key], (n, threads)


def test_from_bnb_linear4bit_state_dict():
    """A real Linear4bit state dict (safetensors, numpy only) loads, dequantises like bnb, writes back byte for byte."""
    state = load_file(str(FIXTURES / "bnb_linear4bit.safetensors"))
    assert quant.bnb_weight_keys(state) == ["0.weight", "1.weight"]
    w0 = quant.from_bnb_state(state, "0.weight")
    w1 = quant.from_bnb_state(state, "1.weight")
    assert (w0.quant_type, w0.double_quant, w0.shape, w0.block_size) == ("nf4", True, (64, 128), 64)
    assert (w1.quant_type, w1.double_quant, w1.shape) == ("fp4", False, (32, 64))
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(w0, jnp.float32)), REF["linear4bit/dequant0"])
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(w1, jnp.float32)), REF["linear4bit/dequant1"])
    kernel = quant.from_bnb_state(state, "0.weight", transpose=True)  # a Flax [in, out] kernel
    assert kernel.shape == (128, 64) and kernel.stored_shape == (64, 128)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(kernel, jnp.float32)), REF["linear4bit/dequant0"].T)
    x = REF["linear4bit/x"]
    h = x @ np.asarray(nf4.dequantize(kernel, jnp.float32)) + state["0.bias"]
    y = h @ np.asarray(nf4.dequantize(w1, jnp.float32)).T
    np.testing.assert_allclose(y, REF["linear4bit/y"], rtol=1e-5, atol=1e-5)
    for key, q in (("0.weight", w0), ("1.weight", w1), ("0.weight", kernel)):
        written = quant.to_bnb_state(q, key)
        stored = {k: v for k, v in state.items() if k.startswith(key)}
        assert written.keys() == stored.keys()
        for k in stored:
            assert written[k].dtype == stored[k].dtype and written[k].shape == stored[k].shape, k
            np.testing.assert_array_equal(written[k], stored[k], err_msg=k)
    # quantising the same float weight here gives the same bytes and statistics
    q = nf4.quantize(REF["linear4bit/w0"].T, transpose=True)
    np.testing.assert_array_equal(np.asarray(q.packed), state["0.weight"].reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), state["0.weight.nested_absmax"])
    np.testing.assert_array_equal(np.asarray(q.absmax), REF["linear4bit/absmax0_portable"])
    meta = json.loads(bytes(state["0.weight.quant_state.bitsandbytes__nf4"]))
    assert np.float32(q.offset) == np.float32(meta["nested_offset"])


def test_bnb_state_errors():
    state = load_file(str(FIXTURES / "bnb_linear4bit.safetensors"))
    with pytest.raises(KeyError, match=r"0\.weight.*1\.weight"):
        quant.from_bnb_state(state, "2.weight")
    bad = dict(state, **{"0.weight.quant_map": np.zeros(16, np.float32)})
    with pytest.raises(ValueError, match="custom code books"):
        quant.from_bnb_state(bad, "0.weight")
    bad = dict(state, **{"0.weight": state["0.weight"][:-1]})
    with pytest.raises(ValueError, match="bytes"):
        quant.from_bnb_state(bad, "0.weight")
    with pytest.raises(ValueError, match="block sizes"):
        quant.to_bnb_state(nf4.quantize(np.ones(64, np.float32), block_size=16))


def test_int8_matches_bitsandbytes():
    for name in ("f32", "bf16"):
        w = REF["int8/f32/w"] if name == "f32" else jnp.asarray(bf16(REF["int8/bf16/w_bf16"]))
        q = int8.quantize(w, channel_axis=0)  # bnb's rows = channels of a torch [out, in] weight
        np.testing.assert_array_equal(np.asarray(q.codes), REF[f"int8/{name}/codes"])
        np.testing.assert_array_equal(np.asarray(q.absmax), REF[f"int8/{name}/absmax"])
        np.testing.assert_array_equal(np.asarray(int8.dequantize(q, jnp.float32)), REF[f"int8/{name}/dequant_f32"])
        kernel = int8.quantize(jnp.asarray(w).T)  # Flax [in, out], channel_axis=-1
        np.testing.assert_array_equal(np.asarray(kernel.codes), REF[f"int8/{name}/codes"].T)


def test_int8_blockwise_and_zero_channels():
    x = np.random.default_rng(0).standard_normal((5, 30)).astype(np.float32)
    x[1] = 0.0
    q = int8.quantize_blockwise(x, block_size=32)  # 150 values: 4 full blocks and one of 22
    assert q.codes.shape == (150,) and q.absmax.shape == (5,)
    err = np.abs(np.asarray(int8.dequantize(q, jnp.float32)) - x).reshape(-1)
    bound = np.repeat(np.asarray(q.absmax), 32)[:150] / 254 * (1 + 1e-6)
    assert np.all(err <= bound)
    per_channel = int8.quantize(x, channel_axis=0)
    assert np.all(np.asarray(per_channel.codes)[1] == 0) and np.asarray(per_channel.absmax)[1] == 0
    assert np.all(np.asarray(int8.dequantize(per_channel, jnp.float32))[1] == 0)
    assert q.bits_per_param == pytest.approx(8 + 32 * 5 / 150)


def test_bits_per_param():
    assert nf4.bits_per_param(64, double_quant=False) == 4.5
    assert nf4.bits_per_param(64) == pytest.approx(4.127, abs=5e-4)  # 4 + 8/64 + 32/(256 * 64)
    w = jax.random.normal(jax.random.key(0), (256, 320))  # 1280 blocks: 5 nested blocks
    n = w.size
    for double_quant, expected in ((False, 4.5), (True, 4 + 8 / 64 + 32 * 5 / n + 32 / n)):
        q = nf4.quantize(w, double_quant=double_quant)
        assert q.bits_per_param == pytest.approx(expected, rel=1e-12)
        assert q.bits_per_param == pytest.approx(nf4.bits_per_param(64, double_quant, n=n), rel=1e-12)


def test_odd_element_count_padding():
    x = np.linspace(-1, 1, 129, dtype=np.float32)  # 129 values: 2 full blocks and a partial one, odd count
    for quant_type, zero in (("nf4", 7), ("fp4", 0)):
        q = nf4.quantize(x, quant_type=quant_type)
        assert q.packed.shape == (65,) and q.absmax.shape == (3,)
        assert int(q.packed[-1]) & 0xF == zero  # low nibble of the last byte: the code of 0.0
        assert nf4.dequantize(q, jnp.float32).shape == (129,)
    # an all-zero partial block stores absmax float32(1e-38), a full one 0 (bnb's portable backend)
    q = nf4.quantize(np.concatenate([np.zeros(64), np.ones(64), np.zeros(3)]).astype(np.float32), double_quant=False)
    assert np.asarray(q.absmax).tolist() == [0.0, 1.0, float(np.float32(1e-38))]
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(q, jnp.float32)), np.repeat([0.0, 1.0, 0.0], [64, 64, 3]))


def test_pytree_jit_vmap_and_tree_ops():
    w = jax.random.normal(jax.random.key(1), (4, 64, 96)) * 0.02  # 4 stacked layers
    q3 = nf4.quantize(w[3])
    leaves, treedef = jax.tree.flatten(q3)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
    assert jax.tree.unflatten(treedef, leaves).shape == (64, 96)
    equal = lambda a, b: jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.array_equal(u, v)), a, b))  # noqa: E731
    # quantize under jit equals eager; shape and format are static (part of the treedef)
    qj = jax.jit(nf4.quantize)(w[3])
    assert jax.tree.structure(qj) == treedef and equal(qj, q3)
    assert jax.tree.structure(jax.eval_shape(functools.partial(nf4.quantize, quant_type="fp4"), w[3])) != treedef
    # eval_shape gives an abstract node (an orbax restore target)
    abstract = jax.eval_shape(nf4.quantize, w[3])
    assert isinstance(abstract, nf4.QuantizedArray) and abstract.packed.shape == (3072,)
    # vmap over layers = per-layer quantisation (every leaf, bit for bit); dequantize maps over the stack
    qs = jax.vmap(nf4.quantize)(w)
    assert qs.packed.shape == (4, 3072) and qs.offset.shape == (4,) and qs.shape == (64, 96)
    assert equal(jax.tree.map(lambda leaf: leaf[3], qs), q3)
    dense = nf4.dequantize(qs, jnp.float32)
    assert dense.shape == (4, 64, 96)
    np.testing.assert_array_equal(np.asarray(dense[3]), np.asarray(nf4.dequantize(q3, jnp.float32)))
    # scan over the stacked node, as nn.scan slices it
    total = jax.lax.scan(lambda c, qi: (c + nf4.dequantize(qi, jnp.float32).sum(), None), 0.0, qs)[0]
    np.testing.assert_allclose(total, dense.sum(), rtol=1e-5)


def test_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    w = jax.random.normal(jax.random.key(2), (64, 96))
    tree = {"dense": {"kernel": nf4.quantize(w), "bias": jnp.ones(96)},
            "fp4": nf4.quantize(w, double_quant=False, quant_type="fp4"), "int8": int8.quantize(w)}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", tree)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", jax.eval_shape(lambda: tree))
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype and bool(jnp.array_equal(a, b)), restored, tree))


# --------------------------------------------------------------------------- checks in their own process
# Sharding needs simulated devices (set before jax starts) and the bitsandbytes check needs torch, so both run
# in subprocesses, started when this module's first test runs so that they overlap with the other tests.

SHARDING_SCRIPT = """
import json
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from lowrank_jax import quant
out = {"devices": jax.device_count()}
w = jax.random.normal(jax.random.key(0), (128, 256)) * 0.02
q = quant.nf4.quantize(w)
dense = quant.nf4.dequantize(q, jnp.float32)
for mode in ("explicit", "auto"):
    mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit if mode == "explicit" else AxisType.Auto,))
    specs = jax.tree.map(lambda leaf: P("x") if leaf.ndim == 1 and leaf.shape[0] % 4 == 0 else P(), q)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
    qs = jax.device_put(q, shardings)
    r = {"packed": str(qs.packed.sharding.spec), "absmax": str(qs.absmax.sharding.spec),
         "shards": len(qs.packed.addressable_shards)}
    with jax.set_mesh(mesh):
        d = jax.jit(lambda q: quant.nf4.dequantize(q, jnp.float32, out_sharding=P("x", None)))(qs)
        r["dequant_equal"] = bool(jnp.array_equal(d, dense))
        r["dequant_spec"] = str(d.sharding.spec)
        ws = jax.device_put(w, NamedSharding(mesh, P("x", None)))
        q2 = jax.jit(quant.nf4.quantize, out_shardings=shardings)(ws)
        r["quant_equal"] = bool(jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), q, q2)))
        r["quant_spec"] = str(q2.packed.sharding.spec)
    out[mode] = r
print(json.dumps(out))
"""

BNB_LOAD_SCRIPT = """
import sys, numpy as np, torch, bitsandbytes as bnb
from safetensors.torch import load_file
directory = sys.argv[1]
state = load_file(directory + "/layer.safetensors")
stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32)
# how transformers loads a pre-quantised bitsandbytes checkpoint
layer.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, requires_grad=False, device="cpu",
                                                   module=layer)
layer.train()  # the generic dequantise + matmul path
with torch.no_grad():
    np.save(directory + "/y.npy", layer(torch.tensor(np.load(directory + "/x.npy"))).numpy())
"""


def _start(args, directory, env=None):
    with open(directory / "stdout", "w") as out, open(directory / "stderr", "w") as err:  # the child keeps its copies
        return subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True, env=env)


def _finish(proc, directory) -> str:
    proc.wait(timeout=600)
    assert proc.returncode == 0, (directory / "stderr").read_text()[-3000:]
    return (directory / "stdout").read_text()


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Starts the subprocess checks that the selected tests need; yields ``{name: (process, directory)}``."""
    selected = {item.originalname for item in request.session.items if item.module.__name__ == __name__}
    jobs = {}
    if "test_sharding_on_a_4_device_mesh" in selected:
        directory = tmp_path_factory.mktemp("sharding")
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
        jobs["sharding"] = (_start(["-c", SHARDING_SCRIPT], directory, env), directory)
    have_bnb = all(importlib.util.find_spec(m) is not None for m in ("torch", "bitsandbytes"))
    if "test_to_bnb_state_loads_in_bitsandbytes" in selected and have_bnb:
        directory = tmp_path_factory.mktemp("bnb_load")
        # in_features a multiple of 64: bitsandbytes 0.50.2's CPU dequantisation kernel is wrong otherwise
        kernel = jax.random.normal(jax.random.key(3), (128, 64)) * 0.05  # Flax [in, out]
        q = nf4.quantize(kernel, transpose=True)  # stored in torch's [out, in] order
        save_file(quant.to_bnb_state(q, "weight"), str(directory / "layer.safetensors"))
        x = np.random.default_rng(0).standard_normal((4, 128)).astype(np.float32)
        np.save(directory / "x.npy", x)
        np.save(directory / "expected.npy", x @ np.asarray(nf4.dequantize(q, jnp.float32)))
        jobs["bnb_load"] = (_start(["-c", BNB_LOAD_SCRIPT, str(directory)], directory), directory)
    yield jobs
    for proc, _ in jobs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sharding_on_a_4_device_mesh(background):
    """device_put with NamedShardings on the packed codes; jit quantize/dequantize on Explicit and Auto meshes."""
    report = json.loads(_finish(*background["sharding"]).strip().splitlines()[-1])
    assert report["devices"] == 4
    for mode in ("explicit", "auto"):
        r = report[mode]
        assert r["packed"] == "P('x',)" and r["absmax"] == "P('x',)" and r["shards"] == 4, r
        assert r["dequant_equal"] and r["quant_equal"] and r["quant_spec"] == "P('x',)", r
    assert report["explicit"]["dequant_spec"] == "P('x', None)"


def test_to_bnb_state_loads_in_bitsandbytes(background):
    """What to_bnb_state writes, bitsandbytes loads (Params4bit.from_prequantized) and runs as a Linear4bit."""
    if "bnb_load" not in background:
        pytest.skip("bitsandbytes (with torch) is not installed")
    proc, directory = background["bnb_load"]
    _finish(proc, directory)
    np.testing.assert_allclose(np.load(directory / "y.npy"), np.load(directory / "expected.npy"), rtol=1e-5,
                               atol=1e-5)


def test_quantize_params_and_back():
    from flax import nnx

    params = {"params": {"layers_0": {"q_proj": {"kernel": jnp.ones((64, 64)), "bias": jnp.zeros(64)},
                                      "mlp": {"kernel": jnp.full((64, 64), 0.5)}},
                         "embed": {"embedding": jnp.ones((10, 64))}}}
    q = quant.quantize_params(params, [r".*/q_proj/kernel", r".*/mlp/kernel"])
    layer = q["params"]["layers_0"]
    assert all(isinstance(layer[name]["kernel"], nf4.QuantizedArray) for name in ("q_proj", "mlp"))
    assert layer["q_proj"]["bias"] is params["params"]["layers_0"]["q_proj"]["bias"]
    assert q["params"]["embed"]["embedding"] is params["params"]["embed"]["embedding"]
    dense = jax.jit(quant.dequantize_params)(q)
    assert jax.tree.structure(dense) == jax.tree.structure(params)
    assert dense["params"]["layers_0"]["mlp"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(dense["params"]["layers_0"]["mlp"]["kernel"], np.float32), 0.5)
    # a callable target and another quantiser
    q8 = quant.quantize_params(params, lambda path, leaf: leaf.ndim == 2 and "embed" not in path, int8.quantize)
    assert isinstance(q8["params"]["layers_0"]["mlp"]["kernel"], int8.Int8Array)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_params(q8, jnp.float32)["params"]["layers_0"]["mlp"][
        "kernel"]), 0.5)
    # scanned layers: each slice quantised on its own, the stack axis in front of every leaf
    stacked = {"layers": {"kernel": jax.random.normal(jax.random.key(0), (3, 64, 64))}}
    qs = quant.quantize_params(stacked, r"layers/kernel", stack_axes={r"layers/.*": 1})
    assert qs["layers"]["kernel"].packed.shape == (3, 2048)
    np.testing.assert_array_equal(np.asarray(qs["layers"]["kernel"].packed[2]),
                                  np.asarray(nf4.quantize(stacked["layers"]["kernel"][2]).packed))
    assert quant.dequantize_params(qs)["layers"]["kernel"].shape == (3, 64, 64)
    # NNX state: the Variable wrapper is kept
    state = quant.quantize_params(nnx.state(nnx.Linear(64, 64, rngs=nnx.Rngs(0))), r"kernel")
    assert isinstance(state["kernel"], nnx.Param) and quant.is_quantized(state["kernel"].get_value())
    assert quant.dequantize_params(state, jnp.float32)["kernel"].get_value().shape == (64, 64)
    # errors
    with pytest.raises(ValueError, match=r"matched no parameter.*'params/layers_0/q_proj/kernel'"):
        quant.quantize_params(params, r".*/v_proj/kernel")
    with pytest.raises(ValueError, match="already quantised"):
        quant.quantize_params(q, r".*/mlp/kernel")
    with pytest.raises(TypeError, match="floating-point.*int32"):
        quant.quantize_params({"w": jnp.ones((4, 4), jnp.int32)}, "w")
    with pytest.raises(ValueError, match="stack axes"):
        quant.quantize_params(stacked, r"layers/kernel", stack_axes=3)


def test_bad_input():
    x = np.ones((8, 64), np.float32)
    for bad in (0, -64, 48, 64.0, True, "64"):
        with pytest.raises(ValueError, match="block_size"):
            nf4.quantize(x, block_size=bad)
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize(x, quant_type="int4")
    with pytest.raises(TypeError, match="int32"):
        nf4.quantize(np.ones((8, 64), np.int32))
    with pytest.raises(TypeError, match="bool"):
        int8.quantize(np.ones((8, 64), bool))
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(np.ones((0, 64), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        nf4.quantize(np.ones((2, 8, 64), np.float32), transpose=True)
    with pytest.raises(ValueError, match="channel_axis"):
        int8.quantize(x, channel_axis=2)
    # NaN / inf: a clear error when the input is concrete...
    for value in (np.nan, np.inf):
        y = x.copy()
        y[3, 5] = value
        with pytest.raises(ValueError, match=r"1 non-finite values .* index \(3, 5\)"):
            nf4.quantize(y)
        with pytest.raises(ValueError, match="non-finite"):
            int8.quantize(y)
    # ...and under jit the non-finite value poisons its block (or, with double quantisation, every block)
    y = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    y[1, 7] = np.nan
    plain = np.asarray(jax.jit(lambda v: nf4.dequantize(nf4.quantize(v, double_quant=False), jnp.float32))(y))
    assert np.isnan(plain[1]).all() and np.isfinite(plain[[0, 2, 3]]).all()
    nested = np.asarray(jax.jit(lambda v: nf4.dequantize(nf4.quantize(v), jnp.float32))(y))
    assert np.isnan(nested).all()
    # a block larger than the array: one partial block, as in bitsandbytes
    q = nf4.quantize(np.arange(1.0, 21.0, dtype=np.float32), block_size=64)
    assert q.absmax.shape == (1,) and float(nf4.dequantize(q, jnp.float32)[-1]) == 20.0


def test_bench_quant_smoke(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_quant.py"
    spec = importlib.util.spec_from_file_location("bench_quant", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_quant"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "quant.json"
    args = ["--rows", "64", "--cols", "96", "--runs", "2", "--no-bnb", "--no-smollm2", "--out", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    rows = {(r["tensor"], r["format"]): r for r in result["rows"]}
    nf4_dq = rows[("gaussian 64x96", "nf4 + double quant")]
    assert nf4_dq["bits_per_param"] == pytest.approx(4.135, abs=1e-3)
    assert rows[("gaussian 64x96", "nf4")]["bits_per_param"] == 4.5
    assert nf4_dq["rms_error"] > 0 and nf4_dq["quantize_ratio"] > 0
