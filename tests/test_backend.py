import numpy as np
import pytest

import tinytf
from tinytf import backend


def test_numpy_is_the_module_for_host_arrays():
    assert backend.get_array_module(np.ones(2), np.zeros(1)) is np


def test_device_names_are_validated():
    assert backend.canonical_device("cuda") == "cuda:0"
    assert backend.canonical_device("cuda:1") == "cuda:1"
    for bad in ("gpu", "cpu:0", "cuda:x"):
        with pytest.raises(ValueError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
            backend.canonical_device(bad)


def test_cpu_is_always_available():
    assert tinytf.is_available("cpu")


@pytest.mark.skipif(tinytf.is_available("cuda"), reason="checks the error on machines without a usable GPU")
def test_asking_for_cuda_without_a_gpu_says_what_is_missing():
    with pytest.raises(RuntimeError, match=r"tinytf\[gpu\]|no CUDA GPU"):
        tinytf.ones(2, device="cuda")
    with pytest.raises(RuntimeError, match=r"tinytf\[gpu\]|no CUDA GPU"):
        tinytf.ones(2).to("cuda")


def test_import_without_cupy_is_fast_and_does_not_import_cupy():
    import subprocess
    import sys

    code = "import sys, time; t = time.perf_counter(); import tinytf; print(time.perf_counter() - t, 'cupy' in sys.modules)"
    seconds, cupy_loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.split()
    assert float(seconds) < 1.0 and cupy_loaded == "False"


def test_rng_state_round_trips():
    tinytf.manual_seed(3)
    state = backend.get_rng_state()
    first = tinytf.randn(4).numpy()
    backend.set_rng_state(state)
    np.testing.assert_array_equal(tinytf.randn(4).numpy(), first)
