import json
import math

import ml_dtypes
import numpy as np
import pytest

import tinytf
from tinytf import backend, optim
from tinytf.checkpoint import load_checkpoint, save_checkpoint
from tinytf.functional import common, expression
from tinytf.optim import SGD, AdamW, GradScaler, clip_grad_norm_, lr_at, weight_decay_groups

# Each parameter pulls towards its own target: grad = p - target, so the gradients depend on the updates so far.
SHAPES = [(3, 4), (4,), (2, 3, 2)]


def _problem(seed=0, dtype=np.float64, device="cpu"):
    rng = np.random.default_rng(seed)
    params = [tinytf.tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True, device=device)
              for shape in SHAPES]
    targets = [backend.to_device(rng.standard_normal(shape).astype(dtype), device) for shape in SHAPES]
    return params, targets


def _set_grads(params, targets):
    for param, target in zip(params, targets):
        with backend.device_scope(param.device):
            param.grad = param.data - target


# --- AdamW ------------------------------------------------------------------------------------------------------------
def _adamw_reference(values, targets, steps, lr, betas, eps, weight_decay):
    """Textbook AdamW in float64: decoupled decay, then Adam with bias-corrected moments."""
    beta1, beta2 = betas
    values = [v.astype(np.float64) for v in values]
    m = [np.zeros_like(v) for v in values]
    v2 = [np.zeros_like(v) for v in values]
    for t in range(1, steps + 1):
        for i, target in enumerate(targets):
            grad = values[i] - target
            values[i] = values[i] - lr * weight_decay * values[i]
            m[i] = beta1 * m[i] + (1 - beta1) * grad
            v2[i] = beta2 * v2[i] + (1 - beta2) * grad**2
            m_hat = m[i] / (1 - beta1**t)
            v_hat = v2[i] / (1 - beta2**t)
            values[i] = values[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return values


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_the_textbook_update_over_several_steps(weight_decay, device):
    params, targets = _problem(device=device)
    initial = [p.numpy().copy() for p in params]  # numpy() shares a CPU tensor's memory, as in PyTorch
    optimizer = AdamW(params, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    for _ in range(5):
        _set_grads(params, targets)
        optimizer.step()
    host_targets = [backend.to_numpy(target) for target in targets]
    expected = _adamw_reference(initial, host_targets, 5, 0.05, (0.8, 0.95), 1e-6, weight_decay)
    for param, value in zip(params, expected):
        assert param.device == backend.canonical_device(device)
        np.testing.assert_allclose(param.numpy(), value, rtol=1e-12, atol=1e-14)
    assert {backend.device_of(optimizer.state[id(param)]["exp_avg"]) for param in params} == {params[0].device}


def test_adamw_in_float32_stays_close_to_the_float64_reference():
    params, targets = _problem(dtype=np.float32)
    initial = [p.data.copy() for p in params]
    optimizer = AdamW(params, lr=0.01)
    for _ in range(5):
        _set_grads(params, targets)
        optimizer.step()
    expected = _adamw_reference(initial, targets, 5, 0.01, (0.9, 0.999), 1e-8, 0.01)
    for param, value in zip(params, expected):
        assert param.data.dtype == np.float32
        np.testing.assert_allclose(param.data, value, rtol=1e-5, atol=1e-6)


def test_updates_are_in_place_and_leave_the_gradients_alone():
    params, targets = _problem()
    arrays = [p.data for p in params]
    _set_grads(params, targets)
    grads = [p.grad.copy() for p in params]
    AdamW(params, weight_decay=0.1).step()
    SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1).step()
    assert all(p.data is array for p, array in zip(params, arrays))
    for param, grad in zip(params, grads):
        np.testing.assert_array_equal(param.grad, grad)


def test_parameters_without_gradients_are_skipped_and_keep_their_own_step_count():
    params, targets = _problem()
    optimizer = AdamW(params, lr=0.1)
    _set_grads(params, targets)
    optimizer.step()
    frozen = params[1].data.copy()
    params[1].grad = None
    optimizer.step()
    np.testing.assert_array_equal(params[1].data, frozen)
    assert [optimizer.state[id(p)]["step"] for p in params] == [2, 1, 2]


def test_parameter_groups_take_their_own_options():
    params, targets = _problem()
    initial = [p.data.copy() for p in params]
    optimizer = AdamW([{"params": params[:1], "lr": 0.2, "weight_decay": 0.5}, {"params": params[1:]}], lr=0.01)
    _set_grads(params, targets)
    optimizer.step()
    first = _adamw_reference(initial[:1], targets[:1], 1, 0.2, (0.9, 0.999), 1e-8, 0.5)
    rest = _adamw_reference(initial[1:], targets[1:], 1, 0.01, (0.9, 0.999), 1e-8, 0.01)
    for param, value in zip(params, first + rest):
        np.testing.assert_allclose(param.data, value, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_steps_all_parameters_in_one_call_bit_identically_to_one_call_each(dtype, monkeypatch):
    # Tiny blocks and two threads: the parameters' blocks cross and are shared out between the threads. Two groups,
    # a strided (transposed) parameter, and one that misses a step (its own bias corrections).
    monkeypatch.setattr(common, "BLOCK_BYTES", 64)
    monkeypatch.setattr(expression, "get_num_threads", lambda: 2)
    rng = np.random.default_rng(5)
    values = [rng.standard_normal(shape).astype(dtype) for shape in [(40, 9), (7,), (13, 11), (300,)]]
    values[2] = np.asfortranarray(values[2])
    params = [tinytf.tensor(value.copy(), requires_grad=True) for value in values]
    params[2].data = values[2].copy(order="F")  # a transposed weight's layout
    optimizer = AdamW([{"params": params[:2], "lr": 0.05, "weight_decay": 0.3}, {"params": params[2:]}], lr=0.01,
                      betas=(0.8, 0.9))
    expected = [value.copy(order="K") for value in values]
    moments = [(np.zeros_like(value), np.zeros_like(value)) for value in values]
    steps = [0] * len(values)
    options = [(0.05, 0.3)] * 2 + [(0.01, 0.01)] * 2
    for step in range(3):
        grads = [rng.standard_normal(value.shape).astype(dtype) for value in values]
        for index, (param, grad) in enumerate(zip(params, grads)):
            param.grad = None if (step, index) == (1, 3) else grad
            if param.grad is None:
                continue
            steps[index] += 1
            lr, weight_decay = options[index]
            optim.ADAMW_UPDATE(grad, out=(*moments[index], expected[index]), lr=lr, weight_decay=weight_decay,
                               beta1=0.8, beta2=0.9, eps=1e-8, bias_correction1=1.0 - 0.8 ** steps[index],
                               bias_correction2=1.0 - 0.9 ** steps[index])
        optimizer.step()
    assert [optimizer.state[id(p)]["step"] for p in params] == [3, 3, 3, 2]
    for param, value, (m, v) in zip(params, expected, moments):
        state = optimizer.state[id(param)]
        np.testing.assert_array_equal(param.data, value)
        np.testing.assert_array_equal(state["exp_avg"], m)
        np.testing.assert_array_equal(state["exp_avg_sq"], v)


# --- SGD --------------------------------------------------------------------------------------------------------------
def _sgd_reference(values, targets, steps, lr, momentum, nesterov, weight_decay):
    """torch.optim.SGD's documented algorithm (dampening 0), in float64."""
    values = [v.astype(np.float64) for v in values]
    buffers = [None] * len(values)
    for _ in range(steps):
        for i, target in enumerate(targets):
            g = (values[i] - target) + weight_decay * values[i]
            if momentum:
                buffers[i] = g if buffers[i] is None else momentum * buffers[i] + g
                g = g + momentum * buffers[i] if nesterov else buffers[i]
            values[i] = values[i] - lr * g
    return values


@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay",
    [(0.0, False, 0.0), (0.0, False, 0.1), (0.9, False, 0.0), (0.9, False, 0.1), (0.9, True, 0.0), (0.8, True, 0.1)],
)
def test_sgd_matches_the_reference_update_over_several_steps(momentum, nesterov, weight_decay):
    params, targets = _problem()
    initial = [p.data.copy() for p in params]
    optimizer = SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for _ in range(4):
        _set_grads(params, targets)
        optimizer.step()
    expected = _sgd_reference(initial, targets, 4, 0.1, momentum, nesterov, weight_decay)
    for param, value in zip(params, expected):
        np.testing.assert_allclose(param.data, value, rtol=1e-12, atol=1e-14)


# --- state ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_optimizer", [
    lambda params: AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=0.05),
    lambda params: SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
])
def test_state_dict_through_a_checkpoint_continues_identically(tmp_path, make_optimizer, device):
    """Saved from the device, loaded onto it: the state lands where the parameters are, and the steps agree."""
    params, targets = _problem(device=device)
    optimizer = make_optimizer(params)
    for _ in range(3):
        _set_grads(params, targets)
        optimizer.step()
    save_checkpoint(tmp_path, {str(i): p.data for i, p in enumerate(params)}, {}, optimizer.state_dict())

    loaded = load_checkpoint(tmp_path)
    resumed_params = [tinytf.tensor(loaded.weights[str(i)], requires_grad=True, device=device)
                      for i in range(len(params))]
    resumed = make_optimizer(resumed_params)
    for group in resumed.param_groups:
        group["lr"] = 123.0  # the saved options must win, as in PyTorch
    resumed.load_state_dict(loaded.optimizer_state)
    for _ in range(3):
        _set_grads(params, targets)
        _set_grads(resumed_params, targets)
        optimizer.step()
        resumed.step()
    for state in resumed.state.values():
        assert all(backend.device_of(value) == backend.canonical_device(device)
                   for value in state.values() if hasattr(value, "shape"))
    for param, resumed_param in zip(params, resumed_params):
        np.testing.assert_array_equal(param.numpy(), resumed_param.numpy())


