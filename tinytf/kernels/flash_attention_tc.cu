// FlashAttention-2 forward on tensor cores: bf16 or fp16 Q, K, V, float32 accumulation and softmax state (sm_80+).
//
// Notation (Dao 2023), for one (batch, query head): Q (T x d), K and V (S x d) of the K/V head it reads (grouped-query
// attention by index: query head h reads K/V head h / (Hq / Hkv), never a repeated copy), scale = 1/sqrt(d) unless the
// caller gives another. Which keys a query sees and what its scores become are attention_mask.cuh's (issue 17, shared
// with flash_attention.cu): batch entry b has T_b <= T queries and S_b <= S keys (varlen; the arrays are padded to
// T and S), query i sits at position i + S_b - T_b (bottom-right aligned), the window (left, right) bounds the keys
// around it (causal: right = 0), key_keep hides keys; the logit of a visible key is c(scale q . k) - slope |i + S_b -
// T_b - j| with the softcap c(s) = softcap tanh(s / softcap), and dropout (Philox) zeroes softmax weights.
//
// One block per (Br = 64 queries, batch x query head); warp w owns queries 16w .. 16w + 15 of the block's tile.
// m = -inf, l = 0, O_i = 0, all float32 in registers:
//     load Q_i once into registers as mma A fragments (ldmatrix from shared memory)
//     for each key tile j of Bc keys that holds a key some query of the block sees (HeadMask::keys_seen_by: the tiles
//     before the window, after the causal diagonal or past S_b are never loaded), with tile j + 1 copying into the
//     other shared-memory stage (cp.async) while tile j is computed:
//         S_ij  = Q_i K_j^T                         mma.m16n8k16, K_j's rows as the col-major B operand (ldmatrix)
//         S_ij  = c(scale S_ij) + ALiBi, or -inf where the key is not visible (edge tiles), before the row max
//         m_new = max(m, rowmax(S_ij))               over the 4 lanes of a quad that share a row (shuffles)
//         P_ij  = exp2((S_ij - m_new) log2(e))       float32; l = exp(m - m_new) l + rowsum(P_ij)
//         P_ij  = Z_ij P_ij                          dropout after l (L is the undropped one): Z = 0 or 1 / (1 - p)
//         O_i   = exp(m - m_new) O_i + P_ij V_j      P_ij rounded to the element type in registers and used as the A
//                                                    operand directly (the C layout of S is the A layout of P);
//                                                    V_j as B through ldmatrix.trans
//     O_i = O_i / l, rounded once to the element type;  L_i = m + log(l) in float32.
//     A row with no visible key gets O_i = 0 and L_i = -inf (rows past T_b, a fully masked batch entry, causal T > S).
//
// Launch: 128 threads = 4 warps; grid (ceil(T / 64), B * Hq). Arguments: q, k, v, key_keep, out, logsumexp, then
//     attention_mask.cuh's list.
// Tiles: Br = 64 = 4 warps x 16 mma rows. Bc = 64 keys for d <= 64 and 32 for d = 96, 128: two stages of K and V
//     must fit in 48 KiB of static shared memory (the emulator does not model dynamic shared memory, and more would
//     need an opt-in), and Bc = 64 at d = 128 would need 68 KiB. Head dims 32, 64, 96, 128: d must be a multiple of
//     16 (the k of m16n8k16 in Q K^T).
// Shared memory: two stages, each a Bc x d tile of K and one of V, rows padded from d to d + 8 elements. The padding
//     (16 bytes) moves each row to the next 16-byte bank group: an 8x8 ldmatrix reads 8 rows of 16 bytes, and
//     with a row stride of d/8 + 1 groups (odd for every d here) those 8 rows cover all 32 banks once: no bank
//     conflicts (an XOR swizzle would need d/8 to be a multiple of 8, which 32 and 96 are not). Q's tile (64 rows)
//     uses the second stage before the first K/V prefetch reaches it: Q lives in registers after the prologue.
//     Bytes: 2 stages x 2 x Bc x (d + 8) x 2 = 20480 (d=32), 36864 (d=64), 26624 (d=96), 34816 (d=128).
// Registers: per lane, Q fragments d/4, O accumulators d/2 floats, S accumulators Bc/2 floats, P fragments Bc/4
//     (d=128: 32 + 64 + 16 + 8). Launch bounds: 128 threads and kMinBlocksPerSM resident blocks, a cap of 128
//     registers for d = 32 and 168 above. ptxas (NVRTC 12.9, sm_80) uses 120, 160, 162, 168 for d = 32, 64, 96, 128,
//     with no spills and no stack frame (python -m tinytf.kernels.compile_gate prints every arch): 4, 3, 3, 3
//     resident blocks on an A100 or H100, 16 or 12 warps of their 64. The Philox draws of dropout run in a rolled
//     loop (drop_weights), without which d = 64 and 128 spill.
// Global traffic: cp.async 16-byte copies (rows of d elements, 16-byte aligned since d % 8 == 0); rows past T_b or
//     S_b are zero-filled, never read (a padded varlen layout may hold anything there). key_keep: each lane reads the
//     bytes of its Bc/4 keys per tile (the masks are applied to every visited tile, interior ones too); T_b, S_b and
//     the ALiBi slope once per block. Output: each lane stores pairs of elements (4 bytes) straight from registers.
//
// Compile: cupy.RawModule gets tinytf.kernels.kernel_source(this file), the text with its headers
// (flash_attention_tc.cuh, attention_mask.cuh, tensor_core.cuh) inlined, and
// tinytf.kernels.tensor_core_variant(d, dtype).options; CuPy adds CUDA's include folder (cuda_bf16.h, cuda_fp16.h)
// and -ftz=true. For d = 128 in bf16 on an A100, NVRTC as CuPy runs it:
//     --std=c++17 -DHEAD_DIM=128 -DELEMENT_BF16 -I<CUDA include> -ftz=true -arch=sm_80
// On the CPU the same file runs under tinytf.kernels.emulator (g++ with cuda_emulator.h and the warp-collective side
// of tensor_core.cuh).

