"""FlashAttention-2 on arrays, tuned: exact attention without ever forming the (T, S) matrix of scores.

Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023).
Queries are cut into row tiles of Br positions, keys and values into column tiles of Bc positions; the scores of
one (Br, Bc) tile at a time are computed, used and dropped. The study version, flash_study.py, is the paper's
Algorithms 1 and 2 as written, with the same arguments (but num_threads) and results and none of the tricks below:
read it first. The tests check this file against it.

Forward (the paper's Algorithm 1), for each row tile i:
    m = -inf, l = 0, O_i = 0                               running row max, running row sum, unnormalized output
    for each column tile j that row tile i can see:
        S_ij  = Q_i K_j^T * scale                          (Br, Bc)
        m_new = max(m, rowmax(S_ij))
        P_ij  = exp(S_ij - m_new)
        l     = exp(m - m_new) * l + rowsum(P_ij)
        O_i   = exp(m - m_new) * O_i + P_ij V_j            rescale the accumulator once per tile
        m     = m_new
    O_i = O_i / l,  L_i = m + log(l)                       only O and the row log-sum-exp L are saved

Backward (Algorithm 2), with D = rowsum(dO * O) computed once, for each column tile j:
    for each row tile i that can see it:
        P_ij  = exp(Q_i K_j^T * scale - L_i)               recomputed from L: softmax without max or sum
        dV_j += P_ij^T dO_i
        dP_ij = dO_i V_j^T
        dS_ij = P_ij * (dP_ij - D_i)                       softmax backward, since rowsum(P * dP) = D
        dQ_i += dS_ij K_j * scale
        dK_j += dS_ij^T Q_i * scale

How this file maps that onto NumPy (the same code runs on CuPy); shapes use N = B * Hkv, d = head size, and Br
for the rows of a tile (Br positions times G heads, see below):
- Batch and heads: every tile is a stack of N matrices, multiplied by one batched matmul.
- Grouped-query attention: the G = Hq // Hkv query heads that share one K/V head are stacked as extra rows of the
  row tile (rows ordered (position, head)), so one matmul serves the whole group, and the matmuls that give dK_j and
  dV_j sum over the group by themselves. Repeated K/V is never built.
- Windows, aligned bottom-right: query t sits at key position t + S - T and sees keys s with
  t + S - T - left <= s <= t + S - T + right (masks.visibility; causal is the window (left, 0)). The visible keys
  form a diagonal band: tiles entirely outside it are skipped, tiles entirely inside are not masked, and only tiles
  that cross its edges get a -inf bias (as does a key-padding mask): Tiling and ScoreBias. A row can see no key at
  all (T > S causal, a narrow window, padding).
- Issue 17's score features, in the order: S = Q K^T * scale; S = c tanh(S / c) (softcap, _softcapped); S += ALiBi
  bias -slope * |t + S - T - s| (ScoreBias); masks; softmax; dropout of P from the Philox counter (Dropout), so the
  backward regenerates the forward's mask tile by tile. Softcap's backward multiplies dS by 1 - tanh^2.
- Matmuls do the row-wise arithmetic: with a column of ones appended to K and V, [K_j, 1] @ [Q_i^T; -m] = S_ij^T - m
  (forward), [V_j, 1] @ [dO_i^T; -D_i] = dP_ij^T - D_i, and P_ij @ [V_j, 1] = [P_ij V_j, rowsum(P_ij)]. Each of
  those saves a pass over the tile, and passes are what NumPy is slow at: _with_ones, _stacked_transposed. The
  backward's S_ij - L_i is the exception (below).
- Precision of the backward: P = exp(S - L) must cancel the forward's rounding of S, as the forward's own
  normalization does. So the backward forms S with the matmul the forward's first tile of a row uses (no subtracted
  column: BLAS sums one in an order of its own, which moves S by a rounding of |S|) and subtracts L after it; L is
  kept in float64, and its base-2 value is split into a rounded part L_hi, subtracted from the tile, and a row
  factor exp2(L_hi - L) folded into dO: _in_base_2. (The forward's later tiles do subtract m inside the matmul; on
  rows spread over many tiles that costs about the rounding of a plain float32 softmax.)
  tests/attention/test_flash_precision.py holds the gradients within 2x of PyTorch's CPU flash kernel.
- One change to Algorithm 1's bookkeeping (FlashAttention-4 makes the same one): m does not have to be the running
  max, only a value no score is far above. So m is set from a row's first keys, and a tile is re-done with the
  paper's update (m_new = max(m, rowmax S_ij), rescale O_i and l) only when some row's sum of exp2(S - m) passes
  2**64, or a row is still waiting for its first visible key. Usually that is the first tile of each row tile only,
  so the other tiles need no max, no rescaling and no separate row sum: _tile_with_kept_max, _tile_with_new_max.
- Score tiles are stored key-major, S_ji = S_ij^T laid out (Bc, N, Br): the row max (on the rare re-done tiles)
  reduces over the outermost axis, and m, L, D broadcast over it, over long contiguous stretches: _product.
- exp2 instead of exp (cheaper in NumPy, as on GPUs): log2(e) is folded into the scale that Q is multiplied by once,
  so S, m and L live in base 2 inside; L is returned in natural log (_normalized).
- Rows with no visible key: l stays 0; they get O = 0 and L = -inf, and the backward gives them P = 0.
- Work partitioning as in FA2: the forward hands row tiles to worker threads, the backward groups of column tiles
  (each group then owns its dK_j, dV_j and keeps its own share of dQ). NumPy drops the GIL inside matmul and ufuncs,
  and each tile's matmul is small enough that BLAS runs it on the calling thread, so the workers use all cores:
  threads.run_on_workers, _balanced_groups.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..functional.common import computes_in_float32
from ..tensor import Function
from ..threads import get_num_threads, run_on_workers
from .dropout import dropout_keep
from .masks import UNBOUNDED, normalized_window, visibility

LOG2_E, LN_2 = 1 / math.log(2), math.log(2)

# BLAS runs a small matmul on the calling thread and splits a bigger one across its own threads. For tile-sized
# matrices that split costs more than it gains, and it fights the worker threads below for the cores, so a tile's
# matmul (Br * G rows x Bc keys x (d + 1)) stays at or under this many multiply-adds, where BLAS starts to split
# (`python bench/attention.py --blas` shows where that is on a machine).
BLAS_SINGLE_THREAD_MACS = 1_000_000
TILE_ROWS = 64  # query rows per tile (Br * G); `python bench/attention.py --tiles` compares tile sizes
# Below this many scores per call (B * Hq * T * S) the worker threads cost more than they save.
MIN_SCORES_FOR_THREADS = 1 << 18
# The forward moves a row's m only when a tile's row sum of exp2(S - m) passes this (or the row had no key yet).
MAX_TILE_ROW_SUM = 2.0**64


def default_tile_sizes(G: int, d: int) -> tuple[int, int]:
    """(Br, Bc): 64 query rows (Br positions of G heads each) and the most keys that keep every tile matmul
    (64 rows x Bc keys x (d + 1) multiply-adds, with the column of ones) on the calling thread."""
    fits = (Bc for Bc in (256, 192, 128, 96, 64, 32) if TILE_ROWS * Bc * (d + 1) <= BLAS_SINGLE_THREAD_MACS)
    return max(1, TILE_ROWS // G), next(fits, 16)


class Tiling:
    """Which (row tile i, column tile j) pairs exist, and which of them the window (or causal mask) cuts.

    window: (left, right), normalized (masks.normalized_window; causal is right = 0): query t sees keys s with
    t + offset - left <= s <= t + offset + right, a bound of -1 dropping that side.
    """

    def __init__(self, T: int, S: int, G: int, Br: int, Bc: int, window: tuple[int, int] = (UNBOUNDED, UNBOUNDED)):
        self.T, self.S, self.G, self.Br, self.Bc, self.window = T, S, G, Br, Bc, window
        self.offset = S - T  # bottom-right alignment: query t sits at key position t + offset
        self.n_row_tiles = -(-T // Br)
        self.n_col_tiles = -(-S // Bc)

    def positions(self, i: int) -> tuple[int, int]:
        """First and last + 1 query position of row tile i."""
        return i * self.Br, min((i + 1) * self.Br, self.T)

    def rows(self, i: int) -> slice:
        """Row tile i in the (position, head-in-group) row layout: Br * G rows."""
        t0, t1 = self.positions(i)
        return slice(t0 * self.G, t1 * self.G)

    def cols(self, j: int) -> slice:
        return slice(j * self.Bc, min((j + 1) * self.Bc, self.S))

    def is_visible(self, i: int, j: int) -> bool:
        """False when no key of tile j is in the window of any query of tile i. The window is a diagonal band, so
        the tile meets it unless the band passes entirely above or below the tile."""
        (t0, t1), cols, (left, right) = self.positions(i), self.cols(j), self.window
        below = right != UNBOUNDED and cols.start > t1 - 1 + self.offset + right
        above = left != UNBOUNDED and cols.stop - 1 < t0 + self.offset - left
        return not (below or above)

    def crosses_window(self, i: int, j: int) -> bool:
        """True when some key of tile j is outside the window of some query of tile i."""
        (t0, t1), cols, (left, right) = self.positions(i), self.cols(j), self.window
        return ((right != UNBOUNDED and cols.stop - 1 > t0 + self.offset + right)
                or (left != UNBOUNDED and cols.start < t1 - 1 + self.offset - left))

    def visible_cols(self, i: int) -> list[int]:
        return [j for j in range(self.n_col_tiles) if self.is_visible(i, j)]

    def visible_rows(self, j: int) -> list[int]:
        return [i for i in range(self.n_row_tiles) if self.is_visible(i, j)]

    def query_positions(self, i: int, xp):
        """(Br * G,) the position of each row of row tile i (rows ordered (position, head-in-group))."""
        return xp.repeat(xp.arange(*self.positions(i)), self.G)

    def key_positions(self, j: int, xp):
        return xp.arange(self.cols(j).start, self.cols(j).stop)

    def hidden_keys(self, i: int, j: int, xp):
        """(Bc, Br * G) bool, key-major like the score tiles: True where key s is outside the row's window."""
        visible = visibility(self.query_positions(i, xp), self.key_positions(j, xp), self.T, self.S, self.window)
        return ~visible.T


