/* One forward step of a decoder-only transformer on the CPU, in a single call.
 *
 * The native runner's CPU path with int8 weights: every matmul reads int8 weights
 * (one float scale per output channel) and multiplies them with float32 activations;
 * norms, rotary embedding, the KV-pool writes and paged attention run in float32. One
 * OpenMP team runs the whole stack: each stage is a work-shared loop, so a step costs
 * one call from Python instead of hundreds of small torch ops.
 *
 * The batch layout is the ForwardBatch contract (backend/batch.py): the new tokens of all
 * requests flat, request b owning rows qo_indptr[b]..qo_indptr[b+1] and attending over the
 * pool slots kv_indices[kv_indptr[b]..kv_indptr[b+1]] (cached prefix first, then its new
 * tokens, causal). The result is the final-normed hidden row of each `out_rows` entry;
 * the LM head runs outside.
 *
 * C11 with AVX-512 or AVX2 intrinsics where the host has them (built with -march=native),
 * else GCC/Clang vector extensions that any target lowers (NEON, SSE).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_HEAD_DIM 256
#define MAX_GROUP 32
/* Weight rows stream from memory: each tile prefetches, a cache line at a time, the rows
 * two tiles ahead (the next column blocks of this thread). */
#define PREFETCH_BYTES 64

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf load_f(const float *p) { return _mm512_loadu_ps(p); }
static inline vf load_b(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline void store_f(float *p, vf v) { _mm512_storeu_ps(p, v); }
static inline vf splat(float x) { return _mm512_set1_ps(x); }
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vround(vf x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANES 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf load_f(const float *p) { return _mm256_loadu_ps(p); }
static inline vf load_b(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline void store_f(float *p, vf v) { _mm256_storeu_ps(p, v); }
static inline vf splat(float x) { return _mm256_set1_ps(x); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vround(vf x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
static inline vf vscale2(vf p, vf n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                            _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#else
/* Portable: GCC/Clang vector extensions (NEON, SSE, ...). */
#define LANES 8
typedef float vf __attribute__((vector_size(LANES * sizeof(float))));
static inline vf vzero(void) { return (vf){0}; }
static inline vf load_f(const float *p) {
    vf v;
    memcpy(&v, p, sizeof(v));
    return v;
}
static inline vf load_b(const int8_t *p) {
    vf v;
    for (int i = 0; i < LANES; i++) v[i] = (float)p[i];
    return v;
}
static inline vf fmadd(vf a, vf b, vf c) { return a * b + c; }
static inline float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}
static inline void store_f(float *p, vf v) { memcpy(p, &v, sizeof(v)); }
static inline vf splat(float x) { return x - (vf){0}; }
static inline vf vmax(vf a, vf b) {
    for (int i = 0; i < LANES; i++) a[i] = a[i] > b[i] ? a[i] : b[i];
    return a;
}
static inline vf vround(vf x) {
    for (int i = 0; i < LANES; i++) x[i] = nearbyintf(x[i]);
    return x;
}
static inline vf vscale2(vf p, vf n) {
    for (int i = 0; i < LANES; i++) p[i] = ldexpf(p[i], (int)n[i]);
    return p;
}
#endif

/* Integer matmuls: activations quantized per row to int16, int8 weights widened to int16,
 * pairs of products summed into int32 lanes (vpdpwssd with AVX512-VNNI, else vpmaddwd); the
 * lanes are added up in int64 (`ihsum`), so only one lane's sum must stay inside int32. */
#if defined(__AVX512BW__)
#define I16_STEP 32
typedef __m512i vacc;
static inline vacc izero(void) { return _mm512_setzero_si512(); }
static inline vacc load_w16(const int8_t *p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
static inline vacc load_x16(const int16_t *p) { return _mm512_loadu_si512((const void *)p); }
#if defined(__AVX512VNNI__)
static inline vacc dot16(vacc acc, vacc x, vacc w) { return _mm512_dpwssd_epi32(acc, x, w); }
#else
static inline vacc dot16(vacc acc, vacc x, vacc w) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(x, w));
}
#endif
static inline int64_t ihsum(vacc v) {
    const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v));
    const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1));
    return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
}
#elif defined(__AVX2__)
#define I16_STEP 16
typedef __m256i vacc;
static inline vacc izero(void) { return _mm256_setzero_si256(); }
static inline vacc load_w16(const int8_t *p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
}
static inline vacc load_x16(const int16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vacc dot16(vacc acc, vacc x, vacc w) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w));
}
static inline int64_t ihsum(vacc v) {
    const __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v));
    const __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1));
    const __m256i s = _mm256_add_epi64(lo, hi);
    const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(_mm_add_epi64(t, _mm_unpackhi_epi64(t, t)));
}
#else
#define I16_STEP 0 /* float32 matmuls only */
#endif

