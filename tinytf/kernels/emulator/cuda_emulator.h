// cuda_emulator.h: compile an unchanged CUDA kernel with g++ and run it on the CPU, to test it without a GPU.
//
// How a launch runs:
//   - Every CUDA thread of a block is a fiber with a stack of its own; one OS thread runs a whole block, switching
//     fibers only where CUDA threads synchronize: __syncthreads, __syncwarp, warp shuffles and votes. Blocks are
//     spread over a few OS threads, and `__shared__` becomes `static thread_local`: one copy per running block.
//   - A schedule decides which warp moves next. "lockstep" advances all warps barrier by barrier; "warps-forward",
//     "warps-reverse" and "warps-random" run one warp at a time up to the next __syncthreads (in warp order, reverse
//     order, or a random order per phase, with the lanes of a warp in the same kind of order). Lockstep hides a
//     missing barrier between warps; one warp at a time lets a warp read shared memory another warp has not yet
//     written, or overwrite what another has not yet read, so the output goes wrong.
//   - Checked, and reported with the file and line of the CUDA call: a __syncthreads that only part of a block
//     reaches (some threads exited or wait at another __syncthreads), a *_sync mask that leaves out the calling lane,
//     lanes of one mask waiting with different masks or having exited, and shuffles that read a lane outside the mask.
//   - Tensor cores (through tinytf/kernels/tensor_core.cuh, which has an emulated side for each of its PTX
//     instructions): mma.sync and ldmatrix are warp collectives that every lane must reach at the same call (.aligned);
//     a lane that exited or waits elsewhere is reported. A cp.async copy lands in shared memory, under lockstep, only
//     when the issuing thread's cp.async.wait_group retires its group, so reading a tile before the wait reads stale
//     data; under the one-warp-at-a-time schedules at once, so refilling a buffer before the barrier that frees it
//     overwrites data other warps have yet to read. A thread that exits with copies it never waited for is reported.
//     Misaligned ldmatrix rows and cp.async addresses too.
//   - __half, __nv_bfloat16 and their pairs, with the CUDA conversions, rounding to nearest even as the GPU's
//     cvt.rn.{f16,bf16}.f32 do; a NaN becomes the canonical NaN 0x7fff, as in the host code of CUDA's cuda_fp16.hpp
//     and cuda_bf16.hpp (NumPy and ml_dtypes keep the payload instead).
// Not modelled: the memory model (fibers see each other's writes at once), timing, bank conflicts, the precision of
// fast intrinsics such as __expf, dynamic shared memory, inline PTX other than tensor_core.cuh's, the tensor cores'
// internal rounding of partial sums (the emulated mma rounds once), arithmetic operators on __half/__nv_bfloat16, and
// -ftz=true: the GPU build flushes float32 subnormals to zero in ordinary float arithmetic, the emulator does not (the
// conversions and mma are inline PTX, which -ftz does not change, so they agree).
//
// tinytf.kernels.emulator builds a kernel file against this header and calls it through ctypes.
#pragma once

// Kernels and tensor_core.cuh pick their emulated side with this.
#define TINYTF_CUDA_EMULATOR 1

#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 700  // macOS declares the ucontext functions only for XSI sources
#endif