def flash_attention_forward(Q, K, V, scale, is_causal=False, key_mask=None, block_q=None, block_k=None,
                            num_threads=None, *, window=None, softcap=None, alibi_slopes=None, dropout_p=0.0,
                            dropout_seed=0, dropout_offset=0, dropout_first_batch=0):
    """Q (B, Hq, T, d), K, V (B, Hkv, S, d) -> O (B, Hq, T, d), L (B, Hq, T): the output and row log-sum-exp.

    key_mask: None or bool (B or 1, S), True where a key may be attended (a key-padding mask).
    block_q, block_k: the tile sizes Br and Bc (default: default_tile_sizes); num_threads: default one per core.
    window: None or (left, right) (masks.normalized_window); softcap: None or c > 0, scores become c tanh(s / c);
    alibi_slopes: None or (Hq,) or (B, Hq), adds -slope * |t + S - T - s|; dropout_p, dropout_seed, dropout_offset:
    attention dropout from the Philox generator (attention/dropout.py); dropout_first_batch: the batch index of Q's
    first row in the Philox counter (varlen_attention runs sequence n as a batch of one). The order is the spec's:
    scale, softcap, ALiBi, masks, softmax, dropout.
    L is float64: the backward's P = exp(S - L) would carry a rounding of L, which grows with |L|, into every
    weight. A row that sees no key gets O = 0 and L = -inf.

    Algorithm 1 (flash_study.flash_attention_forward) with these tricks (module docstring): grouped query heads
    stacked as rows (_to_rows); tiles outside the window skipped, tiles crossing it masked by a cached bias (Tiling,
    ScoreBias); the lazy max (_tile_with_kept_max, else the paper's update _tile_with_new_max); ones columns so
    matmuls subtract m and sum rows (_with_ones, _stacked_transposed); key-major score tiles in reused buffers
    (_product, _scratch); exp2 with log2(e) folded into the scale (_normalized converts L back); row tiles on worker
    threads (run_on_workers).
    """
    xp = get_array_module(Q, K, V)
    B, Hq, T, _ = Q.shape
    Hkv = K.shape[1]
    out_dtype, dtype = Q.dtype, _compute_dtype(Q.dtype)
    tiling, n_threads = _plan(Q.shape, K.shape, is_causal, block_q, block_k, num_threads, xp, window)
    bias = ScoreBias(tiling, key_mask, alibi_slopes, B, Hkv, dtype, xp)
    dropout = None if dropout_p == 0 else Dropout(tiling, dropout_p, dropout_seed, dropout_offset,
                                                  dropout_first_batch * Hkv * tiling.G, B * Hkv, xp)
    softcap2 = None if softcap is None else softcap * LOG2_E  # c tanh(s / c) in base 2 is c2 tanh(s2 / c2)
    Q = _to_rows(Q, Hkv, dtype)  # (N, T*G, d), N = B*Hkv; a view of the input when G == 1
    K, V = _to_kv(K, dtype), _to_kv(V, dtype)  # (N, S, d)
    N, _, d = Q.shape
    O = xp.empty_like(Q)
    L = xp.empty((N, Q.shape[1]), np.float64)
    K1, V1 = _with_ones(K, xp), _with_ones(V, xp)  # (N, S, d + 1): the matmuls subtract m and sum rows

    def tile_scores(scratch, i, j, Q_m, m):
        """S_ij^T - m, (Bc, N, Br) in base 2: softcapped, biased and masked."""
        cols = tiling.cols(j)
        if softcap2 is None:
            S_ji = _product(scratch, "S", K1[:, cols], Q_m, xp)
        else:  # the cap needs S itself, so m is subtracted after it
            S_ji = _softcapped(_product(scratch, "S", K[:, cols], Q_m[:, :-1], xp), softcap2, xp)
            S_ji -= m
        bias(S_ji, i, j, scratch)
        return S_ji

    def forward_row_tiles(row_tiles):
        scratch = {}
        for i in row_tiles:
            rows = tiling.rows(i)
            Q_m = _stacked_transposed(Q[:, rows], scale * LOG2_E, (0,), xp)  # [Q_i^T * scale; -m], (N, d + 1, Br)
            m = xp.zeros((N, Q_m.shape[2]), dtype)  # (N, Br); S and m in base 2: log2(e) is in the scale
            O_l = xp.zeros((N, Q_m.shape[2], d + 1), dtype)  # [O_i, l]
            every_row_has_keys = False  # until then, m is a placeholder and tiles take the paper's update
            for j in tiling.visible_cols(i):
                S_ji = tile_scores(scratch, i, j, Q_m, m)
                P_ji = _scratch(scratch, "P", S_ji.shape, dtype, xp)
                keep = None if dropout is None else dropout.keep(i, j)
                V1_j = V1[:, tiling.cols(j)]
                PV_l = _tile_with_kept_max(S_ji, P_ji, V1_j, keep, xp) if every_row_has_keys else None
                if PV_l is None:  # a row sees its first keys, or scores far above its m
                    PV_l, every_row_has_keys = _tile_with_new_max(S_ji, P_ji, V1_j, keep, Q_m, m, O_l, xp)
                O_l += PV_l  # [O_i + P_ij V_j, l + rowsum(P_ij)]
            O[:, rows], L[:, rows] = _normalized(O_l, m, xp)

    def forward_row_tiles_quietly(row_tiles):
        with np.errstate(over="ignore", invalid="ignore"):  # exp2 may overflow on a kept m: _tile_with_kept_max sees it
            forward_row_tiles(row_tiles)

    # One row tile per task; under a causal mask the bottom row tiles see the most keys: hand them out first.
    run_on_workers(forward_row_tiles_quietly, [[i] for i in reversed(range(tiling.n_row_tiles))], n_threads)
    if dropout is not None:
        O *= dtype.type(1 / (1 - dropout_p))  # kept weights are scaled up; l, and so L, are the undropped ones
    O = _from_rows(O, B, tiling.G).astype(out_dtype, copy=False)
    L = _from_rows(L[..., None], B, tiling.G)[..., 0]
    return O, L


