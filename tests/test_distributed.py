"""Data parallelism: collectives and gradient averaging on real 2-rank MPI jobs, and the training CLI under MPI.

The MPI tests launch `mpiexec -n 2 python -m mpi4py ...` in a subprocess (mpiexec from the mpich wheel, beside
sys.executable); they skip when the mpi extra is not installed. The NCCL tests skip without CuPy or without 2 GPUs.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from test_train import TINY  # the tiny model of the single-process CLI tests (its --batch-size is overridden below)

import tinytf.train as train_module
from tinytf import backend, distributed
from tinytf.checkpoint import load_checkpoint
from tinytf.models import GPT

MPIEXEC = Path(sys.executable).with_name("mpiexec")
LAUNCHER_VARIABLES = ("PMI_", "OMPI_", "PMIX_", "MPI_LOCAL")


def _mpi_missing_reason() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'tinytf[mpi]')"
    if not MPIEXEC.exists():
        return f"no mpiexec beside {sys.executable} (pip install 'tinytf[mpi]' installs MPICH's)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing_reason() is not None, reason=str(_mpi_missing_reason()))


def _clean_environment(**extra) -> dict:
    """This environment without a surrounding MPI launch's variables, with one BLAS thread per process."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(LAUNCHER_VARIABLES)}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_ranks(*arguments, ranks: int = 2, timeout: float = 60) -> subprocess.CompletedProcess:
    """`mpiexec -n ranks python -m mpi4py *arguments`; on timeout the whole process group is killed, ranks included."""
    command = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "mpi4py", *map(str, arguments)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=_clean_environment(), start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"the {ranks}-rank job did not end within {timeout} s; stderr:\n{stderr}")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=_clean_environment(**env))


# --- one process, no launcher -----------------------------------------------------------------------------------------
NO_MPI4PY = "import sys; sys.modules['mpi4py'] = None  # any import of mpi4py now fails\n"


def test_without_a_launcher_the_world_is_one_process_and_mpi4py_is_never_imported():
    job = run_python(NO_MPI4PY + textwrap.dedent("""
        import numpy as np
        from tinytf import distributed
        from tinytf.nn import Linear
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        assert distributed.local_rank() == 0 and not distributed.launched_by_mpi()
        values = np.arange(6.0).reshape(2, 3)
        assert distributed.all_reduce(values.copy(), op="mean").tolist() == values.tolist()
        assert distributed.broadcast(values.copy()).tolist() == values.tolist()
        distributed.barrier()
        assert distributed.gather_object("state") == ["state"] and len(distributed.shard(values)) == 2
        layer = Linear(3, 2)
        distributed.broadcast_parameters(layer.parameters())
        distributed.GradientAverager(layer.parameters()).average()  # no gradients: nothing to do in a world of one
        print("ok")
    """))
    assert job.returncode == 0 and job.stdout.strip() == "ok", job.stderr


def test_an_mpi_launch_without_mpi4py_is_a_clear_error_naming_the_extra(tmp_path):
    train = f"import tinytf.train as t; sys.exit(t.main(['--iters', '1', '--out', {str(tmp_path)!r}]))"
    job = run_python(NO_MPI4PY + train, PMI_RANK="0", PMI_SIZE="2")
    assert job.returncode == 2, job.stderr
    assert job.stderr.startswith("tinytf.train: error:") and "pip install 'tinytf[mpi]'" in job.stderr
    assert "Traceback" not in job.stderr


@pytest.mark.parametrize("call, error", [
    (lambda: distributed.all_reduce(np.zeros(3), op="max"), ValueError),
    (lambda: distributed.all_reduce(np.zeros(3, dtype=np.int64), op="mean"), TypeError),
    (lambda: distributed.all_reduce(np.zeros((3, 4))[:, ::2]), ValueError),
    (lambda: distributed.broadcast(np.zeros((3, 4)).T), ValueError),
    (lambda: distributed.all_reduce(np.float32(1)), TypeError),
])
def test_collectives_reject_what_they_cannot_do_in_place(call, error):
    with pytest.raises(error):
        call()


