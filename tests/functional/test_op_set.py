"""The op set a PyTorch user reaches for (issue 16) is there under PyTorch's names: in tinytf.nn.functional, as Tensor
methods and operators, and as nn modules. Each op's behaviour is tested in the file of its module."""

import numpy as np
import pytest

import tinytf
import tinytf.nn.functional as F
from tinytf import nn

FUNCTIONS = """
floor ceil round trunc sign frac log2 log10 log1p exp2 expm1 tan sinh cosh asin acos atan atan2 softplus elu selu
leaky_relu hardtanh hardswish mish logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
bitwise_not bitwise_left_shift bitwise_right_shift isnan isinf isfinite isclose floor_divide div remainder
std std_mean var_mean prod argmin any all cumsum cumprod cummax cummin logcumsumexp sort argsort topk median norm
gather scatter scatter_add scatter_reduce index_select index_add masked_select nonzero take_along_dim flip roll repeat
tile repeat_interleave tril triu pad einsum meshgrid diag outer
nll_loss cross_entropy binary_cross_entropy binary_cross_entropy_with_logits mse_loss l1_loss smooth_l1_loss kl_div
conv1d conv2d conv_transpose2d max_pool2d avg_pool2d adaptive_avg_pool2d interpolate batch_norm group_norm
""".split()
METHODS = """
floor ceil round trunc sign frac log2 log10 log1p exp2 expm1 tan sinh cosh asin acos atan atan2 isnan isinf isfinite
isclose floor_divide div remainder logical_and logical_or logical_xor logical_not bitwise_and bitwise_or bitwise_xor
bitwise_not std prod argmin any all norm cumsum cumprod cummax cummin logcumsumexp sort argsort topk median gather
scatter scatter_add scatter_reduce index_select index_add masked_select nonzero take_along_dim flip roll repeat tile
repeat_interleave tril triu diag outer
__floordiv__ __rfloordiv__ __mod__ __rmod__ __and__ __or__ __xor__ __invert__ __lshift__ __rshift__
""".split()
MODULES = "Conv1d Conv2d ConvTranspose2d MaxPool2d AvgPool2d AdaptiveAvgPool2d BatchNorm2d GroupNorm".split()
CREATION = "eye linspace tril_indices triu_indices".split()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_the_function_is_in_nn_functional(name):
    assert name in F.__all__ and callable(getattr(F, name))


@pytest.mark.parametrize("name", METHODS)
def test_the_tensor_has_the_method(name):
    assert callable(getattr(tinytf.Tensor, name))


@pytest.mark.parametrize("name", MODULES)
def test_the_module_is_in_nn(name):
    assert name in nn.__all__ and issubclass(getattr(nn, name), nn.Module)


@pytest.mark.parametrize("name", CREATION)
def test_the_creation_function_is_in_tinytf(name):
    assert callable(getattr(tinytf, name))


def test_methods_and_operators_are_the_ops():
    a, b = tinytf.tensor([-7, 7, 5]), tinytf.tensor([2, 2, -3])
    np.testing.assert_array_equal((a // b).numpy(), np.array([-7, 7, 5]) // np.array([2, 2, -3]))
    np.testing.assert_array_equal((a % b).numpy(), np.array([-7, 7, 5]) % np.array([2, 2, -3]))
    np.testing.assert_array_equal((a & b).numpy(), np.array([-7, 7, 5]) & np.array([2, 2, -3]))
    np.testing.assert_array_equal((~a).numpy(), ~np.array([-7, 7, 5]))
    np.testing.assert_array_equal(a.div(b, rounding_mode="trunc").numpy(), [-3, 3, -1])
    x = tinytf.tensor([[3.0, 1.0], [2.0, 4.0]])
    np.testing.assert_array_equal(x.flip(0, 1).numpy(), [[4.0, 2.0], [1.0, 3.0]])
    np.testing.assert_array_equal(x.tile(1, 2).numpy(), np.tile(x.numpy(), (1, 2)))
    np.testing.assert_array_equal(x.sort(dim=1).values.numpy(), [[1.0, 3.0], [2.0, 4.0]])
    assert x.any(dim=0).shape == (2,) and bool(x.all())


def test_div_refuses_an_unknown_rounding_mode():
    with pytest.raises(ValueError, match="rounding_mode must be None, 'floor' or 'trunc', got 'up'"):
        F.div(tinytf.tensor([1.0]), 2.0, rounding_mode="up")