def flash_attention_backward(dO, Q, K, V, O, L, scale, is_causal=False, key_mask=None, block_q=None, block_k=None,
                             num_threads=None, *, window=None, softcap=None, alibi_slopes=None, dropout_p=0.0,
                             dropout_seed=0, dropout_offset=0, dropout_first_batch=0):
    """dO, Q, O (B, Hq, T, d), K, V (B, Hkv, S, d), L (B, Hq, T) -> dQ, dK, dV with the shapes of Q, K, V.
    The keywords are the forward's, with the same values.

    Algorithm 2 (flash_study.flash_attention_backward) with the forward's tricks, but no max to keep: a ones column
    so a matmul subtracts D_i (_with_ones, _stacked_transposed), key-major score tiles (_product), exp2, tiles
    outside the window skipped or masked (Tiling, ScoreBias), and groups of column tiles on worker threads, each
    with its own share of dQ (_balanced_groups, run_on_workers). S comes from the matmul the forward's first tile of
    a row uses, and L is subtracted after it as L_hi and a row factor folded into dO (_in_base_2): subtracted inside
    the matmul, or rounded once more, it would move P by a rounding of |S| or |L| that the forward's own
    normalization did not see (module docstring).
    With dropout (FlashAttention-2 with the mask Z regenerated per tile): dV_j += (P_ij Z_ij)^T dO_i,
    dS_ij = P_ij (Z_ij dO_i V_j^T - D_i), where still D_i = rowsum(dO_i O_i). With softcap, dS is multiplied by
    the cap's derivative 1 - tanh^2(s / c) before the scale.
    """
    xp = get_array_module(dO, Q, K, V)
    B, Hkv = K.shape[:2]
    dtypes, dtype = (Q.dtype, K.dtype, V.dtype), _compute_dtype(Q.dtype)
    tiling, n_threads = _plan(Q.shape, K.shape, is_causal, block_q, block_k, num_threads, xp, window)
    bias = ScoreBias(tiling, key_mask, alibi_slopes, B, Hkv, dtype, xp)
    dropout = None if dropout_p == 0 else Dropout(tiling, dropout_p, dropout_seed, dropout_offset,
                                                  dropout_first_batch * Hkv * tiling.G, B * Hkv, xp)
    softcap2 = None if softcap is None else softcap * LOG2_E
    L_hi, row_factor = _in_base_2(_to_rows(L[..., None], Hkv, np.float64)[..., 0], dtype, xp)  # (N, T*G) each
    dO = _to_rows(dO, Hkv, dtype) * row_factor[..., None]  # (N, T*G, d): P = exp2(S - L_hi) * row_factor
    D = (dO * _to_rows(O, Hkv, dtype)).sum(axis=-1)  # (N, T*G): rowsum(dO * O) = rowsum(P * dP)
    if dropout is not None:
        dO *= dtype.type(1 / (1 - dropout_p))  # Z = keep / (1 - p): the factor goes with dO into dV and dP
    Q = _to_rows(Q, Hkv, dtype)  # unscaled: a view of the input when G == 1, so no copy
    K, V = _to_kv(K, dtype), _to_kv(V, dtype)  # (N, S, d)
    V1 = _with_ones(V, xp)  # (N, S, d + 1): the matmul subtracts D_i (header)
    dK = xp.zeros_like(K)
    dV = xp.zeros_like(V)

    def backward_col_tiles(col_tiles):
        scratch = {}
        dQ = xp.zeros_like(Q)  # this group's share of dQ
        mine = set(col_tiles)
        # Row tiles outermost: a row tile's right operands are built once per thread and dropped after its column
        # tiles, so they never exist for the whole sequence at once (that would be two more copies of Q and dO).
        for i in range(tiling.n_row_tiles):
            cols_seen = [j for j in tiling.visible_cols(i) if j in mine]
            if not cols_seen:
                continue
            rows = tiling.rows(i)
            Q_scaled = _stacked_transposed(Q[:, rows], scale * LOG2_E, (), xp)  # (N, d, Br)
            dO_D = _stacked_transposed(dO[:, rows], 1, () if dropout else (-D[:, rows],), xp)  # (N, d (+ 1), Br)
            for j in cols_seen:
                cols = tiling.cols(j)
                dK_j, dV_j = dK[:, cols], dV[:, cols]  # views: this group owns these columns
                S_ji = _product(scratch, "S", K[:, cols], Q_scaled, xp)  # S_ij^T, (Bc, N, Br), base 2
                if softcap2 is not None:  # the cap's tanh is kept for its derivative
                    tanh_ji = _scratch(scratch, "tanh", S_ji.shape, dtype, xp)
                    _softcapped(S_ji, softcap2, xp, tanh_ji)
                S_ji -= L_hi[:, rows]
                bias(S_ji, i, j, scratch)
                P_ji = xp.exp2(S_ji, out=S_ji)
                if dropout is None:
                    dV_j += P_ji.transpose(1, 0, 2) @ dO[:, rows]  # (N, Bc, Br) @ (N, Br, d)
                    dS_ji = _product(scratch, "dP", V1[:, cols], dO_D, xp)  # dP_ij^T - D_i
                else:
                    keep = dropout.keep(i, j)
                    PZ_ji = xp.multiply(P_ji, keep, out=_scratch(scratch, "PZ", P_ji.shape, dtype, xp))  # 1/(1-p): dO
                    dV_j += PZ_ji.transpose(1, 0, 2) @ dO[:, rows]
                    dS_ji = _product(scratch, "dP", V[:, cols], dO_D, xp)  # Z_ij dP_ij^T - D_i, in three steps
                    dS_ji *= keep
                    dS_ji -= D[:, rows]
                dS_ji *= P_ji
                if softcap2 is not None:
                    dS_ji *= _softcap_derivative(tanh_ji, xp)
                dQ[:, rows] += dS_ji.transpose(1, 2, 0) @ K[:, cols]  # (N, Br, Bc) @ (N, Bc, d)
                dK_j += dS_ji.transpose(1, 0, 2) @ Q[:, rows]  # (N, Bc, Br) @ (N, Br, d)
        return dQ

    # One group of column tiles per thread, balanced by their number of row tiles (a causal mask makes the first
    # columns the busiest); each group adds into its own share of dQ (memory: one dQ per thread), and the shares
    # are summed in a fixed order, so dQ is reproducible.
    col_groups = _balanced_groups({j: len(tiling.visible_rows(j)) for j in range(tiling.n_col_tiles)}, n_threads)
    dQ_shares = run_on_workers(backward_col_tiles, col_groups, n_threads)
    dQ = dQ_shares[0]
    for share in dQ_shares[1:]:
        dQ += share
    dQ *= dtype.type(scale)  # dS is the gradient for S = Q K^T * scale: dQ = dS K * scale, dK = dS^T Q * scale
    dK *= dtype.type(scale)
    dQ = _from_rows(dQ, B, tiling.G)
    dK, dV = dK.reshape(B, Hkv, *dK.shape[1:]), dV.reshape(B, Hkv, *dV.shape[1:])
    return tuple(grad.astype(grad_dtype, copy=False) for grad, grad_dtype in zip((dQ, dK, dV), dtypes))