# --- two ranks --------------------------------------------------------------------------------------------------------
COLLECTIVES = textwrap.dedent("""
    import numpy as np
    from tinytf import distributed
    from tinytf.nn import Parameter

    rank, world = distributed.rank(), distributed.world_size()
    assert world == 2 and distributed.local_rank() == rank

    def values(shape, dtype, of_rank):
        return np.array(np.arange(int(np.prod(shape))).reshape(shape) + 10 * of_rank + 1, dtype)  # (): 0-d array

    for dtype in ("float16", "float32", "float64", "int32", "int64", "uint8"):
        for shape in ((), (1,), (7,), (3, 5), (2, 3, 4)):
            total = sum(values(shape, "float64", r) for r in range(world))
            summed = distributed.all_reduce(values(shape, dtype, rank))
            assert summed.dtype == dtype and summed.shape == shape
            np.testing.assert_array_equal(summed, total.astype(dtype))
            if np.dtype(dtype).kind == "f":
                np.testing.assert_array_equal(distributed.all_reduce(values(shape, dtype, rank), op="mean"),
                                              (total / world).astype(dtype))
            for root in range(world):
                np.testing.assert_array_equal(distributed.broadcast(values(shape, dtype, rank), root),
                                              values(shape, dtype, root))

    assert distributed.gather_object({"rank": rank}) == ([{"rank": 0}, {"rank": 1}] if rank == 0 else None)
    np.testing.assert_array_equal(distributed.shard(np.arange(8)), np.arange(4) + 4 * rank)

    # Parameters of two dtypes: broadcast from rank 0, then gradients averaged with one Allreduce per dtype.
    params = [Parameter(np.full(shape, rank + 1.0, dtype)) for shape, dtype in
              (((4, 3), np.float32), ((3,), np.float32), ((2, 2), np.float64), ((5,), np.float32))]
    distributed.broadcast_parameters(params)
    assert all((p.data == 1).all() for p in params)
    for p in params:
        p.grad = np.arange(p.data.size, dtype=p.dtype).reshape(p.shape) * (rank + 1)
    calls = []
    reduce = distributed.all_reduce
    distributed.all_reduce = lambda array, op="sum": calls.append(array.size) or reduce(array, op)
    distributed.GradientAverager(params).average()
    assert sorted(calls) == [4, 12 + 3 + 5], calls
    for p in params:
        np.testing.assert_array_equal(p.grad, np.arange(p.data.size).reshape(p.shape) * 1.5)
    distributed.barrier()  # both ranks got here: their checks passed
    if rank == 0:
        print("ok")
""")




@needs_mpi
def test_an_exception_on_one_rank_ends_the_whole_job_within_seconds():
    waits_for_rank_1 = ("import numpy as np\nfrom tinytf import distributed\n"
                        "if distributed.rank() == 1:\n    raise RuntimeError('rank 1 fails')\n"
                        "distributed.all_reduce(np.zeros(3))  # rank 0 waits here for a rank that is gone\n")
    started = time.perf_counter()
    job = run_ranks("-c", waits_for_rank_1, timeout=30)
    elapsed = time.perf_counter() - started
    assert job.returncode != 0 and "rank 1 fails" in job.stderr
    assert elapsed < 10, f"the job took {elapsed:.1f} s to end"


# --- the training CLI on two ranks ------------------------------------------------------------------------------------
STEPS, MORE_STEPS = 6, 10
PER_RANK_BATCH = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"{n} green bottles hanging on the wall, and if one should fall...\n"
                            for n in range(400, 0, -1)), encoding="utf-8")
    return path


def _train_arguments(out, iters, batch_size, *extra) -> list[str]:
    return [*TINY, "--out", str(out), "--iters", str(iters), "--eval-interval", "3", "--batch-size", str(batch_size),
            *map(str, extra)]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, corpus):
    """Two runs of STEPS steps: one process with batch 2b ("one") and two ranks with batch b each ("two")."""
    folder = tmp_path_factory.mktemp("six_steps")
    assert train_module.main(_train_arguments(folder / "one", STEPS, 2 * PER_RANK_BATCH, "--data", corpus)) == 0
    job = run_ranks("-m", "tinytf.train", *_train_arguments(folder / "two", STEPS, PER_RANK_BATCH, "--data", corpus))
    assert job.returncode == 0, job.stderr
    assert f"2 ranks x {PER_RANK_BATCH} sequences = {2 * PER_RANK_BATCH} sequences" in job.stdout
    assert job.stdout.count("iter 3: train loss") == 1  # only the main rank speaks
    return folder


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _max_weight_difference(folder_a, folder_b) -> float:
    weights_a, weights_b = load_checkpoint(folder_a).weights, load_checkpoint(folder_b).weights
    assert weights_a.keys() == weights_b.keys()
    return max(float(np.abs(weights_a[name] - weights_b[name]).max()) for name in weights_a)