#include "flash_attention_tc.cuh"

// Resident blocks asked of ptxas: 65536 registers / (128 threads x blocks) caps a thread at 128 registers for d = 32
// (4 blocks) and 168 for larger d (3 blocks). At 128, d = 64 spilled; d = 128 fits 168 without spilling (it takes
// 190 when allowed 255, which leaves room for only 2 blocks).
constexpr int kMinBlocksPerSM = kHeadDim <= 32 ? 4 : 3;

constexpr int kQueryTile = 16 * kWarps;                // Br
constexpr int kKeyTile = kHeadDim <= 64 ? 64 : 32;     // Bc
constexpr int kRowStride = kHeadDim + 8;               // padded shared-memory row, in elements
constexpr int kChunksPerRow = kHeadDim / 8;            // 16-byte chunks of a row
constexpr int kDimSteps = kHeadDim / 16;               // k steps of Q K^T
constexpr int kDimGroups = kHeadDim / 8;               // n tiles of O
constexpr int kKeyGroups = kKeyTile / 8;               // n tiles of S
constexpr int kKeySteps = kKeyTile / 16;               // k steps of P V
constexpr float kLog2E = 1.4426950408889634f;

// The two stages of the K/V pipeline, each K's tile followed by V's. The first prefetch goes to stage 1, so Q's tile
// can borrow it until then.
struct alignas(16) SharedTiles {
    Element stage[2][2 * kKeyTile * kRowStride];
};

__device__ __forceinline__ Element* key_tile(SharedTiles& shared, int stage) { return shared.stage[stage]; }
__device__ __forceinline__ Element* value_tile(SharedTiles& shared, int stage) {
    return shared.stage[stage] + kKeyTile * kRowStride;
}

static_assert(kQueryTile <= 2 * kKeyTile, "Q's tile must fit in one K/V stage");
static_assert(sizeof(SharedTiles) <= 48 * 1024, "static shared memory is limited to 48 KiB");

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }

