"""bfloat16 and float16 end to end: every op's forward and backward keep the input's dtype, and compute like the
float32 op on the same (rounded) inputs, rounded to the dtype once at the end, as PyTorch's kernels do.

How close is close. Both the half-precision op and the reference (the float32 op on the rounded inputs, its result
rounded to the dtype) round one float32 value to the dtype; the two float32 values agree up to float32 noise, so the
rounded results are equal or, where a rounding boundary falls between them, 1 ulp (unit in the last place) apart.
An op that rounds at k steps is within k ulps. The float32 noise itself (a different summation order: about
n * 2^-24 of the summed magnitudes) is below 2^-8 of a bfloat16 or float16 ulp of the largest output for the sizes
here; _FLOAT32_SLACK allows for it near zero, where a result is much smaller than its terms.
"""

import numpy as np
import pytest

import tinytf
import tinytf.nn.functional as F
from devices import DEVICES
from tinytf import backend

HALF = [tinytf.bfloat16, tinytf.float16]
_FLOAT32_SLACK = 2.0**-8  # of an ulp of the output's largest magnitude (module docstring)


def ulp(values, dtype) -> np.ndarray:
    """The unit in the last place of each value in `dtype` (its spacing there), as float64."""
    info = backend.finfo(dtype)
    magnitude = np.maximum(np.abs(np.asarray(values, dtype=np.float64)), float(info.smallest_normal))
    return float(info.eps) * 2.0 ** np.floor(np.log2(magnitude))


def assert_within_ulps(actual, expected, dtype, ulps: int, what: str) -> None:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    allowed = ulps * ulp(expected, dtype) + _FLOAT32_SLACK * float(ulp(scale, dtype))
    error = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(error - allowed), error.shape) if error.ndim else ()
    assert np.all(error <= allowed), (f"{what}: {actual[worst]} vs {expected[worst]} at {worst}, "
                                      f"{error[worst] / ulp(expected[worst], dtype):.2f} ulps (allowed {ulps})")


def normal(*shape):
    return lambda rng: rng.standard_normal(shape)


def positive(*shape):
    return lambda rng: rng.uniform(0.5, 2.0, shape)


def ids(high, *shape):
    return lambda rng: rng.integers(0, high, shape)


def _sdpa(backend_name, causal):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend_name)


