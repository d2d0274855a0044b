// A small thread pool for the CPU kernels (instead of an OpenMP runtime).
//
// Why not OpenMP: pymesh shares its cores with other processes (local swarms,
// tests). An OpenMP parallel region ends in a barrier that waits for every
// thread of the team, including one that never got a core: the caller then
// sits idle for a scheduler time slice (milliseconds) after the work is done.
// Here the caller works too, helpers claim chunks from an atomic counter, and
// the caller waits only for chunks that were actually claimed; a helper that
// wakes up late finds nothing left and goes back to sleep. Helpers block on a
// condition variable between jobs (no spinning, like OMP_WAIT_POLICY=PASSIVE).
#pragma once

#include <cstdint>
#include <functional>

namespace pymesh {

// Run fn(chunk) for every chunk in [0, chunks), on the calling thread plus up
// to `helpers` pool threads. Chunks may run in any order and concurrently.
// fn must not throw.
void pool_run(int64_t chunks, int helpers, const std::function<void(int64_t)>& fn);

// Whether a helper is likely awake and on a core: false when helpers do not spin
// (PYMESH_POOL_SPIN_US=0, or the load average leaves no free core) and for a while
// after a helper, preempted mid-chunk, held a caller up. Callers then keep small
// jobs to themselves.
bool pool_helpers_reliable();

// Pool threads started so far (they start on first use, up to what is asked).
int pool_size();

}  // namespace pymesh
