"""Fused elementwise expressions: each evaluator (NumPy program, numexpr, CuPy kernel) against plain NumPy formulas,
and the CUDA C printed for every expression tinytf defines compiles with NVRTC."""

import math
import re

import numpy as np
import pytest
from devices import DEVICES_AND_SECOND_GPU

from tinytf import backend, optim
from tinytf.functional import activation, expression, rotary
from tinytf.functional.expression import ElementwiseExpression

# Locals, constants, per-call scalars, every function and operator, a comparison, and an output read by a later
# statement.
MIXED = ElementwiseExpression("mixed", """
    u = exp(-abs(x)) * scale + sqrt(y * y + 1)
    z = log(u) / (u + shift) - tanh(x * k)
    w = z * z - u + (x >= y) * shift
""", inputs=("x", "y"), outputs=("z", "w"), scalars=("scale", "shift"), constants=dict(k=0.75))

# An update in place, as an optimizer's: m and p are read before they are assigned.
MOMENTUM = ElementwiseExpression("momentum", """
    m = m * beta + g
    p = p - m * lr
""", inputs=("g",), outputs=("m", "p"), scalars=("beta", "lr"))

DEFINED = [activation.GELU_TANH_FORWARD, activation.GELU_TANH_BACKWARD, activation.SILU_FORWARD,
           activation.SILU_BACKWARD, activation.SWIGLU_FORWARD, activation.SWIGLU_BACKWARD,
           activation.DROPOUT_FORWARD, optim.ADAMW_UPDATE, rotary.ROTATE, MIXED, MOMENTUM]


def mixed_reference(x, y, scale, shift):
    u = np.exp(-np.abs(x)) * scale + np.sqrt(y * y + 1)
    z = np.log(u) / (u + shift) - np.tanh(x * 0.75)
    return z, z * z - u + (x >= y) * shift


@pytest.fixture(params=["numpy", "numexpr"])
def evaluator(request):
    if request.param == "numexpr":
        pytest.importorskip("numexpr")
    expression.use_numexpr(request.param == "numexpr")
    yield request.param
    expression.use_numexpr(False)


# tests/functional runs with tiny cache blocks (its conftest): every size but 0 and 1 crosses block boundaries,
# and the odd ones end in a short block
SIZES = [(0,), (1,), (3, 17), (1001,)]


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_expression_matches_numpy_formula(evaluator, shape, dtype):
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    z, w = MIXED(x, y, scale=1.5, shift=2.0)
    z_ref, w_ref = mixed_reference(x.astype(np.float64), y.astype(np.float64), 1.5, 2.0)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    assert z.dtype == w.dtype == dtype and z.shape == shape
    np.testing.assert_allclose(z, z_ref, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(w, w_ref, rtol=tolerance, atol=tolerance)


def test_in_place_outputs_are_read_before_they_are_written(evaluator):
    rng = np.random.default_rng(1)
    g, m, p = (rng.standard_normal(1000) for _ in range(3))
    m_ref = m * 0.9 + g
    p_ref = p - m_ref * 0.1
    MOMENTUM(g, out=(m, p), beta=0.9, lr=0.1)
    np.testing.assert_allclose(m, m_ref, rtol=1e-15)
    np.testing.assert_allclose(p, p_ref, rtol=1e-15)
    with pytest.raises(TypeError, match="in place"):
        MOMENTUM(g, beta=0.9, lr=0.1)


def test_outputs_can_be_given_and_arrays_may_be_strided(evaluator):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 30)).astype(np.float32).T  # not contiguous
    y = np.ones((30, 40), np.float32)
    z, w = np.empty_like(y), np.empty((40, 30), np.float32).T
    assert MIXED(x, y, out=(z, w), scale=1.0, shift=3.0)[1] is w
    z_ref, w_ref = mixed_reference(x, y, 1.0, 3.0)
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
    g, m, p = (rng.standard_normal((6, 4)).T for _ in range(3))  # a strided in-place update
    m_ref = m * 0.5 + g
    p_ref = p - m_ref
    MOMENTUM(g, out=(m, p), beta=0.5, lr=1.0)
    np.testing.assert_allclose(m, m_ref, rtol=1e-15)
    np.testing.assert_allclose(p, p_ref, rtol=1e-15)
    with pytest.raises(ValueError, match="shape"):
        MIXED(x, y[:5], scale=1.0, shift=3.0)


def test_the_numpy_program_updates_buffers_in_place():
    # GELU's forward written in pass order needs no scratch buffer: every pass writes into t or y
    assert activation.GELU_TANH_FORWARD.program.n_registers == 0
    calls = re.sub(r"scalar_\d", "scalar", activation.GELU_TANH_FORWARD.program.source).splitlines()[1:]
    assert [call.strip() for call in calls] == [
        "np.multiply(scalar, x, out=t)", "np.multiply(t, x, out=t)", "np.add(scalar, t, out=t)",
        "np.multiply(x, t, out=t)", "np.tanh(t, out=t)", "np.add(scalar, t, out=y)", "np.multiply(y, x, out=y)",
        "np.multiply(y, scalar, out=y)"]
    # the same formula written as the study version reads allocates an intermediate
    textbook = ElementwiseExpression("textbook", "y = 0.5 * x * (1 + tanh(c * (x + k * x * x * x)))",
                                     inputs=("x",), outputs=("y",), constants=dict(c=1.0, k=1.0))
    assert textbook.program.n_registers == 1


