import numpy as np
import pytest

import tinytf
from tinytf import nn
from tinytf.checkpoint import load_checkpoint, save_checkpoint


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.second = nn.Linear(4, 2, bias=False)
        self.register_buffer("scale", np.ones(2, dtype=np.float32))
        self.register_buffer("scratch", np.zeros(2, dtype=np.float32), persistent=False)

    def forward(self, x):
        return self.second(self.norm(self.first(x))) * tinytf.Tensor(self.scale)


def test_parameters_are_registered_in_assignment_order():
    model = TwoLayer()
    names = [name for name, _ in model.named_parameters()]
    assert names == ["first.weight", "first.bias", "norm.weight", "norm.bias", "second.weight"]
    assert model.num_parameters() == 3 * 4 + 4 + 4 + 4 + 4 * 2
    assert set(model.state_dict()) == set(names) | {"scale"}


def test_tied_parameters_are_listed_once_but_saved_under_each_name():
    model = TwoLayer()
    model.second.weight = nn.Parameter(np.ones((2, 4), dtype=np.float32))
    model.extra = model.second
    assert len(list(model.parameters())) == 5
    assert "extra.weight" in model.state_dict()


def test_state_dict_round_trips_through_safetensors(tmp_path):
    tinytf.manual_seed(0)
    source = TwoLayer()
    save_checkpoint(tmp_path, source.state_dict(), {"kind": "test"})
    tinytf.manual_seed(1)
    target = TwoLayer()
    x = tinytf.randn(5, 3)
    assert not np.allclose(source(x).numpy(), target(x).numpy())
    target.load_state_dict(load_checkpoint(tmp_path).weights)
    np.testing.assert_array_equal(source(x).numpy(), target(x).numpy())


def test_load_state_dict_lists_every_problem():
    model = TwoLayer()
    state = dict(model.state_dict())
    del state["norm.bias"]
    state["surprise"] = np.zeros(1)
    state["first.weight"] = np.zeros((5, 3))
    with pytest.raises(KeyError) as error:
        model.load_state_dict(state)
    message = str(error.value)
    assert "missing keys: norm.bias" in message and "unexpected keys: surprise" in message
    assert "first.weight: checkpoint (5, 3), model (4, 3)" in message


def test_load_state_dict_non_strict_returns_missing_and_unexpected():
    model = TwoLayer()
    state = {"first.weight": np.ones((4, 3)), "other": np.ones(1)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert "first.bias" in missing and unexpected == ["other"]
    assert model.first.weight.dtype == np.float32 and model.first.weight.numpy().sum() == 12


def test_train_eval_and_zero_grad_reach_every_submodule():
    model = TwoLayer()
    model.eval()
    assert not any(module.training for module in model.modules())
    model.train()
    assert all(module.training for module in model.modules())
    model(tinytf.randn(2, 3)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_module_list_registers_its_items():
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert len(layers) == 3 and [name for name, _ in layers.named_parameters()][:2] == ["0.weight", "0.bias"]
    assert isinstance(layers[1], nn.Linear) and len(list(iter(layers))) == 3


def test_module_that_forgets_super_init_gets_a_clear_error():
    class Broken(nn.Module):
        def __init__(self):
            self.layer = nn.Linear(2, 2)

    with pytest.raises(RuntimeError, match="must call super"):
        Broken()


@pytest.mark.parametrize("cast, dtype", [(lambda m: m.to(tinytf.bfloat16), tinytf.bfloat16),
                                         (lambda m: m.to("bfloat16"), tinytf.bfloat16),
                                         (lambda m: m.bfloat16(), tinytf.bfloat16), (lambda m: m.half(), np.float16),
                                         (lambda m: m.to("cpu", tinytf.float16), np.float16),
                                         (lambda m: m.float(), np.float32),
                                         (lambda m: m.double(), np.float64)])
def test_to_dtype_casts_floating_parameters_gradients_and_buffers(cast, dtype):
    model = TwoLayer()
    model.register_buffer("positions", np.arange(3))  # an integer buffer keeps its dtype
    model(tinytf.ones(2, 3)).sum().backward()
    values = model.first.weight.numpy().copy()
    assert cast(model) is model
    assert {parameter.dtype for parameter in model.parameters()} == {np.dtype(dtype)}
    assert {parameter.grad.dtype for parameter in model.parameters()} == {np.dtype(dtype)}
    assert model.scale.dtype == model.scratch.dtype == dtype and model.positions.dtype == np.int64
    np.testing.assert_array_equal(model.first.weight.numpy(), values.astype(dtype))  # rounded, not redrawn
    out = model(tinytf.ones(2, 3, dtype=dtype))
    assert out.dtype == dtype


def test_to_refuses_a_non_floating_dtype():
    with pytest.raises(TypeError, match="dtype must be floating"):
        TwoLayer().to(np.int32)