def test_state_dict_is_a_snapshot():
    params, targets = _problem()
    optimizer = AdamW(params)
    _set_grads(params, targets)
    optimizer.step()
    snapshot = optimizer.state_dict()
    saved_avg = snapshot["state"][0]["exp_avg"].copy()
    optimizer.step()
    np.testing.assert_array_equal(snapshot["state"][0]["exp_avg"], saved_avg)
    assert snapshot["param_groups"][0]["params"] == [0, 1, 2]


def test_load_state_dict_rejects_mismatched_states_and_changes_nothing():
    params, targets = _problem()
    optimizer = AdamW(params)
    _set_grads(params, targets)
    optimizer.step()
    state = optimizer.state_dict()
    other = AdamW(_problem()[0])

    wrong_shape = optimizer.state_dict()
    wrong_shape["state"][2]["exp_avg"] = np.zeros((5,))
    with pytest.raises(ValueError, match=r"saved 'exp_avg' of parameter 2 has shape \(5,\)"):
        other.load_state_dict(wrong_shape)
    assert other.state == {}
    with pytest.raises(ValueError, match="1 parameter groups, this optimizer has 2"):
        AdamW([{"params": params[:1]}, {"params": params[1:]}]).load_state_dict(state)
    with pytest.raises(ValueError, match="expected \\['momentum_buffer'\\] for SGD"):
        SGD(params, lr=0.1, momentum=0.9).load_state_dict(state)
    bad_betas = optimizer.state_dict()
    bad_betas["param_groups"][0]["betas"] = [0.9, 1.5]
    with pytest.raises(ValueError, match="betas must be two numbers in"):
        other.load_state_dict(bad_betas)


