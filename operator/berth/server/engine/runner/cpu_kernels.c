/* Berth's CPU kernels for the gguf weight format: y = x W^T with W in a GGUF file's own blocks (Q4_0/Q4_1,
 * Q8_0; 32 weights a block) and x float32, for the few rows of a decode step, and a decode step's attention over
 * the paged KV cache (berth_decode_attention, at the end). Built at first use by runner/cpu_kernels.py
 * (cc -O3 -mavx2 -mfma -mf16c -fopenmp) and called through ctypes.
 *
 * The activations are quantized per row and block of 32 to two int8 digits with a float scale (see
 * quantize_rows); a block's dot product is then integer multiply-adds (maddubs: unsigned 4-bit or |int8| codes
 * times signed int8, once per digit) and float multiply-adds per block. Output rows are split over `threads` OpenMP threads (none when 1).
 *
 * Layouts (built by cpu_kernels.py, one byte stream per weight): tiles of TILE output rows, each tile block by
 * block along k; a Q4 block of a tile is the TILE rows' 16 code bytes as in the file (the low nibble of byte j
 * is element j of the block, the high nibble element j + 16), then their float32 scales d, then their float32
 * zeros z at code 8: w = d (q - 8) + z (Q4_1's d q + m: z = m + 8 d; Q4_0: z = 0). A block's dot product is
 * computed as d sum(q xq) dx - 8 d dx sum(xq) + z sum(x): the activations' rounding error meets only the centred
 * codes q - 8 (with d sum(q xq) dx + m sum(x) it would meet q, whose mean 7.5 is far from the weights' mean). A Q8 block of a tile: the TILE rows' 32 int8 codes, then their
 * float32 scales d: w = d q.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QK 32

int berth_kernels_abi(void) { return 7; }

/* Each block of 32 activations as two int8 digits: x ~ dx xq + (dx / R) xr, xq = round(x / dx) with dx = max|x| /
 * 127, xr = round((x - dx xq) R / dx) (|x - dx xq| <= dx / 2, so |xr| <= 127); about 15 bits of each block's
 * largest value. One digit alone (llama.cpp's q8_1) loses the small values of a block that holds an outlier, and
 * SmolLM2's hidden states have them: greedy output left fp32's at the first token on one prompt of four. */
#define R 254.0f

