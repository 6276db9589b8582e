"""Issue 6 asks that a training step never creates a float64 array: NumPy upcasts silently (a Python float in the
wrong place, np.mean on float16, an int / int), and float64 doubles memory traffic.

The parameters' arrays are made into a NumPy subclass whose __array_finalize__ runs for every array derived from
them (ufunc results and their temporaries, views, copies, empty_like, matmul); it records a float64 one with the
line that made it. Every array of a step derives from the parameters except fresh allocations with an explicit dtype
(xp.zeros(shape, dtype=...)), so this sees inside the fused ops too, not only their outputs.
"""

import traceback

import numpy as np
import pytest

import tinytf
import tinytf.attention
from tinytf.models.gpt import GPT, GPTConfig
from tinytf.optim import AdamW, clip_grad_norm_, weight_decay_groups


class Float64Alarm(np.ndarray):
    made: list[str] = []

    def __array_finalize__(self, source):
        if self.dtype == np.float64:
            Float64Alarm.made.append("".join(traceback.format_stack(limit=3)[:-1]))


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["naive", "flash"])
def test_a_training_step_makes_no_float64_array(monkeypatch, preset, attention):
    monkeypatch.setattr(tinytf.attention, "AUTO_FLASH_MIN_SCORES", 0 if attention == "flash" else 1 << 40)
    tinytf.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=65, n_layer=2, n_head=4, n_embd=32, block_size=16,
                                      dropout=0.1))
    for parameter in model.parameters():
        parameter.data = parameter.data.view(Float64Alarm)
    optimizer = AdamW(weight_decay_groups(model.parameters(), 0.1), lr=1e-3)
    ids = np.random.default_rng(0).integers(0, 65, (3, 17))
    Float64Alarm.made = []
    for _ in range(2):  # the second step runs the optimizer on existing state
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert type(loss.data) is Float64Alarm, "the loss no longer derives from the parameters: the check sees nothing"
    assert not Float64Alarm.made, "float64 arrays made at:\n" + "\n".join(sorted(set(Float64Alarm.made)))


def test_the_alarm_rings_for_an_upcast():
    Float64Alarm.made = []
    weights = np.ones(3, dtype=np.float32).view(Float64Alarm)
    weights * np.float64(2.0)  # a NumPy float64 scalar is not weak: the result is float64
    assert Float64Alarm.made


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["naive", "flash"])
def test_a_half_precision_forward_and_backward_make_no_float64_array(monkeypatch, preset, attention, dtype):
    """model.to(bfloat16) computes in float32 where it accumulates (and its loss is float32): never in float64."""
    monkeypatch.setattr(tinytf.attention, "AUTO_FLASH_MIN_SCORES", 0 if attention == "flash" else 1 << 40)
    tinytf.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=65, n_layer=2, n_head=4, n_embd=32, block_size=16,
                                      dropout=0.1)).to(dtype)
    for parameter in model.parameters():
        parameter.data = parameter.data.view(Float64Alarm)
    ids = np.random.default_rng(0).integers(0, 65, (3, 17))
    Float64Alarm.made = []
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    assert type(loss.data) is Float64Alarm, "the loss no longer derives from the parameters: the check sees nothing"
    assert loss.dtype == np.float32
    assert not Float64Alarm.made, "float64 arrays made at:\n" + "\n".join(sorted(set(Float64Alarm.made)))
