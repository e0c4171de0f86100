"""S2-Attn (lrj.attention.s2_attention) against independent references.

References built here, not from the library:

* ``roll_pattern``: the index bookkeeping of LongLoRA's ``forward_noflashattn``
  (torch.roll of the second half of the heads by ``-G/2``, ``G``-token groups,
  causal inside a group), as an explicit ``[N, T, T]`` mask;
* ``flash_pattern``: the ``cu_q_lens`` construction of ``forward_flashattn``
  transliterated line by line (batch 1, no padding), turned into a mask;
* ``reference_roll_forward``: ``forward_noflashattn``'s tensor code transliterated
  to numpy float64 (repeat_kv, shift, matmul + HF causal mask, fp32 softmax,
  shift back);
* ``naive_attention``: a plain masked-softmax attention in float32 given one of
  those masks; outputs AND VJPs of ``s2_attention`` are compared with it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank_jax as lrj
import lowrank_jax.attention  # noqa: F401  (lrj.attention)
from lowrank_jax.attention import S2Attention, resolve_group_size, s2_attention, s2_mask

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def fast_compile(request):
    """These tests compile many small programs; XLA's optimisation passes would take most of their time
    (about 2x), so they compile without them (``jax_disable_most_optimizations``; same numbers up to float
    rounding). The setting is restored afterwards. The benchmark smoke test compiles normally
    (it checks XLA's FLOP count of the optimized program)."""
    if request.node.name.startswith("test_bench"):
        yield
        return
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


# --------------------------------------------------------------------------- references


def roll_pattern(T, N, G, causal=True):
    """forward_noflashattn: heads N//2.. are rolled by -G/2 (torch.roll == np.roll), then G-token groups."""
    r = np.arange(T)
    allowed_rolled = (r[:, None] // G) == (r[None, :] // G)
    if causal:
        allowed_rolled &= r[None, :] <= r[:, None]
    out = np.zeros((N, T, T), bool)
    for n in range(N):
        order = np.roll(np.arange(T), -G // 2) if n >= N // 2 else np.arange(T)  # rolled slot -> original token
        out[n][np.ix_(order, order)] = allowed_rolled
    return out


def flash_pattern(T, N, G, causal=True):
    """forward_flashattn's varlen segments for bsz=1 and an all-ones key_padding_mask (repeated for 2 halves)."""
    bsz = 1
    cu_q_lens = np.array([0, T, 2 * T])                                   # unpad_input: 2 sequences of T tokens
    max_s = T
    cu_q_len_tmp = np.arange(0, max_s, G)
    cu_q_len_tmp = np.tile(np.stack([cu_q_len_tmp, cu_q_len_tmp + G // 2]), (bsz, 1)) + cu_q_lens[:-1][:, None]
    cu_q_lens = np.concatenate([cu_q_len_tmp, cu_q_lens[1:][:, None]], axis=-1).reshape(-1)
    segment = np.searchsorted(cu_q_lens, np.arange(2 * T), side="right")  # varlen sequence of each packed token
    out = np.zeros((N, T, T), bool)
    for half, heads in ((0, range(N // 2)), (1, range(N // 2, N))):
        seg = segment[half * T:(half + 1) * T]
        allowed = seg[:, None] == seg[None, :]
        if causal:
            allowed &= np.tril(np.ones((T, T), bool))
        out[list(heads)] = allowed
    return out


def reference_roll_forward(q, k, v, G):
    """forward_noflashattn's tensor code in numpy float64, BTNH in and out."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    bsz, q_len, num_heads, head_dim = q.shape
    query_states, key_states, value_states = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    key_states = np.repeat(key_states, num_heads // k.shape[2], axis=1)       # repeat_kv
    value_states = np.repeat(value_states, num_heads // k.shape[2], axis=1)

    def shift(qkv):
        qkv = qkv.copy()
        qkv[:, num_heads // 2:] = np.roll(qkv[:, num_heads // 2:], -G // 2, axis=2)
        return qkv.transpose(0, 2, 1, 3).reshape(bsz * (q_len // G), G, num_heads, head_dim).transpose(0, 2, 1, 3)

    query_states, key_states, value_states = map(shift, (query_states, key_states, value_states))
    attn_weights = query_states @ key_states.transpose(0, 1, 3, 2) / math.sqrt(head_dim)
    causal_mask = np.triu(np.full((G, G), np.finfo(np.float64).min), 1)       # HF 4D mask, top-left block
    attn_weights = attn_weights + causal_mask
    attn_weights = np.exp(attn_weights - attn_weights.max(-1, keepdims=True))
    attn_weights /= attn_weights.sum(-1, keepdims=True)
    attn_output = (attn_weights @ value_states).transpose(0, 2, 1, 3).reshape(bsz, q_len, num_heads, head_dim)
    attn_output[:, :, num_heads // 2:] = np.roll(attn_output[:, :, num_heads // 2:], G // 2, axis=1)
    return attn_output


def naive_attention(q, k, v, allowed, scale=None, cotangent=None):
    """Plain masked-softmax attention in numpy float64; ``allowed`` is ``[N, T, S]`` or ``[B, N, T, S]``.

    With a ``cotangent`` also returns the VJP ``(dq, dk, dv)``, derived by hand:
    ``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - rowsum(dP * P))``, ``dQ = s dS K``, ``dK = s dS^T Q``,
    summed over the query heads that share a key/value head.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    n, kh = q.shape[2], k.shape[2]
    rep = n // kh
    kr, vr = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = np.broadcast_to(allowed, (q.shape[0], n, q.shape[1], k.shape[1]))
    logits = np.where(allowed, np.einsum("btnh,bsnh->bnts", q, kr) * scale, -1e300)  # finite: no NaN rows
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p, vr)
    if cotangent is None:
        return out
    do = np.asarray(cotangent, np.float64)
    dv = np.einsum("bnts,btnh->bsnh", p, do)
    dp = np.einsum("btnh,bsnh->bnts", do, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bnts,bsnh->btnh", ds, kr) * scale
    dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    fold = lambda x: x.reshape(x.shape[0], x.shape[1], kh, rep, x.shape[3]).sum(3)  # noqa: E731
    return out, (dq, fold(dk), fold(dv))


def pattern(variant, T, N, G, causal=True):
    if variant == "roll":
        return roll_pattern(T, N, G, causal)
    if G == T:  # documented: one group, no shift -> plain attention on every head
        return roll_pattern(T, 1, G, causal).repeat(N, 0)
    return flash_pattern(T, N, G, causal)


def inputs(B, T, N, K, H, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H)).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, H)).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, H)).astype(dtype)
    ct = jax.random.normal(ks[3], (B, T, N, H)).astype(dtype)
    return q, k, v, ct


def probe(T, N, K, **kw):
    """The pattern s2_attention computes, observed: q = k = 0 and one-hot values (H = T) give out[i, n, j] > 0
    exactly for the keys j that query i attends to."""
    q = jnp.zeros((1, T, N, T))
    k = jnp.zeros((1, T, K, T))
    v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, K, T))
    out = jax.jit(lambda q, k, v: s2_attention(q, k, v, **kw))(q, k, v)
    return np.asarray(out[0] > 0).transpose(1, 0, 2)  # [N, T, T]


# --------------------------------------------------------------------------- outputs and VJPs

CASES = [  # B, T, N, K, G, dtype, variant
    (2, 16, 4, 2, 4, jnp.float32, "no_wrap"),     # GQA, 4 groups
    (2, 16, 4, 2, 4, jnp.float32, "roll"),
    (2, 16, 4, 2, 4, jnp.bfloat16, "no_wrap"),
    (2, 16, 4, 2, 4, jnp.bfloat16, "roll"),
    (1, 16, 4, 4, 8, jnp.float32, "no_wrap"),     # MHA, 2 groups (roll MHA: test_roll_matches_reference_...)
    (1, 24, 9, 3, 6, jnp.float32, "no_wrap"),     # SmolLM2's 9/3 heads: the half split (4 | 5) cuts a kv group;
]                                                 # G/2 = 3 is odd (roll 9/3: test_roll_matches_reference_...)


@pytest.mark.parametrize("case", CASES, ids=[f"B{b}T{t}N{n}K{k}G{g}-{jnp.dtype(d).name}-{v}"
                                             for b, t, n, k, g, d, v in CASES])
def test_output_and_vjp_match_naive(case):
    B, T, N, K, G, dtype, variant = case
    q, k, v, ct = inputs(B, T, N, K, 8, dtype)
    allowed = pattern(variant, T, N, G)

    @jax.jit
    def s2_and_vjp(q, k, v, ct):
        out, vjp = jax.vjp(lambda *a: s2_attention(*a, group_size=G, variant=variant), q, k, v)
        return out, vjp(ct)

    out, grads = s2_and_vjp(q, k, v, ct)
    ref, ref_grads = naive_attention(q, k, v, allowed, cotangent=ct)
    assert out.dtype == dtype and out.shape == q.shape
    assert all(g.dtype == dtype for g in grads)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=4e-2, rtol=4e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, **tol)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, **tol)


