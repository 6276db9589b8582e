"""scaled_dot_product_attention through tinytf Tensors: both backends agree, differentiate correctly, and reject
what they cannot do with an error that says what to do instead."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinytf
from attention.attention_reference import assert_as_accurate_as_naive, reference_attention
from tinytf.attention import AUTO_FLASH_MIN_SCORES, _choose_backend, scaled_dot_product_attention
from tinytf.attention import cuda as cuda_backend
from tinytf.attention.dropout import dropout_keep
from tinytf.testing import gradcheck


def tensors(*arrays, requires_grad=True):
    return [tinytf.tensor(a, requires_grad=requires_grad) for a in arrays]


def random_qkv(B, Hq, Hkv, T, S, D, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, T, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, S, D)).astype(dtype)
    dO = rng.standard_normal((B, Hq, T, D)).astype(dtype)
    return q, k, v, dO


def attention_with_grads(backend, q, k, v, dO, **options):
    """Output and dq, dk, dv of the public op with the given backend, as arrays."""
    tq, tk, tv = tensors(q, k, v)
    out = scaled_dot_product_attention(tq, tk, tv, backend=backend, **options)
    out.backward(dO)
    return out.numpy(), tq.grad, tk.grad, tv.grad


@st.composite
def problems(draw):
    Hkv, G = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    T, S = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    is_causal = draw(st.booleans())  # with T > S, the first T - S queries see no key
    return dict(B=draw(st.integers(1, 2)), Hq=Hkv * G, Hkv=Hkv, T=T, S=S, D=draw(st.sampled_from([3, 16, 59])),
                is_causal=is_causal, key_padding=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
                dtype=draw(st.sampled_from([np.float32, np.float64])))


@settings(max_examples=max(15, settings.default.max_examples // 2))
@given(problem=problems())
def test_flash_matches_naive_values_and_gradients(problem):
    q, k, v, dO = random_qkv(*(problem[n] for n in ("B", "Hq", "Hkv", "T", "S", "D", "dtype", "seed")))
    mask = None
    if problem["key_padding"]:
        mask = np.random.default_rng(problem["seed"]).random((problem["B"], 1, 1, problem["S"])) < 0.8
    options = dict(is_causal=problem["is_causal"], attn_mask=mask)
    flash = attention_with_grads("flash", q, k, v, dO, **options)
    naive = attention_with_grads("naive", q, k, v, dO, **options)
    assert all(a.dtype == q.dtype for a in flash + naive)
    assert_as_accurate_as_naive(flash, q, k, v, dO, **options)
    assert_as_accurate_as_naive(naive, q, k, v, dO, factor=1.5, **options)


@pytest.mark.parametrize("backend", ["naive", "flash"])
@pytest.mark.parametrize("is_causal, key_padding, Hq, Hkv, T, S", [
    (True, False, 2, 1, 3, 5),
    (False, True, 2, 2, 4, 3),
    (True, True, 3, 1, 2, 4),
])
def test_gradcheck_in_float64(backend, is_causal, key_padding, Hq, Hkv, T, S):
    q, k, v, _ = random_qkv(2, Hq, Hkv, T, S, 4, seed=11)
    mask = np.array([[[[True] * S]], [[[False] + [True] * (S - 1)]]]) if key_padding else None
    assert gradcheck(
        lambda q, k, v: scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, backend=backend),
        *tensors(q, k, v),
    )


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_grouped_query_attention_equals_attention_on_repeated_heads(backend):
    q, k, v, dO = random_qkv(2, 6, 2, 13, 21, 8, seed=4)
    grouped = attention_with_grads(backend, q, k, v, dO, is_causal=True)
    repeated = attention_with_grads("naive", q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), dO, is_causal=True)
    np.testing.assert_allclose(grouped[0], repeated[0], rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grouped[1], repeated[1], rtol=1e-12, atol=1e-13)
    for got, want in zip(grouped[2:], repeated[2:]):  # a shared K/V head collects the gradients of its group
        np.testing.assert_allclose(got, want.reshape(2, 2, 3, 21, 8).sum(axis=2), rtol=1e-12, atol=1e-12)


def test_naive_supports_general_boolean_and_additive_masks():
    q, k, v, dO = random_qkv(2, 2, 1, 5, 7, 4, seed=8)
    rng = np.random.default_rng(8)
    bool_mask = rng.random((2, 2, 5, 7)) < 0.6
    bool_mask[0, 0, 1] = False  # one row sees nothing
    additive = np.where(rng.random((5, 7)) < 0.3, -np.inf, rng.standard_normal((5, 7)))
    for mask in (bool_mask, additive):
        got = attention_with_grads("naive", q, k, v, dO, attn_mask=mask, is_causal=True)
        want = reference_attention(q, k, v, dO, attn_mask=mask, is_causal=True)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    assert not got[0][0, 0, 1].any() if mask is bool_mask else True


def test_naive_differentiates_an_additive_tensor_mask_under_grouped_query_attention():
    q, k, v, dO = random_qkv(2, 4, 2, 3, 5, 4, seed=9)
    mask = np.random.default_rng(9).standard_normal((4, 3, 5))  # per query head: the groups must not mix them up
    tq, tk, tv, tmask = tensors(q, k, v, mask)
    out = scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, is_causal=True, backend="naive")
    out.backward(dO)
    want = reference_attention(q, k, v, dO, attn_mask=mask, is_causal=True)
    for got, expected in zip((out.numpy(), tq.grad, tk.grad, tv.grad), want):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert gradcheck(
        lambda q, k, v, mask: scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True, backend="naive"),
        *tensors(q, k, v, mask),
    )


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_rows_without_visible_keys_give_zeros_not_nan(backend):
    q, k, v, dO = random_qkv(2, 2, 2, 4, 6, 8, dtype=np.float32)
    mask = np.ones((2, 1, 1, 6), dtype=bool)
    mask[1] = False  # the second sequence is all padding
    mask[0, ..., :2] = False  # with is_causal, query 0 of the first sequence sees keys 0..2, of which only 2
    out, dq, dk, dv = attention_with_grads(backend, q, k, v, dO, attn_mask=mask, is_causal=True)
    for array in (out, dq, dk, dv):
        assert np.isfinite(array).all()
    assert not out[1].any() and not dq[1].any() and not dk[1].any() and not dv[1].any()
    assert not dk[0, :, :2].any() and not dv[0, :, :2].any()


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_extreme_logits_stay_finite(backend):
    rng = np.random.default_rng(9)
    q, k, v, dO = (1e3 * rng.standard_normal((1, 2, 9, 4)).astype(np.float32) for _ in range(4))
    out, *grads = attention_with_grads(backend, q, k, v, dO, scale=100.0, is_causal=True)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_half_precision_returns_half(backend):
    q, k, v, dO = random_qkv(1, 2, 1, 5, 5, 8, dtype=np.float16, seed=6)
    out, dq, dk, dv = attention_with_grads(backend, q, k, v, dO, is_causal=True)
    assert out.dtype == dq.dtype == dk.dtype == dv.dtype == np.float16
    np.testing.assert_allclose(out, reference_attention(q, k, v, is_causal=True), atol=5e-3)


def test_flash_records_one_graph_node_and_none_under_no_grad():
    q, k, v = tensors(*random_qkv(1, 2, 2, 3, 3, 4)[:3])
    out = scaled_dot_product_attention(q, k, v, backend="flash")
    assert type(out.grad_fn).__name__ == "FlashAttention" and out.grad_fn.inputs == (q, k, v)
    with tinytf.no_grad():
        assert scaled_dot_product_attention(q, k, v, backend="flash").grad_fn is None


def test_default_scale_is_one_over_sqrt_head_size():
    q, k, v, _ = random_qkv(1, 1, 1, 3, 4, 16)
    for backend in ("naive", "flash"):
        default = scaled_dot_product_attention(*tensors(q, k, v), backend=backend).numpy()
        explicit = scaled_dot_product_attention(*tensors(q, k, v), scale=0.25, backend=backend).numpy()
        np.testing.assert_allclose(default, explicit, rtol=1e-14)


def test_auto_picks_flash_for_long_sequences_and_naive_otherwise():
    short = tinytf.zeros(1, 1, 8, 4)
    long = tinytf.zeros(1, 1, int(np.sqrt(AUTO_FLASH_MIN_SCORES)) + 1, 4)
    assert _choose_backend(short, short, None) == "naive"
    assert _choose_backend(long, long, None) == "flash"
    assert _choose_backend(long, long, np.ones((1, 1, 1, long.shape[2]), dtype=bool)) == "flash"
    assert _choose_backend(long, long, np.zeros((1, 1, long.shape[2], long.shape[2]))) == "naive"  # additive
    assert _choose_backend(long, long, None, {"dropout_p": 0.1, "window": (4, 0), "softcap": 5.0}) == "flash"
    q, k, v, _ = random_qkv(1, 2, 1, 6, 6, 4)
    np.testing.assert_allclose(scaled_dot_product_attention(*tensors(q, k, v), is_causal=True).numpy(),
                               reference_attention(q, k, v, is_causal=True), rtol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_a_single_causal_query_sees_every_key(backend):
    q, k, v, _ = random_qkv(2, 4, 2, 1, 7, 8)
    key_padding = np.array([[True] * 7, [True] * 5 + [False] * 2])[:, None, None, :]
    for mask in (None, key_padding):
        out = scaled_dot_product_attention(*tensors(q, k, v), attn_mask=mask, is_causal=True, backend=backend)
        np.testing.assert_allclose(out.numpy(), reference_attention(q, k, v, attn_mask=mask), rtol=1e-12)


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_dropout_zeroes_attention_weights_and_scales_the_rest(p):
    """With V = the identity, the output rows are the attention weights: each is dropped or divided by 1 - p."""
    B, Hq, Hkv, T, S = 2, 4, 2, 5, 7
    q, k, _, _ = random_qkv(B, Hq, Hkv, T, S, S)
    v = np.broadcast_to(np.eye(S), (B, Hkv, S, S)).copy()
    weights = reference_attention(q, k, v, is_causal=True)
    tinytf.manual_seed(0)
    dropped = scaled_dot_product_attention(*tensors(q, k, v), dropout_p=p, is_causal=True).numpy()
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], weights[kept] / (1 - p), rtol=1e-12)
    visible = weights > 0
    assert 0.5 * p < 1 - kept[visible].mean() < 1.5 * p, "about a fraction p of the weights must be dropped"


def test_a_decoding_step_builds_no_causal_mask(monkeypatch):
    import tinytf.attention as attention

    seen = []
    monkeypatch.setattr(attention, "naive_attention", lambda *args, window, **kwargs: seen.append(window))
    for T in (1, 2):
        scaled_dot_product_attention(*tensors(*random_qkv(1, 2, 2, T, 5, 4)[:3]), is_causal=True, backend="naive")
    assert seen == [(-1, -1), (-1, 0)]


def test_nn_functional_holds_the_ops_and_attention():
    import tinytf.functional as ops
    import tinytf.nn.functional as F

    assert F.scaled_dot_product_attention is scaled_dot_product_attention
    assert all(getattr(F, name) is getattr(ops, name) for name in ops.__all__)
    assert not hasattr(ops, "scaled_dot_product_attention"), "the op layer must not reach up into attention"


# --- errors -------------------------------------------------------------------------------------------------------


def sdpa_shapes(q_shape, k_shape, v_shape=None, **options):
    q, k = tinytf.zeros(*q_shape), tinytf.zeros(*k_shape)
    v = tinytf.zeros(*(v_shape or k_shape))
    return scaled_dot_product_attention(q, k, v, **options)


@pytest.mark.parametrize("options, message", [
    (dict(softcap=0.0), r"softcap must be None or a finite number > 0, got 0\.0"),
    (dict(softcap=-2), r"softcap .* got -2"),
    (dict(softcap=float("inf")), r"softcap .* got inf"),
    (dict(window=(2, -3)), r"window must be .* got \(2, -3\)"),
    (dict(window=(1.0, 2)), r"window must be .* got \(1\.0, 2\)"),
    (dict(window=3), r"window must be .* got 3"),
    (dict(alibi_slopes=np.ones(3)), r"alibi_slopes must have shape \(2,\) or \(1, 2\).*got shape \(3,\)"),
    (dict(alibi_slopes=np.ones((2, 2))), r"alibi_slopes .* got shape \(2, 2\)"),
    (dict(dropout_p=0.1, dropout_seed=1.5), r"dropout_seed must be an int in \[0, 2\*\*64\), got 1\.5"),
    (dict(dropout_p=0.1, dropout_seed=-1), r"dropout_seed .* got -1"),
    (dict(dropout_p=0.1, dropout_offset=2**32), r"dropout_offset must be an int in \[0, 2\*\*32\), got 4294967296"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1\.0"),
])
def test_bad_score_and_dropout_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        sdpa_shapes((1, 2, 4, 8), (1, 2, 4, 8), backend="naive", **options)


@pytest.mark.parametrize("mask_shape, dtype", [((1, 1, 4, 4), bool), ((1, 1, 1, 4), np.float32), ((4, 4), bool)])
def test_flash_rejects_masks_it_cannot_apply_and_names_the_naive_backend(mask_shape, dtype):
    with pytest.raises(ValueError, match="backend='naive'"):
        sdpa_shapes((1, 2, 4, 8), (1, 2, 4, 8), attn_mask=np.ones(mask_shape, dtype=dtype), backend="flash")


def test_query_heads_must_be_a_multiple_of_key_value_heads():
    with pytest.raises(ValueError, match="multiple of the 2 key/value heads"):
        sdpa_shapes((1, 3, 4, 8), (1, 2, 4, 8))


@pytest.mark.parametrize("q_shape, k_shape, v_shape, message", [
    ((1, 2, 4, 8), (1, 2, 4, 8), (1, 2, 5, 8), "k and v must have the same shape"),
    ((1, 2, 4, 8), (1, 2, 4, 6), None, "head size"),
    ((2, 2, 4, 8), (1, 2, 4, 8), None, "batch"),
    ((2, 4, 8), (2, 4, 8), None, "4 dimensions"),
])
def test_shape_mismatches_are_reported(q_shape, k_shape, v_shape, message):
    with pytest.raises(ValueError, match=message):
        sdpa_shapes(q_shape, k_shape, v_shape)


def test_mask_that_does_not_broadcast_is_reported():
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa_shapes((1, 2, 4, 8), (1, 2, 5, 8), attn_mask=np.ones((1, 1, 1, 4), dtype=bool))


def test_unknown_backend_and_mixed_dtypes_are_reported():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        sdpa_shapes((1, 1, 2, 2), (1, 1, 2, 2), backend="fast")
    q, k = tinytf.zeros(1, 1, 2, 2), tinytf.zeros(1, 1, 2, 2, dtype="float64")
    with pytest.raises(TypeError, match="share a dtype"):
        scaled_dot_product_attention(q, k, k)


def test_cuda_backend_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='cuda'.*'flash' or 'naive'"):
        sdpa_shapes((1, 1, 2, 2), (1, 1, 2, 2), backend="cuda")


@pytest.mark.parametrize("backend", ["auto", "naive", "flash", "cuda"])
def test_every_backend_on_every_device_matches_the_reference(device, backend):
    """On "cuda" (a GPU, or the CuPy stand-in with the kernels run by the emulator) every backend gives the same
    attention and gradients as the float64 reference; "auto" is what every model forward calls."""
    if backend == "cuda" and device == "cpu":
        pytest.skip("the cuda backend takes CUDA tensors; its CPU refusal is tested above")
    q, k, v, dO = random_qkv(2, 4, 2, 17, 17, 16, dtype=np.float32)
    inputs = [tinytf.tensor(x, requires_grad=True, device=device) for x in (q, k, v)]
    out = scaled_dot_product_attention(*inputs, is_causal=True, backend=backend)
    assert out.device == inputs[0].device
    out.backward(tinytf.tensor(dO, device=device))
    expected = reference_attention(*(x.astype(np.float64) for x in (q, k, v)), is_causal=True)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
    _, reference_grads = None, attention_with_grads("naive", *(x.astype(np.float64) for x in (q, k, v, dO)),
                                                   is_causal=True)[1:]
    for tensor, reference_grad in zip(inputs, reference_grads):
        np.testing.assert_allclose(tinytf.Tensor(tensor.grad).numpy(), reference_grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("T", [17, int(np.sqrt(AUTO_FLASH_MIN_SCORES)) + 1])  # naive, then flash on the CPU
def test_auto_takes_bfloat16_on_every_device(device, T):
    """"auto" picks the cuda backend only where attention/cuda.py says its kernels take the inputs (head size 16 has
    no tensor-core build); otherwise naive or flash, which compute in float32 and round once, so the output is the
    float32 attention of the same rounded inputs to within one bfloat16 ulp (2^-7 relative at most, plus float32
    noise)."""
    q, k, v, dO = random_qkv(1, 2, 1, T, T, 16, dtype=np.float32)
    rounded = [x.astype(tinytf.bfloat16) for x in (q, k, v)]
    inputs = [tinytf.tensor(x, requires_grad=True, device=device) for x in rounded]
    if device != "cpu":
        assert cuda_backend.unsupported_reason(inputs[0], inputs[1]) is not None
    assert _choose_backend(inputs[0], inputs[1], None) in ("naive", "flash")
    out = scaled_dot_product_attention(*inputs, is_causal=True)
    assert out.dtype == tinytf.bfloat16
    expected = reference_attention(*(x.astype(np.float64) for x in rounded), is_causal=True)
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=2**-7, atol=2**-7 * 1e-3)
    out.backward(tinytf.tensor(dO.astype(tinytf.bfloat16), device=device))
    assert {tensor.grad.dtype for tensor in inputs} == {tinytf.bfloat16}


# --- windows, softcap, ALiBi, T > S, dropout ---------------------------------------------------------------------


@st.composite
def feature_problems(draw):
    """The ragged grid with every score option: lengths 1, 17, 97 and small ones, T != S either way, odd head sizes,
    windows narrower than, equal to and wider than the sequence, key padding that hides whole rows, dropout."""
    Hkv, G = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    B, T, S = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 5, 17, 97])), draw(st.sampled_from([1, 3, 17, 97]))
    bound = st.sampled_from([-1, 0, 1, 4, T - 1, T, S, 200])
    window = draw(st.one_of(st.none(), st.tuples(bound, bound)))
    slopes_shape = draw(st.sampled_from([None, (Hkv * G,), (B, Hkv * G)]))
    return dict(B=B, Hq=Hkv * G, Hkv=Hkv, T=T, S=S, D=draw(st.sampled_from([1, 3, 17])), window=window,
                is_causal=draw(st.booleans()), softcap=draw(st.sampled_from([None, 0.5, 5.0, 30.0])),
                slopes_shape=slopes_shape, key_padding=draw(st.booleans()),
                dropout_p=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**32 - 1)))


def feature_options(problem, rng):
    """scaled_dot_product_attention's keywords for `problem`, with random slopes and key padding."""
    slopes = None
    if problem["slopes_shape"] is not None:
        slopes = rng.uniform(0, 1, problem["slopes_shape"]).astype(np.float32)
    mask = rng.random((problem["B"], 1, 1, problem["S"])) < 0.7 if problem["key_padding"] else None
    return dict(window=problem["window"], is_causal=problem["is_causal"], softcap=problem["softcap"],
                alibi_slopes=slopes, attn_mask=mask)