def _tile_with_kept_max(S_ji, P_ji, V1_j, keep, xp):
    """The lazy max: P_ij = exp2(S_ij - m) with the m the rows already have -> [P_ij V_j, rowsum(P_ij)] (N, Br, d + 1),
    or None when some row sum passes MAX_TILE_ROW_SUM (or overflows): scores far above m, the tile must be redone.

    S_ji (Bc, N, Br) holds S_ij^T - m; P_ji receives exp2 of it; V1_j is [V_j, 1] (N, Bc, d + 1); keep: the
    dropout mask or None (_tile_sums).
    """
    PV_l = _tile_sums(xp.exp2(S_ji, out=P_ji), V1_j, keep, xp)
    return PV_l if PV_l[..., -1].max() <= MAX_TILE_ROW_SUM else None


def _tile_sums(P_ji, V1_j, keep, xp):
    """[P_ij V_j, rowsum(P_ij)] (N, Br, d + 1) from P_ji (Bc, N, Br) and V1_j = [V_j, 1]. With dropout (keep, bool
    like P_ji), the dropped weights leave P_ij V_j but not the row sum: l, and so L, are the undropped ones."""
    if keep is None:
        return P_ji.transpose(1, 2, 0) @ V1_j
    l = P_ji.sum(axis=0)
    PV_l = xp.multiply(P_ji, keep, out=P_ji).transpose(1, 2, 0) @ V1_j
    PV_l[..., -1] = l
    return PV_l


