// tensor_core.cuh: the tensor-core primitives of tinytf's bf16/fp16 kernels (sm_80+), in two implementations.
//
//   pack2 / unpack2     two floats <-> one fragment register of two bf16 or fp16 (round to nearest even)
//   mma_m16n8k16        acc (16x8 f32) += A (16x16) * B (16x8): mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}
//   ldmatrix_x4/_x2     ldmatrix.sync.aligned.m8n8.{x4,x2}[.trans].shared.b16: 8x8 tiles of shared memory to fragments
//   cp_async_16         cp.async.cg.shared.global, 16 bytes, zero-filled when out of bounds; commit and wait<N>
//
// A fragment register is an `unsigned` holding two 16-bit elements, the one with the smaller column (or k) index in the
// low 16 bits, as the PTX ISA lays them out. mma and ldmatrix are warp collectives: all 32 lanes call them together.
//
// Under NVRTC or nvcc each primitive is one inline PTX instruction. Under the CPU emulator (cuda_emulator.h defines
// TINYTF_CUDA_EMULATOR) each is C++ that does what the PTX ISA says the instruction does, with the ISA's fragment
// tables ("Matrix Fragments for mma.m16n8k16" with .bf16/.f16, and ldmatrix) written as index formulas:
//   - mma and ldmatrix wait for every lane of the warp at the same call, then read the other lanes' operands (their
//     registers, or the shared rows whose addresses they pass); a lane that exited or waits elsewhere is reported with
//     the file and line of the call. mma sums the 16 exact products and the accumulator in double and rounds once to
//     float: the tensor cores' own rounding of partial sums is not modelled, so results may differ from a GPU's in
//     the last bits of float32.
//   - cp.async reads its 16 source bytes when issued and writes shared memory at one of the two ends of the window a
//     GPU has: when the issuing thread's cp_async_wait<N> retires the copy's group (lockstep schedule: a tile read
//     before its wait is stale), or at issue (one-warp-at-a-time schedules: a buffer refilled before the barrier that
//     frees it loses data other warps have yet to read). A thread that exits with copies it never waited for is
//     reported as an error.
//
// The kernels include this header with `#include "tensor_core.cuh"`; the NVRTC build needs -I for this directory (or
// the header inlined, as tinytf.kernels.kernel_source does for CuPy) and for CUDA's cuda_bf16.h/cuda_fp16.h
// (tinytf.kernels.TensorCoreVariant.options and the compile gate give both).
#pragma once

#ifndef TINYTF_CUDA_EMULATOR
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// The packed pair of an element type and its conversions, the same CUDA intrinsics on the GPU and in the emulator.
template <class Element>
struct ElementPair;

template <>
struct ElementPair<__nv_bfloat16> {
    using type = __nv_bfloat162;
    static __device__ __forceinline__ type from_floats(float low, float high) {
        return __floats2bfloat162_rn(low, high);
    }
    static __device__ __forceinline__ float2 to_floats(type pair) { return __bfloat1622float2(pair); }
};

template <>
struct ElementPair<__half> {
    using type = __half2;
    static __device__ __forceinline__ type from_floats(float low, float high) { return __floats2half2_rn(low, high); }
    static __device__ __forceinline__ float2 to_floats(type pair) { return __half22float2(pair); }
};

// Two floats rounded to nearest even into one fragment register: `low` in bits 0-15, `high` in bits 16-31.
template <class Element>
__device__ __forceinline__ unsigned pack2(float low, float high) {
    const typename ElementPair<Element>::type pair = ElementPair<Element>::from_floats(low, high);
    unsigned packed;
    memcpy(&packed, &pair, sizeof packed);
    return packed;
}

// The two elements of a fragment register as floats: .x from bits 0-15, .y from bits 16-31.
template <class Element>
__device__ __forceinline__ float2 unpack2(unsigned packed) {
    typename ElementPair<Element>::type pair;
    memcpy(&pair, &packed, sizeof packed);
    return ElementPair<Element>::to_floats(pair);
}

#ifndef TINYTF_CUDA_EMULATOR
// ---- the GPU: one PTX instruction each ------------------------------------------------------------------------------

template <class Element>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]);

#define TINYTF_MMA_M16N8K16(type)                                                                                    \
    asm("mma.sync.aligned.m16n8k16.row.col.f32." type "." type ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, " \
        "{%0, %1, %2, %3};"                                                                                          \
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])                                                     \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&acc)[4], const unsigned (&a)[4],
                                                            const unsigned (&b)[2]) {
    TINYTF_MMA_M16N8K16("bf16");
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    TINYTF_MMA_M16N8K16("f16");
}
#undef TINYTF_MMA_M16N8K16

// The 32-bit shared-state-space address that ldmatrix and cp.async take.
__device__ __forceinline__ unsigned shared_address(const void* pointer) {
    return static_cast<unsigned>(__cvta_generic_to_shared(pointer));
}

// "memory": these read or write shared memory, so the compiler must not move ordinary loads and stores across them.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* shared_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(shared_row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* shared_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(shared_row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], const void* shared_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(shared_row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x2_trans(unsigned (&r)[2], const void* shared_row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(shared_row))
                 : "memory");
}

