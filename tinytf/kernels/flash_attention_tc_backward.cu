// FlashAttention-2's backward pass on tensor cores, bf16 or fp16 in and out, float32 inside: three kernels.
//
// Notation (Dao 2023), for one (batch, query head): Q, dO (T x d), K, V (S x d) of the K/V head it reads, O and the
// row log-sum-exp L from the forward pass (tinytf/kernels/flash_attention_tc.cu), scale = 1/sqrt(d) unless the
// caller gives another. Which keys a query sees and its logits are attention_mask.cuh's (issue 17): per-batch lengths
// T_b, S_b in arrays padded to T and S, the window (causal: right = 0) around query i's position i + S_b - T_b,
// key_keep, and the logit c(scale q . k) + ALiBi with the softcap c(s) = softcap tanh(s / softcap); dropout factors
// Z (0 or 1 / (1 - p)) are drawn again from the forward's Philox counters. A query that sees no key (L = -inf) gets
// zero gradients, and so do padding rows past T_b and keys past S_b, whatever the arrays hold there.
//
//     flash_attention_tc_backward_delta: D_i = rowsum(dO_i * O_i) in float32, one warp per row.
//     flash_attention_tc_backward_dkdv, one block per (Bc = 64 keys, batch x K/V head), looping over the query tiles
//     (Br rows) of every query head that reads its K/V head (grouped-query attention by index, no repeated K/V):
//         S^T  = K_j Q_i^T                  mma; rows = keys, so P^T and dS^T land in the layout of an A operand
//         P^T  = exp(c(scale S^T) + ALiBi - L_i)   selected to 0 where not visible (softmax_gradient)
//         dV_j += (Z P)^T dO_i              (Z P)^T rounded to the element type in registers; dO by ldmatrix.trans
//         dP^T = Z V_j dO_i^T;  dS^T = P^T * (dP^T - D_i) * c'(scale S^T);  dK_j += dS^T Q_i
//                                           (dS^T rounded, Q by ldmatrix.trans; c' = 1 - (c / softcap)^2)
//         dK_j, dV_j stay in float32 registers over the whole loop and are written once: dK = scale dK.
//     flash_attention_tc_backward_dq, one block per (Br = 64 queries, batch x query head), looping over key tiles
//     (Bc rows) that its queries can see:
//         S = Q_i K_j^T;  P = exp(c(scale S) + ALiBi - L_i);  dP = Z dO_i V_j^T;  dS = P * (dP - D_i) * c'(scale S);
//         dQ_i += scale dS K_j
//     A dK/dV block visits only the queries that see one of its keys (HeadMask::queries_seeing), a dQ block only the
//     key tiles that hold a key one of its queries sees (keys_seen_by): tiles outside the window, after the causal
//     diagonal or past the lengths are neither loaded nor computed.
//     dQ gets a pass of its own rather than atomicAdd from the dK/dV blocks, as in the float32 kernels: the result is
//     deterministic, needs no zeroed float32 buffer and no conversion pass; the price is recomputing S and dP.
//
// Tensor cores: every product is mma.sync.aligned.m16n8k16 (16 x 16 times 16 x 8, float32 accumulate). A warp owns
// 16 rows (keys in dK/dV, queries in dQ) and all d columns of its accumulators. The accumulator of a 16 x 16 product
// holds, per lane, (row g, columns 2t, 2t+1) and (row g + 8, ...) of each 8-column half (g = lane / 4, t = lane % 4):
// exactly the A fragment of the next product, so P and dS go from S to the next mma without leaving registers.
// Operands in shared memory are read with ldmatrix: plain for a factor stored as the mma wants it (K or V as A,
// Q or dO as the B of K Q^T), .trans for the right factor of a weighted sum of rows (dO, Q, K as B).
//
// Launch: 128 threads = 4 warps; the block's 64 rows are 16 per warp. Arguments of dK/dV and dQ: their arrays, then
//     attention_mask.cuh's list; delta: (out, grad_out, delta, n_rows).
//     dK/dV: grid (ceil(S / 64), B * Hkv);  dQ: grid (ceil(T / 64), B * Hq);  delta: grid (ceil(B * Hq * T / 4)).
// Tiles (rows of d elements, no padding): the block's 64 rows of K and V (or Q and dO), loaded once, and a double
//     buffer of the streamed tile (Q and dO in dK/dV, K and V in dQ), Br = Bc = 32 rows for d <= 64 and 16 for d = 96
//     and 128, loaded with cp.async one step ahead of its use. Why: 16 rows per warp is the mma's M; 4 warps share
//     each streamed tile, so it is read from global memory once per 64 rows; the streamed tile is as tall as the
//     48 KiB of static shared memory allow at d = 128 (the most a block gets without opting in, and the emulator
//     models no dynamic shared memory), and 32 rows below, where registers rather than shared memory run out first.
//     Static shared memory, 2 bytes per element, (2 * 64 + 2 * 2 * rows) * d:
//         d = 32: 16 KiB, d = 64: 32 KiB, d = 96: 36 KiB, d = 128: 48 KiB.
//     One ldmatrix reads 8 rows at the same logical 16-byte chunk; rows of 128 or 256 bytes (d = 64, 128) would put
//     all 8 on the same 4 banks, rows of 64 or 192 bytes (d = 32, 96) on 2 groups of them. The chunks of a row are
//     therefore stored XOR-swizzled with bits of the row index (swizzled()): 8 distinct bank groups, no padding.
// Registers: the dK/dV accumulators are 2 * 16 * d / 32 = d floats per thread, the dQ accumulator d / 2. Launch
//     bounds: dK/dV asks for 3 blocks per SM at d <= 64 (168 registers) and 2 above (255); dQ for 4 (128) and 3 (168).
//     ptxas (NVRTC 12.9, sm_80; sm_86 to sm_90 within 4 more) uses, for d = 32 / 64 / 96 / 128:
//         dK/dV 136 / 167 / 189 / 234, dQ 125 / 128 / 153 / 161, delta 11 to 23; no spills, no stack frame.
//     On an A100 that is 3 / 3 / 2 / 2 resident dK/dV blocks and 4 / 4 / 3 / 3 dQ blocks per SM (8 to 16 warps).
// Cost: 14 T S d flops per (batch, head) on tensor cores (dK/dV 8, dQ 6: S and dP are computed twice) for the
//     10 T S d of the gradients. Per mma (4096 flops) a warp reads 320 to 430 bytes of shared memory through ldmatrix
//     (K, V or Q, dO fragments are reloaded for each streamed tile, the price of holding d accumulators per thread),
//     more than an SM's 128 bytes per clock deliver in the 2 clocks an A100 SM needs per mma: shared memory, not the
//     tensor cores, bounds these kernels, at about 2/3 of the tensor-core peak.
//
// Compile: cupy.RawModule gets tinytf.kernels.kernel_source(this file), the text with its headers
// (flash_attention_tc.cuh, attention_mask.cuh, tensor_core.cuh) inlined, and
// tinytf.kernels.tensor_core_variant(d, dtype).options; CuPy adds CUDA's include folder (cuda_bf16.h, cuda_fp16.h)
// and -ftz=true. For d = 128 in bf16 on an A100, NVRTC as CuPy runs it:
//     --std=c++17 -DHEAD_DIM=128 -DELEMENT_BF16 -I<CUDA include> -ftz=true -arch=sm_80
// Head dims 32, 64, 96 and 128; sm_80 and later (mma.sync on bf16, cp.async). On the CPU the same file runs under
// tinytf.kernels.emulator, whose tensor_core.cuh half moves fragment elements exactly as the PTX ISA lays them out.

