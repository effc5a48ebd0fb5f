/* The engine's two products on its table of source differences, CPU, float32.

   masked_sum: every destination's delta, one small product per token t,

       out[t, h, :] = sum_k m_t[h, k] * x_t[k, :]

   with m_t the token's mask block [H, n] (shared by tokens, per position or per
   example), x_t the token's table rows [n, D] (H <= ~40, n <= ~160, D = d_model).
   head_differences: every head's row of the table, P_h - z_h W_O_h.

   A BLAS packs both operands of every small product and then reads each row of the
   table from memory while computing; here each product runs as register tiles of RB
   rows x CV vectors that read their operands in place, the next column panel is
   prefetched while the current one is computed, and the result is written with
   streaming stores (it is not read again before far more than the cache has streamed
   through). The sums over k run in order with fused multiply-adds, as the BLAS's do.

   Built ahead of time, never inside a forward: `python -m auto_circuit.engine.kernels
   build` compiles it with the machine's C compiler (-O3 -march=native -fopenmp) into a
   private cache directory; table_ops.py loads it only where asked to, and only after
   the library's recorded SHA-256 matches. Otherwise the engine uses torch. */

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

/* One tile: R rows x CV vectors of out, accumulated over all n rows of x, starting
   from the rows of init (NULL: from 0). o[r], init[r]: the tile's output and initial
   rows at its first column. pf: the column of the next panel to prefetch, one line
   per row of x (NULL: none). */
#define TILE(R, CV)                                                                        \
  static void tile_##R##_##CV(const float *m, int64_t m_row, const float *x, int64_t x_row, \
                              float *const *o, const float *const *init, int64_t n,        \
                              const float *pf) {                                           \
    vf acc[R][CV];                                                                         \
    for (int r = 0; r < R; r++)                                                            \
      for (int j = 0; j < CV; j++) {                                                       \
        if (init)                                                                          \
          memcpy(&acc[r][j], init[r] + j * VL, sizeof(vf));                                \
        else                                                                               \
          acc[r][j] = (vf){0};                                                             \
      }                                                                                    \
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
      for (int j = 0; j < CV; j++) STREAM(o[r] + j * VL, acc[r][j]);                       \
  }

#define TILES_FOR(R) TILE(R, 1) TILE(R, 2) TILE(R, 3)
TILES_FOR(1) TILES_FOR(2) TILES_FOR(3) TILES_FOR(4)
#if RB > 4
TILES_FOR(5) TILES_FOR(6) TILES_FOR(7) TILES_FOR(8)
#endif

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float *const *,
                        const float *const *, int64_t, const float *);
#define ROW(R) {tile_##R##_1, tile_##R##_2, tile_##R##_3}
static const tile_fn tiles[RB + 1][CV_MAX] = {{0, 0, 0}, ROW(1), ROW(2), ROW(3), ROW(4)
#if RB > 4
                                              , ROW(5), ROW(6), ROW(7), ROW(8)
#endif
};

/* out_o[r, :] = init_o[r, :] + sum_k m_o[r, k] x_o[k, :] for the products o in [o0, o1).
   Elements within a row are contiguous in every operand. */
typedef struct {
  const float *m;
  int64_t m_batch, m_seq, m_row; /* m_o = m + (o / seq) m_batch + (o % seq) m_seq */
  const float *x;
  int64_t x_outer, x_row; /* x_o = x + o x_outer */
  float *out;
  int64_t out_outer, out_row; /* out_o[r] = out + o out_outer + r out_row */
  const float *init;          /* NULL, or init_o[r] = init + o init_outer + */
  int64_t init_outer, init_batch, init_seq, init_len; /* (r / len) batch + (r % len) seq */
  int64_t seq, rows, n, D, o0, o1;
} job_t;