// ---- global -> shared: cp.async ----------------------------------------------------------------------------------

// Starts copying rows [first_row, first_row + ROWS) of a (total_rows x d) matrix into a padded shared tile, one
// 16-byte chunk per copy; rows past the matrix's end are zero-filled. All threads of the block take part.
template <int ROWS>
__device__ __forceinline__ void start_tile_copy(Element* tile, const Element* matrix, int first_row, int total_rows) {
    static_assert(ROWS * kChunksPerRow % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < ROWS * kChunksPerRow / kThreads; ++i) {
        const int chunk = threadIdx.x + i * kThreads;
        const int row = chunk / kChunksPerRow;
        const int column = chunk % kChunksPerRow * 8;
        const bool in_bounds = first_row + row < total_rows;
        const size_t source_row = in_bounds ? first_row + row : 0;  // a valid address even where nothing is read
        cp_async_16(tile + row * kRowStride + column, matrix + source_row * kHeadDim + column, in_bounds);
    }
}

__device__ __forceinline__ void start_key_value_copy(SharedTiles& shared, int stage, const Element* k,
                                                     const Element* v, int first_key, int key_len) {
    start_tile_copy<kKeyTile>(key_tile(shared, stage), k, first_key, key_len);
    start_tile_copy<kKeyTile>(value_tile(shared, stage), v, first_key, key_len);
}

// ---- shared -> registers: ldmatrix fragments ---------------------------------------------------------------------
// An x4 ldmatrix reads four 8x8 matrices; lanes 8i .. 8i + 7 give the row addresses of matrix i, and register i of
// every lane receives its part of matrix i. The helpers below choose the four matrices so that the registers come
// out in the order of the mma operand they feed.

// Q's A fragments for this warp's 16 rows, one per k step of 16 dims: matrices (rows 0-7 | 8-15) x (dims 0-7 | 8-15)
// in the order a0 = (0-7, 0-7), a1 = (8-15, 0-7), a2 = (0-7, 8-15), a3 = (8-15, 8-15).
__device__ __forceinline__ void load_query_fragments(unsigned (&q_fragments)[kDimSteps][4], const Element* q_tile,
                                                     int warp, int lane) {
    const int row = warp * 16 + lane % 8 + 8 * (lane / 8 % 2);
    const int column = 8 * (lane / 16);
#pragma unroll
    for (int step = 0; step < kDimSteps; ++step)
        ldmatrix_x4(q_fragments[step], q_tile + row * kRowStride + step * 16 + column);
}

// B fragments of K^T for 16 keys (two n tiles of 8) and 16 dims: K's rows are the columns of the col-major B, so a
// plain ldmatrix of 8 keys x 8 dims gives b0 (dims 0-7) or b1 (dims 8-15) of one n tile. Registers: {b0, b1} of
// keys 0-7, then {b0, b1} of keys 8-15.
__device__ __forceinline__ void load_key_fragments(unsigned (&b)[4], const Element* k_tile, int first_key,
                                                   int first_dim, int lane) {
    const int key = first_key + lane % 8 + 8 * (lane / 16);
    const int dim = first_dim + 8 * (lane / 8 % 2);
    ldmatrix_x4(b, k_tile + key * kRowStride + dim);
}

// B fragments of V for 16 keys (the k of P V) and 16 dims (two n tiles of 8): V is stored key-major, the B operand
// wants each lane's pair along the keys, so ldmatrix .trans. Registers: {b0 = keys 0-7, b1 = keys 8-15} of dims 0-7,
// then the same of dims 8-15.
__device__ __forceinline__ void load_value_fragments(unsigned (&b)[4], const Element* v_tile, int first_key,
                                                     int first_dim, int lane) {
    const int key = first_key + lane % 8 + 8 * (lane / 8 % 2);
    const int dim = first_dim + 8 * (lane / 16);
    ldmatrix_x4_trans(b, v_tile + key * kRowStride + dim);
}