static void quantize_rows(const float *x, int64_t rows, int64_t k, int8_t *xq, int8_t *xr, float *xd, float *xs,
                          float *xz)
{
    const int64_t groups = k / QK;
    for (int64_t i = 0; i < rows * groups; i++) {
        const float *v = x + i * QK;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
            sum += v[j];
        }
        const float d = amax / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int qsum = 0;
        for (int j = 0; j < QK; j++) {
            const float t = v[j] * id;
            const float q = rintf(t);
            xq[i * QK + j] = (int8_t)q;
            xr[i * QK + j] = (int8_t)rintf((t - q) * R);
            qsum += (int)(R * q) + xr[i * QK + j];
        }
        xd[i] = d / R;
        xs[i] = sum;
        xz[i] = d / R * (float)qsum;
    }
}

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 float partial sums of the 32 products u[i] * s[i] (u unsigned, s signed bytes). */
static inline __m256 dot32(__m256i u, __m256i s)
{
    const __m256i p16 = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* 8 float partial sums of u times the two-digit activations (R sq + sr). */
static inline __m256 dot32x2(__m256i u, __m256i sq, __m256i sr)
{
    return _mm256_fmadd_ps(dot32(u, sq), _mm256_set1_ps(R), dot32(u, sr));
}

static inline __m256i nibbles(const uint8_t *qs)
{
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return _mm256_set_m128i(hi, lo);
}

/* Quantized activations: the two int8 digits, per block the scale of the second (dx / R), the exact sum of x
 * and what the quantized block sums to. */
typedef struct {
    int8_t *xq;
    int8_t *xr;
    float *xd;
    float *xs;
    float *xz;
} qrows;

static void release(qrows *q)
{
    free(q->xq);
    free(q->xr);
    free(q->xd);
    free(q->xs);
    free(q->xz);
}

/* The linear's input from its argument x [rows, k]: x itself, or with `norm` RMSNorm(x) * norm (what the decoder
 * layer's input and post-attention norms give the q|k|v and gate|up projections: one call instead of two). */
static const float *prepare(const float *x, int64_t rows, int64_t k, const float *norm, float eps, float **owned)
{
    *owned = NULL;
    if (!norm) {
        return x;
    }
    float *out = malloc(sizeof(float) * (size_t)(rows * k));
    if (!out) {
        return NULL;
    }
    for (int64_t r = 0; r < rows; r++) {
        const float *v = x + r * k;
        double ss = 0.0;
        for (int64_t j = 0; j < k; j++) {
            ss += (double)v[j] * v[j];
        }
        const float scale = 1.0f / sqrtf((float)(ss / (double)k) + eps);
        for (int64_t j = 0; j < k; j++) {
            out[r * k + j] = v[j] * scale * norm[j];
        }
    }
    *owned = out;
    return out;
}

static int quantize(const float *x0, int64_t rows, int64_t k, const float *norm, float eps, qrows *q)
{
    const int64_t groups = k / QK;
    float *owned;
    const float *x = prepare(x0, rows, k, norm, eps, &owned);
    if (!x) {
        q->xq = q->xr = NULL;
        q->xd = q->xs = q->xz = NULL;
        return -1;
    }
    q->xq = malloc((size_t)(rows * k));
    q->xr = malloc((size_t)(rows * k));
    q->xd = malloc(sizeof(float) * (size_t)(rows * groups));
    q->xs = malloc(sizeof(float) * (size_t)(rows * groups));
    q->xz = malloc(sizeof(float) * (size_t)(rows * groups));
    if (!q->xq || !q->xr || !q->xd || !q->xs || !q->xz) {
        release(q);
        free(owned);
        return -1;
    }
    quantize_rows(x, rows, k, q->xq, q->xr, q->xd, q->xs, q->xz);
    free(owned);
    return 0;
}

/* Output rows are taken TILE at a time (independent accumulators, each activation block loaded once), from
 * one stream of bytes: the TILE rows' blocks g side by side, then their block g+1, ...; the tile functions are
 * inlined with a constant t, so the accumulators stay in registers. */
#define TILE 4
#define Q4_TILE_BYTES (TILE * 16 + TILE * 4 + TILE * 4) /* codes, d, z */
#define Q8_TILE_BYTES (TILE * 32 + TILE * 4)           /* codes, d */
#define AHEAD 32                                          /* blocks prefetched ahead of the one computed */

/* Many rows (at least FLOAT_ROWS: measured on the AVX2 EPYC, one 3072x576 Q4 linear, one thread, the integer path
 * 138 us a row, this one 330 us a call plus 55 us a row): each tile's weights are dequantized to float once (TILE x k floats, in L1/L2),
 * then every row's float32 activations are multiplied in with float multiply-adds, two rows at a time. Exact
 * activations, and about 3x less work a row than the integer path, whose per-row cost is all integer work; the
 * dequantization is paid once a tile, which does not pay at one or two rows. */
#define FLOAT_ROWS 5

static inline void q4_dequant_tile(const uint8_t *tw, int64_t groups, int64_t k, float *wf)
{
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b = tw + g * Q4_TILE_BYTES;
        const float *d = (const float *)(b + TILE * 16), *z = d + TILE;
        for (int i = 0; i < TILE; i++) {
            uint8_t codes[QK];
            _mm256_storeu_si256((__m256i *)codes, nibbles(b + i * 16));
            const __m256 dv = _mm256_set1_ps(d[i]), mv = _mm256_set1_ps(z[i] - 8.0f * d[i]);
            for (int c = 0; c < QK; c += 8) {
                const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + c))));
                _mm256_storeu_ps(wf + i * k + g * QK + c, _mm256_fmadd_ps(dv, q, mv));
            }
        }
    }
}