# name, op, inputs (floating ones get gradients), ulps of forward and backward (module docstring).
# 1 ulp: one Function that computes in float32 and rounds once (forward and backward). An op that keeps its rounded
# output for backward (exp: y' = y) adds that output's rounding: 2 ulps in backward.
OPS = [
    ("add", lambda a, b: a + b, [normal(4, 5), normal(5)], 1, 1),
    ("mul", lambda a, b: a * b, [normal(4, 5), normal(4, 1)], 1, 1),
    ("div", lambda a, b: a / b, [normal(4, 5), positive(4, 5)], 1, 1),
    ("pow", lambda a: a**2.5, [positive(4, 5)], 1, 1),
    ("exp", F.exp, [normal(4, 5)], 1, 2),
    ("log", F.log, [positive(4, 5)], 1, 1),
    ("sqrt", F.sqrt, [positive(4, 5)], 1, 1),
    ("rsqrt", F.rsqrt, [positive(4, 5)], 1, 1),
    ("tanh", F.tanh, [normal(4, 5)], 1, 1),
    ("sigmoid", F.sigmoid, [normal(4, 5)], 1, 1),
    ("relu", F.relu, [normal(4, 5)], 1, 1),
    ("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), [normal(4, 33)], 1, 1),
    ("gelu_erf", F.gelu, [normal(4, 5)], 1, 1),
    ("silu", F.silu, [normal(4, 33)], 1, 1),
    ("swiglu", F.swiglu, [normal(4, 33), normal(4, 33)], 1, 1),
    ("softplus", F.softplus, [normal(4, 5)], 1, 1),
    ("mish", F.mish, [normal(4, 5)], 1, 1),
    ("sum", lambda a: a.sum(dim=-1), [normal(3, 300)], 1, 1),
    ("mean", lambda a: a.mean(dim=0), [normal(300, 3)], 1, 1),
    ("var", lambda a: a.var(dim=-1), [normal(3, 64)], 1, 1),
    ("std", lambda a: a.std(), [normal(3, 64)], 1, 1),
    ("norm", lambda a: F.norm(a, dim=-1), [normal(3, 64)], 1, 1),
    ("logsumexp", lambda a: a.logsumexp(dim=-1), [normal(3, 64)], 1, 1),
    ("prod", lambda a: a.prod(dim=-1), [positive(3, 8)], 1, 1),
    ("max", lambda a: a.max(dim=-1), [normal(3, 64)], 1, 1),
    ("cumsum", lambda a: a.cumsum(dim=-1), [normal(3, 64)], 1, 1),
    ("logcumsumexp", lambda a: a.logcumsumexp(dim=-1), [normal(3, 16)], 1, 1),
    ("softmax", lambda a: F.softmax(a, dim=-1), [normal(3, 4, 50)], 1, 1),
    ("log_softmax", lambda a: F.log_softmax(a, dim=-1), [normal(3, 50)], 1, 1),
    ("masked_softmax", lambda a: F.masked_softmax(a, np.tril(np.ones((6, 6), bool)), scale=0.5),
     [normal(2, 6, 6)], 1, 1),
    ("matmul", lambda a, b: a @ b, [normal(2, 5, 64), normal(64, 7)], 1, 1),
    ("linear", F.linear, [normal(2, 5, 64), normal(7, 64), normal(7)], 1, 1),
    ("einsum", lambda a, b: F.einsum("bij,bjk->bik", a, b), [normal(2, 5, 64), normal(2, 64, 3)], 1, 1),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, 64, w, b), [normal(3, 5, 64), normal(64), normal(64)], 1, 1),
    ("rms_norm", lambda x, w: F.rms_norm(x, 64, w), [normal(3, 5, 64), normal(64)], 1, 1),
    ("batch_norm", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
     [normal(4, 3, 5, 5), normal(3), normal(3)], 1, 1),
    ("group_norm", lambda x, w, b: F.group_norm(x, 2, w, b), [normal(2, 4, 5, 5), normal(4), normal(4)], 1, 1),
    ("cross_entropy", lambda logits, t: F.cross_entropy(logits, t), [normal(40, 11), ids(11, 40)], 1, 1),
    ("cross_entropy_smoothed", lambda logits, t: F.cross_entropy(logits, t, label_smoothing=0.1),
     [normal(40, 11), ids(11, 40)], 1, 1),
    ("nll_loss", lambda logp, t: F.nll_loss(logp, t), [normal(40, 11), ids(11, 40)], 1, 1),
    ("bce_with_logits", F.binary_cross_entropy_with_logits, [normal(4, 5), lambda rng: rng.uniform(0, 1, (4, 5))],
     1, 1),
    ("embedding", lambda t, w: F.embedding(t, w), [ids(7, 300), normal(7, 16)], 1, 1),
    ("embedding_large_vocab", lambda t, w: F.embedding(t, w), [ids(300, 600), normal(300, 8)], 1, 1),
    ("gather", lambda a, i: F.gather(a, 1, i), [normal(3, 5), ids(5, 3, 40)], 1, 1),
    ("index_select", lambda a, i: F.index_select(a, 0, i), [normal(5, 3), ids(5, 40)], 1, 1),
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, padding=1), [normal(2, 3, 6, 6), normal(4, 3, 3, 3), normal(4)],
     1, 1),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 2), [normal(2, 3, 6, 6)], 1, 1),
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, stride=1), [normal(2, 3, 6, 6)], 1, 1),
    ("rotary", lambda x: F.apply_rotary(x, *F.rotary_tables(16, 9)), [normal(2, 3, 9, 16)], 1, 1),
    ("clamp", lambda a: F.clamp(a, -0.5, 0.7), [normal(4, 5)], 1, 1),
    ("hardtanh", F.hardtanh, [normal(4, 5)], 1, 1),
    ("leaky_relu", F.leaky_relu, [normal(4, 5)], 1, 1),
    ("selu", F.selu, [normal(4, 5)], 1, 1),
    ("log2", F.log2, [positive(4, 5)], 1, 1),
    ("tan", F.tan, [normal(4, 5)], 1, 1),
    ("atan2", F.atan2, [normal(4, 5), normal(4, 5)], 1, 1),
    ("maximum", F.maximum, [normal(4, 5), normal(4, 5)], 1, 1),
    ("where", lambda a, b: F.where(a > 0, a, b), [normal(4, 5), normal(4, 5)], 1, 1),
    ("cat", lambda a, b: F.cat([a, b], dim=1), [normal(4, 5), normal(4, 2)], 1, 1),
    ("pad", lambda a: F.pad(a, (1, 2)), [normal(4, 5)], 1, 1),
    ("sort", lambda a: F.sort(a, dim=1).values, [normal(4, 9)], 1, 1),
    ("topk", lambda a: F.topk(a, 3).values, [normal(4, 9)], 1, 1),
    ("advanced_index", lambda a: a[np.array([0, 2, 0, 0, 1])], [normal(3, 4)], 1, 1),
    ("index_add", lambda a, b: F.index_add(a, 0, np.array([0, 0, 2]), b), [normal(5, 3), normal(3, 3)], 1, 1),
    ("scatter_reduce_mean", lambda a, b: F.scatter_reduce(a, 1, np.array([[0, 1], [2, 2], [4, 0]]), b, "mean"),
     [normal(3, 5), normal(3, 2)], 1, 1),
    ("cumprod", lambda a: a.cumprod(dim=-1), [positive(3, 8)], 1, 1),
    ("conv1d", lambda x, w: F.conv1d(x, w, padding=1), [normal(2, 3, 9), normal(4, 3, 3)], 1, 1),
    ("conv_transpose2d", lambda x, w: F.conv_transpose2d(x, w, stride=2), [normal(1, 2, 4, 4), normal(2, 3, 3, 3)],
     1, 1),
    ("attention_naive", _sdpa("naive", True), [normal(2, 4, 9, 16), normal(2, 2, 9, 16), normal(2, 2, 9, 16)], 1, 1),
    ("attention_flash", _sdpa("flash", True), [normal(2, 4, 9, 16), normal(2, 2, 9, 16), normal(2, 2, 9, 16)], 1, 1),
]


