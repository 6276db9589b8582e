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


def test_asking_for_cuda_without_a_gpu_says_what_is_missing():
    """Run with the CuPy stand-in off: then CuPy (absent, or present without a GPU) must explain itself."""
    import os
    import subprocess
    import sys

    code = ("import tinytf\n"
            "if tinytf.is_available('cuda'): print('has a GPU')\n"
            "else:\n"
            "    for make in (lambda: tinytf.ones(2, device='cuda'), lambda: tinytf.ones(2).to('cuda')):\n"
            "        try: make()\n"
            "        except RuntimeError as error: print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "TINYTF_CUDA_STANDIN": "0"})
    if result.stdout.strip() == "has a GPU":
        pytest.skip("this machine has a CUDA GPU: the error for machines without one cannot happen here")
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all("tinytf[gpu]" in line or "no CUDA GPU" in line for line in lines), lines


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


def test_device_name_is_cudas_name_of_the_gpu_and_empty_for_the_cpu():
    assert backend.device_name("cpu") == ""
    if backend.is_available("cuda"):
        expected = backend.cupy_module().cuda.runtime.getDeviceProperties(0)["name"]
        expected = expected.decode() if isinstance(expected, bytes) else expected
        assert backend.device_name("cuda") == backend.device_name("cuda:0") == expected != ""