static inline void q8_dequant_tile(const uint8_t *tw, int64_t groups, int64_t k, float *wf)
{
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b = tw + g * Q8_TILE_BYTES;
        const float *d = (const float *)(b + TILE * 32);
        for (int i = 0; i < TILE; i++) {
            const __m256 dv = _mm256_set1_ps(d[i]);
            for (int c = 0; c < QK; c += 8) {
                const __m128i v = _mm_loadl_epi64((const __m128i *)(b + i * 32 + c));
                _mm256_storeu_ps(wf + i * k + g * QK + c, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
            }
        }
    }
}

/* y rows [r0, r0 + nr) (nr 1 or 2) of one tile: wf [TILE][k] floats times x, plus res. */
static inline void float_rows(const float *wf, const float *x, int64_t k, int64_t r0, int nr, int64_t n, int64_t o0,
                              float *y, const float *res)
{
    __m256 acc[2][TILE];
    for (int r = 0; r < 2; r++) {
        for (int i = 0; i < TILE; i++) {
            acc[r][i] = _mm256_setzero_ps();
        }
    }
    const float *a0 = x + r0 * k, *a1 = x + (r0 + (nr > 1 ? 1 : 0)) * k;
    for (int64_t j = 0; j < k; j += 8) {
        const __m256 x0 = _mm256_loadu_ps(a0 + j), x1 = _mm256_loadu_ps(a1 + j);
        for (int i = 0; i < TILE; i++) {
            const __m256 wv = _mm256_loadu_ps(wf + i * k + j);
            acc[0][i] = _mm256_fmadd_ps(wv, x0, acc[0][i]);
            acc[1][i] = _mm256_fmadd_ps(wv, x1, acc[1][i]);
        }
    }
    for (int r = 0; r < nr; r++) {
        for (int i = 0; i < TILE; i++) {
            const int64_t o = (r0 + r) * n + o0 + i;
            y[o] = hsum(acc[r][i]) + (res ? res[o] : 0.0f);
        }
    }
}

/* The float path of berth_q4_linear / berth_q8_linear (bits 4 or 8); 0, or -1 when out of memory. */
static int float_linear(int bits, const float *x0, int64_t rows, int64_t k, const uint8_t *w, int64_t n, float *y,
                        int threads, const float *norm, float eps, const float *res)
{
    const int64_t groups = k / QK, tile_bytes = bits == 4 ? Q4_TILE_BYTES : Q8_TILE_BYTES;
    float *owned;
    const float *x = prepare(x0, rows, k, norm, eps, &owned);
    if (!x) {
        return -1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *wf = malloc(sizeof(float) * (size_t)(TILE * k));
        if (!wf) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t tile = 0; tile < n / TILE; tile++) {
                const uint8_t *tw = w + tile * groups * tile_bytes;
                if (bits == 4) {
                    q4_dequant_tile(tw, groups, k, wf);
                } else {
                    q8_dequant_tile(tw, groups, k, wf);
                }
                for (int64_t r = 0; r < rows; r += 2) {
                    float_rows(wf, x, k, r, rows - r > 1 ? 2 : 1, n, tile * TILE, y, res);
                }
            }
            free(wf);
        }
    }
    free(owned);
    return failed ? -1 : 0;
}