/* exp(x) for x <= 0 (softmax weights): 2^(x log2 e) as 2^n times a degree-6 polynomial of
 * the fraction in [-1/2, 1/2]; relative error ~1e-7, exp(-87) and below flush to ~0. */
static inline vf vexp(vf x) {
    const vf t = vmax(x, splat(-87.0f)) * splat(1.44269504088896341f);
    const vf n = vround(t);
    const vf f = t - n;
    vf p = splat(1.5403530393381606e-4f);
    p = fmadd(p, f, splat(1.3333558146428443e-3f));
    p = fmadd(p, f, splat(9.6181291076284772e-3f));
    p = fmadd(p, f, splat(5.5504108664821580e-2f));
    p = fmadd(p, f, splat(2.4022650695910071e-1f));
    p = fmadd(p, f, splat(6.9314718055994531e-1f));
    p = fmadd(p, f, splat(1.0f));
    return vscale2(p, n);
}

/* y[n] = scale[n] * dot(x, w[n]) + bias[n] for a [n_out, n_in] row-major int8 weight. */
typedef struct {
    const int8_t *weight;
    const float *scale;
    const float *bias; /* NULL: no bias */
    int64_t n_out;
    int64_t n_in;
} QLinear;

typedef struct {
    const float *input_norm;      /* [hidden] */
    const float *post_norm;       /* [hidden] */
    const float *q_norm;          /* [head_dim] or NULL (Qwen3 q/k norms) */
    const float *k_norm;          /* [head_dim] or NULL */
    QLinear qkv;                  /* [q | k | v] */
    QLinear o;
    QLinear gate_up;              /* [gate | up], each `intermediate` rows */
    QLinear down;
    float *k_cache;               /* [slots, kv_heads, head_dim] */
    float *v_cache;
} Layer;

typedef struct {
    int64_t hidden;
    int64_t intermediate;
    int64_t num_layers;
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    float eps;
    float attn_scale;
    const float *embed;           /* [vocab, hidden] */
    const float *final_norm;      /* [hidden] */
    const float *rope;            /* [max_pos, head_dim]: cos of the angles, then sin */
    const Layer *layers;
} Model;

typedef struct {
    int64_t num_tokens;
    int64_t batch_size;
    int64_t num_out;
    int64_t num_threads;
    const int64_t *input_ids;     /* [T] */
    const int64_t *positions;     /* [T] */
    const int64_t *out_slots;     /* [T] */
    const int64_t *qo_indptr;     /* [B + 1] */
    const int64_t *kv_indptr;     /* [B + 1] */
    const int64_t *kv_indices;
    const int64_t *out_rows;      /* [num_out] */
    float *residual;              /* [T, hidden] workspaces */
    float *normed;                /* [T, max(hidden, q_size)] */
    float *qkv;                   /* [T, q_size + 2 kv_size] */
    float *act;                   /* [T, intermediate] */
    int64_t *token_request;       /* [T] */
    int16_t *xq;                  /* [T, max in_features]: int16 activations */
    float *xq_scale;              /* [T] */
    float *out;                   /* [num_out, hidden] */
} Step;

