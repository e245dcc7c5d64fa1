// Launch machinery of the CPU kernel emulator, linked into every emulated kernel library.
//
// A launch runs the grid's blocks one after another (in order, or reversed on request). Each
// of a block's threads is an OS thread, so __syncthreads and warp operations are real barriers
// and lanes really run concurrently, like independent thread scheduling on Volta and later.
// A thread that returns from the kernel counts as arrived at later __syncthreads (as on the
// hardware) but makes any later full-mask warp operation of its warp an error.
//
// Errors (bad warp operations, a barrier waiting past the timeout, misaligned or null memory
// accesses and out-of-bounds indexing of fixed-size arrays, which the UB sanitizer reports
// through the handlers at the bottom) fail the launch: every thread unwinds out of the
// kernel, remaining blocks are skipped, and nybble_emu_launch returns the first error.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "nybble_emu_kernels.h"
#include "nybble_emu_runtime.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace nybble_emu {

const KernelEntry* kernel_table(int* count);  // generated per kernel library

namespace {

using Clock = std::chrono::steady_clock;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr auto kPollInterval = std::chrono::milliseconds(20);
// With far more threads than cores, a waiter that yields its core a few times usually sees the
// barrier release without the cost of a futex sleep and wake-up (measured: 5x faster warp
// operations on 2 cores); only then does it sleep.
constexpr int kYieldsBeforeSleep = 32;

// Thrown inside an emulated thread once its launch has failed: unwinds it out of the kernel.
struct LaunchAborted {};

// A barrier generation that waiters sleep on with a futex: woken threads return without
// re-taking a mutex, which matters with hundreds of threads on a few cores.
class Generation {
   public:
    std::uint32_t load() const { return value_.load(std::memory_order_acquire); }
    // Bumps the generation (the caller holds the barrier's mutex) and wakes every sleeper.
    void advance() {
        value_.fetch_add(1, std::memory_order_release);
        syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&value_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr,
                nullptr, 0);
    }
    // Sleeps while the generation is still `seen`, at most one poll interval.
    void sleep_while(std::uint32_t seen) const {
        timespec poll{0, std::chrono::nanoseconds(kPollInterval).count()};
        syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&value_), FUTEX_WAIT_PRIVATE, seen, &poll, nullptr,
                0);
    }

   private:
    std::atomic<std::uint32_t> value_{0};
};
static_assert(sizeof(Generation) == sizeof(std::uint32_t), "a futex word");

// Where each thread is, for deadlock reports.
enum class Where : unsigned char { kRunning, kSyncthreads, kWarpOp, kExited };

std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

class Launch;
thread_local Launch* t_launch = nullptr;
thread_local unsigned t_tid = 0;

