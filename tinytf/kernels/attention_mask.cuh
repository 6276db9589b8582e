// attention_mask.cuh: which keys a query sees and what its scores become, shared by every FlashAttention kernel
// (flash_attention.cu in float32; flash_attention_tc.cu and flash_attention_tc_backward.cu in bf16/fp16).
//
// The semantics are tinytf.attention's (issue 17), for query i of T_b and key j of S_b in batch b, with
// offset = S_b - T_b (bottom-right aligned: query i sits at absolute position i + offset):
//     visible(i, j)  = i < T_b and j < S_b and key_keep[b, j]
//                      and (left  == -1 or j >= i + offset - left)
//                      and (right == -1 or j <= i + offset + right)        causal attention is right = 0
//     score(i, j)    = c(scale q_i . k_j) - slope[b, h] * |i + offset - j|, c(s) = softcap tanh(s / softcap)
//                      (c(s) = s when softcap is 0), masked keys -> -inf, softmax over j
//     dropout        the softmax weight P_ij is kept when philox4x32_10((j, i, b Hq + h, offset_word),
//                      (seed lo, seed hi)).x >= threshold, and kept weights are multiplied by 1 / (1 - p); the
//                      log-sum-exp is the undropped one. O = dropout(P) V.
// A row that sees no key gives O = 0, L = -inf and zero gradients.
//
// Kernel arguments. Every kernel entry point that reads Q and K (forward, backward_dq, backward_dkdv, in both builds)
// ends with this list, in this order, after its array arguments (q, k, v, key_keep, ...):
//     int n_query_heads, int n_kv_heads,      Hq, Hkv (Hq a multiple of Hkv; query head h reads K/V head h / (Hq/Hkv))
//     int query_len, int key_len,             T, S: the padded lengths the arrays are laid out with (B, H, T|S, d)
//     const int* query_lens,                  T_b for each batch b (B entries, 1 <= T_b <= T; all T for a plain call)
//     const int* key_lens,                    S_b for each batch b (B entries, 1 <= S_b <= S; all S for a plain call)
//     float scale,                            the factor of q . k (1/sqrt(d) unless the caller gives another)
//     int window_left, int window_right,      the window, -1 = unbounded on that side; causal passes right = 0
//     float softcap,                          > 0, or 0 for none
//     const float* alibi_slopes,              slope of (b, h) = alibi_slopes[b * alibi_batch_stride + h];
//     int alibi_batch_stride,                   stride 0 for (Hq,) slopes, Hq for (B, Hq); all zeros when absent
//     unsigned int dropout_threshold,         floor(p * 2^32), computed exactly on the host; 0 = no dropout
//     float dropout_scale,                    1 / (1 - p) (1 when p is 0)
//     unsigned long long dropout_seed,        the Philox key: (seed & 0xffffffff, seed >> 32)
//     unsigned int dropout_offset             the Philox counter's word 3
// Varlen attention pads: the launcher scatters packed (total, H, d) rows into (N, H, max_len, d), calls the kernels
// with query_lens/key_lens, and gathers the rows back. Rows i >= T_b write O = 0 and L = -inf; keys j >= S_b are
// masked; gradients of padding rows and keys come out 0. backward_delta keeps (out, grad_out, delta, n_rows).
//
// Device helpers:
//     HeadMask           the lengths, window, softcap and ALiBi slope of one (batch, query head), with
//       .visible(i, j)     the per-element test (without key_keep, which the kernels read themselves)
//       .keys_seen_by(first_query, last_query)   the key range [begin, end) any of those queries sees
//       .queries_seeing(first_key, last_key)     the query range [begin, end) that sees any of those keys
//       .score(scaled, i, j), .capped(scaled), .capped_grad(capped), .alibi_bias(i, j)
//     first_tile(begin, tile)   where a tile loop over [begin, end) starts: tiles wholly outside are never visited
//     Dropout            the threshold, scale, seed and offset; .factor(batch_head, i, j) is 0 or 1 / (1 - p)
//     philox4x32_10      the counter-based generator (Salmon et al. 2011), as tinytf.attention.dropout.philox4x32
//
// Included with `#include "attention_mask.cuh"`; tinytf.kernels.kernel_source inlines it for NVRTC.
#pragma once

// The lengths, window, softcap and ALiBi slope that decide the scores of one (batch, query head).
struct HeadMask {
    int query_len;     // T_b
    int key_len;       // S_b
    int offset;        // S_b - T_b: query i sits at absolute position i + offset
    int window_left;   // -1: unbounded
    int window_right;  // -1: unbounded; 0 when causal
    float softcap;     // 0: none
    float alibi_slope;

    // Key j is visible to query i (key_keep aside). Both are indices >= 0 into the padded layout.
    __device__ __forceinline__ bool visible(int query, int key) const {
        const int position = query + offset;
        return query < query_len && key < key_len && (window_left < 0 || key >= position - window_left) &&
               (window_right < 0 || key <= position + window_right);
    }