def test_roll_matches_reference_forward_transliteration():
    """The roll variant equals forward_noflashattn's computation, on SmolLM2's 9/3 heads (the reference rolls
    heads 4..8 after repeat_kv) with G = 6, and without GQA (unbatched (TNH) inputs, explicit scale)."""
    q, k, v, _ = inputs(1, 24, 9, 3, 8)
    out = jax.jit(lambda q, k, v: s2_attention(q, k, v, group_size=6, variant="roll"))(q, k, v)
    np.testing.assert_allclose(out, reference_roll_forward(q, k, v, 6), atol=2e-6)
    q, k, v, _ = inputs(1, 16, 4, 4, 8)
    out = jax.jit(lambda q, k, v: s2_attention(q, k, v, group_size=8, variant="roll", scale=0.5))(q[0], k[0], v[0])
    np.testing.assert_allclose(out, naive_attention(q, k, v, roll_pattern(16, 4, 8), scale=0.5)[0], atol=2e-6)


# --------------------------------------------------------------------------- the patterns


@pytest.mark.parametrize("T,N,G", [(16, 4, 4), (16, 3, 8), (24, 9, 6)])
def test_s2_mask_is_the_reference_bookkeeping(T, N, G):
    for causal in (True, False):
        np.testing.assert_array_equal(s2_mask(T, N, group_size=G, variant="roll", is_causal=causal),
                                      roll_pattern(T, N, G, causal))
        np.testing.assert_array_equal(s2_mask(T, N, group_size=G, is_causal=causal), flash_pattern(T, N, G, causal))


