// FlashAttention-2 in float32 on CUDA cores: the forward pass, and the backward pass in three kernels.
//
// Notation (Dao 2023), for one (batch, query head): Q (T x d), K and V (S x d) of the K/V head it reads,
// scale = 1/sqrt(d) unless the caller gives another. Which keys a query sees and what its scores become is
// attention_mask.cuh's (issue 17): per-batch lengths T_b <= T and S_b <= S within the padded arrays, a window aligned
// bottom-right (causal is the window's right bound 0: the last query sees every key), key_keep[j] on top; the score
// is c(scale q.k) + ALiBi bias, c the softcap; dropout multiplies P by Z = keep / (1 - p) from Philox.
// Tiles: Br rows (queries in forward and dQ, keys in dK/dV) per block, Bc = 32 columns per step, one per lane.
//
// Forward, one block per (Br queries, batch x query head); m = -inf, l = 0, O_i = 0:
//     for each key tile j holding a key that one of the block's queries sees (the others are never loaded):
//         S_ij  = c(scale * Q_i K_j^T) + bias_ij         lane c of a warp computes column c of its rows
//         m_new = max(m, rowmax(S_ij));  P_ij = exp(S_ij - m_new)
//         l     = exp(m - m_new) l + rowsum(P_ij)        each lane keeps the sum of its own column; reduced once
//         O_i   = exp(m - m_new) O_i + (Z_ij P_ij) V_j   lane c now owns head-dim columns c, c + 32, ...
//     O_i = O_i / l;  L_i = m + log(l), undropped.  A row with no visible key gets O_i = 0 and L_i = -inf.
//
// Backward, with D_i = rowsum(dO_i * O_i) (called `delta` below, since d is the head dim):
//     flash_attention_backward_delta: one warp per row computes D_i.
//     flash_attention_backward_dkdv, one block per (Br keys, batch x K/V head), looping over the query tiles that
//     see one of its keys, of every query head that reads this K/V head (grouped-query attention by index):
//         P_ij = exp(S_ij - L_i)  recomputed from L;  dV_j += (Z_ij P_ij)^T dO_i
//         dP_ij = Z_ij dO_i V_j^T;  dS_ij = P_ij * (dP_ij - D_i) * c'(scale q.k);  dK_j += scale dS_ij^T Q_i
//     flash_attention_backward_dq, one block per (Br queries, batch x query head), looping over key tiles:
//         the same P_ij and dS_ij;  dQ_i += scale dS_ij K_j
//     dQ gets a pass of its own rather than atomicAdd from the dK/dV blocks: the result is deterministic (the order
//     of float atomics would change the sum from run to run), dQ needs no zeroed buffer, and no block waits on
//     atomic traffic to the same rows. The price is recomputing S and dP: 7 matmul-sized products instead of 5.
//     D_i = sum_j Z_ij P_ij dO_i V_j^T = sum_j P_ij dP_ij, so dS has FlashAttention's form with dropout too.
//
// Launch: 128 threads = 4 warps; a warp owns R consecutive rows of the block's Br = 4R rows.
//     forward and dQ: grid (ceil(T / Br), B * Hq); dK/dV: grid (ceil(S / Br), B * Hkv);
//     delta: grid (ceil(B * Hq * T / 4)), one warp per row.
// Shared memory (static; float32): the block's rows of Q (or K, V) at stride d, broadcast to all lanes; the 32-row
//     column tiles at stride d + 1, so that 32 lanes reading one column each hit 32 different banks; and per warp
//     an R x 32 tile of P (or dS) that hands a lane's column over to the lanes that own output columns.
//     Up to d = 128 two column tiles sit side by side (K and V; Q and dO in dK/dV); past it one buffer takes them
//     in turn (COLUMN_TILES=1), refilled behind barriers. R comes from the compile options: the largest of 8, 4, 2,
//     1 that keeps a kernel within 48 KiB of static shared memory, the most a block gets without opting in, and at
//     most 32 accumulators per thread (tinytf/kernels/__init__.py works it out).
// Registers: the R x ceil(d / 32) output accumulators (two sets in dK/dV), R scores, and the softmax state; at
//     most 128 per thread for forward and dQ, 168 for dK/dV (the launch bounds), no spills. The compile gate
//     (python -m tinytf.kernels.compile_gate) prints registers, shared memory and occupancy per kernel and arch.
//
// Compile: the options of tinytf.kernels.flash_attention_variant(d).options, which cupy.RawModule gets, with
// attention_mask.cuh inlined (tinytf.kernels.kernel_source); NVRTC as CuPy runs it, for d = 64 on an A100:
//     --std=c++17 -DHEAD_DIM=64 -DFORWARD_ROWS_PER_WARP=8 -DBACKWARD_ROWS_PER_WARP=8 -DCOLUMN_TILES=2 -ftz=true
//     -arch=sm_80
// Variants are the head dims of tinytf.kernels.HEAD_DIMS, 16 to 256 (any d <= 256 would compute correctly: lanes
// past d sit idle). Float32 only. On the CPU the same file runs under tinytf.kernels.emulator (g++ with
// cuda_emulator.h).

