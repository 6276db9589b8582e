"""The suite's settings: the GPU rehearsal's switch, the device axis, and the hypothesis profiles.

GPU rehearsal: without a real GPU, the suite runs with TINYTF_CUDA_STANDIN=1 (tinytf.testing.cupy_standin in
CuPy's place), so every test on the device axis runs on "cuda" too, and the GPU-only tests run on the stand-in. With a
GPU they run on real CuPy. TINYTF_CUDA_STANDIN=0 turns the rehearsal off (CPU only). At the end, every CuPy name
tinytf touched on the stand-in is looked up in the real cupy module (tests/rehearsal_names.py).

Hypothesis: "ci" (the default) bounds example counts so the suite fits CI's time; "thorough" digs deeper. Select
with HYPOTHESIS_PROFILE=thorough. No deadlines: a shared 2-core machine makes timings noisy.
"""

import os


def _real_gpu_present() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


# Before tinytf is imported anywhere: the backend reads the switch when it first loads CuPy.
if "TINYTF_CUDA_STANDIN" not in os.environ and not _real_gpu_present():
    os.environ["TINYTF_CUDA_STANDIN"] = "1"

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from devices import DEVICES_AND_SECOND_GPU  # noqa: E402
from rehearsal_names import check_cupy_names  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=DEVICES_AND_SECOND_GPU)
def device(request) -> str:
    """Each test that takes `device` runs on the CPU and, with a GPU or the stand-in, on cuda:0, and on cuda:1 where
    there is a second GPU (the stand-in has two): a device that is not CuPy's current one."""
    return request.param


NEEDS_INTEROP = "comparing with transformers needs the interop extra: pip install -e '.[interop]'"


@pytest.fixture(scope="module")
def hf():
    """torch and transformers, imported once for the module (torch alone takes seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # a test must never reach the Hub
        torch = pytest.importorskip("torch", reason=NEEDS_INTEROP)
        transformers = pytest.importorskip("transformers", reason=NEEDS_INTEROP)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        yield torch, transformers


_cupy_names_report: list[str] = []


def pytest_sessionfinish(session, exitstatus):
    lines, failed = check_cupy_names()
    _cupy_names_report.extend(lines)
    if failed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _cupy_names_report:
        terminalreporter.write_sep("-", "GPU rehearsal: CuPy names")
        for line in _cupy_names_report:
            terminalreporter.write_line(line)