def test_roll_wraps_around_and_no_wrap_does_not():
    T, N, G = 16, 2, 4
    roll, no_wrap = roll_pattern(T, N, G), flash_pattern(T, N, G)
    # the reference's last rolled group is tokens 14, 15, 0, 1: tokens 0 and 1 see the future tokens 14 and 15
    future = np.triu(np.ones((T, T), bool), 1)
    assert np.argwhere(roll[1] & future).tolist() == [[0, 14], [0, 15], [1, 14], [1, 15]]
    assert not (roll[0] & future).any()
    assert not (no_wrap & future).any()
    # the two variants differ exactly by those wrapped links
    np.testing.assert_array_equal(roll[1] & ~no_wrap[1], roll[1] & future)
    np.testing.assert_array_equal(probe(T, N, N, group_size=G, variant="roll")[1], roll[1])


@pytest.mark.parametrize("variant,leaks", [("no_wrap", False), ("roll", True)])
def test_perturbing_future_tokens(variant, leaks):
    T, G, t = 16, 4, 9
    q, k, v, _ = inputs(1, T, 4, 2, 8)
    future = (jnp.arange(T) > t)[None, :, None, None]
    noise = lambda x, seed: x + jax.random.normal(jax.random.key(seed), x.shape) * future  # noqa: E731
    fn = jax.jit(lambda q, k, v: s2_attention(q, k, v, group_size=G, variant=variant))
    before, after = fn(q, k, v), fn(noise(q, 7), noise(k, 8), noise(v, 9))
    changed = np.abs(np.asarray(after - before))[0, : t + 1].max()
    if leaks:
        assert changed > 1e-3      # tokens 0, 1 of the shifted heads see tokens 14, 15
    else:
        assert changed == 0.0      # nothing at or before t depends on a later token


def test_no_wrap_with_one_group_is_full_causal_attention():
    q, k, v, ct = inputs(2, 16, 4, 2, 8)
    full = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    s2 = lambda q, k, v: s2_attention(q, k, v, group_size_ratio=1.0)  # noqa: E731  (G = T)

    @jax.jit
    def run(q, k, v, ct):
        out, vjp = jax.vjp(s2, q, k, v)
        ref, ref_vjp = jax.vjp(full, q, k, v)
        roll = s2_attention(q, k, v, group_size_ratio=1.0, variant="roll")
        return out, vjp(ct), ref, ref_vjp(ct), roll

    out, grads, ref, ref_grads, roll = run(q, k, v, ct)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)
    # the roll variant still shifts with one group (the reference does)
    assert np.abs(np.asarray(roll - ref)).max() > 1e-3