// ---- the tile's math ---------------------------------------------------------------------------------------------
// Accumulator layout of an m16n8 tile (PTX ISA, mma.m16n8k16 C/D): lane = 4 g + t holds rows g (c0, c1) and g + 8
// (c2, c3), columns 2t and 2t + 1. So scores[n][2 r + e] is row g + 8 r, key 8 n + 2 t + e of the tile.

// S = Q K^T for this warp's 16 rows and the tile's Bc keys, unscaled.
__device__ __forceinline__ void compute_scores(float (&scores)[kKeyGroups][4],
                                               const unsigned (&q_fragments)[kDimSteps][4], const Element* k_tile,
                                               int lane) {
#pragma unroll
    for (int n = 0; n < kKeyGroups; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) scores[n][e] = 0.0f;
#pragma unroll
    for (int key_pair = 0; key_pair < kKeyGroups / 2; ++key_pair) {
#pragma unroll
        for (int step = 0; step < kDimSteps; ++step) {
            unsigned b[4];
            load_key_fragments(b, k_tile, 16 * key_pair, 16 * step, lane);
            const unsigned b_low[2] = {b[0], b[1]};
            const unsigned b_high[2] = {b[2], b[3]};
            mma_m16n8k16<Element>(scores[2 * key_pair], q_fragments[step], b_low);
            mma_m16n8k16<Element>(scores[2 * key_pair + 1], q_fragments[step], b_high);
        }
    }
}

// Turns the tile's raw scores q . k into the softmax's logits in place: scale, softcap, ALiBi (HeadMask::score), and
// -inf for keys a row may not see, before the row max: padding, window (causal), past the batch entry's lengths
// (which the zero-filled tail of the last tile would otherwise score as 0).
__device__ __forceinline__ void score_tile(float (&scores)[kKeyGroups][4], const HeadMask& mask,
                                           const unsigned char* key_keep, float scale, int first_key,
                                           int first_query, int lane) {
#pragma unroll
    for (int n = 0; n < kKeyGroups; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int key = first_key + 8 * n + 2 * (lane % 4) + e;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int query = first_query + lane / 4 + 8 * r;
                float& score = scores[n][2 * r + e];
                score = is_visible(mask, key_keep, query, key) ? mask.score(score * scale, query, key)
                                                               : negative_infinity();
            }
        }
    }
}

// The online softmax of a lane's two rows: updates m (the row max of the logits) and the lane's part of l, rescales
// O, and turns the logits into P = exp(S - m) in place.
__device__ __forceinline__ void online_softmax(float (&scores)[kKeyGroups][4], float (&row_max)[2],
                                               float (&lane_row_sum)[2], float (&o)[kDimGroups][4]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float tile_max = negative_infinity();
#pragma unroll
        for (int n = 0; n < kKeyGroups; ++n) tile_max = fmaxf(tile_max, fmaxf(scores[n][2 * r], scores[n][2 * r + 1]));
        // The 4 lanes of a quad hold the same row.
        tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarp, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarp, tile_max, 2));
        const float new_max = fmaxf(row_max[r], tile_max);
        // Until a row sees a key its max is -inf; shifting by 0 then keeps exp2() at 0 instead of NaN.
        const float shift = new_max == negative_infinity() ? 0.0f : new_max * kLog2E;
        const float rescale = exp2f(row_max[r] * kLog2E - shift);
        row_max[r] = new_max;
        float tile_sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kKeyGroups; ++n) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float p = exp2f(fmaf(scores[n][2 * r + e], kLog2E, -shift));
                scores[n][2 * r + e] = p;
                tile_sum += p;
            }
        }
        lane_row_sum[r] = lane_row_sum[r] * rescale + tile_sum;
#pragma unroll
        for (int n = 0; n < kDimGroups; ++n) {
            o[n][2 * r] *= rescale;
            o[n][2 * r + 1] *= rescale;
        }
    }
}