def _tile_with_new_max(S_ji, P_ji, V1_j, keep, Q_m, m, O_l, xp):
    """Algorithm 1's update: m_new = max(m, rowmax S_ij), O_i and l rescaled by exp2(m - m_new), P_ij from m_new.

    Updates m (N, Br), Q_m's last row (-m) and O_l = [O_i, l] in place, overwrites S_ji with S_ij^T - m_new.
    Returns [P_ij V_j, rowsum(P_ij)] and whether every row has now seen a key (then later tiles may keep m).
    A row that has seen no key yet has the placeholder m = 0 and may step down to its first keys' max.
    """
    dtype = S_ji.dtype.type
    l = O_l[..., -1]
    step = S_ji.max(axis=0)  # m_new - m where it grows; -inf where the row sees no key here
    step = xp.where((step > 0) | (l == 0), step, dtype(0))
    step = xp.where(xp.isfinite(step), step, dtype(0))  # rows without keys keep m
    m += step
    Q_m[:, -1] = -m
    xp.exp2(xp.subtract(S_ji, step, out=S_ji), out=P_ji)
    O_l *= xp.exp2(-xp.maximum(step, 0))[..., None]  # rows with l = 0 may step down: they have nothing to rescale
    PV_l = _tile_sums(P_ji, V1_j, keep, xp)
    return PV_l, bool(xp.all((O_l[..., -1] + PV_l[..., -1]) > 0))