// Only light headers: every variant of a kernel is a fresh g++ build, and <thread> or <random> would add a second.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__linux__) && !defined(TINYTF_EMULATOR_UCONTEXT)
#define TINYTF_EMULATOR_FAST_SWITCH 1
#else
#include <ucontext.h>
#endif

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// ---- vector and half-precision types ----------------------------------------------------------------------------
// The vector types with CUDA's alignment (a float4 or uint4 load is one 16-byte access on a GPU).
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace tinytf_emulator {

inline uint32_t float_bits(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

inline float bits_float(uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

// Drops the low `shift` bits of `bits` (1 to 31 of them), rounding to nearest, ties to even.
inline uint32_t shift_right_rounding_to_even(uint32_t bits, int shift) {
    const uint32_t kept = bits >> shift, rest = bits & ((1u << shift) - 1), half = 1u << (shift - 1);
    return kept + (rest > half || (rest == half && (kept & 1u)));
}

// float -> IEEE binary16, as cvt.rn.f16.f32: nearest even, overflow to infinity, subnormals kept, NaN 0x7fff.
inline uint16_t float_to_half_bits(float value) {
    const uint32_t bits = float_bits(value), sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return 0x7fffu;
    if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // at least 65520, halfway past the largest half (65504)
    if (magnitude >= 0x38800000u)                         // at least 2^-14: a normal half; a carry bumps the exponent
        return sign | shift_right_rounding_to_even(magnitude - (112u << 23), 13);
    if (magnitude < 0x33000000u) return sign;  // below 2^-25, half of the smallest subnormal half: rounds to zero
    // A subnormal half counts units of 2^-24: the significand (with its implicit bit) shifted by 126 - exponent.
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
    return sign | shift_right_rounding_to_even(significand, 126 - static_cast<int>(magnitude >> 23));
}

// IEEE binary16 -> float: exact (a NaN keeps its sign and payload).
inline float half_bits_to_float(uint16_t half) {
    const uint32_t sign = (half & 0x8000u) << 16, exponent = (half >> 10) & 0x1fu, significand = half & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | significand << 13);
    if (exponent == 0) {
        const float magnitude = std::ldexp(static_cast<float>(significand), -24);
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | (exponent + 112u) << 23 | significand << 13);
}

// float -> bfloat16, as cvt.rn.bf16.f32: the top 16 bits rounded to nearest even (overflow to infinity falls out of
// the carry), NaN 0x7fff.
inline uint16_t float_to_bfloat16_bits(float value) {
    const uint32_t bits = float_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(uint16_t bfloat16) { return bits_float(static_cast<uint32_t>(bfloat16) << 16); }

}  // namespace tinytf_emulator

// As in CUDA: converted from and to float implicitly, rounding to nearest even. No arithmetic operators: kernels
// convert to float, which is what tinytf's kernels do, so the emulator need not model half-precision arithmetic.
struct alignas(2) __half {
    uint16_t __x;
    __half() = default;
    __half(float value) : __x(tinytf_emulator::float_to_half_bits(value)) {}
    operator float() const { return tinytf_emulator::half_bits_to_float(__x); }
};

struct alignas(2) __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float value) : __x(tinytf_emulator::float_to_bfloat16_bits(value)) {}
    operator float() const { return tinytf_emulator::bfloat16_bits_to_float(__x); }
};

struct alignas(4) __half2 { __half x, y; };             // x in the low 16 bits, as on a GPU
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