// src-size 0 reads nothing from `global` and zero-fills the 16 shared bytes.
__device__ __forceinline__ void cp_async_16(void* shared, const void* global, bool in_bounds) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(shared_address(shared)), "l"(global), "r"(in_bounds ? 16 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

#else
// ---- the emulator: what each instruction does, lane by lane ---------------------------------------------------------
// Each primitive takes the caller's file and line as defaulted arguments (__builtin_FILE/__builtin_LINE), so errors
// name the kernel's line, not this header's.

namespace tinytf_tensor_core {

// Element `high` (0: bits 0-15, 1: bits 16-31) of a fragment register, as a float.
template <class Element>
float element_value(unsigned packed, int high) {
    const float2 pair = unpack2<Element>(packed);
    return high ? pair.y : pair.x;
}

// ldmatrix .m8n8 with `Matrices` tiles: lanes 8m..8m+7 pass the row addresses of tile m. Without .trans, lane L gets
// row L/4, columns 2(L%4) and 2(L%4)+1 of each tile; with .trans, the same positions of the transposed tile.
template <int Matrices, bool Transposed>
void ldmatrix(unsigned (&r)[Matrices], const void* shared_row, const char* instruction, const char* file, int line) {
    const int lane = ::tinytf_emulator::current->running % ::tinytf_emulator::kWarpSize;
    if (lane < 8 * Matrices && reinterpret_cast<uintptr_t>(shared_row) % 16 != 0)
        ::tinytf_emulator::fail({file, line}, std::string(instruction) + ": lane " + std::to_string(lane) +
                                                  " passes a row address that is not 16-byte aligned");
    unsigned loaded[Matrices];
    ::tinytf_emulator::aligned_warp_collective(shared_row, instruction, file, line, [&](auto row_of_lane) {
        for (int matrix = 0; matrix < Matrices; ++matrix) {
            unsigned packed = 0;
            for (int high = 0; high < 2; ++high) {
                const int row = Transposed ? 2 * (lane % 4) + high : lane / 4;
                const int column = Transposed ? lane / 4 : 2 * (lane % 4) + high;
                const auto* shared = static_cast<const unsigned short*>(row_of_lane(8 * matrix + row));
                packed |= static_cast<unsigned>(shared[column]) << (16 * high);
            }
            loaded[matrix] = packed;
        }
    });
    for (int matrix = 0; matrix < Matrices; ++matrix) r[matrix] = loaded[matrix];
}

struct MmaOperands {
    const unsigned* a;
    const unsigned* b;
};

}  // namespace tinytf_tensor_core

// A (16x16, row-major): lane L = 4g + t holds in a[i] the elements (g + 8(i%2), 2t + 8(i/2) + {0, 1}).
// B (16x8, k by n): b[i] holds (2t + 8i + {0, 1}, g). C/D (16x8): acc[i] is (g + 8(i/2), 2t + i%2).
template <class Element>
void mma_m16n8k16(float (&acc)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    using namespace tinytf_tensor_core;
    const int lane = ::tinytf_emulator::current->running % ::tinytf_emulator::kWarpSize;
    float result[4];
    ::tinytf_emulator::aligned_warp_collective(MmaOperands{a, b}, "mma.sync.m16n8k16", file, line,
                                               [&](auto operands_of_lane) {
        // The inverse of the tables above: which lane, register and half hold A[row][k] and B[k][column].
        auto a_at = [&](int row, int k) {
            const unsigned* registers = operands_of_lane(4 * (row % 8) + (k % 8) / 2).a;
            return element_value<Element>(registers[row / 8 + 2 * (k / 8)], k % 2);
        };
        auto b_at = [&](int k, int column) {
            const unsigned* registers = operands_of_lane(4 * column + (k % 8) / 2).b;
            return element_value<Element>(registers[k / 8], k % 2);
        };
        for (int i = 0; i < 4; ++i) {
            const int row = lane / 4 + 8 * (i / 2), column = 2 * (lane % 4) + i % 2;
            double sum = acc[i];  // the products of 8-bit (bf16) or 11-bit (fp16) significands are exact in double
            for (int k = 0; k < 16; ++k) sum += static_cast<double>(a_at(row, k)) * b_at(k, column);
            result[i] = static_cast<float>(sum);
        }
    });
    for (int i = 0; i < 4; ++i) acc[i] = result[i];
}

inline void ldmatrix_x4(unsigned (&r)[4], const void* shared_row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    tinytf_tensor_core::ldmatrix<4, false>(r, shared_row, "ldmatrix.x4", file, line);
}

inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* shared_row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    tinytf_tensor_core::ldmatrix<4, true>(r, shared_row, "ldmatrix.x4.trans", file, line);
}

inline void ldmatrix_x2(unsigned (&r)[2], const void* shared_row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    tinytf_tensor_core::ldmatrix<2, false>(r, shared_row, "ldmatrix.x2", file, line);
}

inline void ldmatrix_x2_trans(unsigned (&r)[2], const void* shared_row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    tinytf_tensor_core::ldmatrix<2, true>(r, shared_row, "ldmatrix.x2.trans", file, line);
}

inline void cp_async_16(void* shared, const void* global, bool in_bounds, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    ::tinytf_emulator::async_copy_16(shared, global, in_bounds, {file, line});
}

inline void cp_async_commit() { ::tinytf_emulator::async_commit(); }

template <int N>
void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group takes a count of groups that may stay pending");
    ::tinytf_emulator::async_wait(N);
}
#endif
