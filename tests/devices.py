"""The device axis of the suite: the CPU, and "cuda" where a GPU or the CuPy stand-in is there."""

from tinytf import backend

CUDA = backend.is_available("cuda")
DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]
# Where a second GPU exists (the stand-in has two), "cuda:1": a device that is not CuPy's current one.
DEVICES_AND_SECOND_GPU = DEVICES + (["cuda:1"] if backend.is_available("cuda:1") else [])
STANDIN = backend.uses_cuda_standin()
