// Small kernels that exercise tinytf.kernels.emulator: what it must compute, and what it must report.
// test_cuda_emulator.py looks up the line numbers of the marked lines (// REPORTED: ...) to check the file:line in
// the emulator's messages.

constexpr unsigned kFullWarp = 0xffffffffu;

// Each warp writes the sum of its 32 inputs: shuffles must move the right values under every schedule.
extern "C" __global__ void warp_sums(const float* x, float* sums) {
    float value = x[threadIdx.x];
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(kFullWarp, value, offset);
    if (threadIdx.x % 32 == 0) sums[threadIdx.x / 32] = value;
}

// y = x reversed through shared memory: correct only because of the barrier between writing and reading.
extern "C" __global__ void reverse_through_shared(const float* x, float* y) {
    __shared__ float staged[256];
    staged[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = staged[blockDim.x - 1 - threadIdx.x];
}

// Lanes vote: bit i of the ballot is set for odd lanes.
extern "C" __global__ void odd_lane_ballot(unsigned* ballots) {
    const unsigned ballot = __ballot_sync(kFullWarp, threadIdx.x % 2 == 1);
    if (threadIdx.x % 32 == 0) ballots[threadIdx.x / 32] = ballot;
}

// Every thread of every block adds one: atomics must not lose updates across the emulator's OS threads.
extern "C" __global__ void count_threads(int* count, float* total) {
    atomicAdd(count, 1);
    atomicAdd(total, 0.5f);
}

// Threads past the first 64 leave, the rest wait at a barrier they can never pass.
extern "C" __global__ void exit_before_barrier(float* x) {
    if (threadIdx.x >= 64) return;
    __syncthreads();  // REPORTED: exit_before_barrier
    x[threadIdx.x] = 1.0f;
}

// Two halves of the block wait at two different barriers.
extern "C" __global__ void barrier_in_branches(float* x) {
    if (threadIdx.x < 32) {
        __syncthreads();  // REPORTED: barrier_in_branches
    } else {
        __syncthreads();
    }
    x[threadIdx.x] = 1.0f;
}

// Every lane shuffles with a mask naming only lanes 0-15: lanes 16-31 leave themselves out.
extern "C" __global__ void shuffle_with_half_mask(float* x) {
    x[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, x[threadIdx.x], 1);  // REPORTED: shuffle_with_half_mask
}

// Lanes 0-15 shuffle among themselves but read lane 20, outside their mask.
extern "C" __global__ void shuffle_outside_mask(float* x) {
    if (threadIdx.x >= 16) return;
    x[threadIdx.x] = __shfl_sync(0x0000ffffu, x[threadIdx.x], 20);  // REPORTED: shuffle_outside_mask
}

// Writes one element per thread without checking n.
extern "C" __global__ void write_unchecked(float* x, int n) { x[threadIdx.x] = static_cast<float>(n); }