#include "flash_attention_tc.cuh"

constexpr int kWarpRows = 16;                       // the M of mma.m16n8k16: rows a warp owns
constexpr int kBlockRows = kWarps * kWarpRows;      // keys of a dK/dV block, queries of a dQ block
constexpr int kStreamRows = kHeadDim <= 64 ? 32 : 16;  // Br of dK/dV, Bc of dQ: what fits the double buffer
constexpr int kStreamColumnTiles = kStreamRows / 8;    // 8-column mma tiles across a product with the streamed rows
constexpr int kStreamSteps = kStreamRows / 16;         // 16-deep mma steps along the streamed rows
constexpr int kHeadColumnTiles = kHeadDim / 8;
constexpr int kHeadSteps = kHeadDim / 16;
constexpr int kChunk = 8;                           // elements in 16 bytes: one cp.async, one ldmatrix row
constexpr int kChunksPerRow = kHeadDim / kChunk;
// Blocks per SM the launch bounds ask for, which caps registers at 65536 / (128 * blocks) (and 255).
constexpr int kDkdvMinBlocks = kHeadDim > 64 ? 2 : 3;
constexpr int kDqMinBlocks = kHeadDim > 64 ? 3 : 4;

using Accumulator = float[4];  // one 16 x 8 C fragment: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)