def test_not_causal():
    q, k, v, _ = inputs(1, 16, 4, 2, 8)
    run = jax.jit(lambda q, k, v: [s2_attention(q, k, v, group_size=4, variant=variant, is_causal=False)
                                   for variant in ("no_wrap", "roll")])
    for variant, out in zip(("no_wrap", "roll"), run(q, k, v)):
        np.testing.assert_allclose(out, naive_attention(q, k, v, pattern(variant, 16, 4, 4, causal=False)), atol=2e-6)


# --------------------------------------------------------------------------- masks and padding


def test_mask_is_intersected_with_the_pattern():
    B, T, N, K, G = 2, 16, 4, 2, 4
    q, k, v, _ = inputs(B, T, N, K, 8)
    rng = np.random.default_rng(0)
    user = rng.random((B, N, T, T)) < 0.7
    user |= np.eye(T, dtype=bool)                     # every row keeps a key
    run = jax.jit(lambda q, k, v, m: [s2_attention(q, k, v, group_size=G, variant=variant, mask=m)
                                      for variant in ("no_wrap", "roll")])
    for variant, got in zip(("no_wrap", "roll"), run(q, k, v, jnp.asarray(user))):
        want = naive_attention(q, k, v, pattern(variant, T, N, G)[None] & user)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_padding_mask_and_seq_lengths():
    """Right padding as the LLaMA model passes it (a causal (B1TS) mask), and as key_value_seq_lengths."""
    B, T, N, K, G = 2, 16, 4, 2, 4
    q, k, v, _ = inputs(B, T, N, K, 8)
    lengths = np.array([16, 11], np.int32)
    key_ok = np.arange(T)[None, :] < lengths[:, None]
    mask = np.tril(np.ones((T, T), bool))[None, None] & key_ok[:, None, None, :]   # (B1TS)

    @jax.jit
    def run(q, k, v):
        return [(s2_attention(q, k, v, group_size=G, variant=variant, mask=jnp.asarray(mask)),
                 s2_attention(q, k, v, group_size=G, variant=variant, key_value_seq_lengths=jnp.asarray(lengths)))
                for variant in ("no_wrap", "roll")], s2_attention(q, k, v, group_size=G,
                                                                  query_seq_lengths=jnp.asarray(lengths))

    results, by_query = run(q, k, v)
    for variant, (by_mask, by_len) in zip(("no_wrap", "roll"), results):
        # the mask is read in (query, key) coordinates: its causal part removes the roll's wrapped links,
        # while key_value_seq_lengths masks keys only and keeps them (the reference's roll computation)
        for got, allowed in ((by_mask, pattern(variant, T, N, G)[None] & mask),
                             (by_len, pattern(variant, T, N, G)[None] & key_ok[:, None, None, :])):
            # rows left with no key (padding queries in a group of padding) are unspecified: compare the others
            rows = allowed.any(-1).transpose(0, 2, 1)[..., None]
            want = naive_attention(q, k, v, allowed)
            np.testing.assert_allclose(np.where(rows, got, 0), np.where(rows, want, 0), atol=2e-6)
    np.testing.assert_array_equal(*results[0])  # no_wrap: the same thing
    # query_seq_lengths zeroes later queries, as in jax.nn.dot_product_attention
    np.testing.assert_allclose(by_query[0], results[0][1][0], atol=1e-6)
    assert not np.asarray(by_query[1, 11:]).any()
    np.testing.assert_allclose(by_query[1, :11], results[0][1][1, :11], atol=2e-6)


# --------------------------------------------------------------------------- API