inline __half __float2half_rn(float value) { return __half(value); }
inline __half __float2half(float value) { return __half(value); }
inline float __half2float(__half value) { return value; }
inline __nv_bfloat16 __float2bfloat16_rn(float value) { return __nv_bfloat16(value); }
inline __nv_bfloat16 __float2bfloat16(float value) { return __nv_bfloat16(value); }
inline float __bfloat162float(__nv_bfloat16 value) { return value; }
inline __half2 __floats2half2_rn(float low, float high) { return {__half(low), __half(high)}; }
inline __half2 __float22half2_rn(float2 pair) { return __floats2half2_rn(pair.x, pair.y); }
inline __half2 __float2half2_rn(float value) { return __floats2half2_rn(value, value); }
inline __nv_bfloat162 __floats2bfloat162_rn(float low, float high) {
    return {__nv_bfloat16(low), __nv_bfloat16(high)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 pair) { return __floats2bfloat162_rn(pair.x, pair.y); }
inline __nv_bfloat162 __float2bfloat162_rn(float value) { return __floats2bfloat162_rn(value, value); }
inline float2 __half22float2(__half2 pair) { return {pair.x, pair.y}; }
inline float2 __bfloat1622float2(__nv_bfloat162 pair) { return {pair.x, pair.y}; }
inline float __low2float(__half2 pair) { return pair.x; }
inline float __high2float(__half2 pair) { return pair.y; }
inline float __low2float(__nv_bfloat162 pair) { return pair.x; }
inline float __high2float(__nv_bfloat162 pair) { return pair.y; }
inline __half __low2half(__half2 pair) { return pair.x; }
inline __half __high2half(__half2 pair) { return pair.y; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 pair) { return pair.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 pair) { return pair.y; }
inline __half2 __halves2half2(__half low, __half high) { return {low, high}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 low, __nv_bfloat16 high) { return {low, high}; }
inline unsigned short __half_as_ushort(__half value) { return value.__x; }
inline __half __ushort_as_half(unsigned short bits) { __half value; value.__x = bits; return value; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 value) { return value.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { __nv_bfloat16 value; value.__x = bits; return value; }

namespace tinytf_emulator {

// ---- fibers ------------------------------------------------------------------------------------------------------
#ifdef TINYTF_EMULATOR_FAST_SWITCH
// A context is the saved stack pointer; the callee-saved registers sit on the stack below it. swapcontext would also
// save the signal mask with a system call on every switch, which makes it several times slower.
struct Context {
    void* stack_pointer = nullptr;
};
extern "C" void tinytf_emulator_switch(void** save_stack_pointer, void* load_stack_pointer);
asm(R"(
    .text
    .p2align 4
    .globl tinytf_emulator_switch
    .hidden tinytf_emulator_switch
    .type tinytf_emulator_switch, @function
tinytf_emulator_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tinytf_emulator_switch, .-tinytf_emulator_switch
)");

inline void switch_context(Context& from, Context& to) {
    tinytf_emulator_switch(&from.stack_pointer, to.stack_pointer);
}

// Lays out a stack that tinytf_emulator_switch "returns" into entry(), as if entry had just been called.
inline void make_context(Context& context, char* stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t{15};
    auto* slot = reinterpret_cast<void**>(top);
    *--slot = nullptr;                               // entry's return address: entry never returns
    *--slot = reinterpret_cast<void*>(entry);        // popped by `ret`
    for (int saved = 0; saved < 6; ++saved) *--slot = nullptr;  // rbp rbx r12 r13 r14 r15
    context.stack_pointer = slot;
}
#else
struct Context {
    ucontext_t state;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.state, &to.state); }

inline void make_context(Context& context, char* stack, size_t size, void (*entry)()) {
    getcontext(&context.state);
    context.state.uc_stack.ss_sp = stack;
    context.state.uc_stack.ss_size = size;
    context.state.uc_link = nullptr;
    makecontext(&context.state, entry, 0);
}
#endif

// Fiber stacks with an inaccessible page below each, so an overflow faults instead of corrupting a neighbour.
class Stacks {
  public:
    Stacks(int count, size_t size) : size_(size), page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {
        const size_t total = count * (size_ + page_);
        void* memory = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        base_ = memory == MAP_FAILED ? nullptr : static_cast<char*>(memory);
        total_ = base_ ? total : 0;
        for (int i = 0; base_ && i < count; ++i) mprotect(base_ + i * (size_ + page_), page_, PROT_NONE);
    }
    ~Stacks() {
        if (base_) munmap(base_, total_);
    }
    Stacks(const Stacks&) = delete;
    Stacks& operator=(const Stacks&) = delete;
    bool ok() const { return base_ != nullptr; }
    char* stack(int i) const { return base_ + i * (size_ + page_) + page_; }
    size_t size() const { return size_; }

  private:
    size_t size_, page_, total_ = 0;
    char* base_ = nullptr;
};

// ---- one block -------------------------------------------------------------------------------------------------
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The values are the indices of tinytf.kernels.emulator.SCHEDULES.
enum class Schedule : int { kLockstep = 0, kWarpsForward = 1, kWarpsReverse = 2, kWarpsRandom = 3 };

enum class Wait { kNothing, kWarpBarrier, kBlockBarrier, kExited };

struct Site {
    const char* file = "";
    int line = 0;
    bool operator==(const Site& other) const { return line == other.line && std::strcmp(file, other.file) == 0; }
};

// A cp.async copy: its 16 source bytes, read when issued, land in shared memory at issue or when its group is retired
// (see async_copy_16).
struct AsyncCopy {
    void* shared;
    unsigned char bytes[16];
    long group;  // the commit that closes its group: the thread's async_groups_committed when issued
    Site site;
    bool landed;
};

struct Thread {
    Context context;
    dim3 index;
    Wait wait = Wait::kNothing;
    Site site;                    // where it waits
    unsigned mask = 0;            // the *_sync mask it waits with
    uint64_t shuffle_sent = 0;    // the value it offers to a shuffle
    uint64_t shuffle_seen = 0;    // shuffle_sent frozen when its warp barrier released, read by the other lanes
    const char* aligned_instruction = nullptr;  // the .aligned collective it waits in (mma, ldmatrix), if any
    std::vector<AsyncCopy> async_copies;        // cp.async copies issued and not yet landed, oldest first
    long async_groups_committed = 0;            // cp.async.commit_group calls so far
};

// The kernel with its arguments bound: run(arguments) is one CUDA thread's whole execution.
struct KernelCall {
    void (*run)(void*);
    void* arguments;
};

// splitmix64: a small, good random generator for the "warps-random" schedule.
struct Random {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
};

struct Block {
    dim3 grid_dim, block_dim, block_idx;
    std::vector<Thread> threads;
    int running = -1;
    Context scheduler;
    KernelCall kernel;
    Schedule schedule = Schedule::kLockstep;
    Random random;
    std::string error;
};

inline thread_local Block* current = nullptr;

inline Thread& running_thread() { return current->threads[current->running]; }

inline std::string where(const Site& site) { return std::string(site.file) + ":" + std::to_string(site.line); }

inline std::string hex(unsigned value) {
    char text[16];
    std::snprintf(text, sizeof text, "0x%08x", value);
    return text;
}

inline std::string block_name() {
    const dim3& b = current->block_idx;
    return "block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " + std::to_string(b.z) + ")";
}

inline void set_error(const std::string& message) {
    if (current->error.empty()) current->error = message + " [" + block_name() + "]";
}

inline void yield_to_scheduler() { switch_context(running_thread().context, current->scheduler); }

// Called from a CUDA thread: records the error and never resumes this thread.
[[noreturn]] inline void fail(const Site& site, const std::string& message) {
    set_error(where(site) + ": " + message + " (thread " + std::to_string(current->running) + ")");
    running_thread().wait = Wait::kExited;
    yield_to_scheduler();
    __builtin_unreachable();
}

inline void fiber_entry() {
    current->kernel.run(current->kernel.arguments);
    const std::vector<AsyncCopy>& pending = running_thread().async_copies;
    if (!pending.empty()) {
        // On a GPU nobody could rely on these copies having landed: only the issuing thread can wait for them.
        fail(pending.front().site, "the thread exits with " + std::to_string(pending.size()) +
                                       " cp.async copies it never waited for (cp_async_wait<0>() lands them)");
    }
    running_thread().wait = Wait::kExited;
    yield_to_scheduler();
    __builtin_unreachable();
}

inline void block_barrier(const char* file, int line) {
    Thread& me = running_thread();
    me.wait = Wait::kBlockBarrier;
    me.site = {file, line};
    yield_to_scheduler();
}

// aligned_instruction: the name of a .aligned warp collective (mma, ldmatrix), which every lane must reach at the same
// call; nullptr for __syncwarp and shuffles, whose lanes may meet from different lines.
inline void warp_barrier(unsigned mask, const char* file, int line, const char* aligned_instruction = nullptr) {
    const int lane = current->running % kWarpSize;
    if (!((mask >> lane) & 1u)) {
        fail({file, line}, "lane " + std::to_string(lane) + " passes mask " + hex(mask) +
                               ", which leaves the calling lane out");
    }
    Thread& me = running_thread();
    me.wait = Wait::kWarpBarrier;
    me.site = {file, line};
    me.mask = mask;
    me.aligned_instruction = aligned_instruction;
    yield_to_scheduler();
}

// The order in which lanes (or warps) run, for the schedule in force.
inline std::vector<int> visiting_order(int count) {
    std::vector<int> order(count);
    for (int i = 0; i < count; ++i) order[i] = i;
    if (current->schedule == Schedule::kWarpsReverse)
        for (int i = 0; i < count / 2; ++i) std::swap(order[i], order[count - 1 - i]);
    if (current->schedule == Schedule::kWarpsRandom)
        for (int i = count - 1; i > 0; --i) std::swap(order[i], order[current->random.next() % (i + 1)]);
    return order;
}

inline int warp_lanes(int warp) {
    const int left = static_cast<int>(current->threads.size()) - warp * kWarpSize;
    return left < kWarpSize ? left : kWarpSize;
}

// Releases each group of lanes whose *_sync barrier every lane of the mask has reached. Returns whether any did.
inline bool release_warp_barriers(int warp) {
    Block& block = *current;
    const int first = warp * kWarpSize, lanes = warp_lanes(warp);
    bool released = false;
    for (int lane = 0; lane < lanes; ++lane) {
        const Thread& waiter = block.threads[first + lane];
        if (waiter.wait != Wait::kWarpBarrier) continue;
        bool complete = true;
        for (int other = 0; other < kWarpSize; ++other) {
            if (!((waiter.mask >> other) & 1u)) continue;
            if (other >= lanes) {
                set_error(where(waiter.site) + ": mask names lane " + std::to_string(other) +
                          ", which this block does not have");
                return false;
            }
            const Thread& peer = block.threads[first + other];
            if (peer.wait == Wait::kExited) {
                set_error(where(waiter.site) + ": lane " + std::to_string(other) + " is in the mask but exited before "
                          "reaching this " + (waiter.aligned_instruction ? waiter.aligned_instruction : "*_sync call"));
                return false;
            }
            if (peer.wait == Wait::kWarpBarrier && (waiter.aligned_instruction || peer.aligned_instruction) &&
                !(peer.site == waiter.site && peer.aligned_instruction && waiter.aligned_instruction &&
                  std::strcmp(peer.aligned_instruction, waiter.aligned_instruction) == 0)) {
                auto call = [](const Thread& thread) {
                    return std::string(thread.aligned_instruction ? thread.aligned_instruction : "a *_sync call") +
                           " at " + where(thread.site);
                };
                set_error("lanes of warp " + std::to_string(warp) + " meet at different calls: " + call(waiter) +
                          " and " + call(peer) + "; .aligned instructions need every lane of the warp at the same one");
                return false;
            }
            if (peer.wait == Wait::kWarpBarrier && peer.mask != waiter.mask) {
                set_error(where(peer.site) + ": lanes of warp " + std::to_string(warp) +
                          " wait with different masks (" + where(waiter.site) + " uses another)");
                return false;
            }
            complete = complete && peer.wait == Wait::kWarpBarrier;
        }
        if (!complete) continue;
        for (int other = 0; other < kWarpSize; ++other) {
            if (!((waiter.mask >> other) & 1u)) continue;
            Thread& peer = block.threads[first + other];
            peer.shuffle_seen = peer.shuffle_sent;
            peer.wait = Wait::kNothing;
        }
        released = true;
    }
    return released;
}

// Runs every ready lane of a warp until it waits or exits. Returns whether any lane ran.
inline bool run_ready_lanes(int warp) {
    Block& block = *current;
    bool ran = false;
    for (int lane : visiting_order(warp_lanes(warp))) {
        const int id = warp * kWarpSize + lane;
        if (block.threads[id].wait != Wait::kNothing) continue;
        block.running = id;
        switch_context(block.scheduler, block.threads[id].context);
        ran = true;
        if (!block.error.empty()) return ran;
    }
    return ran;
}

inline bool step_warp(int warp) {
    if (!current->error.empty()) return false;
    const bool ran = run_ready_lanes(warp);
    if (!current->error.empty()) return false;
    const bool released = release_warp_barriers(warp);
    return (ran || released) && current->error.empty();
}

// Runs warps until none can move without the block barrier, per the schedule.
inline void run_phase(int warps) {
    const std::vector<int> order = visiting_order(warps);
    if (current->schedule == Schedule::kLockstep) {
        for (bool moved = true; moved && current->error.empty();) {
            moved = false;
            for (int warp : order) moved = step_warp(warp) || moved;
        }
    } else {
        for (int warp : order) {
            while (step_warp(warp)) {
            }
            if (!current->error.empty()) return;
        }
    }
}

// After a phase: the block finished, or every live thread waits at one __syncthreads (released), or an error.
// Returns whether the block goes on.
inline bool release_block_barrier() {
    Block& block = *current;
    const Thread* waiting = nullptr;
    int n_waiting = 0, n_exited = 0;
    for (const Thread& thread : block.threads) {
        if (thread.wait == Wait::kWarpBarrier) {
            set_error(where(thread.site) + ": a *_sync call waits for lanes that never arrive (they exited or wait "
                                           "at a __syncthreads)");
            return false;
        }
        if (thread.wait == Wait::kExited) ++n_exited;
        if (thread.wait == Wait::kBlockBarrier) {
            ++n_waiting;
            if (!waiting) waiting = &thread;
        }
    }
    if (n_waiting == 0) return false;
    const int n = static_cast<int>(block.threads.size());
    if (n_exited > 0) {
        set_error(where(waiting->site) + ": __syncthreads reached by " + std::to_string(n_waiting) + " of " +
                  std::to_string(n) + " threads; the other " + std::to_string(n_exited) + " have exited");
        return false;
    }
    for (const Thread& thread : block.threads) {
        if (!(thread.site == waiting->site)) {
            set_error("threads of one block wait at different __syncthreads: " + where(waiting->site) + " and " +
                      where(thread.site));
            return false;
        }
    }
    for (Thread& thread : block.threads) thread.wait = Wait::kNothing;
    return true;
}

inline void run_block(Block& block, const Stacks& stacks) {
    current = &block;
    for (size_t i = 0; i < block.threads.size(); ++i) {
        Thread& thread = block.threads[i];
        thread.wait = Wait::kNothing;
        thread.async_copies.clear();
        thread.async_groups_committed = 0;
        make_context(thread.context, stacks.stack(static_cast<int>(i)), stacks.size(), fiber_entry);
    }
    const int warps = (static_cast<int>(block.threads.size()) + kWarpSize - 1) / kWarpSize;
    do {
        run_phase(warps);
    } while (block.error.empty() && release_block_barrier());
    current = nullptr;
}

// ---- a launch ----------------------------------------------------------------------------------------------------
constexpr size_t kStackBytes = 64 * 1024;

struct Launch {
    dim3 grid, block_shape;
    KernelCall kernel;
    Schedule schedule;
    unsigned seed;
    long n_blocks;
    long next_block = 0;             // taken with __atomic_fetch_add by the workers
    std::vector<std::string> errors;  // one per worker
};

// One OS thread: takes block after block until none is left or one fails.
inline void run_worker(Launch& launch, int worker) {
    const int threads_per_block = static_cast<int>(launch.block_shape.x * launch.block_shape.y * launch.block_shape.z);
    Stacks stacks(threads_per_block, kStackBytes);
    if (!stacks.ok()) {
        launch.errors[worker] = "could not allocate fiber stacks";
        __atomic_store_n(&launch.next_block, launch.n_blocks, __ATOMIC_RELAXED);
        return;
    }
    const dim3 shape = launch.block_shape, grid = launch.grid;
    Block block;
    block.grid_dim = grid;
    block.block_dim = shape;
    block.kernel = launch.kernel;
    block.schedule = launch.schedule;
    block.random.state = launch.seed + 7919u * worker;
    block.threads.resize(threads_per_block);
    for (int i = 0; i < threads_per_block; ++i)
        block.threads[i].index = dim3(i % shape.x, (i / shape.x) % shape.y, i / (shape.x * shape.y));
    for (long b; (b = __atomic_fetch_add(&launch.next_block, 1, __ATOMIC_RELAXED)) < launch.n_blocks;) {
        block.block_idx = dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<long>(grid.x) * grid.y));
        run_block(block, stacks);
        if (!block.error.empty()) {
            launch.errors[worker] = block.error;
            __atomic_store_n(&launch.next_block, launch.n_blocks, __ATOMIC_RELAXED);  // the others stop soon
            return;
        }
    }
}