/* res[r * C + c] = dot(x row r, w row c) over n_in (a multiple of LANES), for an R x C tile:
 * each weight vector is converted once and used for R rows, each x vector for C columns. */
static inline __attribute__((always_inline)) void tile(
    int R, int C, const float *x, int64_t ldx, const int8_t *w, int64_t n_in, float *res) {
    vf acc[4][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = vzero();
    for (int64_t k = 0; k < n_in; k += LANES) {
        vf wv[8];
        for (int c = 0; c < C; c++) {
            if (k % PREFETCH_BYTES == 0) __builtin_prefetch(w + (2 * C + c) * n_in + k, 0, 3);
            wv[c] = load_b(w + c * n_in + k);
        }
        for (int r = 0; r < R; r++) {
            vf xv = load_f(x + r * ldx + k);
            for (int c = 0; c < C; c++) acc[r][c] = fmadd(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) res[r * C + c] = hsum(acc[r][c]);
}

#if I16_STEP
/* The integer tile: res[r * C + c] = dot(xq row r, w row c) over n_in (a multiple of
 * I16_STEP), exact: each int32 lane sums n_in / (I16_STEP / 2) products, within the bound
 * that `prepare_input`'s level count keeps. */
static inline __attribute__((always_inline)) void tile16(
    int R, int C, const int16_t *xq, int64_t ldx, const int8_t *w, int64_t n_in, int64_t *res) {
    vacc acc[4][8];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = izero();
    for (int64_t k = 0; k < n_in; k += I16_STEP) {
        vacc wv[8];
        for (int c = 0; c < C; c++) {
            if (k % PREFETCH_BYTES == 0) __builtin_prefetch(w + (2 * C + c) * n_in + k, 0, 3);
            wv[c] = load_w16(w + c * n_in + k);
        }
        for (int r = 0; r < R; r++) {
            const vacc xv = load_x16(xq + r * ldx + k);
            for (int c = 0; c < C; c++) acc[r][c] = dot16(acc[r][c], xv, wv[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) res[r * C + c] = ihsum(acc[r][c]);
}
#endif

/* A matmul's input rows: float32, and their int16 copy (NULL when the float path runs). */
typedef struct {
    const float *x;
    const int16_t *xq;
    const float *xq_scale;
    int64_t rows;
} Input;

/* Quantize x [rows, n_in] to int16 per row (symmetric) when the integer path can take it.
 * The level count keeps one int32 lane's sum (n_in / (I16_STEP / 2) products with int8
 * weights, down to -128) inside int32: 32767 levels up to n_in = 8192 with AVX-512. */
static Input prepare_input(const float *x, int64_t rows, int64_t n_in, const Step *s) {
    Input in = {x, NULL, NULL, rows};
    if (I16_STEP == 0 || n_in % (I16_STEP ? I16_STEP : 1) != 0) return in;
    const float per_lane = (float)(n_in / (I16_STEP ? I16_STEP / 2 : 1));
    const float limit = floorf(2147483647.0f / (128.0f * per_lane));
    const float levels = limit < 32767.0f ? limit : 32767.0f;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; t++) {
        const float *row = x + t * n_in;
        float top = 0.0f;
        for (int64_t k = 0; k < n_in; k++) top = fabsf(row[k]) > top ? fabsf(row[k]) : top;
        const float scale = top > 0.0f ? top / levels : 1.0f, inv = 1.0f / scale;
        int16_t *out = s->xq + t * n_in;
        for (int64_t k = 0; k < n_in; k++) out[k] = (int16_t)lrintf(row[k] * inv);
        s->xq_scale[t] = scale;
    }
    in.xq = s->xq;
    in.xq_scale = s->xq_scale;
    return in;
}

static float dot_scalar(const float *x, const int8_t *w, int64_t n) {
    float s = 0.0f;
    for (int64_t k = 0; k < n; k++) s += x[k] * (float)w[k];
    return s;
}

enum { STORE, ADD };

/* Columns [c0, c0 + C) of y = x W^T for all T rows into raw[t * 8 + c] (unscaled). */
static void column_block(const Input *in, const QLinear *lin, int64_t c0, int C,
                         float *raw) {
    const int64_t K = lin->n_in, vec_k = K - K % LANES, T = in->rows;
    const float *x = in->x;
    const int8_t *w = lin->weight + c0 * K;
    int64_t t = 0;
    float res[32];
#if I16_STEP
    if (in->xq != NULL && C == 8) {
        int64_t ires[32];
        for (; t + 4 <= T; t += 4) {
            tile16(4, 4, in->xq + t * K, K, w, K, ires);
            tile16(4, 4, in->xq + t * K, K, w + 4 * K, K, ires + 16);
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) {
                    raw[(t + r) * 8 + c] = (float)ires[r * 4 + c] * in->xq_scale[t + r];
                    raw[(t + r) * 8 + 4 + c] = (float)ires[16 + r * 4 + c] * in->xq_scale[t + r];
                }
        }
        for (; t < T; t++) {
            tile16(1, 8, in->xq + t * K, K, w, K, ires);
            for (int c = 0; c < 8; c++) raw[t * 8 + c] = (float)ires[c] * in->xq_scale[t];
        }
        return;
    }
#endif
    if (vec_k == K && C == 8) {
        for (; t + 4 <= T; t += 4) {
            tile(4, 4, x + t * K, K, w, K, res);
            tile(4, 4, x + t * K, K, w + 4 * K, K, res + 16);
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++) {
                    raw[(t + r) * 8 + c] = res[r * 4 + c];
                    raw[(t + r) * 8 + 4 + c] = res[16 + r * 4 + c];
                }
        }
        for (; t < T; t++) {
            tile(1, 8, x + t * K, K, w, K, res);
            for (int c = 0; c < 8; c++) raw[t * 8 + c] = res[c];
        }
        return;
    }
    for (; t < T; t++)
        for (int c = 0; c < C; c++) {
            float s = 0.0f;
            if (vec_k > 0) tile(1, 1, x + t * K, K, w + c * K, vec_k, &s);
            raw[t * 8 + c] = s + dot_scalar(x + t * K + vec_k, w + c * K + vec_k, K - vec_k);
        }
}

static inline float scaled(const QLinear *lin, int64_t n, float raw) {
    float y = raw * lin->scale[n];
    return lin->bias ? y + lin->bias[n] : y;
}

/* y[t, n] (=|+=) x[t] . W[n] for all T rows; the caller's team shares the columns. */
static void linear(const Input *in, const QLinear *lin, float *y, int64_t ldy, int mode) {
    const int64_t blocks = (lin->n_out + 7) / 8, T = in->rows;
    float *raw = malloc(sizeof(float) * 8 * (size_t)T);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t c0 = b * 8;
        const int C = (int)(lin->n_out - c0 < 8 ? lin->n_out - c0 : 8);
        column_block(in, lin, c0, C, raw);
        for (int64_t t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                const float v = scaled(lin, c0 + c, raw[t * 8 + c]);
                if (mode == ADD)
                    y[t * ldy + c0 + c] += v;
                else
                    y[t * ldy + c0 + c] = v;
            }
    }
    free(raw);
}

/* act[t, n] = silu(gate[t, n]) * up[t, n] straight from the merged [gate | up] weight. */
static void gate_up_silu(const Input *in, const QLinear *lin, int64_t inter, float *act) {
    const int64_t blocks = (inter + 7) / 8, T = in->rows;
    float *gate = malloc(sizeof(float) * 16 * (size_t)T);
    float *up = gate + 8 * T;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t c0 = b * 8;
        const int C = (int)(inter - c0 < 8 ? inter - c0 : 8);
        column_block(in, lin, c0, C, gate);
        column_block(in, lin, inter + c0, C, up);
        for (int64_t t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                const float g = scaled(lin, c0 + c, gate[t * 8 + c]);
                const float u = scaled(lin, inter + c0 + c, up[t * 8 + c]);
                act[t * inter + c0 + c] = g / (1.0f + expf(-g)) * u;
            }
    }
    free(gate);
}

static void rms_norm_row(const float *x, const float *weight, int64_t n, float eps, float *y) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * inv * weight[i];
}