#if !defined(HEAD_DIM) || !defined(FORWARD_ROWS_PER_WARP) || !defined(BACKWARD_ROWS_PER_WARP) || !defined(COLUMN_TILES)
#error "compile with the options of tinytf.kernels.flash_attention_variant(head_dim).options"
#endif

#include "attention_mask.cuh"

constexpr int kHeadDim = HEAD_DIM;
static_assert(kHeadDim >= 1 && kHeadDim <= 256, "head dims from 1 to 256");
constexpr int kForwardRows = FORWARD_ROWS_PER_WARP;    // R of the forward kernel
constexpr int kBackwardRows = BACKWARD_ROWS_PER_WARP;  // R of the dQ and dK/dV kernels
// Column tiles in shared memory: 2 (K and V, or Q and dO, side by side), or 1 for head dims past 128, where two
// would not fit in 48 KiB: the second operand then refills the buffer once every warp is done with the first.
constexpr int kColumnTiles = COLUMN_TILES;
static_assert(kColumnTiles == 1 || kColumnTiles == 2, "one or two column tiles");

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr unsigned kFullWarp = 0xffffffffu;
// Asking for 4 resident blocks caps registers at 65536 / (4 * 128) = 128 per thread. Naming a block count also
// matters on its own: with a thread count alone, ptxas picked register targets that spilled a few bytes.
constexpr int kMinBlocksPerSM = 4;
// dK/dV holds two accumulator sets and, with dropout, Philox's rounds for R keys at once: at 128 registers sm_70
// spilled a few bytes, so it asks for 3 blocks (168 registers); at d >= 64 shared memory allows at most 3 anyway.
constexpr int kDkdvMinBlocksPerSM = 3;
constexpr int kColumnTile = kWarpSize;                // Bc: one column of a step per lane
constexpr int kColumnStride = kHeadDim + 1;           // padded stride of column tiles: conflict-free lane reads
constexpr int kColumnsPerLane = (kHeadDim + kWarpSize - 1) / kWarpSize;

__device__ __forceinline__ float negative_infinity() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float positive_infinity() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float warp_max(float value) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        value = fmaxf(value, __shfl_xor_sync(kFullWarp, value, offset));
    return value;
}

__device__ __forceinline__ float warp_sum(float value) {
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullWarp, value, offset);
    return value;
}

// Copies rows [first_row, first_row + n_rows) of a (total_rows x d) matrix into a tile of the given row stride,
// with zeros past the matrix's end. All threads of the block take part; the caller synchronizes.
__device__ __forceinline__ void load_rows(float* tile, int stride, int n_rows, const float* __restrict__ matrix,
                                          int first_row, int total_rows) {
    for (int index = threadIdx.x; index < n_rows * kHeadDim; index += kThreads) {
        const int row = index / kHeadDim;
        const int column = index % kHeadDim;
        const int source_row = first_row + row;
        tile[row * stride + column] =
            source_row < total_rows ? matrix[static_cast<size_t>(source_row) * kHeadDim + column] : 0.0f;
    }
}