struct WorkerStart {
    Launch* launch;
    int worker;
};

inline void* worker_main(void* start) {
    auto* s = static_cast<WorkerStart*>(start);
    run_worker(*s->launch, s->worker);
    return nullptr;
}

// Runs the grid on `workers` OS threads; returns "" or the first error.
inline std::string launch(dim3 grid, dim3 block_shape, KernelCall kernel, Schedule schedule, unsigned seed,
                          int workers) {
    const long threads_per_block = static_cast<long>(block_shape.x) * block_shape.y * block_shape.z;
    if (threads_per_block < 1 || threads_per_block > 1024 || block_shape.z > 64)
        return "invalid block shape: 1 to 1024 threads, z at most 64";
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
        return "invalid grid shape: every dimension at least 1, y and z at most 65535";
    Launch launch{grid, block_shape, kernel, schedule, seed, static_cast<long>(grid.x) * grid.y * grid.z};
    workers = static_cast<int>(launch.n_blocks < workers ? launch.n_blocks : (workers < 1 ? 1 : workers));
    launch.errors.resize(workers);
    std::vector<pthread_t> pool(workers);
    std::vector<WorkerStart> starts(workers);
    for (int worker = 1; worker < workers; ++worker) {
        starts[worker] = {&launch, worker};
        if (pthread_create(&pool[worker], nullptr, worker_main, &starts[worker]) != 0) return "pthread_create failed";
    }
    run_worker(launch, 0);
    for (int worker = 1; worker < workers; ++worker) pthread_join(pool[worker], nullptr);
    for (const std::string& error : launch.errors)
        if (!error.empty()) return error;
    return "";
}