/* One row r of one tile, integer path: Q4 blocks. */
static inline void q4_row(const uint8_t *tw, int64_t groups, const qrows *q, int64_t k, int64_t r, float *out)
{
    const int8_t *a = q->xq + r * k, *ar = q->xr + r * k;
    const float *ad = q->xd + r * groups, *as = q->xs + r * groups, *az = q->xz + r * groups;
    __m256 acc[TILE];
    float macc[TILE];
    for (int i = 0; i < TILE; i++) {
        acc[i] = _mm256_setzero_ps();
        macc[i] = 0.0f;
    }
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b = tw + g * Q4_TILE_BYTES;
        _mm_prefetch((const char *)(b + AHEAD * Q4_TILE_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(b + AHEAD * Q4_TILE_BYTES + 64), _MM_HINT_T0);
        const float *d = (const float *)(b + TILE * 16), *z = d + TILE;
        const __m256i av = _mm256_loadu_si256((const __m256i *)(a + g * QK));
        const __m256i avr = _mm256_loadu_si256((const __m256i *)(ar + g * QK));
        const __m256 adg = _mm256_broadcast_ss(ad + g);
        for (int i = 0; i < TILE; i++) {
            const __m256 sc = _mm256_mul_ps(_mm256_broadcast_ss(d + i), adg);
            acc[i] = _mm256_fmadd_ps(sc, dot32x2(nibbles(b + i * 16), av, avr), acc[i]);
            macc[i] += z[i] * as[g] - 8.0f * d[i] * az[g];
        }
    }
    for (int i = 0; i < TILE; i++) {
        out[i] = hsum(acc[i]) + macc[i];
    }
}

/* One row r of one tile, integer path: Q8 blocks. */
static inline void q8_row(const uint8_t *tw, int64_t groups, const qrows *q, int64_t k, int64_t r, float *out)
{
    const int8_t *a = q->xq + r * k, *ar = q->xr + r * k;
    const float *ad = q->xd + r * groups;
    __m256 acc[TILE];
    for (int i = 0; i < TILE; i++) {
        acc[i] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *b = tw + g * Q8_TILE_BYTES;
        _mm_prefetch((const char *)(b + AHEAD * Q8_TILE_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(b + AHEAD * Q8_TILE_BYTES + 64), _MM_HINT_T0);
        const float *d = (const float *)(b + TILE * 32);
        const __m256i av = _mm256_loadu_si256((const __m256i *)(a + g * QK));
        const __m256i avr = _mm256_loadu_si256((const __m256i *)(ar + g * QK));
        const __m256 adg = _mm256_broadcast_ss(ad + g);
        for (int i = 0; i < TILE; i++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(b + i * 32));
            /* |w| (unsigned, -128 -> 128) times a with w's sign: the same products as w * a. */
            const __m256 p =
                dot32x2(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv), _mm256_sign_epi8(avr, wv));
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_broadcast_ss(d + i), adg), p, acc[i]);
        }
    }
    for (int i = 0; i < TILE; i++) {
        out[i] = hsum(acc[i]);
    }
}

/* y [rows, n] = res + f(x) W^T for W of `bits` 4 (Q4_0/Q4_1) or 8 (Q8_0), n a multiple of TILE, f the RMSNorm with
 * weight `norm` (NULL: none, see prepare), res [rows, n] (NULL: none): the integer path below FLOAT_ROWS rows, the
 * float path from there; 0, or -1 when out of memory. */
static int linear(int bits, const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t n, float *y,
                  int threads, const float *norm, float eps, const float *res)
{
    if (rows >= FLOAT_ROWS) {
        return float_linear(bits, x, rows, k, w, n, y, threads, norm, eps, res);
    }
    const int64_t groups = k / QK, tile_bytes = bits == 4 ? Q4_TILE_BYTES : Q8_TILE_BYTES;
    qrows q;
    if (quantize(x, rows, k, norm, eps, &q)) {
        return -1;
    }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t tile = 0; tile < n / TILE; tile++) {
        const uint8_t *tw = w + tile * groups * tile_bytes;
        for (int64_t r = 0; r < rows; r++) {
            float out[TILE];
            if (bits == 4) {
                q4_row(tw, groups, &q, k, r, out);
            } else {
                q8_row(tw, groups, &q, k, r, out);
            }
            for (int i = 0; i < TILE; i++) {
                const int64_t o = r * n + tile * TILE + i;
                y[o] = out[i] + (res ? res[o] : 0.0f);
            }
        }
    }
    release(&q);
    return 0;
}