static void *run_job(void *arg) {
  const job_t *j = (const job_t *)arg;
  float *orow[RB];
  const float *irow[RB];
  for (int64_t o = j->o0; o < j->o1; o++) {
    const float *m = j->m + (o / j->seq) * j->m_batch + (o % j->seq) * j->m_seq;
    const float *x = j->x + o * j->x_outer;
    for (int64_t c0 = 0; c0 < j->D;) {
      int64_t cv = (j->D - c0) / VL < CV_MAX ? (j->D - c0) / VL : CV_MAX;
      int64_t next = c0 + cv * VL; /* the panel to prefetch: next columns, or next product */
      const float *panel = next < j->D ? x + next : (o + 1 < j->o1 ? x + j->x_outer : 0);
      for (int64_t r0 = 0, rb = 0; r0 < j->rows; r0 += RB, rb++) {
        int64_t rows = j->rows - r0 < RB ? j->rows - r0 : RB;
        for (int64_t r = 0; r < rows; r++) {
          orow[r] = j->out + o * j->out_outer + (r0 + r) * j->out_row + c0;
          if (j->init)
            irow[r] = j->init + o * j->init_outer + ((r0 + r) / j->init_len) * j->init_batch +
                      ((r0 + r) % j->init_len) * j->init_seq + c0;
        }
        /* spread the panel's prefetches over the first row blocks: one vector each */
        const float *pf = panel && rb < CV_MAX ? panel + rb * VL : 0;
        tiles[rows][cv - 1](m + r0 * j->m_row, j->m_row, x + c0, j->x_row, orow,
                            j->init ? irow : 0, j->n, pf);
      }
      c0 = next;
    }
  }
  FENCE();
  return 0;
}

static void run_jobs(job_t job, int64_t outer, int threads) {
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > outer) threads = (int)outer;
  job_t jobs[MAX_THREADS];
  for (int i = 0; i < threads; i++) {
    jobs[i] = job;
    jobs[i].o0 = outer * i / threads;
    jobs[i].o1 = outer * (i + 1) / threads;
  }
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
}

static int unaligned(const float *p, int64_t stride) {
  return ((uintptr_t)p) % (VL * 4) || stride % VL;
}

/* The engine's masked sum: out[t, h, :] = sum_k m_t[h, k] x_t[k, :] for the tokens
   t = b * seq + s, m_t = m + b m_batch + s m_seq (rows m_row apart), x_t = x + t x_tok
   (rows x_row apart), out [batch * seq, H, D] contiguous. Returns 0, or -1 when D is
   not a multiple of vector_floats() or out is not aligned to a vector (nothing done). */
int masked_sum(const float *m, int64_t m_batch, int64_t m_seq, int64_t m_row, const float *x,
               int64_t x_tok, int64_t x_row, float *out, int64_t batch, int64_t seq,
               int64_t H, int64_t n, int64_t D, int threads) {
  if (D % VL || unaligned(out, D)) return -1;
  job_t job = {m, m_batch, m_seq, m_row, x, x_tok, x_row, out, H * D, D,
               0, 0, 0, 0, 1, seq, H, n, D, 0, 0};
  run_jobs(job, batch * seq, threads);
  return 0;
}

/* Heads' differences into the table: out_h[t, :] = patch_h[t, :] + sum_e zneg_h[t, e]
   w_h[e, :] for the heads h and tokens t = b * seq + s, with zneg_h = zneg + h z_head
   (tokens z_tok apart), w_h = w + h w_head (rows w_row apart), out_h[t] = out + h
   out_head + t out_tok, patch_h[t] = patch + h p_head + b p_batch + s p_seq (0 strides
   broadcast). Returns 0, or -1 as masked_sum does. */
int head_differences(const float *zneg, int64_t z_head, int64_t z_tok, const float *w,
                     int64_t w_head, int64_t w_row, const float *patch, int64_t p_head,
                     int64_t p_batch, int64_t p_seq, float *out, int64_t out_head,
                     int64_t out_tok, int64_t heads, int64_t batch, int64_t seq, int64_t e,
                     int64_t D, int threads) {
  if (D % VL || unaligned(out, out_head) || out_tok % VL) return -1;
  job_t job = {zneg, z_head, 0, z_tok, w, w_head, w_row, out, out_head, out_tok,
               patch, p_head, p_batch, p_seq, seq, 1, batch * seq, e, D, 0, 0};
  run_jobs(job, heads, threads);
  return 0;
}

int vector_floats(void) { return VL; }