// ---- warp shuffles and votes: offer a value, wait at the warp barrier, read the source lane's frozen value --------
enum class Shuffle { kIndex, kXor, kDown, kUp };

template <class T>
T shuffle(unsigned mask, T value, Shuffle kind, int argument, int width, const char* file, int line) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
    if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
        fail({file, line}, "shuffle width must be a power of two from 1 to 32");
    Thread& me = running_thread();
    std::memcpy(&me.shuffle_sent, &value, sizeof(T));
    warp_barrier(mask, file, line);
    const int lane = current->running % kWarpSize;
    const int segment = lane & ~(width - 1);
    int source = lane;
    switch (kind) {
        case Shuffle::kIndex: source = segment + (argument & (width - 1)); break;
        case Shuffle::kXor: source = lane ^ argument; if (source >= segment + width) source = lane; break;
        case Shuffle::kDown: source = lane + argument; if (source >= segment + width) source = lane; break;
        case Shuffle::kUp: source = lane - argument; if (source < segment) source = lane; break;
    }
    if (source < 0 || source >= kWarpSize || !((mask >> source) & 1u)) {
        fail({file, line}, "lane " + std::to_string(lane) + " reads lane " + std::to_string(source) +
                               ", which is outside the mask (the result would be undefined on a GPU)");
    }
    const Thread& peer = current->threads[current->running - lane + source];
    T result;
    std::memcpy(&result, &peer.shuffle_seen, sizeof(T));
    return result;
}