// Element offset of (row, column) in a tile of d-element rows. The 16-byte chunks of a row are permuted by an XOR
// with bits of the row: the 8 rows that one ldmatrix reads at the same logical chunk then start in 8 different
// groups of 4 banks. Rows of 128 or 256 bytes (d = 64, 128) use the row's low 3 bits; rows of 64 or 192 bytes
// (d = 32, 96) already alternate between two bank halves, so bits 1 and 2 of the row suffice (and the chunk stays
// inside its aligned group of 4, which d / 8 = 4 or 12 chunks always contains).
__device__ __forceinline__ int swizzled(int row, int column) {
    const int chunk = column / kChunk;
    const int permuted = kChunksPerRow % 8 == 0 ? chunk ^ (row % 8) : chunk ^ ((row / 2) % 4);
    return row * kHeadDim + permuted * kChunk + column % kChunk;
}

// Starts the cp.async copies of rows [first_row, first_row + ROWS) of a (total_rows x d) matrix into a tile, zeros
// past the matrix's end. All threads of the block take part; the caller commits the group.
template <int ROWS>
__device__ __forceinline__ void load_tile_async(Element* tile, const Element* __restrict__ matrix, int first_row,
                                                int total_rows) {
    for (int chunk = threadIdx.x; chunk < ROWS * kChunksPerRow; chunk += kThreads) {
        const int row = chunk / kChunksPerRow;
        const int column = chunk % kChunksPerRow * kChunk;
        const bool in_bounds = first_row + row < total_rows;
        const int source_row = in_bounds ? first_row + row : 0;  // a valid address even where nothing is read
        cp_async_16(tile + swizzled(row, column), matrix + static_cast<size_t>(source_row) * kHeadDim + column,
                    in_bounds);
    }
}

// The A fragment of rows [first_row, first_row + 16), columns [first_column, first_column + 16) of a tile: the 8x8
// matrices (rows 0-7, columns 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) are registers a0 to a3.
__device__ __forceinline__ void load_a_fragment(unsigned (&a)[4], const Element* tile, int first_row,
                                                int first_column, int lane) {
    const int row = first_row + lane % 8 + 8 * (lane / 8 % 2);
    ldmatrix_x4(a, tile + swizzled(row, first_column + 8 * (lane / 16)));
}

