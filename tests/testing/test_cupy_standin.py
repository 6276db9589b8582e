"""The CuPy stand-in refuses what CuPy refuses, and the names check can fail."""

import numpy as np
import pytest

from rehearsal_names import missing_in
from tinytf import backend

if not backend.uses_cuda_standin():
    pytest.skip("the CuPy stand-in is off (a real GPU, or TINYTF_CUDA_STANDIN=0)", allow_module_level=True)
cupy = backend.cupy_module()


def test_implicit_conversion_to_numpy_fails_as_in_cupy():
    x = cupy.arange(4.0)
    for convert in (np.asarray, np.exp, lambda a: a.__array__(), lambda a: np.concatenate([a])):
        with pytest.raises(TypeError):
            convert(x)
    np.testing.assert_array_equal(x.get(), np.arange(4.0))
    assert float(x.sum()) == 6.0 and isinstance(x.sum(), cupy.ndarray) and x.sum().ndim == 0


def test_a_numpy_array_in_an_operation_fails_but_scalars_and_index_arrays_work():
    x = cupy.ones(3)
    with pytest.raises(TypeError, match="Unsupported type"):
        x + np.ones(3)
    with pytest.raises(TypeError):
        np.ones(3) + x
    assert float((x + np.float32(2))[np.array([0, 2])].sum()) == 6.0


def test_arrays_of_another_device_need_it_current():
    on_first = cupy.ones(2)
    with cupy.cuda.Device(1):
        y = cupy.ones(2)
    with pytest.raises(ValueError, match="current device"):
        y * 2
    with pytest.raises(ValueError, match="devices"):
        with cupy.cuda.Device(1):
            y + cupy.asarray(on_first)  # asarray keeps the cuda:0 array on cuda:0, as CuPy does
    with cupy.cuda.Device(1):
        assert (y * 2).device.id == 1
    assert y.copy().device.id == 0  # copy() lands on the current device


def test_views_of_another_devices_array_need_no_kernel_but_copies_do():
    with cupy.cuda.Device(1):
        y = cupy.arange(6.0).reshape(2, 3)
    views = [y.reshape(3, 2), y.T, y[1], y[:, ::2], y[None, ..., 0], cupy.broadcast_to(y, (4, 2, 3)),
             cupy.moveaxis(y, 0, 1), y.ravel()]
    assert all(view.device.id == 1 for view in views)
    assert float(views[2][0]) == 3.0
    for needs_a_kernel in (lambda: y.T.reshape(6), lambda: y[np.array([0])], lambda: y[[True, False]],
                           lambda: y.astype(np.float32)):
        with pytest.raises(ValueError, match="current device"):
            needs_a_kernel()


def test_the_names_check_reports_names_real_cupy_lacks():
    real_cupy = pytest.importorskip("cupy")
    names = {"cupy.exp": "a", "cupy.cuda.Device": "b", "cupy.ndarray.sum": "c", "cupy.no_such_name": "d",
             "cupy.ndarray.no_such_method": "e"}
    assert missing_in(real_cupy, names) == {"cupy.no_such_name": "d", "cupy.ndarray.no_such_method": "e"}


def test_cupy_names_that_are_builtins_too_leave_the_standins_own_code_alone():
    """cupy.all, cupy.any, ... once looked up must not replace the builtins the stand-in calls (a device array as
    an index was then taken for a basic index and handed to NumPy)."""
    assert cupy.all(cupy.ones(2)) and cupy.any(cupy.ones(2)) and float(cupy.max(cupy.arange(3.0))) == 2.0
    x = cupy.arange(5.0)
    np.testing.assert_array_equal(x[cupy.asarray([4, 0])].get(), [4.0, 0.0])


def test_bfloat16_works_where_cupy_14_supports_it_and_fails_where_it_does_not():
    bfloat16 = backend.BFLOAT16
    x = cupy.arange(6.0).astype(bfloat16).reshape(2, 3)
    assert (cupy.exp(x) * 2 + x).dtype == bfloat16 and float(x.sum()) == 15.0
    assert (x @ x.T).shape == (2, 2)  # 2-D matmul: cuBLAS takes bfloat16
    batched = x.reshape(1, 2, 3)
    for unsupported in (lambda: batched @ x.T, lambda: cupy.matmul(batched, x.T), lambda: cupy.around(x),
                        lambda: x.round(), lambda: cupy.divmod(x, x), lambda: cupy.add.at(x, cupy.asarray([0]), x[0])):
        with pytest.raises(TypeError, match="bfloat16"):
            unsupported()
    assert float((batched.astype(np.float32) @ x.T.astype(np.float32)).sum()) == float((x @ x.T).sum())


def test_elementwise_kernel_compiles_its_operation_and_follows_cupys_rules():
    add_scaled = cupy.ElementwiseKernel("T x, T y, float32 scale", "T z", "z = x * scale + y + i", "add_scaled")
    x = cupy.asarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    y = cupy.asarray(np.array([10.0, 20.0, 30.0]))  # broadcast along the rows
    z = add_scaled(x, y, 2)  # a Python scalar takes its parameter's type
    assert z.dtype == np.float64 and z.shape == (2, 3)  # T is float64, from the arrays
    np.testing.assert_array_equal(z.get(), np.arange(6).reshape(2, 3) * 2 + [10, 20, 30] + np.arange(6).reshape(2, 3))
    out = cupy.zeros((2, 3), dtype=np.float64)
    assert add_scaled(x, y, 0, out) is out
    np.testing.assert_array_equal(out.get(), np.arange(6).reshape(2, 3) + [10, 20, 30])
    with pytest.raises(ValueError, match="Out shape"):
        add_scaled(x, y, 0, cupy.zeros((3,), dtype=np.float64))
    with pytest.raises(TypeError, match="Type is mismatched"):
        add_scaled(x, y, 0, cupy.zeros((2, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="number of arguments"):
        add_scaled(x, y)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        add_scaled(x, np.ones(3), 1)


def test_elementwise_kernel_types_are_numpy_dtype_names_as_in_cupy():
    """CuPy reads a parameter's type with numpy.dtype: "float" is float64 there, not C's float (which broke every
    fused op on the first real GPU)."""
    copy = cupy.ElementwiseKernel("float x", "float y", "y = x", "copy")
    with pytest.raises(TypeError, match="Type is mismatched. x float32 float64"):
        copy(cupy.ones(3, dtype=np.float32))
    with pytest.raises(TypeError, match="Type is mismatched. y float32 float64"):
        copy(cupy.ones(3), cupy.empty(3, dtype=np.float32))
    assert copy(cupy.ones(3)).dtype == np.float64
    same = cupy.ElementwiseKernel("T x, T y", "T z", "z = x + y", "same")
    with pytest.raises(TypeError, match="Type is mismatched. y float64 float32"):
        same(cupy.ones(3, dtype=np.float32), cupy.ones(3))


def test_elementwise_kernel_raw_parameters_see_the_whole_array():
    reverse = cupy.ElementwiseKernel("raw T x, int64 n", "T y", "y = x[n - 1 - i]", "reverse")
    x = cupy.asarray(np.arange(5, dtype=np.float32))
    y = cupy.empty(5, dtype=np.float32)
    reverse(x, 5, y)
    np.testing.assert_array_equal(y.get(), np.arange(5)[::-1])


def test_elementwise_kernel_runs_the_cuda_source_so_cuda_errors_fail():
    broken = cupy.ElementwiseKernel("T x", "T y", "y = undefined_function(x)", "broken")
    with pytest.raises(Exception, match="undefined_function"):
        broken(cupy.ones(3))