// The one-buffer build's refill of its column tile: a barrier so that no warp still reads the old operand, the load,
// and a barrier so that every warp sees the new one.
__device__ __forceinline__ void refill_column_tile(float* tile, const float* __restrict__ matrix, int first_row,
                                                   int total_rows) {
    __syncthreads();
    load_rows(tile, kColumnStride, kColumnTile, matrix, first_row, total_rows);
    __syncthreads();
}

// scores[r] = dot(rows[r], column_tile[lane]) over the head dim. All lanes read rows[r][k] at the same address
// (a broadcast) and column_tile[lane][k] at stride d + 1 (32 different banks).
template <int ROWS>
__device__ __forceinline__ void dot_rows_with_lane_column(const float* rows, const float* column_tile, int lane,
                                                          float (&scores)[ROWS]) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) scores[r] = 0.0f;
    const float* lane_column = column_tile + lane * kColumnStride;
#pragma unroll 4
    for (int k = 0; k < kHeadDim; ++k) {
        const float x = lane_column[k];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) scores[r] += rows[r * kHeadDim + k] * x;
    }
}

// accumulator[r][c] += sum over j < 32 of weights[r][j] * column_tile[j][lane + 32 c]: the product of a warp's
// (ROWS x 32) weight tile with a (32 x d) column tile, each lane owning head-dim columns lane, lane + 32, ...
template <int ROWS>
__device__ __forceinline__ void accumulate_weighted_columns(const float* weights, const float* column_tile, int lane,
                                                            float (&accumulator)[ROWS][kColumnsPerLane]) {
    for (int j = 0; j < kColumnTile; ++j) {
        float x[kColumnsPerLane];
#pragma unroll
        for (int c = 0; c < kColumnsPerLane; ++c) {
            const int column = lane + c * kWarpSize;
            x[c] = column < kHeadDim ? column_tile[j * kColumnStride + column] : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float weight = weights[r * kColumnTile + j];
#pragma unroll
            for (int c = 0; c < kColumnsPerLane; ++c) accumulator[r][c] += weight * x[c];
        }
    }
}

// Writes scale * a warp's ROWS x d block of results, for the rows that exist.
template <int ROWS>
__device__ __forceinline__ void store_rows(float* __restrict__ matrix, int first_row, int total_rows, int lane,
                                           const float (&accumulator)[ROWS][kColumnsPerLane], float scale) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = first_row + r;
        if (row >= total_rows) break;
#pragma unroll
        for (int c = 0; c < kColumnsPerLane; ++c) {
            const int column = lane + c * kWarpSize;
            if (column < kHeadDim) matrix[static_cast<size_t>(row) * kHeadDim + column] = scale * accumulator[r][c];
        }
    }
}

// Where the heads of one (batch, query head) pair live: its K/V head follows from grouped-query attention.
struct HeadOffsets {
    size_t query;      // into q, out, grad_out, grad_q (rows of d)
    size_t key;        // into k, v (rows of d)
    size_t row_stats;  // into logsumexp, delta
    size_t key_keep;   // into key_keep
};

__device__ __forceinline__ HeadOffsets head_offsets(int batch, int query_head, int n_query_heads, int n_kv_heads,
                                                    int query_len, int key_len) {
    const int kv_head = query_head / (n_query_heads / n_kv_heads);
    const size_t query_rows = static_cast<size_t>(batch * n_query_heads + query_head) * query_len;
    return {query_rows * kHeadDim, static_cast<size_t>(batch * n_kv_heads + kv_head) * key_len * kHeadDim,
            query_rows, static_cast<size_t>(batch) * key_len};
}

// The queries a block of the forward or dQ kernel owns, Br = 4R of them, R per warp, where their head lives, and the
// key tiles they must visit: those holding a key that one of them sees.
struct QueryBlock {
    HeadOffsets at;
    HeadMask mask;
    int batch_head;        // b * Hq + h: the dropout counter's word 2
    int first_query;       // the block's first query
    int warp_first_query;  // this warp's first query
    int2 keys;             // [begin, end): the keys any of the block's queries sees
};