static void rms_norm_rows(const float *x, int64_t rows, int64_t n, const float *weight,
                          float eps, float *y) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < rows; t++) rms_norm_row(x + t * n, weight, n, eps, y + t * n);
}

static void rotate(float *x, const float *cos_sin, int64_t d) {
    const int64_t half = d / 2;
    const float *cos = cos_sin, *sin = cos_sin + half;
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

/* q/k norms and rotary embedding in place; this token's K and V into the pool. */
static void prepare_heads(const Model *m, const Layer *ly, const Step *s) {
    const int64_t D = m->head_dim, Hq = m->num_heads, Hkv = m->num_kv_heads;
    const int64_t width = (Hq + 2 * Hkv) * D;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < s->num_tokens; t++) {
        float *row = s->qkv + t * width;
        const float *cos_sin = m->rope + s->positions[t] * D;
        for (int64_t h = 0; h < Hq + Hkv; h++) {
            float *head = row + h * D;
            const float *norm = h < Hq ? ly->q_norm : ly->k_norm;
            if (norm) rms_norm_row(head, norm, D, m->eps, head);
            rotate(head, cos_sin, D);
        }
        const int64_t slot = s->out_slots[t];
        memcpy(ly->k_cache + slot * Hkv * D, row + Hq * D, sizeof(float) * Hkv * D);
        memcpy(ly->v_cache + slot * Hkv * D, row + (Hq + Hkv) * D, sizeof(float) * Hkv * D);
    }
}

