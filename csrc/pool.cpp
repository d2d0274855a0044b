// The kernels' thread pool: see pool.h for why it is not OpenMP.
#include "pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace pymesh {
namespace {

struct Job {
  const std::function<void(int64_t)>* fn = nullptr;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int> users{0};  // helpers inside run_chunks()
  int wanted = 0;             // helpers that may join
};

void run_chunks(Job& job) {
  for (;;) {
    const int64_t c = job.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= job.chunks) return;
    (*job.fn)(c);
    job.done.fetch_add(1, std::memory_order_release);
  }
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
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      ++epoch_;
    }
    if (helpers == 1) cv_.notify_one();
    else cv_.notify_all();
    run_chunks(job);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = nullptr;  // late helpers no longer see this job
    }
    // Only chunks already claimed remain, each by a thread that is running.
    while (job.done.load(std::memory_order_acquire) < chunks ||
           job.users.load(std::memory_order_acquire) > 0)
      std::this_thread::yield();
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

  void helper(int index) {
    pthread_setname_np(pthread_self(), "pymesh-kernels");
    uint64_t seen = 0;
    for (;;) {
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return epoch_ != seen; });
        seen = epoch_;
        if (job_ == nullptr || index >= job_->wanted) continue;
        job = job_;
        job->users.fetch_add(1, std::memory_order_acq_rel);
      }
      run_chunks(*job);
      job->users.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex run_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable cv_;
  uint64_t epoch_ = 0;
  Job* job_ = nullptr;
  std::vector<std::thread> threads_;
  static Pool* current_;
};

Pool* Pool::current_ = nullptr;

}  // namespace

void pool_run(int64_t chunks, int helpers, const std::function<void(int64_t)>& fn) {
  Pool::instance().run(chunks, helpers, fn);
}

int pool_size() { return Pool::instance().size(); }

}  // namespace pymesh
