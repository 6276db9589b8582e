import gc
import types
import weakref

import numpy as np
import pytest

import tinytf
from devices import DEVICES, DEVICES_AND_SECOND_GPU
from tinytf import backend


def test_deep_chain_of_ten_thousand_ops():
    x = tinytf.tensor(1.0, requires_grad=True, dtype="float64")
    y = x
    for _ in range(10_000):
        y = y * 1.0001 + 0.0
    y.backward()
    np.testing.assert_allclose(x.grad, 1.0001**10_000, rtol=1e-9)


def test_diamond_graph_sums_both_paths():
    x = tinytf.tensor(3.0, requires_grad=True)
    a, b = x * 2, x * x
    (a + b).backward()
    assert x.grad == pytest.approx(2 + 2 * 3)


def test_node_reused_many_times():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    y = x * 3
    total = y
    for _ in range(99):
        total = total + y
    total.sum().backward()
    np.testing.assert_allclose(x.grad, [300.0, 300.0])


def test_gradients_accumulate_across_backward_calls_like_pytorch():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    (x * x).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [2 + 3, 4 + 3])
    x.grad = None
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [3, 3])


def test_leaf_gradients_do_not_alias_each_other():
    a = tinytf.tensor([1.0], requires_grad=True)
    b = tinytf.tensor([1.0], requires_grad=True)
    (a + b).sum().backward()
    a.grad *= 10
    assert b.grad[0] == 1.0


def test_no_grad_as_context_and_decorator():
    x = tinytf.tensor([1.0], requires_grad=True)
    with tinytf.no_grad():
        y = x * 2
        with tinytf.enable_grad():
            z = x * 2
    assert not y.requires_grad and y.grad_fn is None and z.requires_grad
    assert tinytf.is_grad_enabled()

    @tinytf.no_grad()
    def double(t):
        return t * 2

    assert not double(x).requires_grad and tinytf.is_grad_enabled()


def test_no_grad_records_no_graph_and_keeps_no_inputs_alive():
    x = tinytf.tensor(np.ones(3), requires_grad=True)
    with tinytf.no_grad():
        y = x * 2
    recorded = x * 2
    assert recorded.grad_fn.inputs == (x,) and recorded.grad_fn.needs_input_grad == (True,)  # 2 is a parameter
    reference = weakref.ref(x)
    del x, recorded
    gc.collect()
    assert reference() is None  # y was made without a graph: nothing links it back to x
    assert y.grad_fn is None and not y.requires_grad and y.is_leaf


def test_graph_is_released_after_backward():
    x = tinytf.tensor(np.ones(1000), requires_grad=True)
    hidden = x.exp()
    loss = (hidden * 2).sum()
    reference = weakref.ref(hidden)
    del hidden
    gc.collect()
    assert reference() is not None  # the graph holds the intermediate until backward
    loss.backward()
    gc.collect()
    assert reference() is None


def test_retain_graph_allows_a_second_backward_and_release_forbids_it():
    x = tinytf.tensor(2.0, requires_grad=True)
    y = x * x
    y.backward(retain_graph=True)
    y.backward()
    assert x.grad == pytest.approx(8.0)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        y.backward()


def test_retain_grad_keeps_gradient_of_intermediate():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    y = x * 2
    y.retain_grad()
    (y * y).sum().backward()
    np.testing.assert_allclose(y.grad, [4.0, 8.0])


def test_backward_errors():
    with pytest.raises(RuntimeError, match="needs a scalar output, got shape \\(2,\\)"):
        (tinytf.tensor([1.0, 2.0], requires_grad=True) * 2).backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        tinytf.tensor(1.0).backward()
    with pytest.raises(ValueError, match="expected the tensor's shape"):
        (tinytf.tensor([1.0, 2.0], requires_grad=True) * 2).backward(np.ones(3))


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(TypeError, match="only floating-point tensors can require gradients, got dtype int64"):
        tinytf.tensor([1, 2], requires_grad=True)


def test_backward_with_explicit_gradient():
    x = tinytf.tensor([1.0, 2.0], requires_grad=True)
    (x * x).backward(tinytf.tensor([1.0, 10.0]))
    np.testing.assert_allclose(x.grad, [2.0, 40.0])


def test_detach_cuts_the_graph_and_shares_data():
    x = tinytf.tensor([1.0], requires_grad=True)
    y = (x * 2).detach()
    assert not y.requires_grad and y.is_leaf
    z = x.detach()
    z.data[0] = 5.0
    assert x.item() == 5.0


def test_repr_and_conversions():
    x = tinytf.tensor([[1.0, 2.0]], requires_grad=True)
    assert repr(x) == "tensor([[1., 2.]], requires_grad=True)"
    assert "grad_fn=Mul" in repr(x * 2)
    assert "dtype=float64" in repr(x.double())
    assert tinytf.tensor([3.5]).item() == 3.5
    assert x.tolist() == [[1.0, 2.0]]
    assert isinstance(x.numpy(), np.ndarray)
    with pytest.raises(ValueError, match="one element"):
        x.item()