int berth_q4_linear(const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t n, float *y, int threads,
                    const float *norm, float eps, const float *res)
{
    return linear(4, x, rows, k, w, n, y, threads, norm, eps, res);
}

int berth_q8_linear(const float *x, int64_t rows, int64_t k, const uint8_t *w, int64_t n, float *y, int threads,
                    const float *norm, float eps, const float *res)
{
    return linear(8, x, rows, k, w, n, y, threads, norm, eps, res);
}

static inline float dot_f32(const float *a, const float *b, int64_t n)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    }
    float s = hsum(acc);
    for (; j < n; j++) {
        s += a[j] * b[j];
    }
    return s;
}

/* x [d] through the rotary embedding in place: x cos + roll(x, d/2) sin_signed (runner/fused_layers.py's rotate:
 * sin_signed is sin with its first half negated, rotate_half's convention). */
static void rotate(float *x, const float *cos, const float *sin_signed, int64_t d)
{
    const int64_t half = d / 2;
    float tmp[512];
    for (int64_t j = 0; j < d; j++) {
        tmp[j] = x[j] * cos[j] + x[(j + half) % d] * sin_signed[j];
    }
    for (int64_t j = 0; j < d; j++) {
        x[j] = tmp[j];
    }
}

/* One decode step's attention of one layer over the paged KV cache, for b rows of one query each:
 * qkv [b, (h + 2 kvh) d] (q, k, v of the step, before the rotary embedding; rotated in place), cos and
 * sin_signed [b, d], slots [b] (where the step's k and v go), k_cache / v_cache [blocks * bs, kvh, d],
 * tables [b, w] (block ids), ctx [b] (positions attended: the first ctx[i], this step's included), out [b, h, d].
 * The step's k and v are written to the cache, then each (row, head) is one pass of online softmax over its
 * positions. 0, or -1 when d is over 512. */
int berth_decode_attention(float *qkv, const float *cos, const float *sin_signed, const int64_t *slots,
                           float *k_cache, float *v_cache, const int64_t *tables, const int64_t *ctx, int64_t b,
                           int64_t h, int64_t kvh, int64_t d, int64_t bs, int64_t w, float scale, float *out,
                           int threads)
{
    if (d > 512) {
        return -1;
    }
    const int64_t width = (h + 2 * kvh) * d, group = h / kvh;
    for (int64_t i = 0; i < b; i++) {
        float *row = qkv + i * width;
        for (int64_t j = 0; j < h + kvh; j++) {
            rotate(row + j * d, cos + i * d, sin_signed + i * d, d);
        }
        memcpy(k_cache + slots[i] * kvh * d, row + h * d, sizeof(float) * (size_t)(kvh * d));
        memcpy(v_cache + slots[i] * kvh * d, row + (h + kvh) * d, sizeof(float) * (size_t)(kvh * d));
    }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t ih = 0; ih < b * h; ih++) {
        const int64_t i = ih / h, head = ih % h, kv = head / group;
        const float *q = qkv + i * width + head * d;
        float acc[512];
        for (int64_t j = 0; j < d; j++) {
            acc[j] = 0.0f;
        }
        float mx = -INFINITY, denom = 0.0f;
        for (int64_t p = 0; p < ctx[i]; p++) {
            const int64_t slot = tables[i * w + p / bs] * bs + p % bs;
            const float *kp = k_cache + (slot * kvh + kv) * d, *vp = v_cache + (slot * kvh + kv) * d;
            const float s = dot_f32(q, kp, d) * scale;
            if (s > mx) {
                const float c = expf(mx - s); /* rescale what was summed under the old maximum */
                denom *= c;
                for (int64_t j = 0; j < d; j++) {
                    acc[j] *= c;
                }
                mx = s;
            }
            const float e = expf(s - mx);
            denom += e;
            for (int64_t j = 0; j < d; j++) {
                acc[j] += e * vp[j];
            }
        }
        float *o = out + (i * h + head) * d;
        for (int64_t j = 0; j < d; j++) {
            o[j] = acc[j] / denom;
        }
    }
    return 0;
}