def test_zero_grad_clears_gradients():
    params, targets = _problem()
    optimizer = SGD(params, lr=0.1)
    _set_grads(params, targets)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: AdamW(ps, lr=-1.0), "lr must be a non-negative number, got -1.0"),
        (lambda ps: AdamW(ps, betas=(0.9, 1.0)), "betas must be two numbers in"),
        (lambda ps: AdamW(ps, eps=float("nan")), "eps must be a non-negative number"),
        (lambda ps: SGD(ps, lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
        (lambda ps: SGD([{"params": ps, "weight_deacy": 0.1}], lr=0.1), r"unknown option\(s\) \['weight_deacy'\]"),
        (lambda ps: SGD(ps + ps[:1], lr=0.1), "parameter 3 of group 0 .* appears more than once"),
        (lambda ps: SGD([], lr=0.1), "empty parameter list"),
        (lambda ps: SGD(ps[0], lr=0.1), "got a single Tensor"),
        (lambda ps: SGD([ps[0].data], lr=0.1), "parameter 0 of group 0 is a ndarray, expected a Tensor"),
    ],
)
def test_bad_optimizer_arguments_are_named(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(_problem()[0])


def test_weight_decay_groups_decay_only_matrices():
    matrix, vector, tensor3 = _problem()[0]
    frozen = tinytf.tensor(np.ones((2, 2)))
    groups = weight_decay_groups([matrix, vector, tensor3, frozen], weight_decay=0.1)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(matrix), id(tensor3)], [id(vector)]]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert len(weight_decay_groups([matrix], 0.1)) == 1
    AdamW(groups, lr=1e-3)