// The B fragments of two 8-column tiles (n = first_n .. first_n + 15), k = first_k .. first_k + 15, from a tile that
// stores B transposed (row n, column k), as K in Q K^T: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
// (n 8-15, k 8-15) are b0, b1 of the first column tile, then of the second.
__device__ __forceinline__ void load_b_fragments_of_transposed(unsigned (&b)[2][2], const Element* tile, int first_n,
                                                               int first_k, int lane) {
    const int row = first_n + lane % 8 + 8 * (lane / 16);
    unsigned r[4];
    ldmatrix_x4(r, tile + swizzled(row, first_k + 8 * (lane / 8 % 2)));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// The same B fragments from a tile that stores B as it is (row k, column n), as V in P V: ldmatrix.trans of
// matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
__device__ __forceinline__ void load_b_fragments(unsigned (&b)[2][2], const Element* tile, int first_k, int first_n,
                                                 int lane) {
    const int row = first_k + lane % 8 + 8 * (lane / 8 % 2);
    unsigned r[4];
    ldmatrix_x4_trans(r, tile + swizzled(row, first_n + 8 * (lane / 16)));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// product (16 x COLUMNS) = rows [first_row, first_row + 16) of `rows` times the first COLUMNS rows of `columns`,
// transposed: S^T = K Q^T, dP^T = V dO^T, S = Q K^T, dP = dO V^T. Both tiles are d wide.
template <int COLUMNS>
__device__ __forceinline__ void multiply_by_transposed(Accumulator (&product)[COLUMNS / 8], const Element* rows,
                                                       int first_row, const Element* columns, int lane) {
#pragma unroll
    for (int tile = 0; tile < COLUMNS / 8; ++tile)
        for (float& element : product[tile]) element = 0.0f;
#pragma unroll
    for (int step = 0; step < kHeadSteps; ++step) {
        unsigned a[4];
        load_a_fragment(a, rows, first_row, 16 * step, lane);
#pragma unroll
        for (int pair = 0; pair < COLUMNS / 16; ++pair) {
            unsigned b[2][2];
            load_b_fragments_of_transposed(b, columns, 16 * pair, 16 * step, lane);
            mma_m16n8k16<Element>(product[2 * pair], a, b[0]);
            mma_m16n8k16<Element>(product[2 * pair + 1], a, b[1]);
        }
    }
}

// The accumulators of a 16 x COLUMNS product, rounded to Element, as the A fragments of that matrix in the next
// product: C tiles 2s and 2s + 1 hold exactly the elements of the A fragment of step s.
template <int COLUMNS>
__device__ __forceinline__ void to_a_fragments(unsigned (&a)[COLUMNS / 16][4],
                                               const Accumulator (&product)[COLUMNS / 8]) {
#pragma unroll
    for (int step = 0; step < COLUMNS / 16; ++step) {
        a[step][0] = pack2<Element>(product[2 * step][0], product[2 * step][1]);
        a[step][1] = pack2<Element>(product[2 * step][2], product[2 * step][3]);
        a[step][2] = pack2<Element>(product[2 * step + 1][0], product[2 * step + 1][1]);
        a[step][3] = pack2<Element>(product[2 * step + 1][2], product[2 * step + 1][3]);
    }
}

// sum (16 x d) += weights (16 x DEPTH, A fragments) times the first DEPTH rows of a d-wide tile: dV += P^T dO,
// dK += dS^T Q, dQ += dS K.
template <int DEPTH>
__device__ __forceinline__ void accumulate_weighted_rows(Accumulator (&sum)[kHeadColumnTiles],
                                                         const unsigned (&weights)[DEPTH / 16][4],
                                                         const Element* rows, int lane) {
#pragma unroll
    for (int step = 0; step < DEPTH / 16; ++step) {
#pragma unroll
        for (int pair = 0; pair < kHeadDim / 16; ++pair) {
            unsigned b[2][2];
            load_b_fragments(b, rows, 16 * step, 16 * pair, lane);
            mma_m16n8k16<Element>(sum[2 * pair], weights[step], b[0]);
            mma_m16n8k16<Element>(sum[2 * pair + 1], weights[step], b[1]);
        }
    }
}

// Writes scale * a warp's 16 x d accumulators as rows [first_row, first_row + 16) of a (total_rows x d) matrix, for
// the rows that exist. A lane writes its two adjacent columns as one 4-byte word.
__device__ __forceinline__ void store_rows(Element* __restrict__ matrix, int first_row, int total_rows,
                                           const Accumulator (&sum)[kHeadColumnTiles], float scale, int lane) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = first_row + lane / 4 + 8 * half;
        if (row >= total_rows) continue;
#pragma unroll
        for (int tile = 0; tile < kHeadColumnTiles; ++tile) {
            const int column = 8 * tile + 2 * (lane % 4);
            *reinterpret_cast<unsigned*>(matrix + static_cast<size_t>(row) * kHeadDim + column) =
                pack2<Element>(scale * sum[tile][2 * half], scale * sum[tile][2 * half + 1]);
        }
    }
}

