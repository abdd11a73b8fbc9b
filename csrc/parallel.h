// Thread-count-independent parallel loops for the CPU kernels.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__linux__)
// MKL's thread count for the calling thread only (the C entry point that mkl.h names mkl_set_num_threads_local; the
// lower-case symbol is the Fortran one, which takes a pointer). libtorch_cpu exports it when torch uses MKL; the weak
// reference is null otherwise (another BLAS).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#endif

namespace fastattr {

// Whether BLAS can be kept to one thread for the calling thread alone (MKL's per-thread switch is there).
inline bool blas_local_threads() {
#if defined(__linux__)
  return MKL_Set_Num_Threads_Local != nullptr;
#else
  return false;
#endif
}

// BLAS on one thread for the calling thread while in scope (a no-op without MKL's per-thread switch).
class SequentialBlas {
 public:
  SequentialBlas() : previous_(blas_local_threads() ? set_local(1) : 0) {}
  ~SequentialBlas() {
    if (blas_local_threads()) set_local(previous_);  // 0 restores the global setting
  }

 private:
  static int set_local(int threads) {
#if defined(__linux__)
    return MKL_Set_Num_Threads_Local(threads);
#else
    return threads;
#endif
  }
  int previous_;
};

// at::parallel_for over fixed blocks [0, num_blocks): f(b0, b1) on contiguous ranges of blocks, with every BLAS call
// in a block on one thread, so that results never depend on the thread count. (MKL splits some small GEMMs
// differently on two threads than on one, e.g. [9, 16] x [16, 300]; at::parallel_for runs a single block outside any
// parallel region, where MKL would thread it.) Without MKL's per-thread switch the loop is forced into a parallel
// region even for one block, where BLAS libraries do not thread; with it a single block runs inline, which avoids
// waking a thread pool for small calls (a parallel region cost ~0.1 ms here with the other core busy).
template <typename F>
void parallel_blocks(int64_t num_blocks, const F& f) {
  const int64_t range = blas_local_threads() ? num_blocks : std::max<int64_t>(num_blocks, 2);
  at::parallel_for(0, range, 1, [&](int64_t b0, int64_t b1) {
    if (b0 >= num_blocks) return;
    SequentialBlas sequential;
    f(b0, std::min(b1, num_blocks));
  });
}

}  // namespace fastattr