def _normalized(O_l, m, xp):
    """The paper's last step, O_i = O_i / l and L_i = m + log(l), from O_l = [O_i, l] (N, Br, d + 1) and m in base 2:
    -> O_i (N, Br, d), L_i (N, Br) in natural log. Rows that saw no key (l = 0) get O = 0 and L = -inf.

    L is summed and converted in float64 and kept so: the backward's P = exp(S - L) would carry a rounding of L,
    which grows with |L|, into every weight.
    """
    dtype = O_l.dtype.type
    l = O_l[..., -1]
    seen = l > 0
    l = xp.where(seen, l, dtype(1))
    L = (m.astype(np.float64) + xp.log2(l.astype(np.float64))) * LN_2
    return O_l[..., :-1] / l[..., None], xp.where(seen, L, -xp.inf)


def _in_base_2(L, dtype, xp):
    """The natural log-sum-exp L (float64, (N, r)) in base 2 as L_hi in `dtype` and the row factor exp2(L_hi - L2)
    that the rounding of L_hi leaves: P = exp2(S - L_hi) * row_factor. Rows without keys (L = -inf) get a huge L_hi,
    which gives them P = 0 without feeding inf to BLAS."""
    L2 = L * LOG2_E
    L2 = xp.where(xp.isfinite(L2), L2, np.finfo(dtype).max / 4)
    L_hi = L2.astype(dtype)
    return L_hi, xp.exp2(L_hi - L2).astype(dtype)


def _with_ones(X, xp):
    """(N, S, d) -> (N, S, d + 1): X with a last column of ones."""
    X1 = xp.empty((*X.shape[:2], X.shape[2] + 1), X.dtype)
    X1[..., :-1] = X
    X1[..., -1] = 1
    return X1


def _scratch(scratch: dict, name: str, shape, dtype, xp):
    """A buffer reused across tiles of one shape (tiles at the sequence's end are smaller)."""
    buffer = scratch.get((name, shape))
    if buffer is None:
        buffer = scratch[name, shape] = xp.empty(shape, dtype)
    return buffer


def _stacked_transposed(X, factor, rows, xp):
    """[factor * X^T; rows]: X (N, r, d), rows a tuple of n arrays (N, r) -> contiguous (N, d + n, r), as a matmul's
    right operand."""
    out = xp.empty((X.shape[0], X.shape[2] + len(rows), X.shape[1]), X.dtype)
    xp.multiply(X.transpose(0, 2, 1), X.dtype.type(factor), out=out[:, :X.shape[2]])
    for n, row in enumerate(rows):
        out[:, X.shape[2] + n] = row
    return out


def _product(scratch: dict, name: str, A, B, xp):
    """A (N, a, k) @ B (N, k, b) into a reused buffer laid out (a, N, b), returned in that layout."""
    out = _scratch(scratch, name, (A.shape[1], A.shape[0], B.shape[2]), A.dtype, xp)
    xp.matmul(A, B, out=out.transpose(1, 0, 2))
    return out


# --- what the scores get besides Q K^T ----------------------------------------------------------------------------


