"""varlen_attention on packed sequences: equal to one scaled_dot_product_attention call per sequence, to a padded
batch, and to the float64 reference; the cuda launch equal to the per-sequence path; bad cu_seqlens named."""

from __future__ import annotations

import numpy as np
import pytest

import tinytf
from attention.attention_reference import reference_attention
from devices import DEVICES_AND_SECOND_GPU
from tinytf.attention import cuda as cuda_backend
from tinytf.attention import scaled_dot_product_attention, varlen_attention
from tinytf.attention.dropout import dropout_keep

# Sequence lengths (queries, keys): equal, T < S, T > S (causal rows before every key), a single query, no keys.
LENGTHS = [(5, 5), (3, 8), (7, 2), (1, 6), (2, 0), (0, 3)]


def packed_problem(lengths, Hq=4, Hkv=2, D=3, seed=0, dtype=np.float64):
    """Packed q, k, v, dO and the cu_seqlens of `lengths`."""
    rng = np.random.default_rng(seed)
    total_q, total_k = sum(t for t, _ in lengths), sum(s for _, s in lengths)
    q, dO = (rng.standard_normal((total_q, Hq, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((total_k, Hkv, D)).astype(dtype) for _ in range(2))
    cu_q = np.cumsum([0] + [t for t, _ in lengths]).astype(np.int32)
    cu_k = np.cumsum([0] + [s for _, s in lengths]).astype(np.int32)
    return q, k, v, dO, cu_q, cu_k


def run_varlen(q, k, v, dO, cu_q, cu_k, device="cpu", **options):
    tensors = [tinytf.tensor(x, requires_grad=True, device=device) for x in (q, k, v)]
    max_q, max_k = int(np.diff(cu_q).max()), int(np.diff(cu_k).max())
    out = varlen_attention(*tensors, cu_q, cu_k, max_q, max_k, **options)
    out.backward(tinytf.tensor(dO, device=device))
    return [out.numpy()] + [tinytf.Tensor(t.grad).numpy() for t in tensors]


def batch_of_one(x):
    """Packed rows (L, H, D) -> (1, H, L, D)."""
    return np.ascontiguousarray(x.transpose(1, 0, 2)[None])


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_varlen_equals_one_call_per_sequence(backend):
    q, k, v, dO, cu_q, cu_k = packed_problem(LENGTHS)
    slopes = np.random.default_rng(1).uniform(0, 1, (len(LENGTHS), 4)).astype(np.float32)  # (N, Hq)
    shared = dict(is_causal=True, scale=0.7, window=(2, 0), softcap=3.0)
    out, dq, dk, dv = run_varlen(q, k, v, dO, cu_q, cu_k, backend=backend, alibi_slopes=slopes, **shared)
    for n, ((q0, q1), (k0, k1)) in enumerate(zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:]))):
        if q0 == q1:
            continue
        if k0 == k1:  # queries that see no key
            assert not out[q0:q1].any() and not dq[q0:q1].any()
            continue
        want = reference_attention(*(batch_of_one(x) for x in (q[q0:q1], k[k0:k1], v[k0:k1], dO[q0:q1])),
                                   alibi_slopes=slopes[n], **shared)
        for got, expected in zip((out[q0:q1], dq[q0:q1]), want[:2]):
            np.testing.assert_allclose(batch_of_one(got), expected, rtol=1e-10, atol=1e-12)
        for got, expected in zip((dk[k0:k1], dv[k0:k1]), want[2:]):
            np.testing.assert_allclose(batch_of_one(got), expected, rtol=1e-10, atol=1e-12)
    # and scaled_dot_product_attention itself on the second sequence (T < S)
    (q0, q1), (k0, k1) = cu_q[1:3], cu_k[1:3]
    single = scaled_dot_product_attention(*(tinytf.tensor(batch_of_one(x)) for x in (q[q0:q1], k[k0:k1], v[k0:k1])),
                                          alibi_slopes=slopes[1], backend=backend, **shared)
    np.testing.assert_allclose(batch_of_one(out[q0:q1]), single.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_varlen_equals_a_right_padded_batch_with_a_key_padding_mask(backend):
    """Self-attention (T = S per sequence): padding every sequence to the longest at the right end and hiding the
    padded keys gives the same causal sliding-window attention on the real rows."""
    lengths = [4, 9, 1, 6]
    q, k, v, dO, cu_q, cu_k = packed_problem([(n, n) for n in lengths], Hq=2, Hkv=1, D=5, seed=3)
    out, dq, dk, dv = run_varlen(q, k, v, dO, cu_q, cu_k, is_causal=True, window=(3, 0), backend=backend)
    L = max(lengths)

    def padded(x):
        batch = np.zeros((len(lengths), x.shape[1], L, x.shape[2]))
        for n, (start, stop) in enumerate(zip(cu_q, cu_q[1:])):
            batch[n, :, : stop - start] = x[start:stop].transpose(1, 0, 2)
        return batch

    key_padding = (np.arange(L)[None, :] < np.array(lengths)[:, None])[:, None, None, :]
    tensors = [tinytf.tensor(padded(x), requires_grad=True) for x in (q, k, v)]
    out_padded = scaled_dot_product_attention(*tensors, attn_mask=key_padding, is_causal=True, window=(3, 0),
                                              backend=backend)
    out_padded.backward(padded(dO))
    for got, want in zip((out, dq, dk, dv), (out_padded.numpy(), *(t.grad for t in tensors))):
        np.testing.assert_allclose(padded(got), want * key_padding.transpose(0, 1, 3, 2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["naive", "flash"])
def test_varlen_dropout_counts_the_sequence_as_the_batch_index(backend):
    lengths = [(3, 4), (5, 5), (2, 6)]
    q, k, v, dO, cu_q, cu_k = packed_problem(lengths, seed=4)
    seed, offset, p = 12345, 7, 0.35
    out, dq, _, _ = run_varlen(q, k, v, dO, cu_q, cu_k, dropout_p=p, dropout_seed=seed, dropout_offset=offset,
                               is_causal=True, backend=backend)
    for n, (T, S) in enumerate(lengths):
        (q0, q1), (k0, k1) = cu_q[n:n + 2], cu_k[n:n + 2]
        keep = dropout_keep(seed, offset, n * 4 + np.arange(4)[:, None, None], np.arange(T)[None, :, None],
                            np.arange(S)[None, None, :], p, np)[None]  # (1, Hq, T, S): b = n
        want = reference_attention(*(batch_of_one(x) for x in (q[q0:q1], k[k0:k1], v[k0:k1], dO[q0:q1])),
                                   is_causal=True, dropout_keep=keep, dropout_p=p)
        np.testing.assert_allclose(batch_of_one(out[q0:q1]), want[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batch_of_one(dq[q0:q1]), want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", [d for d in DEVICES_AND_SECOND_GPU if d != "cpu"])
def test_the_cuda_launch_equals_the_per_sequence_path(device):
    """One packed launch of the kernels (run by the emulator on the stand-in) against naive sequence by sequence."""
    lengths = [(5, 5), (3, 8), (7, 2), (1, 6)]
    q, k, v, dO, cu_q, cu_k = packed_problem(lengths, D=16, seed=5, dtype=np.float32)
    options = dict(is_causal=True, window=(3, 0), softcap=4.0,
                   alibi_slopes=np.linspace(0.1, 0.4, 4, dtype=np.float32), dropout_p=0.2, dropout_seed=99)
    got = run_varlen(q, k, v, dO, cu_q, cu_k, device=device, backend="cuda", **options)
    want = run_varlen(*(x.astype(np.float64) for x in (q, k, v, dO)), cu_q, cu_k, backend="naive", **options)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", [d for d in DEVICES_AND_SECOND_GPU if d != "cpu"])
def test_auto_takes_the_packed_cuda_launch_where_the_kernels_take_the_inputs(device, monkeypatch):
    calls = []
    launch = cuda_backend.launch_varlen_attention
    monkeypatch.setattr(cuda_backend, "launch_varlen_attention", lambda *args, **kwargs: calls.append(args[0].dtype)
                        or launch(*args, **kwargs))
    for dtype, D in ((np.float32, 16), (np.float32, 5), (np.float64, 16)):  # the kernels have no d = 5, no float64
        q, k, v, dO, cu_q, cu_k = packed_problem([(3, 4), (2, 2)], D=D, dtype=dtype)
        got = run_varlen(q, k, v, dO, cu_q, cu_k, device=device, is_causal=True)
        want = run_varlen(*(x.astype(np.float64) for x in (q, k, v, dO)), cu_q, cu_k, is_causal=True, backend="naive")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert calls == [np.float32]


def test_the_cuda_backend_refuses_cpu_tensors():
    q, k, v, _, cu_q, cu_k = packed_problem([(3, 4)])
    with pytest.raises(RuntimeError, match="backend='cuda' needs tensors on a CUDA device"):
        varlen_attention(*(tinytf.tensor(x) for x in (q, k, v)), cu_q, cu_k, 3, 4, backend="cuda")


@pytest.mark.parametrize("cu_q, message", [
    ([1, 3, 5], r"cu_seqlens_q must rise from 0 to the 5 packed rows, got \[1, 3, 5\]"),
    ([0, 3, 4], r"cu_seqlens_q must rise from 0 to the 5 packed rows, got \[0, 3, 4\]"),
    ([0, 4, 3, 5], r"cu_seqlens_q must rise .* got \[0, 4, 3, 5\]"),
    ([5], r"cu_seqlens_q must be 1-D with N \+ 1 >= 2 entries, got shape \(1,\)"),
    ([0, 5], r"cu_seqlens_q holds a sequence of 5 rows, longer than its max_seqlen 4"),
    ([0, 1, 2, 5], r"cu_seqlens_q and cu_seqlens_k must count the same sequences, got 3 and 2"),
])
def test_bad_cu_seqlens_are_named(cu_q, message):
    q, k = tinytf.zeros(5, 2, 4), tinytf.zeros(6, 2, 4)
    with pytest.raises(ValueError, match=message):
        varlen_attention(q, k, k, np.array(cu_q, np.int32), np.array([0, 2, 6], np.int32), 4, 4)


def test_float_cu_seqlens_and_batched_inputs_are_named():
    q = tinytf.zeros(5, 2, 4)
    with pytest.raises(TypeError, match="cu_seqlens_q must hold integers, got dtype float64"):
        varlen_attention(q, q, q, np.array([0.0, 5.0]), np.array([0, 5]), 5, 5)
    with pytest.raises(ValueError, match=r"q must have 3 dimensions \(total, H, D\)"):
        varlen_attention(tinytf.zeros(1, 5, 2, 4), q, q, np.array([0, 5]), np.array([0, 5]), 5, 5)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(2,\) or \(1, 2\)"):
        varlen_attention(q, q, q, np.array([0, 5]), np.array([0, 5]), 5, 5, alibi_slopes=np.ones((2, 2)))