template <int R>
__device__ __forceinline__ QueryBlock query_block(int n_query_heads, int n_kv_heads, int query_len, int key_len,
                                                  const int* __restrict__ query_lens, const int* __restrict__ key_lens,
                                                  int window_left, int window_right, float softcap,
                                                  const float* __restrict__ alibi_slopes, int alibi_batch_stride) {
    const int batch = blockIdx.y / n_query_heads;
    const int query_head = blockIdx.y % n_query_heads;
    const int first_query = blockIdx.x * kWarps * R;
    const HeadMask mask = head_mask(batch, query_head, query_lens, key_lens, window_left, window_right, softcap,
                                    alibi_slopes, alibi_batch_stride);
    return {head_offsets(batch, query_head, n_query_heads, n_kv_heads, query_len, key_len), mask,
            static_cast<int>(blockIdx.y), first_query, first_query + static_cast<int>(threadIdx.x / kWarpSize) * R,
            mask.keys_seen_by(first_query, first_query + kWarps * R - 1)};
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
flash_attention_forward(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                        const unsigned char* __restrict__ key_keep, float* __restrict__ out,
                        float* __restrict__ logsumexp, int n_query_heads, int n_kv_heads, int query_len,
                        int key_len, const int* __restrict__ query_lens, const int* __restrict__ key_lens,
                        float scale, int window_left, int window_right, float softcap,
                        const float* __restrict__ alibi_slopes, int alibi_batch_stride,
                        unsigned int dropout_threshold, float dropout_scale, unsigned long long dropout_seed,
                        unsigned int dropout_offset) {
    constexpr int R = kForwardRows;
    __shared__ float q_rows[kWarps * R * kHeadDim];
    __shared__ float columns[kColumnTiles][kColumnTile * kColumnStride];  // K, V (V in K's place with one tile)
    __shared__ float p_weights[kWarps][R * kColumnTile];
    float* const k_columns = columns[0];
    float* const v_columns = columns[kColumnTiles - 1];

    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const QueryBlock block = query_block<R>(n_query_heads, n_kv_heads, query_len, key_len, query_lens, key_lens,
                                            window_left, window_right, softcap, alibi_slopes, alibi_batch_stride);
    const HeadOffsets& at = block.at;
    const HeadMask& mask = block.mask;
    const Dropout dropout{dropout_threshold, dropout_scale, dropout_seed, dropout_offset};
    const int warp_first_query = block.warp_first_query;
    const float* my_q_rows = q_rows + warp * R * kHeadDim;

    load_rows(q_rows, kHeadDim, kWarps * R, q + at.query, block.first_query, query_len);

    float row_max[R];      // m
    float lane_sum[R];     // this lane's part of l
    float o[R][kColumnsPerLane] = {};
#pragma unroll
    for (int r = 0; r < R; ++r) {
        row_max[r] = negative_infinity();
        lane_sum[r] = 0.0f;
    }

    for (int tile_first_key = first_tile(block.keys.x, kColumnTile); tile_first_key < block.keys.y;
         tile_first_key += kColumnTile) {
        __syncthreads();  // every warp is done with the previous K/V tile (and the first time: Q is loaded)
        load_rows(k_columns, kColumnStride, kColumnTile, k + at.key, tile_first_key, key_len);
        if constexpr (kColumnTiles == 2)
            load_rows(v_columns, kColumnStride, kColumnTile, v + at.key, tile_first_key, key_len);
        __syncthreads();

        float scores[R];
        dot_rows_with_lane_column<R>(my_q_rows, k_columns, lane, scores);
        const int key = tile_first_key + lane;
        const bool key_kept = key < key_len && key_keep[at.key_keep + key] != 0;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int query = warp_first_query + r;
            const float score = key_kept && mask.visible(query, key) ? mask.score(scores[r] * scale, query, key)
                                                                     : negative_infinity();
            const float new_max = fmaxf(row_max[r], warp_max(score));
            // Until a row sees a key its max is -inf; shifting by 0 then keeps exp() at 0 instead of NaN.
            const float shift = new_max == negative_infinity() ? 0.0f : new_max;
            const float p = __expf(score - shift);
            const float rescale = __expf(row_max[r] - shift);
            row_max[r] = new_max;
            lane_sum[r] = lane_sum[r] * rescale + p;  // l sums the weights before dropout
#pragma unroll
            for (int c = 0; c < kColumnsPerLane; ++c) o[r][c] *= rescale;
            p_weights[warp][r * kColumnTile + lane] = p * dropout.factor(block.batch_head, query, key);
        }
        if constexpr (kColumnTiles == 1) refill_column_tile(v_columns, v + at.key, tile_first_key, key_len);
        __syncwarp();  // each lane reads the P of all 32 columns
        accumulate_weighted_columns<R>(p_weights[warp], v_columns, lane, o);
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const float row_sum = warp_sum(lane_sum[r]);  // l; at least 1 when the row saw a key
        const float inverse_sum = row_sum > 0.0f ? 1.0f / row_sum : 0.0f;
#pragma unroll
        for (int c = 0; c < kColumnsPerLane; ++c) o[r][c] *= inverse_sum;
        const int query = warp_first_query + r;
        if (lane == 0 && query < query_len)
            logsumexp[at.row_stats + query] = row_sum > 0.0f ? row_max[r] + logf(row_sum) : negative_infinity();
    }
    store_rows<R>(out + at.query, warp_first_query, query_len, lane, o, 1.0f);
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
flash_attention_backward_delta(const float* __restrict__ out, const float* __restrict__ grad_out,
                               float* __restrict__ delta, int n_rows) {
    const int row = blockIdx.x * kWarps + threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    if (row >= n_rows) return;  // whole warps leave together: no barrier follows that they would miss
    const size_t offset = static_cast<size_t>(row) * kHeadDim;
    float sum = 0.0f;
    for (int column = lane; column < kHeadDim; column += kWarpSize)
        sum += grad_out[offset + column] * out[offset + column];
    sum = warp_sum(sum);
    if (lane == 0) delta[row] = sum;
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
flash_attention_backward_dq(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                            const unsigned char* __restrict__ key_keep, const float* __restrict__ grad_out,
                            const float* __restrict__ logsumexp, const float* __restrict__ delta,
                            float* __restrict__ grad_q, int n_query_heads, int n_kv_heads, int query_len,
                            int key_len, const int* __restrict__ query_lens, const int* __restrict__ key_lens,
                            float scale, int window_left, int window_right, float softcap,
                            const float* __restrict__ alibi_slopes, int alibi_batch_stride,
                            unsigned int dropout_threshold, float dropout_scale, unsigned long long dropout_seed,
                            unsigned int dropout_offset) {
    constexpr int R = kBackwardRows;
    __shared__ float q_rows[kWarps * R * kHeadDim];
    __shared__ float grad_out_rows[kWarps * R * kHeadDim];
    __shared__ float columns[kColumnTiles][kColumnTile * kColumnStride];  // V, K (K in V's place with one tile)
    __shared__ float ds_weights[kWarps][R * kColumnTile];
    float* const v_columns = columns[0];
    float* const k_columns = columns[kColumnTiles - 1];

    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const QueryBlock block = query_block<R>(n_query_heads, n_kv_heads, query_len, key_len, query_lens, key_lens,
                                            window_left, window_right, softcap, alibi_slopes, alibi_batch_stride);
    const HeadOffsets& at = block.at;
    const HeadMask& mask = block.mask;
    const Dropout dropout{dropout_threshold, dropout_scale, dropout_seed, dropout_offset};
    const int warp_first_query = block.warp_first_query;

    load_rows(q_rows, kHeadDim, kWarps * R, q + at.query, block.first_query, query_len);
    load_rows(grad_out_rows, kHeadDim, kWarps * R, grad_out + at.query, block.first_query, query_len);

    float row_logsumexp[R];  // L
    float row_delta[R];      // D
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int query = min(warp_first_query + r, query_len - 1);  // rows past the end read a valid row, never used
        row_logsumexp[r] = logsumexp[at.row_stats + query];
        row_delta[r] = delta[at.row_stats + query];
    }
    float dq[R][kColumnsPerLane] = {};

    for (int tile_first_key = first_tile(block.keys.x, kColumnTile); tile_first_key < block.keys.y;
         tile_first_key += kColumnTile) {
        __syncthreads();  // every warp is done with the previous K/V tile (and the first time: Q, dO are loaded)
        load_rows(v_columns, kColumnStride, kColumnTile, v + at.key, tile_first_key, key_len);
        if constexpr (kColumnTiles == 2)
            load_rows(k_columns, kColumnStride, kColumnTile, k + at.key, tile_first_key, key_len);
        __syncthreads();

        float scores[R];
        float grad_p[R];
        dot_rows_with_lane_column<R>(grad_out_rows + warp * R * kHeadDim, v_columns, lane, grad_p);
        if constexpr (kColumnTiles == 1) refill_column_tile(k_columns, k + at.key, tile_first_key, key_len);
        dot_rows_with_lane_column<R>(q_rows + warp * R * kHeadDim, k_columns, lane, scores);
        const int key = tile_first_key + lane;
        const bool key_kept = key < key_len && key_keep[at.key_keep + key] != 0;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int query = warp_first_query + r;
            const float capped = mask.capped(scores[r] * scale);
            // A row that sees no key has L = -inf: the test must come first, exp() would give +inf.
            const float p = key_kept && mask.visible(query, key)
                                ? __expf(capped + mask.alibi_bias(query, key) - row_logsumexp[r])
                                : 0.0f;
            // dP of the undropped weights is the dropout factor times dO . V; softcap's derivative then turns
            // dS with respect to the capped score into dS with respect to scale * q . k.
            const float grad_weight = grad_p[r] * dropout.factor(block.batch_head, query, key);
            ds_weights[warp][r * kColumnTile + lane] = p * (grad_weight - row_delta[r]) * mask.capped_grad(capped);
        }
        __syncwarp();  // each lane reads the dS of all 32 columns
        accumulate_weighted_columns<R>(ds_weights[warp], k_columns, lane, dq);
    }

    store_rows<R>(grad_q + at.query, warp_first_query, query_len, lane, dq, scale);
}