def _run(op, arrays, dtype, device, half):
    """op on tensors of `dtype` (integer inputs as they are) -> (output, gradients of the floating inputs); the
    upstream gradient is one random array rounded to `half`, so that both runs get the same values."""
    tensors = [tinytf.tensor(a.astype(dtype) if a.dtype.kind == "f" else a, device=device,
                             requires_grad=a.dtype.kind == "f") for a in arrays]
    out = op(*tensors)
    upstream = np.random.default_rng(1).standard_normal(out.shape).astype(half).astype(out.dtype)
    out.backward(tinytf.tensor(upstream, device=device))
    return out, [tensor.grad for tensor in tensors if tensor.requires_grad]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name, op, inputs, forward_ulps, backward_ulps", OPS, ids=[row[0] for row in OPS])
def test_half_precision_op_matches_float32_on_the_rounded_inputs(name, op, inputs, forward_ulps, backward_ulps,
                                                                 dtype):
    rng = np.random.default_rng(0)
    arrays = [make(rng) for make in inputs]
    # The float32 reference sees exactly the values the half-precision op sees: the inputs rounded to `dtype`.
    rounded = [a.astype(dtype).astype(np.float32) if a.dtype.kind == "f" else a for a in arrays]
    for device in DEVICES:
        expected, expected_grads = _run(op, rounded, np.float32, device, dtype)
        out, grads = _run(op, arrays, dtype, device, dtype)
        assert out.dtype == dtype, f"{name} on {device}: {dtype} inputs gave {out.dtype}"
        assert_within_ulps(out.numpy(), expected.numpy().astype(dtype), dtype, forward_ulps, f"{name} on {device}")
        for i, (grad, expected_grad) in enumerate(zip(grads, expected_grads)):
            assert grad.dtype == dtype, f"{name} on {device}: gradient {i} is {grad.dtype}"
            assert_within_ulps(backend.to_numpy(grad), backend.to_numpy(expected_grad).astype(dtype), dtype,
                               backward_ulps, f"{name} on {device}, gradient {i}")