# --- clipping ---------------------------------------------------------------------------------------------------------
def test_clip_grad_norm_scales_to_max_norm_and_returns_the_norm_before(device):
    params, _ = _problem(dtype=np.float32, device=device)
    rng = np.random.default_rng(1)
    for param in params:
        param.grad = backend.to_device(rng.standard_normal(param.shape).astype(np.float32), device)
    params[1].grad = None
    grads = [backend.to_numpy(p.grad).copy() for p in params if p.grad is not None]
    expected_norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))

    total = clip_grad_norm_(params, max_norm=1.0)
    assert isinstance(total, float)
    assert total == pytest.approx(expected_norm, rel=1e-6)
    scale = 1.0 / (expected_norm + 1e-6)
    clipped = [backend.to_numpy(p.grad) for p in params if p.grad is not None]
    for grad, original in zip(clipped, grads):
        np.testing.assert_allclose(grad, original * scale, rtol=1e-6)
    assert math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in clipped)) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_leaves_small_gradients_unchanged():
    param = tinytf.tensor(np.zeros(4, dtype=np.float16), requires_grad=True)
    param.grad = np.array([0.3, -0.4, 0.0, 0.0], dtype=np.float16)
    assert clip_grad_norm_([param], max_norm=1.0) == pytest.approx(0.5, rel=1e-3)
    np.testing.assert_array_equal(param.grad, np.array([0.3, -0.4, 0, 0], dtype=np.float16))
    assert clip_grad_norm_([tinytf.tensor([1.0], requires_grad=True)], 1.0) == 0.0


def test_clip_grad_norm_returns_a_non_finite_norm_for_the_caller_to_see():
    param = tinytf.tensor(np.zeros(2, dtype=np.float32), requires_grad=True)
    param.grad = np.array([np.inf, 1.0], dtype=np.float32)
    assert math.isinf(clip_grad_norm_(param, 1.0))
    with pytest.raises(ValueError, match="max_norm must be a non-negative number"):
        clip_grad_norm_(param, -1.0)


# --- mixed precision: float32 master weights ----------------------------------------------------------------------
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
LOW_PRECISION = [BFLOAT16, np.dtype(np.float16)]
MAKE_OPTIMIZERS = {
    "adamw": lambda params: AdamW(params, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1),
    "sgd": lambda params: SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
}