// Dropout of P after l has summed it (the log-sum-exp is the undropped one): each weight becomes 0 or P / (1 - p),
// from the Philox draw of its (batch x head, query, key), which the backward kernels draw again. The draws run one
// at a time into a bit mask (a rolled loop): unrolled, ptxas interleaves several 10-round Philox chains for
// latency and the forward spills at d = 64 and 128 under its 168-register cap.
__device__ __forceinline__ void drop_weights(float (&p)[kKeyGroups][4], const Dropout& dropout, int batch_head,
                                             int first_key, int first_query, int lane) {
    static_assert(kKeyGroups * 4 <= 32, "one bit per element of the lane's part of the tile");
    unsigned kept = 0;
#pragma unroll 1
    for (int element = 0; element < kKeyGroups * 4; ++element) {
        const int n = element / 4, i = element % 4;  // p[n][i]: row g + 8 (i / 2), key 8 n + 2 t + i % 2
        const float factor = dropout.factor(batch_head, first_query + lane / 4 + 8 * (i / 2),
                                            first_key + 8 * n + 2 * (lane % 4) + i % 2);
        kept |= (factor != 0.0f ? 1u : 0u) << element;
    }
#pragma unroll
    for (int n = 0; n < kKeyGroups; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) p[n][i] = kept >> (4 * n + i) & 1u ? p[n][i] * dropout.scale : 0.0f;
}

// O += P V. P's accumulator layout (scores) is the A layout of m16n8k16: for the k step over keys 16s .. 16s + 15,
// a0 = row g, keys 2t, 2t+1 (n tile 2s, c0 c1); a1 = row g+8 (n tile 2s, c2 c3); a2, a3 the same of n tile 2s + 1.
__device__ __forceinline__ void accumulate_values(float (&o)[kDimGroups][4], const float (&p)[kKeyGroups][4],
                                                  const Element* v_tile, int lane) {
#pragma unroll
    for (int step = 0; step < kKeySteps; ++step) {
        const unsigned a[4] = {
            pack2<Element>(p[2 * step][0], p[2 * step][1]),
            pack2<Element>(p[2 * step][2], p[2 * step][3]),
            pack2<Element>(p[2 * step + 1][0], p[2 * step + 1][1]),
            pack2<Element>(p[2 * step + 1][2], p[2 * step + 1][3]),
        };
#pragma unroll
        for (int dim_pair = 0; dim_pair < kDimGroups / 2; ++dim_pair) {
            unsigned b[4];
            load_value_fragments(b, v_tile, 16 * step, 16 * dim_pair, lane);
            const unsigned b_low[2] = {b[0], b[1]};
            const unsigned b_high[2] = {b[2], b[3]};
            mma_m16n8k16<Element>(o[2 * dim_pair], a, b_low);
            mma_m16n8k16<Element>(o[2 * dim_pair + 1], a, b_high);
        }
    }
}