# Float32 tolerance: the two runs add the same per-token gradients in a different order (each half, then the
# Allreduce). Measured: weights of size up to 1 differ by 6e-7 after 6 steps, by 1.6e-6 after 50.
WEIGHT_TOLERANCE = 1e-5


@needs_mpi
def test_two_ranks_with_batch_b_train_like_one_process_with_batch_2b(six_steps):
    assert _max_weight_difference(six_steps / "one", six_steps / "two") < WEIGHT_TOLERANCE
    for one, two in zip(_metrics(six_steps / "one"), _metrics(six_steps / "two"), strict=True):
        assert one["iter"] == two["iter"]
        assert one["train_loss"] == pytest.approx(two["train_loss"], rel=1e-6)
        assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-6)
    assert load_checkpoint(six_steps / "two").meta["rng"]["tinytf_other_ranks"]  # rank 1's dropout stream is kept


def _resume_in_one_process(folder, monkeypatch) -> list[float]:
    """Continue the run in `folder` to MORE_STEPS steps with batch 2b; returns the training losses of those steps."""
    losses, forward = [], GPT.forward

    def recording_forward(self, idx, targets=None, position_ids=None):
        logits, loss = forward(self, idx, targets, position_ids)
        if self.training:
            losses.append(loss.item())
        return logits, loss

    with monkeypatch.context() as patch:
        patch.setattr(GPT, "forward", recording_forward)
        assert train_module.main(_train_arguments(folder, MORE_STEPS, 2 * PER_RANK_BATCH, "--resume")) == 0
    return losses


@needs_mpi
def test_a_checkpoint_of_two_ranks_resumes_in_one_process_with_the_same_next_loss(six_steps, tmp_path, monkeypatch):
    for name in ("one", "two"):
        shutil.copytree(six_steps / name, tmp_path / name)
    after_one, after_two = (_resume_in_one_process(tmp_path / name, monkeypatch) for name in ("one", "two"))
    assert len(after_one) == len(after_two) == MORE_STEPS - STEPS
    assert after_two[0] == pytest.approx(after_one[0], rel=1e-6)
    assert after_two == pytest.approx(after_one, rel=1e-5)
    assert _max_weight_difference(tmp_path / "one", tmp_path / "two") < WEIGHT_TOLERANCE


@needs_mpi
def test_a_checkpoint_of_one_process_resumes_on_two_ranks(six_steps, tmp_path, monkeypatch):
    for name in ("in_one", "on_two"):
        shutil.copytree(six_steps / "one", tmp_path / name)
    _resume_in_one_process(tmp_path / "in_one", monkeypatch)
    job = run_ranks("-m", "tinytf.train",
                    *_train_arguments(tmp_path / "on_two", MORE_STEPS, PER_RANK_BATCH, "--resume"))
    assert job.returncode == 0, job.stderr
    assert f"resumed from {tmp_path / 'on_two'} at iteration {STEPS}" in job.stdout
    assert _max_weight_difference(tmp_path / "in_one", tmp_path / "on_two") < WEIGHT_TOLERANCE
    assert [r["iter"] for r in _metrics(tmp_path / "on_two")] == [3, 6, 9, 10]


# --- NCCL for CuPy arrays ---------------------------------------------------------------------------------------------
def _gpu_count() -> int:
    from tinytf import backend

    return sum(backend.is_available(f"cuda:{index}") for index in range(2))


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                    reason="CuPy is not installed (tinytf[gpu]); the NCCL path is import-checked where it is")
def test_the_nccl_path_finds_what_it_uses_in_cupy():
    try:
        codes = {dtype: distributed.nccl_dtype(dtype) for dtype in ("float16", "float32", "float64", "int64")}
    except RuntimeError as error:  # CuPy without an NCCL library
        assert "pip install nvidia-nccl-cu12" in str(error)
        return
    assert len(set(codes.values())) == len(codes)
    nccl = importlib.import_module("cupy.cuda.nccl")
    assert callable(nccl.get_unique_id) and hasattr(nccl.NcclCommunicator, "allReduce")
    with pytest.raises(TypeError, match="NCCL cannot reduce"):
        distributed.nccl_dtype(np.complex64)