extern "C" __global__ void __launch_bounds__(kThreads, kDkdvMinBlocksPerSM)
flash_attention_backward_dkdv(const float* __restrict__ q, const float* __restrict__ k,
                              const float* __restrict__ v, const unsigned char* __restrict__ key_keep,
                              const float* __restrict__ grad_out, const float* __restrict__ logsumexp,
                              const float* __restrict__ delta, float* __restrict__ grad_k,
                              float* __restrict__ grad_v, int n_query_heads, int n_kv_heads, int query_len,
                              int key_len, const int* __restrict__ query_lens, const int* __restrict__ key_lens,
                              float scale, int window_left, int window_right, float softcap,
                              const float* __restrict__ alibi_slopes, int alibi_batch_stride,
                              unsigned int dropout_threshold, float dropout_scale, unsigned long long dropout_seed,
                              unsigned int dropout_offset) {
    constexpr int R = kBackwardRows;
    __shared__ float k_rows[kWarps * R * kHeadDim];
    __shared__ float v_rows[kWarps * R * kHeadDim];
    __shared__ float columns[kColumnTiles][kColumnTile * kColumnStride];  // Q, dO (with one tile: Q, dO, Q again)
    __shared__ float p_weights[kWarps][R * kColumnTile];
    __shared__ float ds_weights[kWarps][R * kColumnTile];

    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int batch = blockIdx.y / n_kv_heads;
    const int kv_head = blockIdx.y % n_kv_heads;
    const int group_size = n_query_heads / n_kv_heads;
    const int block_first_key = blockIdx.x * kWarps * R;
    const int warp_first_key = block_first_key + warp * R;
    const HeadOffsets kv_at =
        head_offsets(batch, kv_head * group_size, n_query_heads, n_kv_heads, query_len, key_len);
    const Dropout dropout{dropout_threshold, dropout_scale, dropout_seed, dropout_offset};

    load_rows(k_rows, kHeadDim, kWarps * R, k + kv_at.key, block_first_key, key_len);
    load_rows(v_rows, kHeadDim, kWarps * R, v + kv_at.key, block_first_key, key_len);

    bool key_kept[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int key = warp_first_key + r;
        key_kept[r] = key < key_len && key_keep[kv_at.key_keep + key] != 0;
    }
    float dk[R][kColumnsPerLane] = {};
    float dv[R][kColumnsPerLane] = {};
    float* const q_columns = columns[0];
    float* const grad_out_columns = columns[kColumnTiles - 1];

    for (int head_in_group = 0; head_in_group < group_size; ++head_in_group) {
        const int query_head = kv_head * group_size + head_in_group;
        const HeadOffsets at = head_offsets(batch, query_head, n_query_heads, n_kv_heads, query_len, key_len);
        const HeadMask mask = head_mask(batch, query_head, query_lens, key_lens, window_left, window_right, softcap,
                                        alibi_slopes, alibi_batch_stride);
        const int batch_head = batch * n_query_heads + query_head;
        // Query tiles that see none of this block's keys (before the causal diagonal, outside the window) are skipped.
        const int2 queries = mask.queries_seeing(block_first_key, block_first_key + kWarps * R - 1);
        for (int tile_first_query = first_tile(queries.x, kColumnTile); tile_first_query < queries.y;
             tile_first_query += kColumnTile) {
            __syncthreads();  // every warp is done with the previous Q/dO tile (and the first time: K, V are loaded)
            load_rows(q_columns, kColumnStride, kColumnTile, q + at.query, tile_first_query, query_len);
            if constexpr (kColumnTiles == 2)
                load_rows(grad_out_columns, kColumnStride, kColumnTile, grad_out + at.query, tile_first_query,
                          query_len);
            __syncthreads();

            const int query = tile_first_query + lane;
            const int stats_row = min(query, query_len - 1);  // lanes past the end read a valid row, never used
            const float query_logsumexp = logsumexp[at.row_stats + stats_row];
            const float query_delta = delta[at.row_stats + stats_row];
            float scores[R];
            float grad_p[R];
            dot_rows_with_lane_column<R>(k_rows + warp * R * kHeadDim, q_columns, lane, scores);
            if constexpr (kColumnTiles == 1)
                refill_column_tile(grad_out_columns, grad_out + at.query, tile_first_query, query_len);
            dot_rows_with_lane_column<R>(v_rows + warp * R * kHeadDim, grad_out_columns, lane, grad_p);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int key = warp_first_key + r;
                const float capped = mask.capped(scores[r] * scale);
                const float p = key_kept[r] && mask.visible(query, key)
                                    ? __expf(capped + mask.alibi_bias(query, key) - query_logsumexp)
                                    : 0.0f;
                const float keep = dropout.factor(batch_head, query, key);
                p_weights[warp][r * kColumnTile + lane] = p * keep;  // dV takes the dropped weights, as O did
                ds_weights[warp][r * kColumnTile + lane] =
                    p * (grad_p[r] * keep - query_delta) * mask.capped_grad(capped);
            }
            __syncwarp();  // each lane reads the P and dS of all 32 queries
            accumulate_weighted_columns<R>(p_weights[warp], grad_out_columns, lane, dv);
            if constexpr (kColumnTiles == 1) refill_column_tile(q_columns, q + at.query, tile_first_query, query_len);
            accumulate_weighted_columns<R>(ds_weights[warp], q_columns, lane, dk);
        }
    }

    store_rows<R>(grad_k + kv_at.key, warp_first_key, key_len, lane, dk, scale);
    store_rows<R>(grad_v + kv_at.key, warp_first_key, key_len, lane, dv, 1.0f);
}
