// The kernels' thread pool: see pool.h for why it is not OpenMP.
//
// Decode calls ~150 small GEMVs per token, 5-40 us each: waking a helper
// blocked in the kernel (futex) costs as much as the work. So after a job a
// helper spins for a bounded time before it blocks again (200 us while the load
// average leaves a core free, else none; PYMESH_POOL_SPIN_US overrides): back-to-back
// kernels find it awake, an idle process burns at most that much CPU once. The
// caller never waits for a helper that is late.
#include "pool.h"

#include <immintrin.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <stdlib.h>
#include <mutex>
#include <thread>
#include <vector>

namespace pymesh {
namespace {

struct Job {
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t chunks = 0;
  int wanted = 0;  // helpers that may join
  alignas(64) std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> done{0};
};

void run_chunks(Job& job) {
  for (;;) {
    const int64_t c = job.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= job.chunks) return;
    (*job.fn)(c);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

// -1: not set, spin only while the machine has a free core (see machine_has_room).
int64_t spin_microseconds_from_env() {
  const char* v = std::getenv("PYMESH_POOL_SPIN_US");
  if (v == nullptr || *v == '\0') return -1;
  const long n = std::strtol(v, nullptr, 10);
  return n < 0 ? 0 : n;
}

constexpr int64_t kDefaultSpinUs = 200;

inline void cpu_relax() { _mm_pause(); }

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

#ifndef PYMESH_POOL_STALL_US
#define PYMESH_POOL_STALL_US 100
#endif
constexpr int64_t kStallUs = PYMESH_POOL_STALL_US;  // a wait this long means a helper lost its core
constexpr int64_t kBusyHoldUs = 50000;  // then small jobs skip the helpers this long

// Whether the 1-minute load average leaves room for a spinning helper: our own
// decode counts ~2 (caller + spinning helper), so up to cores + 1.5. On a machine
// oversubscribed beyond that (measured on 2 cores at load 4-11: decode 20-40% slower
// with spinning) the helper would take CPU from the caller it is meant to help.
// Re-read every second.
bool load_has_room() {
  static std::atomic<int64_t> checked_us{-2000000};
  static std::atomic<bool> room{false};
  const int64_t now = now_us();
  if (now - checked_us.load(std::memory_order_relaxed) >= 1000000) {
    checked_us.store(now, std::memory_order_relaxed);
    double load = 0.0;
    const unsigned cores = std::thread::hardware_concurrency();
    room.store(getloadavg(&load, 1) == 1 && load < (cores == 0 ? 1 : cores) + 1.5,
               std::memory_order_relaxed);
  }
  return room.load(std::memory_order_relaxed);
}

class Pool {
 public:
  void run(int64_t chunks, int helpers, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock() || helpers <= 0 || chunks <= 1) {
      // Another thread is using the pool (or nothing to share): do it all here.
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    ensure_threads(helpers);
    Job job;
    job.fn = &fn;
    job.chunks = chunks;
    job.wanted = helpers;
    job_.store(&job, std::memory_order_seq_cst);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      // A sleeper checks epoch_ under mutex_ before it blocks: taking the lock
      // here means it either saw the new epoch or is already waiting.
      { std::lock_guard<std::mutex> lock(mutex_); }
      if (helpers == 1) cv_.notify_one();
      else cv_.notify_all();
    }
    run_chunks(job);
    const int64_t stall_start = now_us();
    // Late helpers no longer see this job; one that already saw it is counted in users_.
    job_.store(nullptr, std::memory_order_seq_cst);
    while (job.done.load(std::memory_order_acquire) < chunks ||
           users_.load(std::memory_order_seq_cst) > 0)
      cpu_relax();
    // A helper that claimed a chunk and then lost its core held the caller up: the
    // machine is busy, so small jobs run on the caller alone for a while.
    const int64_t end = now_us();
    if (end - stall_start > kStallUs) busy_until_us_.store(end + kBusyHoldUs, std::memory_order_relaxed);
  }

  bool helpers_reliable() const {
    if (spin_us_ == 0 || (spin_us_ < 0 && !load_has_room())) return false;  // helpers asleep
    return now_us() >= busy_until_us_.load(std::memory_order_relaxed);
  }

  int size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int>(threads_.size());
  }

  static Pool& instance() {
    // Leaked on purpose: helpers must outlive static destruction at exit.
    static std::once_flag once;
    std::call_once(once, [] {
      current_ = new Pool();
      // A forked child has none of the helpers and maybe a mutex held by one:
      // it starts a fresh pool (the old one is leaked, its memory is the child's).
      pthread_atfork(nullptr, nullptr, [] { current_ = new Pool(); });
    });
    return *current_;
  }

 private:
  void ensure_threads(int n) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (n > 256) n = 256;
    while (static_cast<int>(threads_.size()) < n) {
      const int index = static_cast<int>(threads_.size());
      threads_.emplace_back([this, index] { helper(index); });
      threads_.back().detach();
    }
  }

  // Wait for an epoch other than `seen`: spin first, then block.
  uint64_t wait_epoch(uint64_t seen) {
    using clock = std::chrono::steady_clock;
    const int64_t spin = spin_us_ >= 0 ? spin_us_ : (load_has_room() ? kDefaultSpinUs : 0);
    const auto deadline = clock::now() + std::chrono::microseconds(spin);
    for (uint32_t i = 0;; ++i) {
      const uint64_t e = epoch_.load(std::memory_order_acquire);
      if (e != seen) return e;
      if ((i & 255u) == 255u && clock::now() >= deadline) break;
      cpu_relax();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    cv_.wait(lock, [&] { return epoch_.load(std::memory_order_seq_cst) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
    return epoch_.load(std::memory_order_acquire);
  }

  void helper(int index) {
    pthread_setname_np(pthread_self(), "pymesh-kernels");
    uint64_t seen = 0;
    for (;;) {
      seen = wait_epoch(seen);
      users_.fetch_add(1, std::memory_order_seq_cst);
      Job* job = job_.load(std::memory_order_seq_cst);
      if (job != nullptr && index < job->wanted) run_chunks(*job);
      users_.fetch_sub(1, std::memory_order_seq_cst);
    }
  }

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;      // only for blocking and waking helpers
  std::condition_variable cv_;
  const int64_t spin_us_ = spin_microseconds_from_env();
  alignas(64) std::atomic<uint64_t> epoch_{0};
  alignas(64) std::atomic<Job*> job_{nullptr};
  alignas(64) std::atomic<int> users_{0};  // helpers that may be touching *job_
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> busy_until_us_{0};
  std::vector<std::thread> threads_;
  static Pool* current_;
};

Pool* Pool::current_ = nullptr;

}  // namespace

void pool_run(int64_t chunks, int helpers, const std::function<void(int64_t)>& fn) {
  Pool::instance().run(chunks, helpers, fn);
}

int pool_size() { return Pool::instance().size(); }

bool pool_helpers_reliable() { return Pool::instance().helpers_reliable(); }

}  // namespace pymesh
