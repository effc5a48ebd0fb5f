/* The engine's masked sum on the CPU, float32:

       out[t, h, :] = sum_k m_t[h, k] * x_t[k, :]      for every token t

   m_t: a token's mask block [H, n] (shared by tokens, per position or per example);
   x_t: the token's rows of the table of source differences [n, D]; out [T, H, D].

   One small product per token, H <= ~40, n <= ~160, D = d_model. A BLAS packs both
   operands for every token and then reads each row of the table from memory while
   computing; here each token's product runs as register tiles of RB rows x CV vectors
   that read the table rows in place, the next column panel is prefetched while the
   current one is computed, and the result is written with streaming stores (the
   result is not read before much more than the cache has streamed through). The
   sum over k runs in order with fused multiply-adds, as the BLAS does.

   Built at first use by auto_circuit/kernels/masked_sum.py with the machine's C
   compiler (-O3 -march=native); without one, the engine uses torch.matmul. */

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define VL 16
#define RB 8
#define STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#define FENCE() _mm_sfence()
#elif defined(__AVX__)
#include <immintrin.h>
#define VL 8
#define RB 4
#define STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
#define FENCE() _mm_sfence()
#else
#define VL 4
#define RB 4
#define STREAM(p, v) memcpy((p), &(v), sizeof(vf))
#define FENCE() ((void)0)
#endif
#define CV_MAX 3 /* vectors per register tile row */
#define MAX_THREADS 64

typedef float vf __attribute__((vector_size(VL * 4)));

/* One tile: R rows x CV vectors of out, accumulated over all n rows of x. pf: the
   column of the next panel to prefetch, one line per row of x (NULL: none). */
#define TILE(R, CV)                                                                        \
  static void tile_##R##_##CV(const float *m, int64_t m_row, const float *x, int64_t x_row, \
                              float *o, int64_t D, int64_t n, const float *pf) {           \
    vf acc[R][CV];                                                                         \
    for (int r = 0; r < R; r++)                                                            \
      for (int j = 0; j < CV; j++) acc[r][j] = (vf){0};                                    \
    for (int64_t k = 0; k < n; k++) {                                                      \
      const float *xk = x + k * x_row;                                                     \
      vf xv[CV];                                                                           \
      if (pf) __builtin_prefetch(pf + k * x_row, 0, 2);                                    \
      for (int j = 0; j < CV; j++) memcpy(&xv[j], xk + j * VL, sizeof(vf));                \
      for (int r = 0; r < R; r++) {                                                        \
        float mv = m[r * m_row + k];                                                       \
        for (int j = 0; j < CV; j++) acc[r][j] += mv * xv[j];                              \
      }                                                                                    \
    }                                                                                      \
    for (int r = 0; r < R; r++)                                                            \
      for (int j = 0; j < CV; j++) STREAM(o + r * D + j * VL, acc[r][j]);                  \
  }

#define TILES_FOR(R) TILE(R, 1) TILE(R, 2) TILE(R, 3)
TILES_FOR(1) TILES_FOR(2) TILES_FOR(3) TILES_FOR(4)
#if RB > 4
TILES_FOR(5) TILES_FOR(6) TILES_FOR(7) TILES_FOR(8)
#endif

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float *, int64_t,
                        int64_t, const float *);
#define ROW(R) {tile_##R##_1, tile_##R##_2, tile_##R##_3}
static const tile_fn tiles[RB + 1][CV_MAX] = {{0, 0, 0}, ROW(1), ROW(2), ROW(3), ROW(4)
#if RB > 4
                                              , ROW(5), ROW(6), ROW(7), ROW(8)
#endif
};

typedef struct {
  const float *m;
  int64_t m_batch, m_seq, m_row; /* mask strides (0: shared); elements in a row are contiguous */
  const float *x;
  int64_t x_tok, x_row; /* table strides; elements in a row are contiguous */
  float *out;           /* [T, H, D], contiguous */
  int64_t seq, H, n, D, t0, t1;
} job_t;

static void *run_job(void *arg) {
  const job_t *j = (const job_t *)arg;
  for (int64_t t = j->t0; t < j->t1; t++) {
    const float *m = j->m + (t / j->seq) * j->m_batch + (t % j->seq) * j->m_seq;
    const float *x = j->x + t * j->x_tok;
    float *o = j->out + t * j->H * j->D;
    for (int64_t c0 = 0; c0 < j->D;) {
      int64_t cv = (j->D - c0) / VL < CV_MAX ? (j->D - c0) / VL : CV_MAX;
      int64_t next = c0 + cv * VL; /* the panel to prefetch: next columns, or next token */
      const float *panel = next < j->D ? x + next : (t + 1 < j->t1 ? x + j->x_tok : 0);
      for (int64_t r0 = 0, rb = 0; r0 < j->H; r0 += RB, rb++) {
        int64_t rows = j->H - r0 < RB ? j->H - r0 : RB;
        /* spread the panel's prefetches over the first row blocks: one vector each */
        const float *pf = panel && rb < CV_MAX ? panel + rb * VL : 0;
        tiles[rows][cv - 1](m + r0 * j->m_row, j->m_row, x + c0, j->x_row, o + r0 * j->D + c0,
                            j->D, j->n, pf);
      }
      c0 = next;
    }
  }
  FENCE();
  return 0;
}

/* Returns 0, or -1 when D is not a multiple of vector_floats() or out is not aligned to
   a vector (the caller then uses its fallback). */
int masked_sum(const float *m, int64_t m_batch, int64_t m_seq, int64_t m_row, const float *x,
               int64_t x_tok, int64_t x_row, float *out, int64_t batch, int64_t seq, int64_t H,
               int64_t n, int64_t D, int threads) {
  if (D % VL || ((uintptr_t)out) % (VL * 4)) return -1;
  int64_t T = batch * seq;
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > T) threads = (int)T;
  job_t jobs[MAX_THREADS];
  for (int i = 0; i < threads; i++)
    jobs[i] = (job_t){m, m_batch, m_seq, m_row, x, x_tok, x_row, out, seq, H, n, D,
                      T * i / threads, T * (i + 1) / threads};
#ifdef _OPENMP
  /* torch's own OpenMP runtime (libgomp.so.1 is loaded by torch and found by its
     name): its idle workers spin for a while after each torch op, so separate
     threads would compete with them for the cores. */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int i = 0; i < threads; i++) run_job(&jobs[i]);
#else
  pthread_t handles[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int i = 1; i < threads; i++)
    started[i] = pthread_create(&handles[i], 0, run_job, &jobs[i]) == 0;
  run_job(&jobs[0]);
  for (int i = 1; i < threads; i++) {
    if (started[i])
      pthread_join(handles[i], 0);
    else
      run_job(&jobs[i]);
  }
#endif
  return 0;
}

int vector_floats(void) { return VL; }
