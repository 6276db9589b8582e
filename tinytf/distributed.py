"""Data parallelism on MPI: ranks, collectives, and gradient averaging for a model's parameters.

One process per CPU socket or GPU, launched by MPI (`mpiexec -n 2 python -m mpi4py -m tinytf.train ...`); each holds
a full copy of the model, computes gradients on its own share of the batch, and averages them with the others before
the optimizer step, so every copy takes the same step.

mpi4py is imported only when the environment shows an MPI launch (`PMI_SIZE` from MPICH, Intel MPI and Slurm's PMI;
`OMPI_COMM_WORLD_SIZE` from Open MPI) or when mpi4py is already running (`python -m mpi4py`). Without a launcher the
world is one process: every collective is a no-op and mpi4py need not be installed.

NumPy arrays travel through MPI. CuPy arrays travel through NCCL (GPU to GPU, no copy to the host); its communicator
is set up on the first collective on a GPU array, from a unique id that rank 0 sends to the others through MPI.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np

from . import backend

_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_MPI_EXTRA_HINT = "install the mpi extra: pip install 'tinytf[mpi]' (mpi4py and the MPICH runtime)"

_UNRESOLVED = object()
_world = _UNRESOLVED  # then mpi4py's COMM_WORLD in a job of several ranks, None in a world of one
_local_rank: int | None = None
_nccl_communicator = None


# --- the world --------------------------------------------------------------------------------------------------------
def launched_by_mpi() -> bool:
    """True when this process is one of several started by an MPI launcher (or runs under `python -m mpi4py`)."""
    if "mpi4py.MPI" in sys.modules:
        return True
    for variable in _SIZE_VARIABLES:
        size = os.environ.get(variable, "")
        if size.isdigit() and int(size) > 1:
            return True
    return False


def _mpi():
    """The mpi4py.MPI module; a RuntimeError naming the extra when mpi4py or the MPI library behind it is missing."""
    try:
        return importlib.import_module("mpi4py.MPI")
    except (ImportError, RuntimeError) as error:  # mpi4py raises RuntimeError when it cannot load libmpi
        raise RuntimeError(
            f"this process was started by an MPI launcher, but MPI is unusable here ({error}); {_MPI_EXTRA_HINT}"
        ) from None


def _communicator():
    """COMM_WORLD when launched by MPI with more than one process, else None (a world of one)."""
    global _world
    if _world is _UNRESOLVED:
        world = _mpi().COMM_WORLD if launched_by_mpi() else None
        _world = world if world is not None and world.Get_size() > 1 else None
    return _world


def rank() -> int:
    """This process's index in the job, 0 to world_size() - 1."""
    world = _communicator()
    return world.Get_rank() if world is not None else 0


def world_size() -> int:
    world = _communicator()
    return world.Get_size() if world is not None else 1


def is_main() -> bool:
    """True on rank 0, the rank that prints, writes metrics and checkpoints."""
    return rank() == 0


def local_rank() -> int:
    """This process's index among the ranks on the same machine: which of the machine's GPUs it should take."""
    global _local_rank
    if _local_rank is None:
        world = _communicator()
        _local_rank = world.Split_type(_mpi().COMM_TYPE_SHARED).Get_rank() if world is not None else 0
    return _local_rank


def barrier() -> None:
    """Wait until every rank has reached this point."""
    world = _communicator()
    if world is not None:
        world.Barrier()


def abort_job(exit_code: int) -> None:
    """In a job of several ranks, end all of them now with `exit_code`: after an error on one rank the others may be
    waiting for it in a collective. Returns without doing anything in a world of one, or if MPI never started."""
    if _world is not _UNRESOLVED and _world is not None:
        _world.Abort(exit_code)


# --- collectives on arrays --------------------------------------------------------------------------------------------
def all_reduce(array, op: str = "sum"):
    """Replace `array` (NumPy or CuPy, contiguous) on every rank by its sum or mean over all ranks; returns it.

    "mean" needs a floating-point array. The result is bitwise the same on every rank.
    """
    _check_in_place(array, "all_reduce")
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce supports op='sum' or op='mean', got {op!r}")
    if op == "mean" and not backend.is_floating(array.dtype):
        raise TypeError(f"all_reduce with op='mean' needs a floating-point array, got dtype {array.dtype}")
    world = _communicator()
    if world is None:
        return array
    if backend.is_cupy_array(array):
        _nccl_all_reduce(array)
    else:
        world.Allreduce(_mpi().IN_PLACE, array, op=_mpi().SUM)
    if op == "mean":
        array /= world.Get_size()
    return array


