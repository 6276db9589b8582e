"""The convolution, pooling and normalization layers, and the batch_norm and group_norm ops under them."""

import math

import numpy as np
import pytest
from devices import CUDA
from op_check import check_op, random_array

import tinytf
from tinytf import nn
from tinytf.functional.convolution import conv2d
from tinytf.functional.normalization import batch_norm, group_norm
from tinytf.nn.conv import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Conv1d,
    Conv2d,
    ConvTranspose2d,
    GroupNorm,
    MaxPool2d,
)


def standardized(x, axes, eps=1e-5):
    return (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


def per_channel(vector, ndim):
    return vector.reshape(-1, *(1,) * (ndim - 2))


@pytest.mark.parametrize("affine", [(), ("weight",), ("bias",), ("weight", "bias")])
@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 2)])
def test_batch_norm_in_training_matches_the_formula(shape, affine):
    x = random_array(1, shape) * 2 + 1
    params = {"weight": random_array(2, (shape[1],)), "bias": random_array(3, (shape[1],))}
    axes = (0, *range(2, len(shape)))

    def reference(x, *values):
        given = dict(zip(affine, values))
        return (standardized(x, axes) * per_channel(given.get("weight", np.ones(shape[1])), x.ndim)
                + per_channel(given.get("bias", np.zeros(shape[1])), x.ndim))

    check_op(lambda x, *values: batch_norm(x, None, None, **dict(zip(affine, values)), training=True), reference, x,
             *(params[name] for name in affine))


def test_batch_norm_in_evaluation_uses_the_running_statistics():
    x, w, b = random_array(4, (3, 2, 2, 2)), random_array(5, (2,)), random_array(6, (2,))
    mean, var = np.array([0.5, -1.0]), np.array([2.0, 0.5])

    def op(x, w, b):
        running = [tinytf.tensor(stat, device=x.device) for stat in (mean, var)]
        return batch_norm(x, *running, w, b, training=False, eps=1e-3)

    check_op(op, lambda x, w, b: (x - per_channel(mean, 4)) / np.sqrt(per_channel(var, 4) + 1e-3)
             * per_channel(w, 4) + per_channel(b, 4), x, w, b)


def test_batch_norm_moves_the_running_statistics_by_momentum():
    x = random_array(7, (4, 2, 3, 3))
    running_mean, running_var = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    batch_norm(tinytf.tensor(x), running_mean, running_var, training=True, momentum=0.3)
    np.testing.assert_allclose(running_mean, 0.7 * np.array([1.0, 2.0]) + 0.3 * x.mean(axis=(0, 2, 3)))
    # the unbiased variance, as PyTorch keeps it
    np.testing.assert_allclose(running_var, 0.7 * np.array([3.0, 4.0]) + 0.3 * x.var(axis=(0, 2, 3), ddof=1))


@pytest.mark.parametrize(("shape", "groups", "affine"), [((2, 6, 2, 3), 3, True), ((3, 4, 5), 2, False),
                                                         ((2, 4, 2, 2), 4, True)])
def test_group_norm_matches_the_formula(shape, groups, affine):
    x, w, b = random_array(8, shape) * 3 - 1, random_array(9, (shape[1],)), random_array(10, (shape[1],))

    def reference(x, *params):
        y = standardized(x.reshape(shape[0], groups, -1), (2,)).reshape(shape)
        return y * per_channel(params[0], x.ndim) + per_channel(params[1], x.ndim) if params else y

    if affine:
        check_op(lambda x, w, b: group_norm(x, groups, w, b), reference, x, w, b)
    else:
        check_op(lambda x: group_norm(x, groups), reference, x)


def test_norm_errors_name_the_problem():
    x = tinytf.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="dividing the 4"):
        group_norm(x, 3)
    with pytest.raises(ValueError, match="running_mean"):
        batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value"):
        batch_norm(tinytf.randn(1, 4), None, None, training=True)
    with pytest.raises(ValueError, match=r"weight of shape \(3,\)"):
        batch_norm(x, None, None, tinytf.ones(3), training=True)