inline unsigned ballot(unsigned mask, bool predicate, const char* file, int line) {
    running_thread().shuffle_sent = predicate ? 1 : 0;
    warp_barrier(mask, file, line);
    const int first = current->running - current->running % kWarpSize;
    unsigned votes = 0;
    for (int lane = 0; lane < kWarpSize; ++lane)
        if (((mask >> lane) & 1u) && current->threads[first + lane].shuffle_seen) votes |= 1u << lane;
    return votes;
}

// ---- .aligned warp collectives: the emulated side of tensor_core.cuh's mma.sync and ldmatrix ----------------------
// Every lane offers a pointer to its operands and waits; then each lane reads the operands of the others through
// operands_of_lane(lane) inside compute(operands_of_lane), and waits again. The second barrier keeps every lane from
// changing its operands, or the shared memory they point at, before all have read: on a GPU the instruction reads for
// the whole warp at once.
template <class Operands, class Compute>
void aligned_warp_collective(const Operands& mine, const char* instruction, const char* file, int line,
                             Compute compute) {
    const Operands* offered = &mine;
    std::memcpy(&running_thread().shuffle_sent, &offered, sizeof offered);
    warp_barrier(kFullMask, file, line, instruction);
    const int first = current->running - current->running % kWarpSize;
    compute([first](int lane) -> const Operands& {
        const Operands* operands;
        std::memcpy(&operands, &current->threads[first + lane].shuffle_seen, sizeof operands);
        return *operands;
    });
    warp_barrier(kFullMask, file, line, instruction);
}