def broadcast(array, root: int = 0):
    """Overwrite `array` (NumPy or CuPy, contiguous) on every rank with rank `root`'s values; returns it."""
    _check_in_place(array, "broadcast")
    world = _communicator()
    if world is None:
        return array
    if not 0 <= root < world.Get_size():
        raise ValueError(f"broadcast root {root} is not a rank of this job of {world.Get_size()}")
    if backend.is_cupy_array(array):
        _nccl_broadcast(array, root)
    else:
        world.Bcast(array, root=root)
    return array


def gather_object(value, root: int = 0) -> list | None:
    """The list of every rank's `value` (any picklable object) on rank `root`; None on the other ranks."""
    world = _communicator()
    if world is None:
        return [value]
    return world.gather(value, root=root)


def shard(batch):
    """This rank's equal share of `batch`'s rows: rows rank*n to (rank+1)*n - 1, with n = len(batch) // world_size."""
    size = world_size()
    if len(batch) % size:
        raise ValueError(f"a batch of {len(batch)} rows does not split evenly over {size} ranks")
    rows = len(batch) // size
    return batch[rank() * rows : (rank() + 1) * rows]


def _check_in_place(array, name: str) -> None:
    if isinstance(array, np.generic) or not hasattr(array, "flags"):
        raise TypeError(f"{name} works in place on NumPy or CuPy arrays, got a {type(array).__name__}")
    # The collectives hand MPI or NCCL a raw pointer and a count: a strided view would be read as scrambled memory.
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} works in place on contiguous arrays; got a strided view of shape {array.shape}")


# --- NCCL for CuPy arrays ---------------------------------------------------------------------------------------------
def _nccl_module():
    """cupy.cuda.nccl, or a RuntimeError saying what to install."""
    backend.cupy_module()  # a clear error when CuPy itself is missing
    try:
        nccl = backend.cupy_submodule("cuda.nccl")
    except ImportError:
        nccl = None
    # CuPy's nccl module imports even when the NCCL library cannot be loaded; it then says so in `available`.
    if not getattr(nccl, "available", False):
        raise RuntimeError("data-parallel training on GPUs needs NCCL, which CuPy cannot load; "
                           "install it with: pip install nvidia-nccl-cu12")
    return nccl


def nccl_dtype(dtype) -> int:
    """NCCL's code for a NumPy dtype; a TypeError for dtypes NCCL cannot reduce."""
    nccl = _nccl_module()
    codes = {
        np.dtype(np.int8): nccl.NCCL_INT8, np.dtype(np.uint8): nccl.NCCL_UINT8,
        np.dtype(np.int32): nccl.NCCL_INT32, np.dtype(np.uint32): nccl.NCCL_UINT32,
        np.dtype(np.int64): nccl.NCCL_INT64, np.dtype(np.uint64): nccl.NCCL_UINT64,
        np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
        np.dtype(np.float64): nccl.NCCL_FLOAT64,
    }
    if np.dtype(dtype) not in codes:
        raise TypeError(f"NCCL cannot reduce arrays of dtype {np.dtype(dtype)}")
    return codes[np.dtype(dtype)]


def _nccl(device_id: int):
    """This rank's NCCL communicator on GPU `device_id`, created collectively on first use."""
    global _nccl_communicator
    if _nccl_communicator is None:
        nccl, world = _nccl_module(), _communicator()
        unique_id = world.bcast(nccl.get_unique_id() if world.Get_rank() == 0 else None, root=0)
        with backend.cupy_module().cuda.Device(device_id):
            _nccl_communicator = nccl.NcclCommunicator(world.Get_size(), unique_id, world.Get_rank())
    return _nccl_communicator


def _nccl_all_reduce(array) -> None:
    cupy = backend.cupy_module()
    with cupy.cuda.Device(array.device.id):
        _nccl(array.device.id).allReduce(array.data.ptr, array.data.ptr, array.size, nccl_dtype(array.dtype),
                                         _nccl_module().NCCL_SUM, cupy.cuda.get_current_stream().ptr)