def _softcapped(S_ji, softcap2: float, xp, tanh_ji=None):
    """S_ji <- c2 tanh(S_ji / c2) in place (the softcap in base 2, c2 = c log2(e)); tanh(S_ji / c2) is left in
    tanh_ji when given (the backward's derivative needs it). Returns S_ji."""
    dtype = S_ji.dtype.type
    tanh_ji = S_ji if tanh_ji is None else tanh_ji
    xp.tanh(xp.multiply(S_ji, dtype(1 / softcap2), out=tanh_ji), out=tanh_ji)
    return xp.multiply(tanh_ji, dtype(softcap2), out=S_ji)


def _softcap_derivative(tanh_ji, xp):
    """d/ds [c tanh(s / c)] = 1 - tanh^2(s / c), in place of tanh_ji."""
    xp.multiply(tanh_ji, tanh_ji, out=tanh_ji)
    return xp.subtract(tanh_ji.dtype.type(1), tanh_ji, out=tanh_ji)


class ScoreBias:
    """Adds to a score tile what it gets besides Q K^T * scale (and softcap): ALiBi's -slope * |t + S - T - s|, and
    -inf for the keys a query may not see, outside its window (causal included) or padding (key_mask).

    All are biases laid out like the score tiles (Bc, N, Br), in base 2, so each is one broadcast add; tiles at the
    same place relative to the diagonal share one cached window mask and one cached ALiBi distance.
    """

    def __init__(self, tiling: Tiling, key_mask, alibi_slopes, B: int, Hkv: int, dtype, xp):
        self.tiling, self.dtype, self.xp = tiling, dtype, xp
        self.key_bias = None  # (S, B*Hkv or 1, 1)
        if key_mask is not None:
            key_bias = xp.where(key_mask.T, dtype.type(0), dtype.type(-xp.inf))[:, :, None]
            self.key_bias = xp.repeat(key_bias, Hkv, axis=1) if key_bias.shape[1] > 1 else key_bias
        self.slopes = None  # (N, T*G) in base 2, rows ordered (position, head-in-group) like Q's
        if alibi_slopes is not None:
            slopes = xp.broadcast_to(xp.asarray(alibi_slopes, dtype=dtype), (B, Hkv * tiling.G))
            self.slopes = xp.tile(slopes.reshape(B * Hkv, tiling.G) * dtype.type(LOG2_E), (1, tiling.T))
        self.window_biases, self.distances = {}, {}

    def __call__(self, S_ji, i: int, j: int, scratch: dict) -> None:
        if self.slopes is not None:  # the product goes to a reused buffer: a fresh one per tile costs page faults
            alibi = _scratch(scratch, "alibi", S_ji.shape, self.dtype, self.xp)
            S_ji -= self.xp.multiply(self.slopes[:, self.tiling.rows(i)], self.distance(i, j), out=alibi)
            # ALiBi sends far keys' scores below exp2's normal range, and subnormal numbers make exp2 and BLAS some
            # hundred times slower: those weights (under 2**-126 of the largest) become exact zeros.
            S_ji[S_ji < np.finfo(self.dtype).minexp] = -self.xp.inf
        if self.tiling.crosses_window(i, j):
            S_ji += self.window_bias(i, j)
        if self.key_bias is not None:
            S_ji += self.key_bias[self.tiling.cols(j)]

    def _place(self, i: int, j: int) -> tuple[int, int, int]:
        """Where tile (i, j) sits relative to the diagonal, and its size: what its masks and distances depend on."""
        (t0, t1), cols = self.tiling.positions(i), self.tiling.cols(j)
        return t0 + self.tiling.offset - cols.start, t1 - t0, cols.stop - cols.start

    def window_bias(self, i: int, j: int):
        """(Bc, 1, Br * G): -inf where the key is outside the query's window, else 0."""
        bias = self.window_biases.get(self._place(i, j))
        if bias is None:
            hidden = self.tiling.hidden_keys(i, j, self.xp)[:, None, :]
            bias = self.window_biases[self._place(i, j)] = self.xp.where(
                hidden, self.dtype.type(-self.xp.inf), self.dtype.type(0))
        return bias

    def distance(self, i: int, j: int):
        """(Bc, 1, Br * G): |t + S - T - s| between each key s and row's query position t."""
        distance = self.distances.get(self._place(i, j))
        if distance is None:
            t, s = self.tiling.query_positions(i, self.xp), self.tiling.key_positions(j, self.xp)
            distance = self.xp.abs(t[None, None, :] + self.tiling.offset - s[:, None, None]).astype(self.dtype)
            self.distances[self._place(i, j)] = distance
        return distance


