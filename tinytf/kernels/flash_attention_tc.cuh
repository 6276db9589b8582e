// flash_attention_tc.cuh: what the tensor-core FlashAttention kernels (flash_attention_tc.cu, the forward, and
// flash_attention_tc_backward.cu) share: the element type and head dim of the build, the block of 4 warps, and which
// keys a query sees (attention_mask.cuh: lengths, window, softcap, ALiBi, dropout; key_keep on top).
#pragma once

#if !defined(HEAD_DIM) || defined(ELEMENT_BF16) == defined(ELEMENT_FP16)
#error "compile with -DHEAD_DIM=<d> and one of -DELEMENT_BF16, -DELEMENT_FP16"
#endif

#include "attention_mask.cuh"
#include "tensor_core.cuh"

#ifdef ELEMENT_BF16
using Element = __nv_bfloat16;
#else
using Element = __half;
#endif

constexpr int kHeadDim = HEAD_DIM;
// d is a multiple of 16, the k of mma.m16n8k16, and of 8 elements, the 16 bytes of a cp.async or ldmatrix row.
static_assert(kHeadDim == 32 || kHeadDim == 64 || kHeadDim == 96 || kHeadDim == 128, "head dims 32, 64, 96, 128");

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr unsigned kFullWarp = 0xffffffffu;

// Key `key` (of this batch entry, whose key_keep row is `key_keep`) is visible to query `query`: the mask's lengths
// and window, and the padding mask, which is read only for keys that exist.
__device__ __forceinline__ bool is_visible(const HeadMask& mask, const unsigned char* key_keep, int query, int key) {
    return mask.visible(query, key) && key_keep[key] != 0;
}