def dropout_options(problem):
    """The dropout keywords of `problem` for the op, and for the reference its keep mask (B, Hq, T, S)."""
    p, seed = problem["dropout_p"], problem["seed"]
    if p == 0:
        return {}, {}
    B, Hq, T, S = (problem[n] for n in ("B", "Hq", "T", "S"))
    keep = dropout_keep(seed, 0, np.arange(B * Hq)[:, None, None], np.arange(T)[None, :, None],
                        np.arange(S)[None, None, :], p, np)
    return dict(dropout_p=p, dropout_seed=seed), dict(dropout_p=p, dropout_keep=keep.reshape(B, Hq, T, S))


@settings(max_examples=max(20, settings.default.max_examples))
@given(problem=feature_problems())
@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_backends_match_the_reference_with_windows_softcap_alibi_and_dropout(backend, problem):
    q, k, v, dO = random_qkv(*(problem[n] for n in ("B", "Hq", "Hkv", "T", "S", "D")), seed=problem["seed"])
    q = 3 * q  # scores of several units, so that softcap bends them
    options = feature_options(problem, np.random.default_rng(problem["seed"]))
    dropout, reference_dropout = dropout_options(problem)
    got = attention_with_grads(backend, q, k, v, dO, **options, **dropout)
    want = reference_attention(q, k, v, dO, **options, **reference_dropout)
    for name, g, w in zip(("O", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_causal_with_more_queries_than_keys_gives_the_early_queries_zeros(backend):
    """T = 7 queries over S = 3 keys: query i sits at position i - 4, so queries 0..3 see no key."""
    q, k, v, dO = random_qkv(2, 2, 1, 7, 3, 5, seed=3)
    out, dq, dk, dv = attention_with_grads(backend, q, k, v, dO, is_causal=True)
    assert not out[:, :, :4].any() and not dq[:, :, :4].any() and np.isfinite(out).all()
    for got, want in zip((out, dq, dk, dv), reference_attention(q, k, v, dO, is_causal=True)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # query 4 sits at position 0: it sees key 0 alone, so its output is v's row 0
    np.testing.assert_allclose(out[:, :, 4], np.repeat(v[:, :, 0], 2, axis=1), rtol=1e-12)


def test_a_window_narrower_than_the_sequence_hides_keys_on_both_sides():
    """window (1, 1) over 5 keys: query 2 sees keys 1, 2, 3 only; with V = the identity O is its attention row."""
    q, k, _, _ = random_qkv(1, 1, 1, 5, 5, 5, seed=5)
    out = scaled_dot_product_attention(*tensors(q, k, np.eye(5)[None, None]), window=(1, 1), backend="naive").numpy()
    np.testing.assert_array_equal(out[0, 0] > 0, np.abs(np.subtract.outer(range(5), range(5))) <= 1)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_a_long_sequence_with_every_option_matches_the_reference(backend):
    """T = S = 1025 (past every tile size), a sliding window of 100 under the causal mask, softcap and ALiBi."""
    q, k, v, dO = random_qkv(1, 1, 1, 1025, 1025, 3, seed=2)
    options = dict(window=(100, 7), is_causal=True, softcap=2.0, alibi_slopes=np.array([0.0625], np.float32))
    got = attention_with_grads(backend, q, k, v, dO, **options)
    for g, w in zip(got, reference_attention(q, k, v, dO, **options)):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["naive", "flash"])
@pytest.mark.parametrize("options", [
    dict(softcap=0.7),
    dict(alibi_slopes=np.array([[0.5, 0.25], [1.0, 0.125]], np.float32), is_causal=True),
    dict(softcap=1.5, alibi_slopes=np.array([0.3, 0.7], np.float32), window=(1, 0), dropout_p=0.3, dropout_seed=4),
])
def test_gradcheck_softcap_alibi_and_dropout_in_float64(backend, options):
    q, k, v, _ = random_qkv(2, 2, 1, 3, 4, 3, seed=12)
    assert gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, backend=backend, **options),
                     *tensors(2 * q, k, v))


def test_alibi_slopes_given_as_a_tensor_are_not_differentiated():
    q, k, v, dO = random_qkv(1, 2, 2, 4, 4, 3, seed=13)
    slopes = tinytf.tensor(np.array([0.5, 1.0], np.float32), requires_grad=True)
    out = scaled_dot_product_attention(*tensors(q, k, v), alibi_slopes=slopes, backend="naive")
    out.backward(dO)
    assert slopes.grad is None
    np.testing.assert_allclose(out.numpy(), reference_attention(q, k, v, alibi_slopes=[0.5, 1.0]), rtol=1e-12)