def _low_precision_problem(dtype, device="cpu"):
    """The float64 problem rounded to `dtype`, and a float32 twin holding the same values."""
    params, targets = _problem(device=device)
    low = [tinytf.tensor(backend.to_numpy(p.data).astype(dtype), requires_grad=True, device=device) for p in params]
    twin = [tinytf.tensor(backend.to_numpy(p.data).astype(np.float32), requires_grad=True, device=device) for p in low]
    return low, twin, [backend.to_numpy(t).astype(np.float32) for t in targets]


def _set_low_precision_grads(low, twin, targets, device="cpu"):
    """Gradients in the parameters' dtype, from the rounded weights, as a 16-bit backward would deliver them; the
    twin gets the same values in float32."""
    for param, twin_param, target in zip(low, twin, targets):
        grad = (backend.to_numpy(param.data).astype(np.float32) - target).astype(param.dtype)
        param.grad = backend.to_device(grad, device)
        twin_param.grad = backend.to_device(grad.astype(np.float32), device)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("kind", sorted(MAKE_OPTIMIZERS))
def test_low_precision_parameters_step_a_float32_master_and_take_its_rounding(kind, dtype, device):
    """The master copy follows exactly the float32 optimizer fed the same gradients (the float32 path is checked
    against the float64 textbook above); the parameter is the master rounded to nearest even, bit for bit."""
    low, twin, targets = _low_precision_problem(dtype, device)
    arrays = [p.data for p in low]
    optimizer, twin_optimizer = MAKE_OPTIMIZERS[kind](low), MAKE_OPTIMIZERS[kind](twin)
    for _ in range(4):
        _set_low_precision_grads(low, twin, targets, device)
        optimizer.step()
        twin_optimizer.step()
        for param, twin_param in zip(low, twin):
            state = optimizer.state[id(param)]
            master = backend.to_numpy(state["master"])
            assert {value.dtype for value in state.values() if hasattr(value, "dtype")} == {np.dtype(np.float32)}
            np.testing.assert_array_equal(master, twin_param.numpy())
            assert param.dtype == dtype
            np.testing.assert_array_equal(param.numpy().view(np.uint16), master.astype(dtype).view(np.uint16))
    assert all(p.data is array for p, array in zip(low, arrays))  # in place


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_updates_below_half_an_ulp_accumulate_in_the_master_copy(dtype):
    """At 1.0 a bfloat16 ulp is 2^-7 (float16: 2^-10); steps of 2^-12 round away on the 16-bit weight itself."""
    param = tinytf.tensor(np.ones(3, dtype=dtype), requires_grad=True)
    optimizer = SGD([param], lr=2.0**-12)
    for _ in range(64):
        param.grad = np.ones(3, dtype=dtype)
        optimizer.step()
    expected_master = np.float32(1.0) - np.float32(64 * 2.0**-12)  # every partial sum is exact in float32
    np.testing.assert_array_equal(optimizer.state[id(param)]["master"], np.full(3, expected_master))
    np.testing.assert_array_equal(param.data, np.full(3, expected_master).astype(dtype))
    assert param.data[0] < 1.0