NCCL_COLLECTIVES = textwrap.dedent("""
    import cupy
    from tinytf import distributed
    rank = distributed.rank()
    with cupy.cuda.Device(distributed.local_rank()):
        for dtype in ("float16", "float32", "float64", "int64"):
            values = cupy.arange(12, dtype=dtype).reshape(3, 4) + rank
            expected = 2 * cupy.arange(12, dtype=dtype).reshape(3, 4) + 1
            assert (distributed.all_reduce(values) == expected).all()
            assert (distributed.broadcast(cupy.full(5, rank, dtype), root=1) == 1).all()
    distributed.barrier()
    if rank == 0:
        print("ok")
""")


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("cupy") is None or backend.uses_cuda_standin() or _gpu_count() < 2,
                    reason="NCCL between two ranks needs CuPy and two CUDA GPUs (the CuPy stand-in has no NCCL)")
def test_nccl_all_reduce_and_broadcast_on_two_gpus():
    job = run_ranks("-c", NCCL_COLLECTIVES)
    assert job.returncode == 0 and job.stdout == "ok\n", job.stderr


# --- bfloat16 and float16 across ranks ---------------------------------------------------------------------------
HALF_COLLECTIVES = textwrap.dedent("""
    import ml_dtypes
    import numpy as np
    from tinytf import distributed
    from tinytf.nn import Parameter

    rank = distributed.rank()
    # bfloat16 parameters broadcast bit for bit (as bytes: MPI has no bfloat16 type).
    params = [Parameter(np.full((3, 2), 1.5 + rank, ml_dtypes.bfloat16)), Parameter(np.full(4, rank, np.float16))]
    distributed.broadcast_parameters(params)
    assert (params[0].data == 1.5).all() and (params[1].data == 0).all()
    # 16-bit gradients are averaged in float32 and stay float32: 1 and 1 + 2^-7 (a bfloat16 ulp apart) average to
    # 1 + 2^-8, which bfloat16 cannot hold.
    params[0].grad = np.full((3, 2), 1 + 2.0**-7 * rank, ml_dtypes.bfloat16)
    params[1].grad = np.full(4, 2.0**-24 * (rank + 1), np.float16)  # float16's smallest subnormal, and twice it
    distributed.GradientAverager(params).average()
    assert params[0].grad.dtype == params[1].grad.dtype == np.float32
    np.testing.assert_array_equal(params[0].grad, np.full((3, 2), 1 + 2.0**-8, np.float32))
    np.testing.assert_array_equal(params[1].grad, np.full(4, 1.5 * 2.0**-24, np.float32))
    distributed.barrier()
    if rank == 0:
        print("ok")
""")


@needs_mpi
@pytest.mark.parametrize("script", [COLLECTIVES, HALF_COLLECTIVES], ids=["float32", "bfloat16 and float16"])
def test_all_reduce_broadcast_and_gradient_averaging_on_two_ranks(script):
    """The collectives, in float32; and bfloat16/float16 parameters broadcast exactly, their gradients averaged in
    float32 (MPI has no bfloat16)."""
    job = run_ranks("-c", script)
    assert job.returncode == 0, job.stderr
    assert job.stdout == "ok\n"


@needs_mpi
def test_two_ranks_train_in_bf16_and_resume_in_one_process(corpus, tmp_path):
    out = tmp_path / "run"
    job = run_ranks("-m", "tinytf.train", *_train_arguments(out, 3, 2, "--data", corpus, "--dtype", "bf16"))
    assert job.returncode == 0, job.stderr
    checkpoint = load_checkpoint(out)
    assert {w.dtype for w in checkpoint.weights.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert checkpoint.meta["train_args"]["dtype"] == "bfloat16"
    assert train_module.main(_train_arguments(out, 6, 4, "--resume")) == 0
    assert load_checkpoint(out).meta["iteration"] == 5