static inline float dot_f(const float *a, const float *b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Pool rows are gathered by slot: fetch the rows KV_PREFETCH keys ahead. */
#define KV_PREFETCH 8
static inline void prefetch_row(const float *row, int64_t n) {
    for (int64_t i = 0; i < n; i += PREFETCH_BYTES / (int64_t)sizeof(float))
        __builtin_prefetch(row + i, 0, 3);
}

/* Softmax of `n` scores in place. */
static void softmax(float *x, int64_t n) {
    const int64_t vec_n = n - n % LANES;
    float top = -INFINITY, total = 0.0f;
    for (int64_t j = 0; j < n; j++) top = x[j] > top ? x[j] : top;
    int64_t j = 0;
    for (; j < vec_n; j += LANES) {
        const vf p = vexp(load_f(x + j) - splat(top));
        store_f(x + j, p);
        total += hsum(p);
    }
    for (; j < n; j++) total += (x[j] = expf(x[j] - top));
    const float inv = 1.0f / total;
    for (j = 0; j < n; j++) x[j] *= inv;
}

/* Causal attention of one token's query heads that share KV head g. `scores` holds
 * group x seq_len floats. */
static void attend(const Model *m, const Layer *ly, const Step *s, int64_t t, int64_t g,
                   float *scores, float *out) {
    const int64_t D = m->head_dim, Hkv = m->num_kv_heads;
    const int64_t group = m->num_heads / Hkv;
    const int64_t b = s->token_request[t];
    const int64_t seq_len = s->kv_indptr[b + 1] - s->kv_indptr[b];
    const int64_t extend_len = s->qo_indptr[b + 1] - s->qo_indptr[b];
    const int64_t visible = seq_len - extend_len + (t - s->qo_indptr[b]) + 1;
    const int64_t *slots = s->kv_indices + s->kv_indptr[b];
    const float *q = s->qkv + t * (m->num_heads + 2 * Hkv) * D + g * group * D;
    for (int64_t j = 0; j < visible; j++) {
        const float *k = ly->k_cache + (slots[j] * Hkv + g) * D;
        if (j + KV_PREFETCH < visible) prefetch_row(ly->k_cache + (slots[j + KV_PREFETCH] * Hkv + g) * D, D);
        for (int64_t h = 0; h < group; h++)
            scores[h * visible + j] = dot_f(q + h * D, k, D) * m->attn_scale;
    }
    for (int64_t h = 0; h < group; h++) softmax(scores + h * visible, visible);
    memset(out, 0, sizeof(float) * group * D);
    for (int64_t j = 0; j < visible; j++) {
        const float *v = ly->v_cache + (slots[j] * Hkv + g) * D;
        if (j + KV_PREFETCH < visible) prefetch_row(ly->v_cache + (slots[j + KV_PREFETCH] * Hkv + g) * D, D);
        for (int64_t h = 0; h < group; h++) {
            const float p = scores[h * visible + j];
            float *o = out + h * D;
#pragma omp simd
            for (int64_t i = 0; i < D; i++) o[i] += p * v[i];
        }
    }
}

static void attention(const Model *m, const Layer *ly, const Step *s, int64_t max_seq_len,
                      float *out) {
    const int64_t Hkv = m->num_kv_heads, q_size = m->num_heads * m->head_dim;
    const int64_t group = m->num_heads / Hkv;
    float *scores = malloc(sizeof(float) * (size_t)(group * max_seq_len));
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < s->num_tokens * Hkv; item++) {
        const int64_t t = item / Hkv, g = item % Hkv;
        attend(m, ly, s, t, g, scores, out + t * q_size + g * group * m->head_dim);
    }
    free(scores);
}