@pytest.mark.parametrize("source", ["y = x ** 2", "y = max(x, 1)", "y = x if x else 1", "x = y + 1", "y = q + 1",
                                    "y + 1", "y = x\nnp = y"])
def test_unsupported_sources_are_rejected(source):
    with pytest.raises((SyntaxError, NameError)):
        ElementwiseExpression("bad", source, inputs=("x",), outputs=("y",))


@pytest.mark.parametrize("name", ["np", "i", "register_0", "scalar_1", "number_2", "exp"])
def test_names_of_the_generated_code_are_refused(name):
    with pytest.raises(NameError, match="generated code"):
        ElementwiseExpression("bad", "y = x", inputs=(name,), outputs=("y",))


def test_numexpr_keeps_float32():
    numexpr = pytest.importorskip("numexpr")
    statements, numbers = activation.GELU_TANH_FORWARD.numexpr_source()
    assert not re.search(r"\d\.\d", " ".join(text for _, text in statements))  # literals would be doubles
    assert numbers and numexpr.evaluate("x * number_0", local_dict=dict(
        x=np.ones(3, np.float32), number_0=np.float32(numbers[0]))).dtype == np.float32


@pytest.mark.parametrize("device", [device for device in DEVICES_AND_SECOND_GPU if device != "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_kernel_matches_numpy(device, dtype):
    """The CuPy kernel, on a GPU or the stand-in's emulator (which compiles the printed CUDA C)."""
    rng = np.random.default_rng(3)
    x, y = (rng.standard_normal((7, 37)).astype(dtype) for _ in range(2))
    with backend.device_scope(backend.canonical_device(device)):
        z, w = MIXED(backend.to_device(x, device), backend.to_device(y, device), scale=1.5, shift=2.0)
        g, m, p = (backend.to_device(rng.standard_normal(300).astype(dtype), device) for _ in range(3))
        m_ref, p_ref = backend.to_numpy(m) * 0.5 + backend.to_numpy(g), backend.to_numpy(p)
        MOMENTUM(g, out=(m, p), beta=0.5, lr=0.25)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    z_ref, w_ref = mixed_reference(x, y, 1.5, 2.0)
    np.testing.assert_allclose(backend.to_numpy(z), z_ref, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(backend.to_numpy(w), w_ref, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(backend.to_numpy(m), m_ref, rtol=tolerance)
    np.testing.assert_allclose(backend.to_numpy(p), p_ref - m_ref * 0.25, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_source_of_every_expression_compiles_with_nvrtc(dtype):
    """The kernel CuPy builds from each ElementwiseKernel, as the stand-in writes it, through NVRTC; a float32
    kernel has no double-precision instruction (an untyped literal such as 0.5 would bring them)."""
    compile_gate = pytest.importorskip("tinytf.kernels.compile_gate")
    from tinytf.testing.cupy_standin import _elementwise_params, _elementwise_source

    for fused in DEFINED:
        in_params, out_params, operation = fused.cuda_source(dtype)
        source = _elementwise_source(_elementwise_params(in_params), _elementwise_params(out_params), operation,
                                    fused.name, {}, scalar_params=fused.scalars)
        ptx = compile_gate.compile_with_nvrtc(source, f"{fused.name}.cu", ("-arch=compute_80",)).ptx
        assert f".entry {fused.name}(" in ptx
        if dtype == np.float32:
            assert ".f64" not in ptx, f"{fused.name} computes in double precision:\n{source}"


def test_constants_fold_once_per_call():
    # c * k of GELU is one number, not a pass over the block
    program = activation.GELU_TANH_FORWARD.program
    ufunc, (slot, x), out = program.calls[0]
    assert ufunc is np.multiply and slot[0] == "scalar" and (x, out) == ("x", "t")
    assert len(program.scalars) == 4
    assert math.isclose(eval(program.scalars[slot[1]], {"FUNCTIONS": expression.FUNCTIONS}),
                        math.sqrt(2 / math.pi) * 0.044715)


# (x's shape, y's shape): tables against (B, H, T, D), packed rows (total, 1, D), decode (B, 1, 1, D), row statistics
# (N, 1), and an x that broadcasts too
BROADCASTS = [((2, 3, 5, 8), (5, 8)), ((5, 3, 8), (5, 1, 8)), ((2, 3, 1, 8), (2, 1, 1, 8)), ((7, 6), (7, 1)),
              ((1, 6), (4, 1)), ((3, 1, 8), ())]


@pytest.mark.parametrize("x_shape, y_shape", BROADCASTS)
def test_inputs_broadcast_to_the_outputs_shape(evaluator, x_shape, y_shape):
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal(x_shape), rng.standard_normal(y_shape)
    z, w = MIXED(x, y, scale=1.5, shift=2.0)
    z_ref, w_ref = mixed_reference(x, y, 1.5, 2.0)
    assert z.shape == w.shape == np.broadcast_shapes(x_shape, y_shape)
    np.testing.assert_allclose(z, z_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-12)


def test_inputs_may_be_views_read_backwards_and_outputs_views_of_one_array(evaluator):
    # RoPE's layout: x (..., 2, D/2) with the halves swapped as a view, the output written through a strided view
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 2, 5))
    table = rng.standard_normal((3, 2, 5))
    out = np.zeros((4, 3, 2, 10))
    z, w = MIXED(x[..., ::-1, :], table, out=(out[..., :5], out[..., 5:]), scale=0.5, shift=1.0)
    z_ref, w_ref = mixed_reference(x[..., ::-1, :], table, 0.5, 1.0)
    np.testing.assert_allclose(out, np.concatenate([z_ref, w_ref], axis=-1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="broadcast"):
        MIXED(x, table[:2], scale=1.0, shift=1.0)
    with pytest.raises(ValueError, match="broadcast"):
        MIXED(x[:1], x, out=(np.empty((1, 3, 2, 5)), np.empty((1, 3, 2, 5))), scale=1.0, shift=1.0)


def test_blocks_follow_the_memory_of_the_outputs():
    # A transposed parameter's update walks its memory as one flat run (not column by column); a table broadcast
    # along the leading axes merges them into one; RoPE's swapped halves keep their own axis.
    g, m = np.ones((30, 40)).T, np.zeros((30, 40)).T
    assert [view.shape for view in expression._merged([g, m])] == [(1200,), (1200,)]
    x, table = np.ones((2, 3, 5, 2, 4)), np.broadcast_to(np.ones((5, 2, 4)), (2, 3, 5, 2, 4))
    merged = expression._merged([x[..., ::-1, :], table, np.empty_like(x)])  # inputs, then the output
    assert [view.shape for view in merged] == [(6, 5, 2, 4)] * 3 and merged[1].strides[0] == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_foreach_is_one_call_each_bit_for_bit(evaluator, dtype, monkeypatch):
    monkeypatch.setattr(expression, "get_num_threads", lambda: 2)  # the blocks shared out between two threads
    rng = np.random.default_rng(7)
    shapes = [(40, 9), (7,), (1,), (0, 3), (13, 11), (300,)]
    grads = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    states = [tuple(rng.standard_normal(shape).astype(dtype) for _ in range(2)) for shape in shapes]
    states[4] = tuple(np.asfortranarray(state) for state in states[4])  # strided outputs
    expected = [tuple(state.copy(order="K") for state in pair) for pair in states]
    for grad, pair in zip(grads, expected):
        MOMENTUM(grad, out=pair, beta=0.9, lr=0.125)
    MOMENTUM.foreach([(grad,) for grad in grads], states, beta=0.9, lr=0.125)
    for pair, pair_ref in zip(states, expected):
        for array, reference in zip(pair, pair_ref):
            np.testing.assert_array_equal(array, reference)
    with pytest.raises(ValueError, match="one dtype"):
        MOMENTUM.foreach([(grads[1],), (grads[1].astype(np.float16),)],
                         [states[1], tuple(state.astype(np.float16) for state in states[1])], beta=0.9, lr=0.1)


@pytest.mark.parametrize("device", [device for device in DEVICES_AND_SECOND_GPU if device != "cpu"])
def test_cuda_kernel_broadcasts_and_runs_foreach(device):
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((2, 3, 4, 8)), rng.standard_normal((4, 8))
    grads = [rng.standard_normal(shape) for shape in [(5,), (3, 4)]]
    states = [(rng.standard_normal(g.shape), rng.standard_normal(g.shape)) for g in grads]
    with backend.device_scope(backend.canonical_device(device)):
        x_gpu = backend.to_device(x.reshape(2, 3, 4, 2, 4), device)[..., ::-1, :].reshape(2, 3, 4, 8)
        z, w = MIXED(x_gpu, backend.to_device(y, device), scale=1.5, shift=2.0)
        on_device = [tuple(backend.to_device(array, device) for array in pair) for pair in states]
        MOMENTUM.foreach([(backend.to_device(g, device),) for g in grads], on_device, beta=0.5, lr=0.25)
    z_ref, w_ref = mixed_reference(x.reshape(2, 3, 4, 2, 4)[..., ::-1, :].reshape(2, 3, 4, 8), y, 1.5, 2.0)
    np.testing.assert_allclose(backend.to_numpy(z), z_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(w), w_ref, rtol=1e-12, atol=1e-12)
    for grad, (m, p), (m_gpu, p_gpu) in zip(grads, states, on_device):
        m_ref = m * 0.5 + grad
        np.testing.assert_allclose(backend.to_numpy(m_gpu), m_ref, rtol=1e-12)
        np.testing.assert_allclose(backend.to_numpy(p_gpu), p - m_ref * 0.25, rtol=1e-12, atol=1e-12)