def test_low_precision_state_through_a_checkpoint_continues_bit_identically(tmp_path, device):
    low, twin, targets = _low_precision_problem(BFLOAT16, device)
    optimizer = MAKE_OPTIMIZERS["adamw"](low)
    for _ in range(3):
        _set_low_precision_grads(low, twin, targets, device)
        optimizer.step()
    save_checkpoint(tmp_path, {str(i): p.data for i, p in enumerate(low)}, {}, optimizer.state_dict())
    loaded = load_checkpoint(tmp_path)
    assert set(loaded.optimizer_state["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "master"}
    resumed = [tinytf.tensor(loaded.weights[str(i)], requires_grad=True, device=device) for i in range(len(low))]
    assert resumed[0].dtype == BFLOAT16
    resumed_optimizer = MAKE_OPTIMIZERS["adamw"](resumed)
    resumed_optimizer.load_state_dict(loaded.optimizer_state)
    for _ in range(3):
        _set_low_precision_grads(low, twin, targets, device)
        _set_low_precision_grads(resumed, twin, targets, device)
        optimizer.step()
        resumed_optimizer.step()
    for param, resumed_param in zip(low, resumed):
        np.testing.assert_array_equal(param.numpy().view(np.uint16), resumed_param.numpy().view(np.uint16))
        for key in ("master", "exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(backend.to_numpy(optimizer.state[id(param)][key]),
                                          backend.to_numpy(resumed_optimizer.state[id(resumed_param)][key]))


def test_a_low_precision_state_without_its_master_copy_is_refused():
    low, twin, targets = _low_precision_problem(BFLOAT16)
    optimizer = AdamW(twin)
    _set_low_precision_grads(low, twin, targets)
    optimizer.step()
    with pytest.raises(ValueError, match=r"parameter 0 has entries \['exp_avg', 'exp_avg_sq', 'step'\], expected "
                                         r"\['exp_avg', 'exp_avg_sq', 'master', 'step'\] for AdamW and a bfloat16"):
        AdamW(low).load_state_dict(optimizer.state_dict())


def test_float32_parameters_keep_no_master_copy():
    params, targets = _problem(dtype=np.float32)
    optimizer = AdamW(params)
    _set_grads(params, targets)
    optimizer.step()
    assert all(set(optimizer.state[id(p)]) == {"step", "exp_avg", "exp_avg_sq"} for p in params)


def test_clip_grad_norm_accumulates_low_precision_gradients_in_float32():
    """4096 ones: the norm is 64. Summed in bfloat16 the squares would stall at 256 (256 + 1 rounds back to 256),
    giving 16."""
    param = tinytf.tensor(np.zeros(4096, dtype=BFLOAT16), requires_grad=True)
    param.grad = np.ones(4096, dtype=BFLOAT16)
    assert clip_grad_norm_([param], max_norm=1.0) == 64.0
    assert param.grad.dtype == BFLOAT16
    # The scaled gradient is rounded once to bfloat16, as the reference here.
    np.testing.assert_array_equal(param.grad, np.full(4096, np.float32(1.0 / (64.0 + 1e-6))).astype(BFLOAT16))


# --- dynamic loss scaling ---------------------------------------------------------------------------------------------
def _fp16_problem():
    """A float16 model's two parameters after one good step of AdamW (so its state exists)."""
    params = [tinytf.tensor(np.array([0.5, -1.0, 2.0], dtype=np.float16), requires_grad=True),
              tinytf.tensor(np.array([[1.5, 0.25]], dtype=np.float16), requires_grad=True)]
    optimizer = AdamW(params, lr=0.01)
    for param in params:
        param.grad = np.full(param.shape, 0.125, dtype=np.float16)
    optimizer.step()
    return params, optimizer


def test_an_overflowing_gradient_skips_the_step_keeps_everything_and_halves_the_scale():
    params, optimizer = _fp16_problem()
    weights = [p.data.copy() for p in params]
    state = {key: backend.to_numpy(value).copy() if hasattr(value, "shape") else value
             for key, value in optimizer.state[id(params[0])].items()}
    scaler = GradScaler(init_scale=2.0**16, growth_interval=3)
    params[0].grad = np.array([np.inf, 1.0, 2.0], dtype=np.float16)  # what a scaled backward gives on overflow
    params[1].grad = np.array([[1.0, 2.0]], dtype=np.float16)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    for param, weight in zip(params, weights):
        np.testing.assert_array_equal(param.data, weight)
    after = optimizer.state[id(params[0])]
    assert after["step"] == state["step"] == 1
    for key in ("master", "exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(after[key], state[key])

    params[0].grad = np.array([np.nan, 1.0, 2.0], dtype=np.float16)  # NaN too
    params[1].grad = np.array([[1.0, 2.0]], dtype=np.float16)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**14 and optimizer.state[id(params[0])]["step"] == 1


def test_the_scale_grows_after_growth_interval_good_steps_in_a_row():
    params, optimizer = _fp16_problem()
    scaler = GradScaler(init_scale=4.0, growth_factor=2.0, backoff_factor=0.25, growth_interval=3)

    def step(value):
        for param in params:
            param.grad = np.full(param.shape, value, dtype=np.float16)
        scaler.step(optimizer)
        scaler.update()
        return scaler.get_scale()

    assert [step(1.0), step(1.0), step(1.0)] == [4.0, 4.0, 8.0]
    assert [step(1.0), step(1.0), step(np.inf), step(1.0), step(1.0), step(1.0)] == [8.0, 8.0, 2.0, 2.0, 2.0, 4.0]
    assert optimizer.state[id(params[0])]["step"] == 1 + 8  # every step but the overflowing one was taken
    assert scaler.state_dict() == {"scale": 4.0, "growth_factor": 2.0, "backoff_factor": 0.25, "growth_interval": 3,
                                   "_growth_tracker": 0}


def test_unscale_then_clip_clips_the_true_gradients_and_step_does_not_unscale_again():
    """The loss scaled by 2^10 through a real backward: the unscaled, clipped gradients and the step equal those of
    the unscaled loss, computed in float32 (the scale is a power of two, so scaling and unscaling are exact)."""
    values = np.array([3.0, -4.0, 12.0], dtype=np.float32)
    weights = np.array([1.0, 2.0, 0.5], dtype=np.float32)

    def loss_of(param):
        return (param * tinytf.tensor(weights)).sum()  # gradient: weights, norm 2.29

    param = tinytf.tensor(values, requires_grad=True)
    scaler = GradScaler(init_scale=2.0**10)
    optimizer = SGD([param], lr=0.5)
    scaler.scale(loss_of(param)).backward()
    np.testing.assert_array_equal(param.grad, weights * 2.0**10)
    scaler.unscale_(optimizer)
    np.testing.assert_array_equal(param.grad, weights)
    norm = clip_grad_norm_([param], max_norm=1.0)
    assert norm == pytest.approx(float(np.linalg.norm(weights.astype(np.float64))), rel=1e-6)
    clipped = param.grad.copy()
    scaler.step(optimizer)
    scaler.update()
    np.testing.assert_array_equal(param.data, values - np.float32(0.5) * clipped)
    assert scaler.get_scale() == 2.0**10
    with pytest.raises(RuntimeError, match="found no inf/NaN check since the last update"):
        scaler.update()


def test_unscaling_keeps_the_small_float16_gradients_in_float32():
    """2^-30 is below float16's smallest subnormal (2^-24); scaled by 2^16 it is 2^-14, and unscaled in float32
    it is 2^-30 again, where dividing back into float16 would give 0."""
    param = tinytf.tensor(np.zeros(2, dtype=np.float16), requires_grad=True)
    param.grad = np.array([2.0**-14, 1.0], dtype=np.float16)
    scaler, optimizer = GradScaler(), SGD([param], lr=1.0)
    scaler.unscale_(optimizer)
    assert param.grad.dtype == np.float32
    np.testing.assert_array_equal(param.grad, np.array([2.0**-30, 2.0**-16], dtype=np.float32))
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    with pytest.raises(RuntimeError, match=r"step\(\) has already been called"):
        scaler.step(optimizer)
    with pytest.raises(RuntimeError, match=r"unscale_\(\) has already been called"):
        scaler.unscale_(optimizer)
    np.testing.assert_array_equal(optimizer.state[id(param)]["master"], np.array([-(2.0**-30), -(2.0**-16)],
                                                                                 dtype=np.float32))


def test_a_disabled_scaler_passes_everything_through():
    param = tinytf.tensor(np.array([1.0, 2.0], dtype=np.float32), requires_grad=True)
    scaler, optimizer = GradScaler(enabled=False), SGD([param], lr=1.0)
    loss = (param * param).sum()
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0 and not scaler.is_enabled()
    param.grad = np.array([np.inf, 1.0], dtype=np.float32)
    scaler.unscale_(optimizer)
    scaler.step(optimizer)  # steps even on inf: without scaling, overflow handling is the caller's
    scaler.update()
    assert np.isinf(param.data[0]) and param.data[1] == 1.0
    assert scaler.state_dict() == {}


def test_scaler_state_dict_round_trips_and_bad_values_are_named():
    scaler = GradScaler(init_scale=8.0, growth_interval=5)
    scaler._growth_tracker = 2
    other = GradScaler()
    other.load_state_dict(json.loads(json.dumps(scaler.state_dict())))  # as a checkpoint's JSON gives it back
    assert other.state_dict() == scaler.state_dict()
    damaged = {**scaler.state_dict(), "_growth_tracker": 5}
    with pytest.raises(ValueError, match=r"_growth_tracker must be a whole number in \[0, growth_interval\)"):
        other.load_state_dict(damaged)
    with pytest.raises(ValueError, match="saved from a disabled GradScaler"):
        other.load_state_dict({})
    assert other.state_dict() == scaler.state_dict()
    for kwargs, message in [({"init_scale": 0.0}, "init_scale must be a positive finite number"),
                            ({"growth_factor": 1.0}, "growth_factor must be a finite number above 1"),
                            ({"backoff_factor": 1.0}, r"backoff_factor must be in \(0, 1\)"),
                            ({"growth_interval": 0}, "growth_interval must be a whole number >= 1")]:
        with pytest.raises(ValueError, match=message):
            GradScaler(**kwargs)


# --- schedule ---------------------------------------------------------------------------------------------------------
def test_lr_schedule_at_its_key_points():
    def schedule(it):
        return lr_at(it, lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=1100)

    assert schedule(0) == pytest.approx(1e-3 / 101)
    assert schedule(99) == pytest.approx(1e-3 * 100 / 101)
    assert schedule(100) == pytest.approx(1e-3)
    assert schedule(600) == pytest.approx((1e-3 + 1e-4) / 2)
    assert schedule(1100) == schedule(5000) == 1e-4
    decay = [schedule(it) for it in range(100, 1101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_lr_schedule_without_warmup_or_decay():
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_iters=0, decay_iters=10) == 1.0
    assert lr_at(5, lr=1.0, min_lr=0.1, warmup_iters=5, decay_iters=5) == 0.1


def test_lr_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        lr_at(-1, lr=1.0, min_lr=0.1, warmup_iters=0, decay_iters=10)
    with pytest.raises(ValueError, match="need 0 <= warmup_iters <= decay_iters"):
        lr_at(0, lr=1.0, min_lr=0.1, warmup_iters=20, decay_iters=10)


# --- optional parity with PyTorch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_matches_pytorch_when_it_is_installed(kind):
    torch = pytest.importorskip("torch", reason="torch is not installed (optional: pip install 'tinytf[bench]')")
    params, targets = _problem(dtype=np.float32)
    torch_params = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    if kind == "adamw":
        ours = AdamW(params, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
        theirs = torch.optim.AdamW(torch_params, lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    else:
        ours = SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
        theirs = torch.optim.SGD(torch_params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)
    for _ in range(5):
        _set_grads(params, targets)
        for torch_param, target in zip(torch_params, targets):
            torch_param.grad = torch_param.detach() - torch.from_numpy(target)
        ours.step()
        theirs.step()
    for param, torch_param in zip(params, torch_params):
        np.testing.assert_allclose(param.data, torch_param.detach().numpy(), rtol=1e-6, atol=1e-7)