class Launch {
   public:
    Launch(const KernelEntry& kernel, void** args, dim3 grid, dim3 block, double timeout_s, bool reverse)
        : kernel_(kernel),
          args_(args),
          grid_(grid),
          block_(block),
          threads_(block.x * block.y * block.z),
          timeout_(std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))),
          reverse_(reverse),
          where_(threads_),
          warps_((threads_ + 31) / 32) {
        for (auto& w : warps_) w = std::make_unique<Warp>();
        reset_block();
    }

    // Runs the whole grid; returns the first error ("" when none).
    std::string run() {
        std::vector<std::thread> workers;
        workers.reserve(threads_);
        try {
            for (unsigned t = 0; t < threads_; ++t) workers.emplace_back([this, t] { worker(t); });
        } catch (const std::system_error& e) {
            // The threads already started would wait for the missing ones: they leave at the gate.
            abandoned_ = true;
            record_error(format("could not start the %u threads of a block: %s", threads_, e.what()));
        }
        start_gate_.advance();
        for (auto& w : workers) w.join();
        return error();
    }

    // Records the first error of the launch; every waiting thread sees it within a poll interval.
    void record_error(const std::string& message) {
        std::lock_guard<std::mutex> lock(error_mu_);
        if (failed_.load()) return;
        error_ = message;
        failed_.store(true);
    }
    // The same, naming the failing emulated thread.
    void fail(const std::string& message) {
        record_error(format("block (%u,%u,%u) thread %u: ", blockIdx.x, blockIdx.y, blockIdx.z, t_tid) + message);
    }
    [[noreturn]] void fail_and_abort(const std::string& message) {
        fail(message);
        throw LaunchAborted{};
    }
    bool failed() const { return failed_.load(); }
    std::string error() {
        std::lock_guard<std::mutex> lock(error_mu_);
        return error_;
    }

    void syncthreads() {
        Where_guard at(*this, Where::kSyncthreads);
        std::unique_lock<std::mutex> lock(block_mu_);
        const std::uint32_t generation = block_generation_.load();
        if (++block_arrived_ == block_participants_) {
            release_block_barrier();
            return;
        }
        lock.unlock();
        wait(block_generation_, generation, "__syncthreads");
    }

    const std::uint64_t* warp_exchange(unsigned mask, WarpOp op, std::uint64_t value) {
        Where_guard at(*this, Where::kWarpOp);
        Warp& w = *warps_[t_tid / 32];
        const unsigned lane = t_tid % 32;
        std::unique_lock<std::mutex> lock(w.mu);
        if (mask != kFullMask)
            fail_and_abort(format("warp operation with mask 0x%08x: the emulator supports full-warp masks only", mask));
        if (w.lanes < 32)
            fail_and_abort(format("full-mask warp operation in a warp of %u threads (block size %u is not a "
                                  "multiple of 32)", w.lanes, threads_));
        if (w.live < 32)
            fail_and_abort(format("full-mask warp operation while %u lane(s) of warp %u have returned from the "
                                  "kernel: the whole warp must take part", 32 - w.live, t_tid / 32));
        const int buffer = w.phase;
        w.values[buffer][lane] = value;
        w.ops[buffer][lane] = op;
        const std::uint32_t generation = w.generation.load();
        if (++w.arrived == 32) {
            for (int l = 0; l < 32; ++l)
                if (w.ops[buffer][l] != op)
                    fail_and_abort(format("lanes of warp %u met in different warp operations (%d and %d): "
                                          "divergent warp-synchronous code", t_tid / 32, int(w.ops[buffer][l]), int(op)));
            // Double buffering: a lane can only reuse this buffer after the whole warp has passed
            // the next exchange, by which time everyone has read this one.
            w.arrived = 0;
            w.phase ^= 1;
            w.generation.advance();
        } else {
            lock.unlock();
            wait(w.generation, generation, "a warp operation");
        }
        return w.values[buffer];
    }

   private:
    struct Warp {
        std::mutex mu;
        unsigned lanes = 32, live = 32, arrived = 0;
        Generation generation;
        int phase = 0;
        std::uint64_t values[2][32] = {};
        WarpOp ops[2][32] = {};
    };

    class Where_guard {
       public:
        Where_guard(Launch& l, Where w) : l_(l) { l_.where_[t_tid].store(w); }
        ~Where_guard() { l_.where_[t_tid].store(Where::kRunning); }

       private:
        Launch& l_;
    };

    void worker(unsigned tid) {
        while (start_gate_.load() == 0) start_gate_.sleep_while(0);
        if (abandoned_) return;  // written before the gate opened
        t_launch = this;
        t_tid = tid;
        threadIdx = {tid % block_.x, (tid / block_.x) % block_.y, tid / (block_.x * block_.y)};
        const std::uint64_t blocks = std::uint64_t(grid_.x) * grid_.y * grid_.z;
        for (std::uint64_t b = 0; b < blocks; ++b) {
            const std::uint64_t linear = reverse_ ? blocks - 1 - b : b;
            blockIdx = {unsigned(linear % grid_.x), unsigned(linear / grid_.x % grid_.y),
                        unsigned(linear / (std::uint64_t(grid_.x) * grid_.y))};
            where_[tid].store(Where::kRunning);
            try {
                kernel_.invoke(args_);
            } catch (const LaunchAborted&) {
            } catch (const std::exception& e) {
                fail(format("C++ exception in the kernel: %s", e.what()));
            }
            exit_kernel();
            if (end_of_block()) break;
        }
        t_launch = nullptr;
    }

    // The thread left the kernel: it no longer holds up __syncthreads, and its warp can no
    // longer run full-mask operations.
    void exit_kernel() {
        where_[t_tid].store(Where::kExited);
        {
            std::lock_guard<std::mutex> lock(block_mu_);
            --block_participants_;
            if (block_arrived_ > 0 && block_arrived_ == block_participants_) release_block_barrier();
        }
        Warp& w = *warps_[t_tid / 32];
        std::lock_guard<std::mutex> lock(w.mu);
        --w.live;
        if (w.arrived > 0)
            fail(format("lane %u returned from the kernel while %u lane(s) of warp %u wait in a full-mask warp "
                        "operation", t_tid % 32, w.arrived, t_tid / 32));
    }

    // Waits for every thread to finish the block (the next block reuses the shared statics);
    // the last one resets the barriers. Returns true when the launch stops here, the same
    // answer for every thread.
    bool end_of_block() {
        std::unique_lock<std::mutex> lock(end_mu_);
        const std::uint32_t generation = end_generation_.load();
        if (++end_arrived_ == threads_) {
            end_arrived_ = 0;
            stop_ = failed();
            reset_block();
            end_generation_.advance();
            return stop_;
        }
        lock.unlock();
        for (int spin = 0; spin < kYieldsBeforeSleep && end_generation_.load() == generation; ++spin) sched_yield();
        const auto deadline = Clock::now() + timeout_;
        while (end_generation_.load() == generation) {
            if (Clock::now() >= deadline) {
                // A thread that never leaves the kernel (an endless loop) cannot be unwound.
                std::fprintf(stderr,
                             "nybble CUDA emulator: %s: a thread of block (%u,%u,%u) did not finish within the "
                             "timeout; aborting\n%s\n",
                             kernel_.name, blockIdx.x, blockIdx.y, blockIdx.z, error().c_str());
                std::abort();
            }
            end_generation_.sleep_while(generation);
        }
        return stop_;  // written before the generation advanced, read after: ordered by it
    }

    void reset_block() {
        block_participants_ = threads_;
        block_arrived_ = 0;
        for (std::size_t i = 0; i < warps_.size(); ++i) {
            Warp& w = *warps_[i];
            w.lanes = w.live = std::min(32u, threads_ - unsigned(i) * 32);
            w.arrived = 0;
        }
    }

    void release_block_barrier() {
        block_arrived_ = 0;
        block_generation_.advance();
    }

    // Waits (without holding the barrier's mutex) until `generation` moves on from `seen`;
    // throws LaunchAborted once the launch failed, and fails it after the timeout (deadlock).
    void wait(const Generation& generation, std::uint32_t seen, const char* what) {
        const auto deadline = Clock::now() + timeout_;
        for (int spin = 0; spin < kYieldsBeforeSleep && generation.load() == seen; ++spin) sched_yield();
        while (generation.load() == seen) {
            if (failed()) throw LaunchAborted{};
            if (Clock::now() >= deadline) {
                fail_and_abort(format("deadlock: waited %.1f s in %s; %s", std::chrono::duration<double>(timeout_).count(),
                                      what, census().c_str()));
            }
            generation.sleep_while(seen);
        }
    }

    // "n running, n in __syncthreads, n in warp operations, n returned" for deadlock reports.
    std::string census() const {
        unsigned counts[4] = {};
        for (const auto& w : where_) ++counts[static_cast<int>(w.load())];
        return format("threads of the block: %u running, %u in __syncthreads, %u in warp operations, %u returned",
                      counts[0], counts[1], counts[2], counts[3]);
    }

    const KernelEntry& kernel_;
    void** args_;
    const dim3 grid_, block_;
    const unsigned threads_;
    const Clock::duration timeout_;
    const bool reverse_;

    Generation start_gate_;  // advanced once every thread exists
    bool abandoned_ = false;
    std::vector<std::atomic<Where>> where_;
    std::vector<std::unique_ptr<Warp>> warps_;

    std::mutex block_mu_;
    unsigned block_participants_ = 0, block_arrived_ = 0;
    Generation block_generation_;

    std::mutex end_mu_;
    unsigned end_arrived_ = 0;
    Generation end_generation_;
    bool stop_ = false;

    std::mutex error_mu_;
    std::atomic<bool> failed_{false};
    std::string error_;
};