# --- float32 accumulation, where bfloat16 arithmetic would visibly fail -----------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_sums_and_means_accumulate_in_float32(device):
    # 256 + 1 rounds back to 256 in bfloat16 (8 significant bits): a bfloat16 accumulator stops there.
    ones = tinytf.ones(4096, dtype="bfloat16", device=device)
    assert ones.sum().dtype == tinytf.bfloat16 and float(ones.sum().item()) == 4096.0
    assert float(ones.mean().item()) == 1.0
    assert float(F.cumsum(ones, dim=0)[-1].item()) == 4096.0
    halves = tinytf.full((4096,), 0.5, dtype="float16", device=device)
    assert float(halves.sum().item()) == 2048.0  # float16 holds 2048 exactly, but not 2048 + 0.5 on the way


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_of_a_row_far_from_zero_computes_its_statistics_in_float32(device):
    # 200 .. 263 are exact in bfloat16 (spacing 1 below 256, 2 above: so 200 .. 255 and even numbers after), but their
    # mean 227.5 is not: a bfloat16 mean would shift every centered value by 0.5, about 0.03 of the output.
    row = np.concatenate([np.arange(200, 256), np.arange(256, 272, 2)]).astype(np.float64)
    x = tinytf.tensor(row.astype(tinytf.bfloat16)[None], device=device)
    expected = (row - row.mean()) / np.sqrt(row.var() + 1e-5)
    for out in (F.layer_norm(x, row.size), F.layer_norm(x, row.size, tinytf.ones(row.size, dtype="bfloat16",
                                                                                   device=device))):
        assert out.dtype == tinytf.bfloat16
        assert_within_ulps(out.numpy()[0], expected.astype(tinytf.bfloat16), tinytf.bfloat16, 1, "layer_norm")
    assert_within_ulps(F.rms_norm(x, row.size).numpy()[0],
                       (row / np.sqrt((row**2).mean() + 1e-6)).astype(tinytf.bfloat16), tinytf.bfloat16, 1,
                       "rms_norm")


@pytest.mark.parametrize("vocab", [7, 300])  # the one-hot GEMM and the add.at paths of Embedding's backward
@pytest.mark.parametrize("device", DEVICES)
def test_embedding_gradients_sum_a_frequent_id_in_float32(device, vocab):
    table = tinytf.zeros(vocab, 4, dtype="bfloat16", requires_grad=True, device=device)
    F.embedding(np.zeros(1000, np.int64), table).sum().backward()
    assert table.grad.dtype == tinytf.bfloat16
    np.testing.assert_array_equal(backend.to_numpy(table.grad)[0].astype(np.float32), 1000.0)  # bfloat16: 256


@pytest.mark.parametrize("device", DEVICES)
def test_a_broadcast_operand_sums_its_gradient_in_float32(device):
    bias = tinytf.zeros(3, dtype="bfloat16", requires_grad=True, device=device)
    (tinytf.zeros(1000, 3, dtype="bfloat16", device=device) + bias).sum().backward()
    np.testing.assert_array_equal(backend.to_numpy(bias.grad).astype(np.float32), 1000.0)


# --- PyTorch's type promotion with half precision --------------------------------------------------------------------
_DTYPES = ["bool", "int8", "uint8", "int64", "float16", "bfloat16", "float32", "float64"]
_PYTHON_SCALARS = [True, 3, 1.5]


def _operands(torch):
    """(tinytf operand, torch operand, label) for 1-d and 0-d tensors of every dtype and for Python scalars."""
    operands = []
    for name in _DTYPES:
        for shape in ((2,), ()):
            values = np.ones(shape, dtype=backend.as_dtype(name))
            operands.append((tinytf.tensor(values), torch.ones(shape, dtype=getattr(torch, name)),
                             f"{name}{'[2]' if shape else '[]'}"))
    return operands + [(scalar, scalar, type(scalar).__name__) for scalar in _PYTHON_SCALARS]


def test_promotion_with_half_precision_follows_pytorch():
    torch = pytest.importorskip("torch")
    operands = _operands(torch)
    checked = 0
    for a, torch_a, label_a in operands:
        for b, torch_b, label_b in operands:
            dtypes = {getattr(x, "dtype", None) for x in (a, b)}
            if not dtypes & {tinytf.float16, tinytf.bfloat16} or not isinstance(a, tinytf.Tensor):
                continue
            expected = str(torch.result_type(torch_a, torch_b)).removeprefix("torch.")
            assert (a + b).dtype == backend.as_dtype(expected), f"{label_a} + {label_b}: expected {expected}"
            checked += 1
    assert checked > 50