// The softmax backward of one accumulator element, in place, from the query's L and D and the element's dropout
// factor Z (0 or 1 / (1 - p)): the raw score q . k becomes the dropped weight Z P that multiplies dO in dV, with
// P = exp(c(scale q . k) + alibi - L), and dP' = dO . v becomes the gradient of the scaled score,
// dS = P (Z dP' - D) c'(scale q . k) (Z dP' is dP, the gradient of P; c' the softcap's derivative). Both are 0 where
// the key is not visible, whatever the padding rows hold (L = -inf, D unset).
__device__ __forceinline__ void softmax_gradient(float& score, float& grad_p, bool visible, const HeadMask& mask,
                                                 int query, int key, float row_logsumexp, float row_delta,
                                                 float dropout_factor, float scale) {
    const float capped = mask.capped(score * scale);
    const float p = visible ? __expf(capped + mask.alibi_bias(query, key) - row_logsumexp) : 0.0f;
    score = p * dropout_factor;
    grad_p = visible ? p * (grad_p * dropout_factor - row_delta) * mask.capped_grad(capped) : 0.0f;
}

// Where the rows of one (batch, query head) live.
struct QueryHead {
    size_t rows;       // into q, grad_out, grad_q: first element of the head's (T x d) rows
    size_t row_stats;  // into logsumexp, delta
};

__device__ __forceinline__ QueryHead query_head(int batch, int head, int n_query_heads, int query_len) {
    const size_t first_row = static_cast<size_t>(batch * n_query_heads + head) * query_len;
    return {first_row * kHeadDim, first_row};
}

extern "C" __global__ void __launch_bounds__(kThreads)
flash_attention_tc_backward_delta(const Element* __restrict__ out, const Element* __restrict__ grad_out,
                                  float* __restrict__ delta, int n_rows) {
    const int row = blockIdx.x * kWarps + threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    if (row >= n_rows) return;  // whole warps leave together: no barrier follows that they would miss
    // Each lane reads pairs of elements as one 4-byte word.
    const unsigned* out_pairs = reinterpret_cast<const unsigned*>(out + static_cast<size_t>(row) * kHeadDim);
    const unsigned* grad_out_pairs = reinterpret_cast<const unsigned*>(grad_out + static_cast<size_t>(row) * kHeadDim);
    float sum = 0.0f;
    for (int pair = lane; pair < kHeadDim / 2; pair += kWarpSize) {
        const float2 o = unpack2<Element>(out_pairs[pair]);
        const float2 d_o = unpack2<Element>(grad_out_pairs[pair]);
        sum += o.x * d_o.x + o.y * d_o.y;
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullWarp, sum, offset);
    if (lane == 0) delta[row] = sum;
}

