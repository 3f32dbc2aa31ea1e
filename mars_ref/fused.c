/* The fused MARS step on CPU: the chain of mars_ref/pieces.py, one loop per tensor.
 *
 * Compiled and loaded by mars_ref/fused.py (MARS(..., fused=True)). Float32, contiguous tensors.
 *
 * Per tensor the step reads memory twice:
 *
 *   pass 1  mars_sumsq   Σ c_i²  with  c = g + s·(g − g_prev)          (the clipping norm; also the
 *                                                                       finite check: NaN/inf in g
 *                                                                       makes the sum NaN/inf)
 *   pass 2  mars_adamw   c ← c·clip;  m ← β1·m + (1−β1)·c;  v ← β2·v + (1−β2)·c²;
 *           mars_lion    u = m / ((√v/√(1−β2^t) + ε)(1−β1^t))   or   u = sign(m);
 *                        x ← x − η·(λ·x + u);   g_prev ← g  (approx)  or  x_prev ← x  (exact)
 *
 * The norm must be known before the momentum may change, so pass 1 cannot be folded into pass 2:
 * MARS-AdamW moves 11 float arrays per step (pass 1 reads g, g_prev; pass 2 reads x, g, g_prev, m, v
 * and writes x, m, v, g_prev) where fused AdamW moves 7.
 *
 * Conventions: g_prev == NULL means g_prev = 0 (exact mode's first step, and the AdamW fallback
 * with s = 0, where c = g). x_prev != NULL (exact mode): write the pre-step x there. Otherwise a
 * g_prev (approx mode) is overwritten with g for the next step. The three cases are the only ones
 * mars_ref/fused.py calls. Sums: float within blocks of BLOCK elements, the blocks added in
 * double in index order, so the result does not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 8192

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Pass 1:  Σ_i c_i²,  c_i = g_i + s·(g_i − g_prev_i).  Returns NaN if out of memory. */
double mars_sumsq(const float *restrict g, const float *restrict g_prev, float s, int64_t n, int threads)
{
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    double *partial = malloc((size_t)(blocks > 0 ? blocks : 1) * sizeof(double));
    if (partial == NULL)
        return NAN;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t lo = b * BLOCK, hi = min64(lo + BLOCK, n);
        float acc = 0.0f;
        if (g_prev) {
            #pragma omp simd reduction(+:acc)
            for (int64_t i = lo; i < hi; i++) {
                float c = g[i] + s * (g[i] - g_prev[i]);   /* c_t = g_t + s·(g_t − g_prev) */
                acc += c * c;
            }
        } else {
            #pragma omp simd reduction(+:acc)
            for (int64_t i = lo; i < hi; i++) {
                float c = g[i] + s * g[i];
                acc += c * c;
            }
        }
        partial[b] = acc;
    }
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++)
        total += partial[b];
    free(partial);
    return total;
}

/* One element of MARS-AdamW (and of the AdamW fallback: s = 0, clip = 1, g_prev = NULL). */
#define ADAMW_ELEMENT(GP)                                                                          \
    {                                                                                              \
        float gi = g[i], xi = x[i];                                                                \
        float c = (gi + s * (gi - (GP))) * clip;      /* 1, 2: c_t = (g_t + s·(g_t − g_prev))·clip */ \
        float mi = m[i] * beta1 + (1.0f - beta1) * c; /* 3: m_t = β1·m + (1−β1)·c_t */              \
        float vi = v[i] * beta2 + (1.0f - beta2) * c * c;   /* v_t = β2·v + (1−β2)·c_t² (addcmul's order) */ \
        float denom = (sqrtf(vi) / sqrt_bc2 + eps) * bc1;   /* 4: (√v/√(1−β2^t) + ε)(1−β1^t) */     \
        float u = mi / denom;                                                                      \
        m[i] = mi;                                                                                 \
        v[i] = vi;                                                                                 \
        x[i] = xi + (-lr) * (u + weight_decay * xi);  /* 5: x ← x − η·(λ·x + u) */                  \
    }

void mars_adamw(float *restrict x, const float *restrict g, float *restrict g_prev, float *restrict x_prev,
                float *restrict m, float *restrict v, int64_t n,
                float s, float clip, float beta1, float beta2, float lr, float weight_decay, float eps,
                float bc1, float sqrt_bc2, int threads)
{
    if (x_prev) { /* exact: remember x_{t−1} for the next step's second gradient */
        #pragma omp parallel for simd schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            x_prev[i] = x[i];
            ADAMW_ELEMENT(g_prev ? g_prev[i] : 0.0f)
        }
    } else if (g_prev) { /* approx: g_prev ← g_t for the next step */
        #pragma omp parallel for simd schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            ADAMW_ELEMENT(g_prev[i])
            g_prev[i] = g[i];
        }
    } else {
        #pragma omp parallel for simd schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++)
            ADAMW_ELEMENT(0.0f)
    }
}

/* One element of MARS-Lion: u = sign(m_t). */
#define LION_ELEMENT(GP)                                                                           \
    {                                                                                              \
        float gi = g[i], xi = x[i];                                                                \
        float c = (gi + s * (gi - (GP))) * clip;      /* 1, 2 */                                   \
        float mi = m[i] * beta1 + (1.0f - beta1) * c; /* 3 */                                      \
        float u = (float)((mi > 0.0f) - (mi < 0.0f)); /* 4: u_t = sign(m_t) */                     \
        m[i] = mi;                                                                                 \
        x[i] = xi + (-lr) * (u + weight_decay * xi);  /* 5 */                                      \
    }

void mars_lion(float *restrict x, const float *restrict g, float *restrict g_prev, float *restrict x_prev,
               float *restrict m, int64_t n,
               float s, float clip, float beta1, float lr, float weight_decay, int threads)
{
    if (x_prev) {
        #pragma omp parallel for simd schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            x_prev[i] = x[i];
            LION_ELEMENT(g_prev ? g_prev[i] : 0.0f)
        }
    } else if (g_prev) {
        #pragma omp parallel for simd schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            LION_ELEMENT(g_prev[i])
            g_prev[i] = g[i];
        }
    } else {
        #pragma omp parallel for simd schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++)
            LION_ELEMENT(0.0f)
    }
}
