#include <pthread.h>

#include "common.h"

/* ---- threads: every kernel splits its output into independent ranges and runs them through
   `run_ranges`: the function `edge_set_parallel` installed (the torch operators install ATen's
   parallel_for: torch's own threads, as many as torch.get_num_threads()), else up to `threads` POSIX threads
   for the call (the ctypes path of an install without the operators). No OpenMP: the same ranges either way. */
static edge_parallel_fn parallel_fn;

void edge_set_parallel(edge_parallel_fn fn) { parallel_fn = fn; }

#define MAX_THREADS 256
struct piece { edge_range_fn fn; void *ctx; int64_t begin, end; };

static void *run_piece(void *arg) {
    const struct piece *p = arg;
    p->fn(p->ctx, p->begin, p->end);
    return 0;
}

/* fn(ctx, begin, end) over [0, n) in at most `threads` ranges, each at least `grain` long */
void run_ranges(int64_t n, int64_t grain, edge_range_fn fn, void *ctx, int threads) {
    if (n <= 0) return;
    if (parallel_fn) {
        parallel_fn(n, grain, fn, ctx);
        return;
    }
    int64_t t = (n + grain - 1) / grain;
    t = t < threads ? t : threads;
    t = t < MAX_THREADS ? t : MAX_THREADS;
    if (t <= 1) {
        fn(ctx, 0, n);
        return;
    }
    const int64_t chunk = (n + t - 1) / t;
    struct piece pieces[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int64_t i = 1; i < t; i++) {
        pieces[i] = (struct piece){fn, ctx, i * chunk, (i + 1) * chunk < n ? (i + 1) * chunk : n};
        if (pieces[i].begin >= pieces[i].end) continue;
        started[i] = pthread_create(&ids[i], 0, run_piece, &pieces[i]) == 0;
        if (!started[i]) fn(ctx, pieces[i].begin, pieces[i].end);  /* no thread to be had: here */
    }
    fn(ctx, 0, chunk < n ? chunk : n);
    for (int64_t i = 1; i < t; i++)
        if (started[i]) pthread_join(ids[i], 0);
}
