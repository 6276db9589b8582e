// Small kernels over tinytf/kernels/tensor_core.cuh and the emulator's half types, for test_half_types.py and
// test_tensor_core_primitives.py (which also builds this file with NVRTC for sm_80). Each test kernel runs one warp
// or one block; the tests hold the expected values. Lines marked `// REPORTED: name` are where the emulator must
// point when it reports the error the kernel makes.
#include "tensor_core.cuh"

// ---- conversions: element by element, through the CUDA intrinsics -------------------------------------------
extern "C" __global__ void round_to_bfloat16(const float* x, __nv_bfloat16* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void round_to_half(const float* x, __half* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half_rn(x[i]);
}

extern "C" __global__ void widen_bfloat16(const __nv_bfloat16* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __bfloat162float(x[i]);
}

extern "C" __global__ void widen_half(const __half* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __half2float(x[i]);
}

// pairs[2i], pairs[2i+1] -> packed[i] (pack2) -> unpacked[2i], unpacked[2i+1] (unpack2), and through the pair
// intrinsics: via_pair[2i] = __low2float, via_pair[2i+1] = __high2float of __floats2*2_rn.
template <class Element, class Pair, Pair (*make_pair)(float, float)>
__device__ void pack_and_unpack(const float* pairs, unsigned* packed, float* unpacked, float* via_pair, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    packed[i] = pack2<Element>(pairs[2 * i], pairs[2 * i + 1]);
    const float2 back = unpack2<Element>(packed[i]);
    unpacked[2 * i] = back.x;
    unpacked[2 * i + 1] = back.y;
    const Pair pair = make_pair(pairs[2 * i], pairs[2 * i + 1]);
    via_pair[2 * i] = __low2float(pair);
    via_pair[2 * i + 1] = __high2float(pair);
}

extern "C" __global__ void pack_bfloat16(const float* pairs, unsigned* packed, float* unpacked, float* via_pair,
                                          int n) {
    pack_and_unpack<__nv_bfloat16, __nv_bfloat162, __floats2bfloat162_rn>(pairs, packed, unpacked, via_pair, n);
}

extern "C" __global__ void pack_half(const float* pairs, unsigned* packed, float* unpacked, float* via_pair, int n) {
    pack_and_unpack<__half, __half2, __floats2half2_rn>(pairs, packed, unpacked, via_pair, n);
}

// ---- mma: one warp, fragments in and out as the tests lay them out (lane-major) -------------------------------------
template <class Element>
__device__ void mma_fragments(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int lane = threadIdx.x;
    const unsigned a_registers[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
    const unsigned b_registers[2] = {b[2 * lane], b[2 * lane + 1]};
    float acc[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
    mma_m16n8k16<Element>(acc, a_registers, b_registers);
    for (int i = 0; i < 4; ++i) d[4 * lane + i] = acc[i];
}

extern "C" __global__ void mma_bfloat16(const unsigned* a, const unsigned* b, const float* c, float* d) {
    mma_fragments<__nv_bfloat16>(a, b, c, d);
}

extern "C" __global__ void mma_half(const unsigned* a, const unsigned* b, const float* c, float* d) {
    mma_fragments<__half>(a, b, c, d);
}

// ---- ldmatrix: a (32 x 8) tile of 16-bit elements in shared memory; lane L passes the address of row rows[L] -------
// registers[lane][0..3]: x4, [4..7]: x4.trans, [8..9]: x2, [10..11]: x2.trans.
extern "C" __global__ void ldmatrix_all(const unsigned short* tile, const int* rows, unsigned* registers) {
    __shared__ __align__(16) unsigned short staged[32][8];
    const int lane = threadIdx.x;
    for (int column = 0; column < 8; ++column) staged[lane][column] = tile[8 * lane + column];
    __syncthreads();
    const unsigned short* row = staged[rows[lane]];
    unsigned four[4], four_transposed[4], two[2], two_transposed[2];
    ldmatrix_x4(four, row);
    ldmatrix_x4_trans(four_transposed, row);
    ldmatrix_x2(two, row);
    ldmatrix_x2_trans(two_transposed, row);
    unsigned* out = registers + 12 * lane;
    for (int i = 0; i < 4; ++i) out[i] = four[i];
    for (int i = 0; i < 4; ++i) out[4 + i] = four_transposed[i];
    for (int i = 0; i < 2; ++i) out[8 + i] = two[i];
    for (int i = 0; i < 2; ++i) out[10 + i] = two_transposed[i];
}

// ---- cp.async: one block of 64 threads, 16 bytes (4 floats) each, two groups into two tiles ------------------------
// Shared tiles start at -1. Thread t copies source[4t..4t+3] into first[4t..] (group 1) and second_source[4t..] into
// second[4t..] (group 2), zero-filling where t >= n_in_bounds, then records its own 4 floats of each tile:
// seen[0]: before any wait, seen[1]: after wait<1> (group 1 landed), seen[2]: after wait<0>, and seen[3]: the next
// thread's 4 floats of `first` after a __syncthreads.
extern "C" __global__ void cp_async_stages(const float* source, const float* second_source, float* seen,
                                           int n_in_bounds) {
    __shared__ __align__(16) float first[256];
    __shared__ __align__(16) float second[256];
    const int t = threadIdx.x;
    for (int i = 0; i < 4; ++i) first[4 * t + i] = second[4 * t + i] = -1.0f;
    __syncthreads();
    const bool in_bounds = t < n_in_bounds;
    cp_async_16(&first[4 * t], in_bounds ? &source[4 * t] : nullptr, in_bounds);
    cp_async_commit();
    cp_async_16(&second[4 * t], &second_source[4 * t], in_bounds);
    cp_async_commit();
    float* out = seen + 32 * t;  // 4 records x (4 of first, 4 of second)
    auto record = [&](int at, const float* a, const float* b) {
        for (int i = 0; i < 4; ++i) out[8 * at + i] = a[i];
        for (int i = 0; i < 4; ++i) out[8 * at + 4 + i] = b[i];
    };
    record(0, &first[4 * t], &second[4 * t]);
    cp_async_wait<1>();
    record(1, &first[4 * t], &second[4 * t]);
    cp_async_wait<0>();
    record(2, &first[4 * t], &second[4 * t]);
    __syncthreads();
    const int next = (t + 1) % blockDim.x;
    record(3, &first[4 * next], &second[4 * next]);
}

// ---- misuse the emulator must report -------------------------------------------------------------------------
// Lanes 16-31 leave before the mma the others wait at.
extern "C" __global__ void mma_with_absent_lanes(float* d) {
    if (threadIdx.x >= 16) return;
    const unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float acc[4] = {0, 0, 0, 0};
    mma_m16n8k16<__nv_bfloat16>(acc, a, b);  // REPORTED: mma_with_absent_lanes
    d[threadIdx.x] = acc[0];
}

// Half of the warp runs ldmatrix.x4 while the other half runs ldmatrix.x2: .aligned needs every lane at one call.
extern "C" __global__ void ldmatrix_in_branches(unsigned* r) {
    __shared__ __align__(16) unsigned short staged[32][8];
    for (int column = 0; column < 8; ++column) staged[threadIdx.x][column] = 0;
    __syncthreads();
    unsigned four[4] = {0, 0, 0, 0};
    if (threadIdx.x < 16) {
        ldmatrix_x4(four, staged[threadIdx.x]);  // REPORTED: ldmatrix_in_branches
    } else {
        ldmatrix_x2(*reinterpret_cast<unsigned(*)[2]>(four), staged[threadIdx.x]);
    }
    r[threadIdx.x] = four[0];
}

// Row addresses 2 bytes past a 16-byte boundary.
extern "C" __global__ void ldmatrix_misaligned(unsigned* r) {
    __shared__ __align__(16) unsigned short staged[33][8];
    unsigned four[4];
    ldmatrix_x4(four, &staged[threadIdx.x][1]);  // REPORTED: ldmatrix_misaligned
    r[threadIdx.x] = four[0];
}

// Copies issued and committed, never waited for.
extern "C" __global__ void exit_with_pending_copy(const float* source, float* y) {
    __shared__ __align__(16) float tile[128];
    cp_async_16(&tile[4 * threadIdx.x], &source[4 * threadIdx.x], true);  // REPORTED: exit_with_pending_copy
    cp_async_commit();
    y[threadIdx.x] = 0.0f;
}