static void embed(const Model *m, const Step *s) {
    const int64_t H = m->hidden;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < s->num_tokens; t++)
        memcpy(s->residual + t * H, m->embed + s->input_ids[t] * H, sizeof(float) * H);
}

static void layer_forward(const Model *m, const Layer *ly, const Step *s,
                          int64_t max_seq_len) {
    const int64_t T = s->num_tokens, H = m->hidden;
    rms_norm_rows(s->residual, T, H, ly->input_norm, m->eps, s->normed);
    Input in = prepare_input(s->normed, T, H, s);
    linear(&in, &ly->qkv, s->qkv, ly->qkv.n_out, STORE);
    prepare_heads(m, ly, s);
    attention(m, ly, s, max_seq_len, s->normed);
    in = prepare_input(s->normed, T, ly->o.n_in, s);
    linear(&in, &ly->o, s->residual, H, ADD);
    rms_norm_rows(s->residual, T, H, ly->post_norm, m->eps, s->normed);
    in = prepare_input(s->normed, T, H, s);
    gate_up_silu(&in, &ly->gate_up, m->intermediate, s->act);
    in = prepare_input(s->act, T, m->intermediate, s);
    linear(&in, &ly->down, s->residual, H, ADD);
}

/* Map each token row to its request (rows are laid out request by request); return the
 * longest sequence. */
static int64_t index_tokens(const Step *s) {
    int64_t longest = 0;
    for (int64_t b = 0; b < s->batch_size; b++) {
        for (int64_t t = s->qo_indptr[b]; t < s->qo_indptr[b + 1]; t++) s->token_request[t] = b;
        const int64_t seq_len = s->kv_indptr[b + 1] - s->kv_indptr[b];
        longest = seq_len > longest ? seq_len : longest;
    }
    return longest;
}

/* Whether the library was built with OpenMP (else one thread runs every step). */
int msg_decoder_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int msg_decoder_forward(const Model *m, const Step *s) {
    if (m->head_dim > MAX_HEAD_DIM || m->num_heads / m->num_kv_heads > MAX_GROUP) return 1;
    const int64_t max_seq_len = index_tokens(s);
#pragma omp parallel num_threads((int)s->num_threads)
    {
        embed(m, s);
        for (int64_t l = 0; l < m->num_layers; l++) layer_forward(m, &m->layers[l], s, max_seq_len);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < s->num_out; i++)
            rms_norm_row(s->residual + s->out_rows[i] * m->hidden, m->final_norm, m->hidden,
                         m->eps, s->out + i * m->hidden);
    }
    return 0;
}
