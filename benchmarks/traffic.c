/* Memory traffic only: the float arrays an optimizer step must read and write, with next to no arithmetic.
 *
 * Used by benchmarks/step_time.py to measure what the bytes alone cost on this machine:
 *   traffic_adamw  reads x, g, m, v and writes x, m, v                      (7 arrays: fused AdamW)
 *   traffic_mars   pass 1 reads g, g_prev (a sum, as the clipping norm),
 *                  pass 2 reads x, g, g_prev, m, v, writes x, m, v, g_prev  (11 arrays: MARS-AdamW, fused)
 * The loops are shaped like mars_ref/fused.c (OpenMP, static schedule), so the ratio of the two times is
 * the floor for "MARS step time / AdamW step time" when both are limited by memory bandwidth.
 */
#include <stdint.h>

void traffic_adamw(float *restrict x, const float *restrict g, float *restrict m, float *restrict v, int64_t n,
                   int threads)
{
    #pragma omp parallel for simd schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        m[i] += gi;
        v[i] += gi;
        x[i] -= gi;
    }
}

float traffic_mars(float *restrict x, const float *restrict g, float *restrict g_prev, float *restrict m,
                    float *restrict v, int64_t n, int threads)
{
    float total = 0.0f;
    #pragma omp parallel for simd schedule(static) reduction(+:total) num_threads(threads)
    for (int64_t i = 0; i < n; i++)
        total += g[i] - g_prev[i];
    float scale = total > 0.0f ? 1.0f : 0.5f; /* the second pass depends on the first, as the clip does */
    #pragma omp parallel for simd schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        float c = scale * (g[i] - g_prev[i]);
        m[i] += c;
        v[i] += c;
        x[i] -= c;
        g_prev[i] = g[i];
    }
    return total;
}