    // The keys [begin, end) that at least one of the queries first_query..last_query can see; begin == end == 0 when
    // none. Windows move right with the query, so the first query bounds the start and the last one the end.
    __device__ __forceinline__ int2 keys_seen_by(int first_query, int last_query) const {
        last_query = min(last_query, query_len - 1);
        const int begin = window_left < 0 ? 0 : max(0, first_query + offset - window_left);
        const int end = window_right < 0 ? key_len : min(key_len, last_query + offset + window_right + 1);
        return first_query <= last_query && begin < end ? make_int2(begin, end) : make_int2(0, 0);
    }

    // The queries [begin, end) that see at least one of the keys first_key..last_key; begin == end == 0 when none.
    __device__ __forceinline__ int2 queries_seeing(int first_key, int last_key) const {
        last_key = min(last_key, key_len - 1);
        const int begin = window_right < 0 ? 0 : max(0, first_key - offset - window_right);
        const int end = window_left < 0 ? query_len : min(query_len, last_key - offset + window_left + 1);
        return first_key <= last_key && begin < end ? make_int2(begin, end) : make_int2(0, 0);
    }

    // c(s) = softcap tanh(s / softcap), applied to the scaled score before the bias.
    __device__ __forceinline__ float capped(float scaled) const {
        return softcap > 0.0f ? softcap * tanhf(scaled / softcap) : scaled;
    }

    // dc/ds from c itself: 1 - tanh^2, so the backward pass needs no second tanh.
    __device__ __forceinline__ float capped_grad(float capped_score) const {
        if (softcap <= 0.0f) return 1.0f;
        const float t = capped_score / softcap;
        return 1.0f - t * t;
    }

    __device__ __forceinline__ float alibi_bias(int query, int key) const {
        return -alibi_slope * fabsf(static_cast<float>(query + offset - key));
    }

    // The score before masking, from scale * (q . k).
    __device__ __forceinline__ float score(float scaled, int query, int key) const {
        return capped(scaled) + alibi_bias(query, key);
    }
};

__device__ __forceinline__ HeadMask head_mask(int batch, int query_head, const int* __restrict__ query_lens,
                                              const int* __restrict__ key_lens, int window_left, int window_right,
                                              float softcap, const float* __restrict__ alibi_slopes,
                                              int alibi_batch_stride) {
    const int query_len = query_lens[batch];
    const int key_len = key_lens[batch];
    return {query_len, key_len, key_len - query_len, window_left, window_right, softcap,
            alibi_slopes[batch * alibi_batch_stride + query_head]};
}

// The start of the tile that holds index `begin`, for loops `for (t = first_tile(r.x, Bc); t < r.y; t += Bc)`.
__device__ __forceinline__ int first_tile(int begin, int tile) { return begin - begin % tile; }

// ---- Philox4x32-10 ------------------------------------------------------------------------------------------------
constexpr unsigned kPhiloxM0 = 0xD2511F53u;
constexpr unsigned kPhiloxM1 = 0xCD9E8D57u;
constexpr unsigned kPhiloxW0 = 0x9E3779B9u;
constexpr unsigned kPhiloxW1 = 0xBB67AE85u;

// The high 32 bits of the 64-bit product.
__device__ __forceinline__ unsigned multiply_high(unsigned a, unsigned b) {
#ifdef TINYTF_CUDA_EMULATOR
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
#else
    return __umulhi(a, b);
#endif
}

// Ten rounds on counter (c.x, c.y, c.z, c.w) with key (key0, key1); the key is bumped by the Weyl constants between
// rounds. The kernels use word x only; the compiler drops the rest.
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned key0, unsigned key1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key0 += kPhiloxW0;
            key1 += kPhiloxW1;
        }
        const unsigned high0 = multiply_high(kPhiloxM0, c.x), low0 = kPhiloxM0 * c.x;
        const unsigned high1 = multiply_high(kPhiloxM1, c.z), low1 = kPhiloxM1 * c.z;
        c = make_uint4(high1 ^ c.y ^ key0, low1, high0 ^ c.w ^ key1, low0);
    }
    return c;
}

// Dropout of the softmax weights, regenerated identically in the forward and backward kernels.
struct Dropout {
    unsigned threshold;  // floor(p * 2^32): a weight is kept when its Philox word is >= threshold
    float scale;         // 1 / (1 - p)
    unsigned long long seed;
    unsigned offset;

    __device__ __forceinline__ bool active() const { return threshold != 0u; }

    // What P_ij is multiplied by: 0 when dropped, 1 / (1 - p) when kept. batch_head = b * Hq + h.
    __device__ __forceinline__ float factor(int batch_head, int query, int key) const {
        if (!active()) return 1.0f;
        const uint4 counter = make_uint4(static_cast<unsigned>(key), static_cast<unsigned>(query),
                                         static_cast<unsigned>(batch_head), offset);
        const uint4 random = philox4x32_10(counter, static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32));
        return random.x >= threshold ? scale : 0.0f;
    }
};