def _nccl_broadcast(array, root: int) -> None:
    cupy = backend.cupy_module()
    with cupy.cuda.Device(array.device.id):
        _nccl(array.device.id).bcast(array.data.ptr, array.size, nccl_dtype(array.dtype), root,
                                     cupy.cuda.get_current_stream().ptr)


# --- a model's parameters and gradients -------------------------------------------------------------------------------
def _by_dtype(arrays) -> dict:
    groups: dict = {}
    for array in arrays:
        groups.setdefault(array.dtype, []).append(array)
    return groups


def _pack(arrays, out=None, dtype=None):
    """The arrays laid end to end in one flat buffer (`out` when given, else a new one of `dtype`, by default the
    arrays'), so a collective is one call, not one each."""
    xp = backend.get_array_module(*arrays)
    if out is None:
        out = xp.empty(sum(array.size for array in arrays), dtype=dtype or arrays[0].dtype)
    return xp.concatenate([array.reshape(-1) for array in arrays], out=out)


def _unpack(buffer, arrays) -> None:
    """Copy the flat `buffer` back into `arrays`, in place (the inverse of `_pack`)."""
    offset = 0
    for array in arrays:
        array[...] = buffer[offset : offset + array.size].reshape(array.shape)
        offset += array.size


def broadcast_parameters(params, root: int = 0) -> None:
    """Give every rank rank `root`'s parameter values (Tensors; one Bcast per dtype), so all copies start equal."""
    if world_size() == 1:
        return
    for arrays in _by_dtype([param.data for param in params]).values():
        buffer = _pack(arrays)
        # A broadcast moves bits: bfloat16, which neither MPI's nor NCCL's type tables know, travels as its bytes.
        broadcast(buffer.view(np.uint8) if buffer.dtype == backend.BFLOAT16 else buffer, root)
        _unpack(buffer, arrays)


class GradientAverager:
    """Averages the gradients of `params` over all ranks: call `average()` after backward, before clipping and the
    optimizer step. Then every rank holds the same gradients and takes the same step.

    Why the mean: each rank's loss is the mean over its own batch of b sequences, so the mean of the W ranks'
    gradients is the gradient of the mean loss over all W*b sequences, the same as one process with batch W*b would
    compute (this needs the same b on every rank, which `shard` guarantees).

    The gradients are packed into one contiguous buffer per dtype (one in practice: float32), reduced with one
    Allreduce, divided by the world size and unpacked. The buffers are allocated on the first step and reused.
    bfloat16 and float16 gradients are reduced in float32 and left in float32 (the optimizer steps float32 master
    weights from them): MPI cannot add bfloat16, and a float16 sum over ranks would round at every addition. This
    sends twice the bytes of a 16-bit reduction.
    """

    def __init__(self, params):
        self.params = [param for param in params if param.requires_grad]
        self._buffers: dict = {}  # dtype -> flat buffer

    def average(self) -> None:
        if world_size() == 1:
            return
        missing = [index for index, param in enumerate(self.params) if param.grad is None]
        if missing:
            # Every rank must send the same buffer; a gradient that is missing here may exist on another rank.
            raise RuntimeError(
                f"parameters {missing} have no gradient on rank {rank()}: data-parallel training needs every "
                "trainable parameter to take part in the loss"
            )
        for dtype, params in _by_reduction_dtype(self.params).items():
            grads = [param.grad for param in params]
            buffer = _pack(grads, out=self._buffers.get(dtype), dtype=dtype)
            self._buffers[dtype] = buffer
            all_reduce(buffer, op="mean")
            xp = backend.get_array_module(buffer)
            averaged = [grad if grad.dtype == dtype else xp.empty(grad.shape, dtype) for grad in grads]
            _unpack(buffer, averaged)
            for param, grad in zip(params, averaged):
                param.grad = grad


def _by_reduction_dtype(params) -> dict:
    """The parameters grouped by the dtype their gradients are reduced in: float32 for bfloat16 and float16."""
    groups: dict = {}
    for param in params:
        groups.setdefault(backend.compute_dtype(param.grad.dtype), []).append(param)
    return groups