extern "C" __global__ void __launch_bounds__(kThreads, kDkdvMinBlocks)
flash_attention_tc_backward_dkdv(const Element* __restrict__ q, const Element* __restrict__ k,
                                 const Element* __restrict__ v, const unsigned char* __restrict__ key_keep,
                                 const Element* __restrict__ grad_out, const float* __restrict__ logsumexp,
                                 const float* __restrict__ delta, Element* __restrict__ grad_k,
                                 Element* __restrict__ grad_v, int n_query_heads, int n_kv_heads, int query_len,
                                 int key_len, const int* __restrict__ query_lens, const int* __restrict__ key_lens,
                                 float scale, int window_left, int window_right, float softcap,
                                 const float* __restrict__ alibi_slopes, int alibi_batch_stride,
                                 unsigned int dropout_threshold, float dropout_scale, unsigned long long dropout_seed,
                                 unsigned int dropout_offset) {
    alignas(16) __shared__ Element k_rows[kBlockRows * kHeadDim];
    alignas(16) __shared__ Element v_rows[kBlockRows * kHeadDim];
    alignas(16) __shared__ Element q_tiles[2][kStreamRows * kHeadDim];
    alignas(16) __shared__ Element grad_out_tiles[2][kStreamRows * kHeadDim];

    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int batch = blockIdx.y / n_kv_heads;
    const int kv_head = blockIdx.y % n_kv_heads;
    const int group_size = n_query_heads / n_kv_heads;
    const int block_first_key = blockIdx.x * kBlockRows;
    const int warp_first_key = block_first_key + warp * kWarpRows;
    const size_t kv_offset = static_cast<size_t>(batch * n_kv_heads + kv_head) * key_len * kHeadDim;  // into k, v
    // The query heads of the group share the lengths and the window; only their ALiBi slopes differ.
    auto mask_of = [&](int head) {
        return head_mask(batch, head, query_lens, key_lens, window_left, window_right, softcap, alibi_slopes,
                         alibi_batch_stride);
    };
    const HeadMask group_mask = mask_of(kv_head * group_size);
    const Dropout dropout{dropout_threshold, dropout_scale, dropout_seed, dropout_offset};

    // Only the queries that see a key of this block: the window (causal) and the lengths bound them on both sides.
    const int2 queries = group_mask.queries_seeing(block_first_key, block_first_key + kBlockRows - 1);
    const int query_begin = queries.x;
    const int tiles_per_head = (queries.y - query_begin + kStreamRows - 1) / kStreamRows;
    const int n_tiles = group_size * tiles_per_head;
    // Tile i: query head kv_head * group_size + i / tiles_per_head, queries from query_begin + (i % ...) * Br.
    auto tile_head_index = [&](int tile) { return kv_head * group_size + tile / tiles_per_head; };
    auto tile_head = [&](int tile) { return query_head(batch, tile_head_index(tile), n_query_heads, query_len); };
    auto tile_first_query = [&](int tile) { return query_begin + tile % tiles_per_head * kStreamRows; };
    // Rows past the batch entry's lengths are zero-filled: what the padded layout holds there is never read.
    auto load_query_tile = [&](int tile, int buffer) {
        const QueryHead head = tile_head(tile);
        load_tile_async<kStreamRows>(q_tiles[buffer], q + head.rows, tile_first_query(tile), group_mask.query_len);
        load_tile_async<kStreamRows>(grad_out_tiles[buffer], grad_out + head.rows, tile_first_query(tile),
                                     group_mask.query_len);
    };

    if (n_tiles > 0) {  // else nothing would read them, and a thread must not exit with copies in flight
        load_tile_async<kBlockRows>(k_rows, k + kv_offset, block_first_key, group_mask.key_len);
        load_tile_async<kBlockRows>(v_rows, v + kv_offset, block_first_key, group_mask.key_len);
        load_query_tile(0, 0);
    }
    cp_async_commit();

    bool key_kept[2];  // the lane's accumulator rows g and g + 8: keys of the block, the same for every query tile
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = warp_first_key + lane / 4 + 8 * half;
        key_kept[half] = key < group_mask.key_len && key_keep[static_cast<size_t>(batch) * key_len + key] != 0;
    }
    Accumulator dk[kHeadColumnTiles] = {};
    Accumulator dv[kHeadColumnTiles] = {};

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int buffer = tile % 2;
        if (tile + 1 < n_tiles) load_query_tile(tile + 1, 1 - buffer);
        cp_async_commit();  // an empty group at the end keeps "all but the newest group" meaning this tile
        cp_async_wait<1>();
        __syncthreads();  // every thread's copies of this tile (and the first time: of K and V) have landed

        const QueryHead head = tile_head(tile);
        const HeadMask mask = mask_of(tile_head_index(tile));
        const int batch_head = batch * n_query_heads + tile_head_index(tile);
        const int first_query = tile_first_query(tile);
        Accumulator scores[kStreamColumnTiles];  // S^T, then P^T
        Accumulator grad_p[kStreamColumnTiles];  // dP^T, then dS^T
        multiply_by_transposed<kStreamRows>(scores, k_rows, warp * kWarpRows, q_tiles[buffer], lane);
        multiply_by_transposed<kStreamRows>(grad_p, v_rows, warp * kWarpRows, grad_out_tiles[buffer], lane);