// ---- cp.async: copies that land at issue or when their group is waited for ----------------------------------------
// A GPU may land a copy at any moment between its issue and the wait that retires it; the schedules take the two
// ends. Lockstep lands it at the wait, so a tile read before its wait is stale. The one-warp-at-a-time schedules land
// it at issue, so a warp that refills a buffer before the barrier that says every warp is done reading it overwrites
// what the other warps have yet to read.
inline void async_copy_16(void* shared, const void* global, bool in_bounds, const Site& site) {
    if (reinterpret_cast<uintptr_t>(shared) % 16 != 0 || (in_bounds && reinterpret_cast<uintptr_t>(global) % 16 != 0))
        fail(site, "cp.async of 16 bytes needs 16-byte aligned shared and global addresses");
    Thread& me = running_thread();
    AsyncCopy copy{shared, {}, me.async_groups_committed, site, current->schedule != Schedule::kLockstep};
    if (in_bounds) std::memcpy(copy.bytes, global, sizeof copy.bytes);  // else: zero-filled, `global` not read
    if (copy.landed) std::memcpy(shared, copy.bytes, sizeof copy.bytes);
    me.async_copies.push_back(copy);
}

inline void async_commit() { ++running_thread().async_groups_committed; }

// cp.async.wait_group pending: lands every copy but those of the `pending` most recently committed groups (and those
// not yet committed, which no wait_group covers).
inline void async_wait(int pending) {
    Thread& me = running_thread();
    const long last_landing = me.async_groups_committed - pending;  // groups numbered below this one land
    std::vector<AsyncCopy> still_pending;
    for (const AsyncCopy& copy : me.async_copies) {
        if (copy.group >= last_landing) still_pending.push_back(copy);
        else if (!copy.landed) std::memcpy(copy.shared, copy.bytes, sizeof copy.bytes);
    }
    me.async_copies.swap(still_pending);
}

inline unsigned sync_mask(unsigned mask = kFullMask) { return mask; }
inline int shuffle_width(int width = kWarpSize) { return width; }

// ---- calling a kernel from Python: argument unpacking and the parameter signature --------------------------------
template <class T>
const char* c_type_name() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, float>) return "float";
    else if constexpr (std::is_same_v<U, __half>) return "__half";
    else if constexpr (std::is_same_v<U, __nv_bfloat16>) return "__nv_bfloat16";
    else if constexpr (std::is_same_v<U, double>) return "double";
    else if constexpr (std::is_same_v<U, bool>) return "bool";
    else if constexpr (std::is_same_v<U, char> || std::is_same_v<U, signed char>) return "signed char";
    else if constexpr (std::is_same_v<U, unsigned char>) return "unsigned char";
    else if constexpr (std::is_same_v<U, short>) return "short";
    else if constexpr (std::is_same_v<U, unsigned short>) return "unsigned short";
    else if constexpr (std::is_same_v<U, int>) return "int";
    else if constexpr (std::is_same_v<U, unsigned>) return "unsigned int";
    else if constexpr (std::is_same_v<U, long> || std::is_same_v<U, long long>) return "long long";
    else if constexpr (std::is_same_v<U, unsigned long> || std::is_same_v<U, unsigned long long>)
        return "unsigned long long";
    else static_assert(sizeof(U) == 0, "unsupported kernel parameter type");
}

// "const float*", "float*", "int", ...: what Python checks each argument against.
template <class T>
std::string parameter_type() {
    if constexpr (std::is_pointer_v<T>) {
        using Pointee = std::remove_pointer_t<T>;
        return std::string(std::is_const_v<Pointee> ? "const " : "") + c_type_name<Pointee>() + "*";
    } else {
        return c_type_name<T>();
    }
}

template <class... Params>
std::string signature(void (*)(Params...)) {
    std::string text;
    ((text += (text.empty() ? "" : ";") + parameter_type<std::remove_cv_t<Params>>()), ...);
    return text;
}

template <class... Params>
struct BoundKernel {
    void (*kernel)(Params...);
    std::tuple<std::remove_cv_t<Params>...> values;
    static void run(void* self) {
        auto* bound = static_cast<BoundKernel*>(self);
        std::apply(bound->kernel, bound->values);
    }
};

template <class... Params, size_t... I>
std::string launch_with(void (*kernel)(Params...), const unsigned* grid, const unsigned* block, void** arguments,
                        int schedule, unsigned seed, int workers, std::index_sequence<I...>) {
    BoundKernel<Params...> bound{kernel, {*static_cast<std::remove_cv_t<Params>*>(arguments[I])...}};
    return launch(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                  KernelCall{&BoundKernel<Params...>::run, &bound}, static_cast<Schedule>(schedule), seed, workers);
}

