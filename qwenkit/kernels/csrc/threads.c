/* The OpenMP team the kernels' parallel regions get on the calling thread: its size is that
   thread's own setting (OMP_NUM_THREADS, then omp_set_num_threads, which torch.set_num_threads
   calls), so a thread that computes must have it set (qwenkit/engine/threads.py). For tests. */
#include "kernels.h"

int qk_team_size(void) {
    int size = 0;
#pragma omp parallel
    {
#pragma omp single
        size = omp_get_num_threads();
    }
    return size;
}