def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = inputs(1, 16, 4, 2, 8)
    with pytest.raises(ValueError, match=r"T=16 is not a multiple of the group size G=6.*pad the sequence to 18"):
        s2_attention(q, k, v, group_size=6)
    with pytest.raises(ValueError, match=r"T=20 is not a multiple of the group size G=8"):
        s2_attention(*(jnp.zeros((1, 20) + x.shape[2:]) for x in (q, k, v)), group_size=8)
    with pytest.raises(ValueError, match=r"even.*G=5"):
        s2_attention(q, k, v, group_size=5)
    with pytest.raises(ValueError, match=r"even.*G=3 \(G = int\(T \* group_size_ratio\) = int\(12 \* 0.25\)\)"):
        s2_attention(*(jnp.zeros((1, 12) + x.shape[2:]) for x in (q, k, v)))
    with pytest.raises(ValueError, match=r"exceeds the sequence length"):
        s2_attention(q, k, v, group_size=32)
    with pytest.raises(ValueError, match=r"N=4 must be a multiple of the key/value heads K=3.*\(1, 16, 3, 8\)"):
        s2_attention(q, jnp.zeros((1, 16, 3, 8)), jnp.zeros((1, 16, 3, 8)), group_size=4)
    with pytest.raises(ValueError, match=r"S=8 must equal the query length T=16"):
        s2_attention(q, k[:, :8], v[:, :8], group_size=4)
    with pytest.raises(ValueError, match=r"`query` must be \(BTNH\)"):
        s2_attention(q[0, 0], k[0, 0], v[0, 0])
    with pytest.raises(ValueError, match=r"`value` shape"):
        s2_attention(q, k, v[..., :4], group_size=4)
    with pytest.raises(ValueError, match=r"share one floating dtype"):
        s2_attention(q, k.astype(jnp.bfloat16), v, group_size=4)
    with pytest.raises(ValueError, match=r"`variant` must be one of"):
        s2_attention(q, k, v, group_size=4, variant="shift")
    with pytest.raises(ValueError, match=r"does not broadcast to \(BNTS\)"):
        s2_attention(q, k, v, group_size=4, mask=jnp.ones((1, 3, 16, 16), bool))
    with pytest.raises(ValueError, match=r"`mask` must be boolean"):
        s2_attention(q, k, v, group_size=4, mask=jnp.ones((1, 1, 16, 16)))
    with pytest.raises(ValueError, match=r"`key_value_seq_lengths` must be an integer array of shape \(B,\)"):
        s2_attention(q, k, v, group_size=4, key_value_seq_lengths=jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"group_size_ratio"):
        S2Attention(group_size_ratio=0.0)
    with pytest.raises(ValueError, match=r"even integer"):
        S2Attention(group_size=7)
    assert resolve_group_size(8192) == 2048


def test_s2attention_is_a_hashable_attention_fn():
    from lowrank_jax.models.llama import LlamaConfig

    fn = S2Attention(group_size_ratio=0.25)
    assert fn == S2Attention() and hash(fn) == hash(S2Attention())
    assert LlamaConfig.tiny(attention_fn=fn) == LlamaConfig.tiny(attention_fn=S2Attention())
    q, k, v, _ = inputs(1, 16, 4, 2, 8)
    assert jax.eval_shape(fn, q, k, v).shape == q.shape
    assert lrj.attention.s2_attention is s2_attention


# --------------------------------------------------------------------------- benchmark smoke test


def test_bench_s2attn_tiny(tmp_path, capsys):
    """The benchmark runs end to end at a small size, and XLA's own accounting there shows the cost claim:
    forward+backward FLOPs ~G/T of full attention's and no T x T array in S2-Attn's optimized HLO."""
    spec = importlib.util.spec_from_file_location("bench_s2attn", BENCHMARKS / "bench_s2attn.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_s2attn"] = bench
    spec.loader.exec_module(bench)
    out, plot = tmp_path / "s2attn.json", tmp_path / "s2attn.png"
    assert bench.main(["--lengths", "256", "--heads", "2", "--head-dim", "8", "--runs", "1", "--warmup", "0",
                       "--out", str(out), "--plot", str(plot)]) == 0
    assert "| T" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/bench_s2attn.py")
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", "s2 no_wrap", "s2 roll"}
    for variant, r in rows.items():
        assert r["seq_len"] == 256 and r["flops"] > 0 and r["temp_bytes"] >= 0 and r["time_s"] > 0
        assert r["full_score_matrix"] == (variant == "full")
        if variant == "full":
            assert r["flops_ratio"] == 1.0
        else:
            assert r["group_size"] == 64 and 0.2 < r["flops_ratio"] < 0.3
    assert all(c.startswith("PASS") for c in result["checks"] if "flops_ratio" in c)
    assert plot.read_bytes().startswith(b"\x89PNG")