#pragma unroll
        for (int column_tile = 0; column_tile < kStreamColumnTiles; ++column_tile) {
#pragma unroll
            for (int pair = 0; pair < 2; ++pair) {  // the lane's two adjacent queries
                const int query = first_query + 8 * column_tile + 2 * (lane % 4) + pair;
                const size_t stats = head.row_stats + min(query, query_len - 1);  // past T: a valid row, unused
                const float query_logsumexp = logsumexp[stats];
                const float query_delta = delta[stats];
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int key = warp_first_key + lane / 4 + 8 * half;
                    const int index = 2 * half + pair;
                    softmax_gradient(scores[column_tile][index], grad_p[column_tile][index],
                                     key_kept[half] && mask.visible(query, key), mask, query, key,
                                     query_logsumexp, query_delta, dropout.factor(batch_head, query, key), scale);
                }
            }
        }
        unsigned p_fragments[kStreamSteps][4];
        to_a_fragments<kStreamRows>(p_fragments, scores);
        accumulate_weighted_rows<kStreamRows>(dv, p_fragments, grad_out_tiles[buffer], lane);
        unsigned ds_fragments[kStreamSteps][4];
        to_a_fragments<kStreamRows>(ds_fragments, grad_p);
        accumulate_weighted_rows<kStreamRows>(dk, ds_fragments, q_tiles[buffer], lane);
        __syncthreads();  // every warp is done with this buffer before the next step refills it
    }

    store_rows(grad_k + kv_offset, warp_first_key, key_len, dk, scale, lane);
    store_rows(grad_v + kv_offset, warp_first_key, key_len, dv, 1.0f, lane);
}