class _FakeGpuArray(np.ndarray):
    """A stand-in for a CuPy array, so the device checks can be exercised on a machine without a GPU."""

    @property
    def device(self):
        return types.SimpleNamespace(id=0)


def test_mixing_devices_names_both(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", types.SimpleNamespace(ndarray=_FakeGpuArray))
    on_gpu = tinytf.Tensor(np.ones(3).view(_FakeGpuArray))
    assert on_gpu.device == "cuda:0"
    with pytest.raises(RuntimeError, match="different devices, cuda:0 and cpu"):
        on_gpu + tinytf.ones(3, dtype="float64")


def test_slices_shared_arrays_and_dense_gradients_add_up():
    # Slices give SliceGrads that the engine writes into one buffer; Add hands one array to both inputs; x is also
    # used whole. Every path must count once, and no array that an op returned may be changed in place.
    data = np.arange(6.0).reshape(2, 3)
    x = tinytf.tensor(data, requires_grad=True)
    doubled = x + x
    total = (x[0] * 2).sum() + x[1].sum() * 3 + (doubled * doubled).sum() + x[:, 1:].sum()
    total.backward(retain_graph=True)
    expected = 8 * data + [[2, 2, 2], [3, 3, 3]] + [[0, 1, 1], [0, 1, 1]]
    np.testing.assert_allclose(x.grad, expected)
    total.backward()  # the saved arrays survived the first pass unchanged
    np.testing.assert_allclose(x.grad, 2 * expected)


def test_backward_never_writes_into_the_callers_gradient():
    x = tinytf.tensor(np.ones((2, 3)), requires_grad=True)
    upstream = np.full((2, 3), 5.0)
    (x + x).backward(upstream)  # both inputs of Add receive `upstream` itself
    np.testing.assert_array_equal(upstream, 5.0)
    np.testing.assert_array_equal(x.grad, 10.0)


def test_a_slice_that_is_the_only_gradient_reaches_the_leaf_as_a_dense_array():
    x = tinytf.tensor(np.zeros((3, 2)), requires_grad=True)
    x[1:].sum().backward()
    assert isinstance(x.grad, np.ndarray)
    np.testing.assert_array_equal(x.grad, [[0, 0], [1, 1], [1, 1]])


@pytest.mark.skipif(len(DEVICES) == 1 or not backend.is_available("cuda:1"), reason="needs two CUDA devices "
                    "(the CuPy stand-in has two)")
def test_tensors_on_two_gpus_or_on_a_gpu_and_the_cpu_in_one_op_are_refused():
    on_first, on_second = tinytf.ones(3, device="cuda:0"), tinytf.ones(3, device="cuda:1")
    with pytest.raises(RuntimeError, match="different devices, cuda:0 and cuda:1"):
        on_first + on_second
    with pytest.raises(RuntimeError, match="different devices, cuda:0 and cpu"):
        on_first * tinytf.ones(3)
    with pytest.raises(RuntimeError, match="different devices, cpu and cuda:1"):
        tinytf.ones(3) @ on_second


@pytest.mark.parametrize("device", DEVICES_AND_SECOND_GPU)
def test_ops_and_backward_run_on_the_tensors_own_device(device):
    """cuda:1 is not CuPy's current device: ops and backward must make it current, and results stay there."""
    x = tinytf.tensor(np.arange(6.0).reshape(2, 3), requires_grad=True, device=device)
    y = ((x * 2).exp().sum(axis=1) @ tinytf.ones(2, device=device, dtype="float64")).log()
    y.backward()
    assert y.device == x.device == backend.canonical_device(device)
    expected = 2 * np.exp(2 * np.arange(6.0).reshape(2, 3)) / np.exp(2 * np.arange(6.0)).sum()
    np.testing.assert_allclose(tinytf.Tensor(x.grad).numpy(), expected)


def test_a_backward_returning_a_misshaped_gradient_is_named_with_its_input():
    class Halved(tinytf.Function):
        def forward(self, a):
            return a * 0.5

        def backward(self, grad):
            return grad.sum(axis=0, keepdims=True) * 0.5  # (1, 3) for its (2, 3) input: the sum is wrong here

    x = tinytf.randn(2, 3, requires_grad=True)
    y = x * 1.0  # an input inside the graph, not a leaf: its gradient would flow on before reaching one
    with pytest.raises(RuntimeError, match=r"Halved.backward returned a gradient of shape \(1, 3\) for its input 0 "
                                           r"of shape \(2, 3\)"):
        Halved.apply(y).sum().backward()
