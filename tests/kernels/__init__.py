"""Tests of the CUDA kernels without a GPU: compile gate, CPU emulation; and on a GPU when there is one."""