def test_layer_shapes_and_parameter_counts():
    x = tinytf.randn(2, 4, 8, 8)
    assert Conv2d(4, 6, 3)(x).shape == (2, 6, 6, 6) and Conv2d(4, 6, 3).num_parameters() == 6 * 4 * 9 + 6
    assert Conv2d(4, 6, (3, 1), stride=2, padding=1, groups=2, bias=False)(x).shape == (2, 6, 4, 5)
    assert Conv2d(4, 8, 3, padding="same", dilation=2)(x).shape == (2, 8, 8, 8)
    assert Conv1d(4, 6, 3, padding=1)(tinytf.randn(2, 4, 10)).shape == (2, 6, 10)
    transposed = ConvTranspose2d(4, 6, 4, stride=2, padding=1, groups=2)
    assert transposed.weight.shape == (4, 3, 4, 4) and transposed(x).shape == (2, 6, 16, 16)
    assert ConvTranspose2d(4, 2, 3, stride=2, output_padding=1)(x).shape == (2, 2, 18, 18)
    assert MaxPool2d(2)(x).shape == (2, 4, 4, 4) and AvgPool2d(3, 2, 1)(x).shape == (2, 4, 4, 4)
    values, indices = MaxPool2d(3, 2, ceil_mode=True, return_indices=True)(x)
    assert values.shape == indices.shape == (2, 4, 4, 4)
    assert AdaptiveAvgPool2d((1, None))(x).shape == (2, 4, 1, 8)
    assert BatchNorm2d(4)(x).shape == x.shape and BatchNorm2d(4).num_parameters() == 8
    assert GroupNorm(2, 4)(x).shape == x.shape and GroupNorm(2, 4, affine=False).num_parameters() == 0


@pytest.mark.parametrize("layer", [Conv2d(6, 8, 3, groups=2), Conv1d(4, 8, 5), ConvTranspose2d(12, 4, 3, groups=2)],
                         ids=["conv2d", "conv1d", "conv_transpose2d"])
def test_conv_init_is_pytorch_kaiming_uniform(layer):
    # kaiming_uniform with a = sqrt(5): U(-b, b), b = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), fan_in =
    # weight.shape[1] * the kernel's size; the bias shares the bound
    bound = 1 / math.sqrt(math.prod(layer.weight.shape[1:]))
    weight = np.abs(layer.weight.numpy())
    assert weight.max() <= bound and weight.max() > 0.9 * bound and weight.mean() == pytest.approx(bound / 2, rel=0.15)
    assert np.abs(layer.bias.numpy()).max() <= bound


def test_conv_module_is_the_op_on_its_parameters():
    layer = Conv2d(2, 3, 3, stride=2, padding=1)
    x = tinytf.randn(1, 2, 5, 5)
    expected = conv2d(x, layer.weight, layer.bias, stride=2, padding=1)
    np.testing.assert_array_equal(layer(x).numpy(), expected.numpy())


def test_batch_norm2d_trains_its_running_statistics_and_uses_them_in_eval():
    layer = BatchNorm2d(3, momentum=0.5)
    x = tinytf.randn(8, 3, 4, 4) * 2 + 3
    layer(x)
    data = x.numpy()
    np.testing.assert_allclose(layer.running_mean, 0.5 * data.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(layer.running_var, 0.5 + 0.5 * data.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    assert layer.num_batches_tracked == 1
    layer.eval()
    before = layer.running_mean.copy()
    expected = (data - per_channel(layer.running_mean, 4)) / np.sqrt(per_channel(layer.running_var, 4) + 1e-5)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.running_mean, before)
    assert layer.num_batches_tracked == 1


def test_batch_norm2d_statistics_travel_in_the_state_dict():
    trained = nn.ModuleList([Conv2d(1, 2, 3), BatchNorm2d(2)])
    trained[1](tinytf.randn(4, 2, 3, 3))
    state = trained.state_dict()
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(state)
    fresh = nn.ModuleList([Conv2d(1, 2, 3), BatchNorm2d(2)])
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh[1].running_var, trained[1].running_var)
    assert fresh[1].num_batches_tracked == 1
    assert "running_mean" not in BatchNorm2d(2, track_running_stats=False).state_dict()


@pytest.mark.skipif(not CUDA, reason="needs a GPU or the CuPy stand-in")
def test_a_small_cnn_runs_forward_and_backward_on_the_gpu():
    model = nn.ModuleList([Conv2d(1, 4, 3, padding=1), BatchNorm2d(4), GroupNorm(2, 4)]).to("cuda")
    x = tinytf.randn(2, 1, 6, 6).to("cuda")
    out = MaxPool2d(2)(model[2](model[1](model[0](x))))
    out.sum().backward()
    assert out.device == "cuda:0" and model[0].weight.grad.shape == (4, 1, 3, 3)
    assert model[1].running_mean.shape == (4,) and model[1].state_dict()["running_mean"].shape == (4,)