// O / l rounded once to the element type, and L = m + log(l), for the rows of the padded layout. A row that saw no
// key (l = 0: past the batch entry's T_b, or every key masked) gets zeros and L = -inf.
__device__ __forceinline__ void store_results(Element* out, float* logsumexp, const float (&o)[kDimGroups][4],
                                              const float (&row_max)[2], const float (&lane_row_sum)[2],
                                              int first_query, int query_len, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float row_sum = lane_row_sum[r];
        row_sum += __shfl_xor_sync(kFullWarp, row_sum, 1);
        row_sum += __shfl_xor_sync(kFullWarp, row_sum, 2);
        const float inverse_sum = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
        const int query = first_query + lane / 4 + 8 * r;
        if (query >= query_len) continue;
        unsigned* row = reinterpret_cast<unsigned*>(out + static_cast<size_t>(query) * kHeadDim);
#pragma unroll
        for (int n = 0; n < kDimGroups; ++n)
            row[4 * n + lane % 4] = pack2<Element>(o[n][2 * r] * inverse_sum, o[n][2 * r + 1] * inverse_sum);
        if (lane % 4 == 0)
            logsumexp[query] = row_sum > 0.0f ? row_max[r] + logf(row_sum) : negative_infinity();
    }
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
flash_attention_tc_forward(const Element* __restrict__ q, const Element* __restrict__ k,
                           const Element* __restrict__ v, const unsigned char* __restrict__ key_keep,
                           Element* __restrict__ out, float* __restrict__ logsumexp, int n_query_heads,
                           int n_kv_heads, int query_len, int key_len, const int* __restrict__ query_lens,
                           const int* __restrict__ key_lens, float scale, int window_left, int window_right,
                           float softcap, const float* __restrict__ alibi_slopes, int alibi_batch_stride,
                           unsigned int dropout_threshold, float dropout_scale, unsigned long long dropout_seed,
                           unsigned int dropout_offset) {
    __shared__ SharedTiles shared;
    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;

    // Where this block's (batch, query head) lives, and its K/V head under grouped-query attention.
    const int batch = blockIdx.y / n_query_heads;
    const int query_head = blockIdx.y % n_query_heads;
    const int kv_head = query_head / (n_query_heads / n_kv_heads);
    const size_t query_rows = static_cast<size_t>(batch * n_query_heads + query_head) * query_len;
    const size_t key_rows = static_cast<size_t>(batch * n_kv_heads + kv_head) * key_len;
    q += query_rows * kHeadDim;
    out += query_rows * kHeadDim;
    logsumexp += query_rows;
    k += key_rows * kHeadDim;
    v += key_rows * kHeadDim;
    key_keep += static_cast<size_t>(batch) * key_len;
    const HeadMask mask = head_mask(batch, query_head, query_lens, key_lens, window_left, window_right, softcap,
                                    alibi_slopes, alibi_batch_stride);
    const Dropout dropout{dropout_threshold, dropout_scale, dropout_seed, dropout_offset};

    // The key tiles that hold a key some query of the block sees; the others are never loaded.
    const int block_first_query = blockIdx.x * kQueryTile;
    const int warp_first_query = block_first_query + 16 * warp;
    const int2 keys = mask.keys_seen_by(block_first_query, block_first_query + kQueryTile - 1);
    const int first_key = first_tile(keys.x, kKeyTile);
    const int n_key_tiles = (keys.y - first_key + kKeyTile - 1) / kKeyTile;

    // Prologue: Q into stage 1's space, the first key tile into stage 0; then Q's fragments into registers. Rows past
    // the batch entry's lengths are zero-filled: what the padded layout holds there is never read.
    Element* q_tile = shared.stage[1];
    start_tile_copy<kQueryTile>(q_tile, q, block_first_query, mask.query_len);
    if (n_key_tiles > 0) start_key_value_copy(shared, 0, k, v, first_key, mask.key_len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();  // every thread's copies of Q have landed
    unsigned q_fragments[kDimSteps][4];
    load_query_fragments(q_fragments, q_tile, warp, lane);

    float row_max[2] = {negative_infinity(), negative_infinity()};  // m
    float lane_row_sum[2] = {0.0f, 0.0f};                             // this lane's part of l
    float o[kDimGroups][4] = {};

    for (int tile = 0; tile < n_key_tiles; ++tile) {
        cp_async_wait<0>();  // this thread's copies of tile `tile` have landed
        // Every thread's copies have landed, and every warp is done with the other stage (tile - 1, or Q's
        // fragments the first time), which the prefetch below overwrites.
        __syncthreads();
        const int tile_first_key = first_key + tile * kKeyTile;
        if (tile + 1 < n_key_tiles)
            start_key_value_copy(shared, (tile + 1) % 2, k, v, tile_first_key + kKeyTile, mask.key_len);
        cp_async_commit();

        float scores[kKeyGroups][4];
        compute_scores(scores, q_fragments, key_tile(shared, tile % 2), lane);
        score_tile(scores, mask, key_keep, scale, tile_first_key, warp_first_query, lane);
        online_softmax(scores, row_max, lane_row_sum, o);
        if (dropout.active()) drop_weights(scores, dropout, blockIdx.y, tile_first_key, warp_first_query, lane);
        accumulate_values(o, scores, value_tile(shared, tile % 2), lane);
    }

    store_results(out, logsumexp, o, row_max, lane_row_sum, warp_first_query, query_len, lane);
}