extern "C" __global__ void __launch_bounds__(kThreads, kDqMinBlocks)
flash_attention_tc_backward_dq(const Element* __restrict__ q, const Element* __restrict__ k,
                               const Element* __restrict__ v, const unsigned char* __restrict__ key_keep,
                               const Element* __restrict__ grad_out, const float* __restrict__ logsumexp,
                               const float* __restrict__ delta, Element* __restrict__ grad_q,
                               int n_query_heads, int n_kv_heads, int query_len, int key_len,
                               const int* __restrict__ query_lens, const int* __restrict__ key_lens, float scale,
                               int window_left, int window_right, float softcap,
                               const float* __restrict__ alibi_slopes, int alibi_batch_stride,
                               unsigned int dropout_threshold, float dropout_scale, unsigned long long dropout_seed,
                               unsigned int dropout_offset) {
    alignas(16) __shared__ Element q_rows[kBlockRows * kHeadDim];
    alignas(16) __shared__ Element grad_out_rows[kBlockRows * kHeadDim];
    alignas(16) __shared__ Element k_tiles[2][kStreamRows * kHeadDim];
    alignas(16) __shared__ Element v_tiles[2][kStreamRows * kHeadDim];

    const int warp = threadIdx.x / kWarpSize;
    const int lane = threadIdx.x % kWarpSize;
    const int batch = blockIdx.y / n_query_heads;
    const int head_index = blockIdx.y % n_query_heads;
    const int kv_head = head_index / (n_query_heads / n_kv_heads);
    const QueryHead head = query_head(batch, head_index, n_query_heads, query_len);
    const size_t kv_offset = static_cast<size_t>(batch * n_kv_heads + kv_head) * key_len * kHeadDim;  // into k, v
    const HeadMask mask = head_mask(batch, head_index, query_lens, key_lens, window_left, window_right, softcap,
                                    alibi_slopes, alibi_batch_stride);
    const Dropout dropout{dropout_threshold, dropout_scale, dropout_seed, dropout_offset};
    key_keep += static_cast<size_t>(batch) * key_len;

    // Only the key tiles that hold a key some query of the block sees.
    const int block_first_query = blockIdx.x * kBlockRows;
    const int warp_first_query = block_first_query + warp * kWarpRows;
    const int2 keys = mask.keys_seen_by(block_first_query, block_first_query + kBlockRows - 1);
    const int first_key = first_tile(keys.x, kStreamRows);
    const int n_tiles = (keys.y - first_key + kStreamRows - 1) / kStreamRows;
    // Rows past the batch entry's lengths are zero-filled: what the padded layout holds there is never read.
    auto load_key_tile = [&](int tile, int buffer) {
        const int tile_first_key = first_key + tile * kStreamRows;
        load_tile_async<kStreamRows>(k_tiles[buffer], k + kv_offset, tile_first_key, mask.key_len);
        load_tile_async<kStreamRows>(v_tiles[buffer], v + kv_offset, tile_first_key, mask.key_len);
    };

    if (n_tiles > 0) {  // else nothing would read them, and a thread must not exit with copies in flight
        load_tile_async<kBlockRows>(q_rows, q + head.rows, block_first_query, mask.query_len);
        load_tile_async<kBlockRows>(grad_out_rows, grad_out + head.rows, block_first_query, mask.query_len);
        load_key_tile(0, 0);
    }
    cp_async_commit();

    float row_logsumexp[2], row_delta[2];  // L and D of the lane's accumulator rows g and g + 8
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int query = min(warp_first_query + lane / 4 + 8 * half, query_len - 1);  // past T: valid, unused
        row_logsumexp[half] = logsumexp[head.row_stats + query];
        row_delta[half] = delta[head.row_stats + query];
    }
    Accumulator dq[kHeadColumnTiles] = {};

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int buffer = tile % 2;
        if (tile + 1 < n_tiles) load_key_tile(tile + 1, 1 - buffer);
        cp_async_commit();  // an empty group at the end keeps "all but the newest group" meaning this tile
        cp_async_wait<1>();
        __syncthreads();  // every thread's copies of this tile (and the first time: of Q and dO) have landed

        Accumulator scores[kStreamColumnTiles];  // S, then P
        Accumulator grad_p[kStreamColumnTiles];  // dP, then dS
        multiply_by_transposed<kStreamRows>(scores, q_rows, warp * kWarpRows, k_tiles[buffer], lane);
        multiply_by_transposed<kStreamRows>(grad_p, grad_out_rows, warp * kWarpRows, v_tiles[buffer], lane);
#pragma unroll
        for (int column_tile = 0; column_tile < kStreamColumnTiles; ++column_tile) {
#pragma unroll
            for (int pair = 0; pair < 2; ++pair) {  // the lane's two adjacent keys
                const int key = first_key + tile * kStreamRows + 8 * column_tile + 2 * (lane % 4) + pair;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int query = warp_first_query + lane / 4 + 8 * half;
                    const int index = 2 * half + pair;
                    softmax_gradient(scores[column_tile][index], grad_p[column_tile][index],
                                     is_visible(mask, key_keep, query, key), mask, query, key, row_logsumexp[half],
                                     row_delta[half], dropout.factor(blockIdx.y, query, key), scale);
                }
            }
        }
        unsigned ds_fragments[kStreamSteps][4];
        to_a_fragments<kStreamRows>(ds_fragments, grad_p);
        accumulate_weighted_rows<kStreamRows>(dq, ds_fragments, k_tiles[buffer], lane);
        __syncthreads();  // every warp is done with this buffer before the next step refills it
    }

    store_rows(grad_q + head.rows, warp_first_query, query_len, dq, scale, lane);
}