template <class... Params>
std::string launch_kernel(void (*kernel)(Params...), const unsigned* grid, const unsigned* block, void** arguments,
                          int schedule, unsigned seed, int workers) {
    return launch_with(kernel, grid, block, arguments, schedule, seed, workers,
                       std::index_sequence_for<Params...>{});
}

}  // namespace tinytf_emulator

// Makes C entry points for Python: tinytf_signature_<kernel>() and tinytf_launch_<kernel>(...), which returns "" or
// an error message.
#define TINYTF_EMULATOR_EXPORT(kernel)                                                                           \
    extern "C" const char* tinytf_signature_##kernel() {                                                       \
        static const std::string text = ::tinytf_emulator::signature(&kernel);                                   \
        return text.c_str();                                                                                   \
    }                                                                                                          \
    extern "C" const char* tinytf_launch_##kernel(const unsigned* grid, const unsigned* block, void** arguments, \
                                                  int schedule, unsigned seed, int workers) {                   \
        static thread_local std::string error;                                                                 \
        error = ::tinytf_emulator::launch_kernel(&kernel, grid, block, arguments, schedule, seed, workers);     \
        return error.c_str();                                                                                  \
    }

// ---- the CUDA vocabulary -----------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(bytes) __attribute__((aligned(bytes)))
#define __shared__ static thread_local
#define __constant__ static

#define threadIdx (::tinytf_emulator::running_thread().index)
#define blockIdx (::tinytf_emulator::current->block_idx)
#define blockDim (::tinytf_emulator::current->block_dim)
#define gridDim (::tinytf_emulator::current->grid_dim)
#define warpSize 32

#define __syncthreads() ::tinytf_emulator::block_barrier(__FILE__, __LINE__)
#define __syncwarp(...) \
    ::tinytf_emulator::warp_barrier(::tinytf_emulator::sync_mask(__VA_ARGS__), __FILE__, __LINE__)
#define TINYTF_SHUFFLE(kind, mask, value, argument, ...)                                                    \
    ::tinytf_emulator::shuffle((mask), (value), ::tinytf_emulator::Shuffle::kind, (argument),               \
                               ::tinytf_emulator::shuffle_width(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, value, lane, ...) TINYTF_SHUFFLE(kIndex, mask, value, lane, __VA_ARGS__)
#define __shfl_xor_sync(mask, value, lane_mask, ...) TINYTF_SHUFFLE(kXor, mask, value, lane_mask, __VA_ARGS__)
#define __shfl_down_sync(mask, value, delta, ...) TINYTF_SHUFFLE(kDown, mask, value, delta, __VA_ARGS__)
#define __shfl_up_sync(mask, value, delta, ...) TINYTF_SHUFFLE(kUp, mask, value, delta, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::tinytf_emulator::ballot((mask), (predicate), __FILE__, __LINE__)
#define __any_sync(mask, predicate) (__ballot_sync(mask, predicate) != 0u)
#define __all_sync(mask, predicate) (__ballot_sync(mask, !(predicate)) == 0u)

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return std::fmin(std::fmax(x, 0.0f), 1.0f); }
inline float __int_as_float(int bits) { float value; std::memcpy(&value, &bits, sizeof value); return value; }
inline float __int_as_float(unsigned bits) { float value; std::memcpy(&value, &bits, sizeof value); return value; }
inline int __float_as_int(float value) { int bits; std::memcpy(&bits, &value, sizeof bits); return bits; }
inline float __uint_as_float(unsigned bits) { return __int_as_float(bits); }
inline unsigned __float_as_uint(float value) { return static_cast<unsigned>(__float_as_int(value)); }
template <class T>
T __ldg(const T* pointer) { return *pointer; }
template <class A, class B>
auto min(A a, B b) { return b < a ? b : a; }
template <class A, class B>
auto max(A a, B b) { return a < b ? b : a; }
// Atomics on any 4- or 8-byte type through the GCC builtins (a compare-and-swap loop where no instruction exists).
template <class T>
T atomicCAS(T* address, T expected, T desired) {
    __atomic_compare_exchange(address, &expected, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
template <class T, class Update>
T atomic_update(T* address, Update update) {
    T old;
    __atomic_load(address, &old, __ATOMIC_SEQ_CST);
    for (T desired = update(old);
         !__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);)
        desired = update(old);
    return old;
}
template <class T>
T atomicAdd(T* address, T value) { return atomic_update(address, [value](T old) { return old + value; }); }
template <class T>
T atomicMax(T* address, T value) {
    return atomic_update(address, [value](T old) { return old < value ? value : old; });
}
template <class T>
T atomicExch(T* address, T value) {
    T old;
    __atomic_exchange(address, &value, &old, __ATOMIC_SEQ_CST);
    return old;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