class Dropout:
    """The dropout keep mask of one score tile, regenerated from Philox wherever a pass needs it: weight (query head
    h of batch b, query t, key s) has the counter (s, t, b * Hq + h, offset) (attention/dropout.py). In the row
    layout, row (t, g) of n = b * Hkv + k/v head belongs to query head h = k/v head * G + g, so b * Hq + h = n G + g,
    after the first_batch_head = first batch * Hq of the rows before Q's (varlen_attention's sequences).
    """

    def __init__(self, tiling: Tiling, dropout_p: float, seed: int, offset: int, first_batch_head: int, N: int, xp):
        self.tiling, self.dropout_p, self.seed, self.offset, self.xp = tiling, dropout_p, seed, offset, xp
        self.batch_heads = first_batch_head + xp.arange(N)[:, None] * tiling.G + xp.arange(tiling.G)  # (N, G)

    def keep(self, i: int, j: int):
        """(Bc, N, Br * G) bool, True where the weight is kept."""
        t0, t1 = self.tiling.positions(i)
        batch_heads = self.xp.tile(self.batch_heads, (1, t1 - t0))[None]  # (1, N, Br * G)
        t = self.tiling.query_positions(i, self.xp)[None, None, :]
        s = self.tiling.key_positions(j, self.xp)[:, None, None]
        return dropout_keep(self.seed, self.offset, batch_heads, t, s, self.dropout_p, self.xp)


# --- layouts: (B, Hq, T, D) <-> tile rows (B*Hkv, T*G, D) ---------------------------------------------------------


def _to_rows(X, Hkv: int, dtype):
    """(B, Hq, T, D) -> (B*Hkv, T*G, D): the G query heads of a K/V head become rows, ordered (position, head)."""
    B, Hq, T, D = X.shape
    G = Hq // Hkv
    X = X.reshape(B, Hkv, G, T, D).transpose(0, 1, 3, 2, 4)  # a view; free when G == 1
    return X.reshape(B * Hkv, T * G, D).astype(dtype, copy=False)


def _from_rows(X, B: int, G: int):
    """(B*Hkv, T*G, D) -> (B, Hq, T, D), the inverse of _to_rows."""
    N, TG, D = X.shape
    T = TG // G
    return X.reshape(B, N // B, T, G, D).transpose(0, 1, 3, 2, 4).reshape(B, N // B * G, T, D)


def _to_kv(X, dtype):
    """(B, Hkv, S, D) -> (B*Hkv, S, D)."""
    B, H, S, D = X.shape
    return X.reshape(B * H, S, D).astype(dtype, copy=False)


def _compute_dtype(dtype):
    """float32 at least: half precision is computed in float32 and cast back."""
    return np.dtype(np.result_type(dtype, np.float32))


# --- scheduling ---------------------------------------------------------------------------------------------------


def _plan(q_shape, k_shape, is_causal, block_q, block_k, num_threads, xp, window=None):
    """The tiling and the number of worker threads for one call."""
    B, Hq, T, d = q_shape
    _, Hkv, S, _ = k_shape
    G = Hq // Hkv
    Br, Bc = default_tile_sizes(G, d)
    tiling = Tiling(T, S, G, block_q or Br, block_k or Bc, normalized_window(window, is_causal))
    if num_threads is None:
        # Threads help the CPU only: on a GPU each tile's kernels already fill the device.
        small = B * Hq * T * S < MIN_SCORES_FOR_THREADS
        num_threads = 1 if xp is not np or small else get_num_threads()
    return tiling, max(1, num_threads)


def _balanced_groups(work: dict, n_groups: int) -> list[list]:
    """Split the keys of `work` into at most n_groups lists of nearly equal total work: the biggest item goes to
    the least loaded group (the longest-processing-time rule)."""
    groups = [[] for _ in range(n_groups)]
    loads = [0] * n_groups
    for item in sorted(work, key=lambda item: -work[item]):
        g = loads.index(min(loads))
        groups[g].append(item)
        loads[g] += work[item]
    return [group for group in groups if group]


# --- the differentiable op ----------------------------------------------------------------------------------------


@computes_in_float32
class FlashAttention(Function):
    """The flash backend as one autograd node: forward saves Q, K, V, O and L; backward recomputes P from them.
    Half-precision inputs are kept in float32 for the backward, O included: D = rowsum(dO * O) from a rounded O
    would move every gradient by the rounding (computes_in_float32)."""

    def forward(self, q, k, v, scale: float, is_causal: bool = False, key_mask=None, block_q=None, block_k=None,
                num_threads=None, window=None, softcap=None, alibi_slopes=None, dropout_p=0.0, dropout_seed=0,
                dropout_offset=0, dropout_first_batch=0):
        """q (B, Hq, T, d), k, v (B, Hkv, S, d) -> O (B, Hq, T, d); the options are flash_attention_forward's."""
        self.options = dict(scale=scale, is_causal=is_causal, key_mask=key_mask, block_q=block_q, block_k=block_k,
                            num_threads=num_threads, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                            dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_offset=dropout_offset,
                            dropout_first_batch=dropout_first_batch)
        O, L = flash_attention_forward(q, k, v, **self.options)
        self.save_for_backward(q, k, v, O, L)
        return O

    def backward(self, dO):
        """dO (B, Hq, T, d) -> dq, dk, dv."""
        q, k, v, O, L = self.saved_tensors
        grads = flash_attention_backward(dO, q, k, v, O, L, **self.options)
        return tuple(grad if needed else None for grad, needed in zip(grads, self.needs_input_grad))