Launch& current() {
    if (t_launch == nullptr) {
        std::fprintf(stderr, "nybble CUDA emulator: a device function ran outside a kernel launch\n");
        std::abort();
    }
    return *t_launch;
}

std::mutex g_launch_mu;  // one launch at a time: blockDim, gridDim and the shared statics are global
std::string g_last_error;

}  // namespace

const std::uint64_t* warp_exchange(unsigned mask, WarpOp op, std::uint64_t value) {
    return current().warp_exchange(mask, op, value);
}

unsigned lane_id() { return t_tid % 32; }

}  // namespace nybble_emu

void __syncthreads() { nybble_emu::current().syncthreads(); }

// ---------------------------------------------------------------------------- C interface

extern "C" {

int nybble_emu_kernel_count() {
    int count = 0;
    nybble_emu::kernel_table(&count);
    return count;
}

const char* nybble_emu_kernel_name(int i) {
    int count = 0;
    return nybble_emu::kernel_table(&count)[i].name;
}

int nybble_emu_kernel_max_threads(int i) {
    int count = 0;
    return nybble_emu::kernel_table(&count)[i].max_threads;
}

const char* nybble_emu_last_error() { return nybble_emu::g_last_error.c_str(); }

// Returns 0 on success, else 1 with the reason in nybble_emu_last_error().
int nybble_emu_launch(int kernel_index, const unsigned* grid, const unsigned* block, void** args, const char* arg_kinds,
                      const int* arg_sizes, int num_args, double timeout_s, int reverse_blocks) {
    using namespace nybble_emu;
    std::lock_guard<std::mutex> lock(g_launch_mu);
    int count = 0;
    const KernelEntry& kernel = kernel_table(&count)[kernel_index];
    std::vector<ArgSpec> specs(num_args);
    for (int i = 0; i < num_args; ++i) specs[i] = {arg_kinds[i], arg_sizes[i]};
    char err[512];
    if (!kernel.check(specs.data(), num_args, err, sizeof err)) {
        g_last_error = std::string(kernel.name) + ": " + err;
        return 1;
    }
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    Launch launch(kernel, args, gridDim, blockDim, timeout_s, reverse_blocks != 0);
    const std::string error = launch.run();
    if (error.empty()) return 0;
    g_last_error = std::string(kernel.name) + ": " + error;
    return 1;
}

// ---------------------------------------------------------------------------- UB sanitizer

// A minimal runtime for -fsanitize=alignment,null,bounds: the reports fail the launch (a
// misaligned vector access faults on the GPU) instead of going to libubsan.
struct UbsanLocation {
    const char* file;
    std::uint32_t line, column;
};
struct UbsanType {
    std::uint16_t kind, info;
    char name[1];
};
struct UbsanTypeMismatch {
    UbsanLocation loc;
    const UbsanType* type;
    unsigned char log_alignment, check_kind;
};
struct UbsanOutOfBounds {
    UbsanLocation loc;
    const UbsanType* array_type;
    const UbsanType* index_type;
};

static std::string where_in_source(const UbsanLocation& loc) {
    const char* slash = std::strrchr(loc.file, '/');
    return nybble_emu::format("%s:%u:%u", slash ? slash + 1 : loc.file, loc.line, loc.column);
}

[[noreturn]] static void ub_report(const std::string& message) {
    if (nybble_emu::t_launch == nullptr) {
        std::fprintf(stderr, "nybble CUDA emulator: %s\n", message.c_str());
        std::abort();
    }
    nybble_emu::t_launch->fail_and_abort(message);
}

__attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* d, std::uintptr_t ptr) {
    static const char* const kAccess[] = {"load of", "store to", "reference binding to", "member access within",
                                          "member call on", "constructor call on"};
    const char* access = d->check_kind < 6 ? kAccess[d->check_kind] : "use of";
    if (ptr == 0) ub_report(nybble_emu::format("%s null pointer of type %s at %s", access, d->type->name,
                                               where_in_source(d->loc).c_str()));
    ub_report(nybble_emu::format("%s misaligned address 0x%llx for type %s, which needs %u-byte alignment, at %s",
                                 access, static_cast<unsigned long long>(ptr), d->type->name, 1u << d->log_alignment,
                                 where_in_source(d->loc).c_str()));
}
__attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatch* d,
                                                                                 std::uintptr_t ptr) {
    __ubsan_handle_type_mismatch_v1(d, ptr);
}

__attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds(UbsanOutOfBounds* d, std::uintptr_t index) {
    // Integer index types are passed inline: info = log2(bit width) << 1 | is_signed.
    const unsigned bits = 1u << (d->index_type->info >> 1);
    long long value = static_cast<long long>(index);
    if ((d->index_type->info & 1) && bits < 64) value = static_cast<long long>(index << (64 - bits)) >> (64 - bits);
    ub_report(nybble_emu::format("index %lld out of bounds for type %s at %s", value, d->array_type->name,
                                 where_in_source(d->loc).c_str()));
}
__attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds_abort(UbsanOutOfBounds* d,
                                                                              std::uintptr_t index) {
    __ubsan_handle_out_of_bounds(d, index);
}

}  // extern "C"