def test_floating_functions_keep_half_precision():
    for dtype in HALF:
        x = tinytf.ones(3, dtype=dtype)
        for result in (F.exp(x), x / 2, x**2, x.mean(), F.softmax(x, dim=0), x.var(), F.where(x > 0, x, 0.5)):
            assert result.dtype == dtype
    assert (tinytf.ones(3, dtype="bfloat16") + tinytf.ones(3, dtype="float16")).dtype == tinytf.float32


# --- tensors, creation and casts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_creation_functions_make_half_precision_tensors(device):
    tinytf.manual_seed(0)
    for dtype in ("bfloat16", "bf16", tinytf.bfloat16, "float16", "half", tinytf.float16):
        expected = backend.as_dtype(dtype)
        made = [tinytf.zeros(2, 3, dtype=dtype, device=device), tinytf.ones(3, dtype=dtype, device=device),
                tinytf.full((2,), 1.5, dtype=dtype, device=device), tinytf.arange(0, 300, dtype=dtype, device=device),
                tinytf.randn(4, dtype=dtype, device=device), tinytf.rand(1000, dtype=dtype, device=device),
                tinytf.eye(3, dtype=dtype, device=device), tinytf.linspace(0, 1, 5, dtype=dtype, device=device),
                tinytf.tensor([1.0, 2.5], dtype=dtype, device=device), tinytf.zeros_like(tinytf.ones(2), dtype=dtype)]
        assert [tensor.dtype for tensor in made] == [expected] * len(made)
        # arange rounds each value once: 257 is 256 in bfloat16 (and exact in float16), never a drifted count
        np.testing.assert_array_equal(made[3].numpy(), np.arange(300, dtype=np.float32).astype(expected))
        assert float(made[5].max().item()) < 1.0  # draws that round up to 1 are kept below it
    assert tinytf.tensor(np.ones(2, tinytf.bfloat16)).dtype == tinytf.bfloat16


def test_casts_between_precisions_are_differentiable():
    x = tinytf.tensor([1.0, 2.0, 3.0], requires_grad=True)
    for cast in (lambda t: t.bfloat16(), lambda t: t.half(), lambda t: t.to("bfloat16"), lambda t: t.to(tinytf.half),
                 lambda t: t.to("cpu", tinytf.bfloat16)):
        x.grad = None
        y = cast(x)
        assert backend.is_half(y.dtype)
        (y.float() * tinytf.tensor([1.0, 2.0, 3.0])).sum().backward()
        assert x.grad.dtype == np.float32
        np.testing.assert_array_equal(x.grad, [1.0, 2.0, 3.0])
    assert tinytf.tensor([1.0], dtype="bfloat16", requires_grad=True).requires_grad
    assert "dtype=bfloat16" in repr(tinytf.ones(2, dtype="bfloat16"))
    assert tinytf.finfo("bfloat16").eps == 2.0**-7 and tinytf.finfo(tinytf.float16).eps == 2.0**-10
    with pytest.raises(TypeError, match="floating dtype"):
        tinytf.finfo("int64")


@pytest.mark.parametrize("device", DEVICES)
def test_rounding_and_remainders_of_bfloat16_go_around_the_gaps_of_cupy(device):
    """CuPy 14 has no bfloat16 rounding or divmod kernels (the stand-in refuses them too): tinytf rounds in float32,
    which is exact, since a bfloat16 rounded to an integer is a bfloat16 again."""
    values = np.array([-2.5, -1.25, 0.5, 1.75, 3.0, 201.0], dtype=np.float32)  # all exact in bfloat16
    x = tinytf.tensor(values.astype(tinytf.bfloat16), device=device)
    for op, reference in ((F.floor, np.floor), (F.ceil, np.ceil), (F.trunc, np.trunc), (F.round, np.round),
                          (F.frac, lambda v: v - np.trunc(v)), (lambda t: t % 1.5, lambda v: np.mod(v, 1.5)),
                          (lambda t: t // 1.5, lambda v: np.floor_divide(v, 1.5))):
        out = op(x)
        assert out.dtype == tinytf.bfloat16
        np.testing.assert_array_equal(out.numpy().astype(np.float32), reference(values).astype(tinytf.bfloat16))
