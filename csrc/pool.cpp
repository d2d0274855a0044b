// The kernels' thread pool: see pool.h for why it is not OpenMP.
//
// Decode calls ~150 small GEMVs per token, 5-40 us each: waking a helper
// blocked in the kernel (futex) costs as much as the work. So after a job a
// helper spins for a bounded time before it blocks again (200 us while the load
// average leaves a core free, else none; PYMESH_POOL_SPIN_US overrides): back-to-back
// kernels find it awake, an idle process burns at most that much CPU once.
//
// The caller never waits for a helper that is merely late. Chunks are claimed with a
// compare-and-swap on one word that names the job (generation, chunk count, next
// chunk), so a helper that wakes after the job is over, or is preempted between waking
// and claiming, touches nothing of it; the caller waits only for chunks a helper has
// claimed and is computing, and while it waits it yields the core after a few
// microseconds (the scheduler may have stacked the helper on the caller's core). A
// spinning helper yields only when it finds itself on the core the caller last ran
// on: there its spin would keep the caller off the core for the whole spin (seen as
// ~250 us first calls after a pause, under load). Yielding on every core was tried:
// under load 3-5 on 2 cores the helper was then mostly off its core when the next
// job came (linear's median/min over bench kernels' rows: geometric mean 1.53 vs 1.24).
#include "pool.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

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

// The job's claim word: generation (16 bits), chunk count (24), next chunk (24).
constexpr int kCountBits = 24;
constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
constexpr int64_t kMaxChunks = static_cast<int64_t>(kCountMask);
inline uint64_t claim_word(uint64_t gen, int64_t chunks, int64_t next) {
  return (gen << (2 * kCountBits)) | (static_cast<uint64_t>(chunks) << kCountBits) |
         static_cast<uint64_t>(next);
}

// Claim the next chunk of whatever job `word` names: its index, or -1 when none is left.
// A successful claim keeps the job (and fn) alive until done counts the chunk.
inline int64_t claim(std::atomic<uint64_t>& word) {
  uint64_t w = word.load(std::memory_order_acquire);
  for (;;) {
    const int64_t chunks = static_cast<int64_t>((w >> kCountBits) & kCountMask);
    const int64_t next = static_cast<int64_t>(w & kCountMask);
    if (next >= chunks) return -1;
    if (word.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel,
                                   std::memory_order_acquire))
      return next;
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
constexpr int64_t kStallDebtUs = 5000;  // see Pool::note_stall

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
    if (!busy.owns_lock() || helpers <= 0 || chunks <= 1 || chunks > kMaxChunks) {
      // Another thread is using the pool (or nothing to share): do it all here.
      for (int64_t c = 0; c < chunks; ++c) fn(c);
      return;
    }
    ensure_threads(helpers);
    // No helper can hold a claim now (the last job's chunks are all done), so the
    // job's fields are the caller's to set before the claim word publishes them.
    fn_ = &fn;
    caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    wanted_.store(helpers, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xffffu;
    word_.store(claim_word(gen_, chunks, 0), std::memory_order_release);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      // A sleeper checks epoch_ under mutex_ before it blocks: taking the lock
      // here means it either saw the new epoch or is already waiting.
      { std::lock_guard<std::mutex> lock(mutex_); }
      if (helpers == 1) cv_.notify_one();
      else cv_.notify_all();
    }
    int64_t own = 0;
    for (int64_t c; (c = claim(word_)) >= 0; ++own) fn(c);
    // Every chunk is claimed: wait for the ones helpers are still computing.
    const int64_t stall_start = now_us();
    for (uint32_t i = 0; done_.load(std::memory_order_acquire) + own < chunks; ++i) {
      if (i < 64) cpu_relax();
      else sched_yield();  // maybe the helper shares this core: let it finish
    }
    const int64_t end = now_us();
    if (end - stall_start > kStallUs) note_stall(end, end - stall_start);
  }

  // A helper that claimed a chunk and then lost its core held the caller up. One such
  // stall now and then (a progress bar redrawing, another process's burst) costs far
  // less than running small jobs alone; stalls eating more than ~10% of the time
  // (the debt leaks 1 us per 10 us, allowing 5 ms of bursts) mean the machine is
  // oversubscribed: small jobs then run on the caller alone for kBusyHoldUs.
  void note_stall(int64_t now, int64_t waited) {
    const int64_t leaked = (now - last_stall_us_) / 10;
    stall_debt_us_ = (stall_debt_us_ > leaked ? stall_debt_us_ - leaked : 0) + waited;
    last_stall_us_ = now;
    if (stall_debt_us_ > kStallDebtUs) {
      busy_until_us_.store(now + kBusyHoldUs, std::memory_order_relaxed);
      stall_debt_us_ = 0;
    }
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
      if ((i & 255u) == 255u) {
        if (clock::now() >= deadline) break;
        // Stacked on the caller's core (the scheduler woke us there while the other
        // core was busy): spinning would keep the caller off its core until our spin
        // ends; give the core back.
        if (sched_getcpu() == caller_cpu_.load(std::memory_order_relaxed)) sched_yield();
      }
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
      if (index >= wanted_.load(std::memory_order_relaxed)) continue;
      for (int64_t c; (c = claim(word_)) >= 0;) {
        (*fn_)(c);  // fn_ is this job's: the caller waits for the claimed chunk
        done_.fetch_add(1, std::memory_order_release);
      }
    }
  }

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;      // only for blocking and waking helpers
  std::condition_variable cv_;
  const int64_t spin_us_ = spin_microseconds_from_env();
  alignas(64) std::atomic<uint64_t> epoch_{0};
  alignas(64) std::atomic<uint64_t> word_{0};  // claim word of the current job
  alignas(64) std::atomic<int64_t> done_{0};   // chunks helpers finished
  const std::function<void(int64_t)>* fn_ = nullptr;
  uint64_t gen_ = 0;
  std::atomic<int> wanted_{0};  // helpers that may join the current job
  std::atomic<int> caller_cpu_{-1};  // the CPU the last job's caller ran on
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> busy_until_us_{0};
  int64_t stall_debt_us_ = 0;  // under run_mutex_
  int64_t last_stall_us_ = 0;
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
