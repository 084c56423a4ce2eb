/* moed's native helpers, compiled on first use by quant/native.py (cc -O3 -march=native) and called through
 * ctypes. Each is tested against the Python code it stands in for (tests/unit/test_quant_planes.py,
 * test_quant_kernels.py, test_native_ops.py).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

/* The first r bit-planes (plane k: bit 7 - k of every 8-bit code, 8 codes per byte, first code in the high
 * bit; n bytes each) -> n * 8 codes of r bits (the 8-bit code >> (8 - r)), one byte each.
 *
 * Byte i of the planes holds bit 7 - k of codes 8i..8i+7. Put plane r-1-t's byte in byte t of a word: bit c
 * of byte t is bit t of code 8i + 7 - c. An 8x8 bit transpose (three delta swaps) moves it to bit t of byte
 * c, and a byte swap to byte 7 - c: the word is then codes 8i..8i+7, one per byte, in memory order.
 */
static inline uint64_t transpose8(uint64_t x) {
    uint64_t t;
    t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
    x ^= t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
    x ^= t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
    x ^= t ^ (t << 28);
    return x;
}

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#if defined(__AVX2__)
/* transpose8 on each 64-bit lane */
static inline __attribute__((always_inline)) __m256i transpose8_lanes(__m256i x) {
    __m256i t;
    t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 7)), _mm256_set1_epi64x(0x00AA00AA00AA00AALL));
    x = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 7)));
    t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 14)), _mm256_set1_epi64x(0x0000CCCC0000CCCCLL));
    x = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 14)));
    t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 28)), _mm256_set1_epi64x(0x00000000F0F0F0F0LL));
    return _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 28)));
}

/* unpack_r's words for 32 bytes of each plane (256 codes) at a time: byte t of word i = byte i of p[t], by
 * three rounds of byte, 16-bit and 32-bit interleaving of the planes (g[k]: words 2k, 2k + 1 in its low half,
 * 16 + 2k, 17 + 2k in its high half), then transpose8 and the byte swap on each word. Returns the bytes done
 * (a multiple of 32). */
static inline __attribute__((always_inline)) int64_t unpack_r_avx2(const uint8_t *const *p, const int r, int64_t n,
                                                                    uint8_t *restrict out) {
    const __m256i bswap = _mm256_setr_epi8(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8,
                                           7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i q[8], a[8], e[8], g[8];
        for (int t = 0; t < 8; t++)
            q[t] = t < r ? _mm256_loadu_si256((const __m256i *)(p[t] + i)) : _mm256_setzero_si256();
        for (int t = 0; t < 8; t += 2) {
            a[t] = _mm256_unpacklo_epi8(q[t], q[t + 1]);     /* bytes 0-7 | 16-23 of planes t, t + 1 */
            a[t + 1] = _mm256_unpackhi_epi8(q[t], q[t + 1]); /* bytes 8-15 | 24-31 */
        }
        for (int h = 0; h < 2; h++) /* planes 4h..4h+3: e[4h + j] holds bytes 4j..4j+3 | 16+4j.. */
            for (int j = 0; j < 2; j++) {
                e[4 * h + 2 * j] = _mm256_unpacklo_epi16(a[4 * h + j], a[4 * h + 2 + j]);
                e[4 * h + 2 * j + 1] = _mm256_unpackhi_epi16(a[4 * h + j], a[4 * h + 2 + j]);
            }
        for (int j = 0; j < 4; j++) {
            g[2 * j] = _mm256_unpacklo_epi32(e[j], e[4 + j]);
            g[2 * j + 1] = _mm256_unpackhi_epi32(e[j], e[4 + j]);
        }
        for (int k = 0; k < 8; k++) g[k] = _mm256_shuffle_epi8(transpose8_lanes(g[k]), bswap);
        for (int k = 0; k < 8; k += 2) {
            _mm256_storeu_si256((__m256i *)(out + 8 * (i + 2 * k)), _mm256_permute2x128_si256(g[k], g[k + 1], 0x20));
            _mm256_storeu_si256((__m256i *)(out + 8 * (i + 16 + 2 * k)),
                                _mm256_permute2x128_si256(g[k], g[k + 1], 0x31));
        }
    }
    return i;
}
#endif

/* One call per plane count, r a constant in each: with AVX2, 32 bytes of each plane at a time
 * (unpack_r_avx2), the last bytes (or all, without) a word at a time, a loop the compiler vectorises. */
static inline __attribute__((always_inline)) void unpack_r(const uint8_t *const *planes, const int r, int64_t n,
                                                           uint8_t *restrict out) {
    const uint8_t *p[8];
    for (int t = 0; t < r; t++)
        p[t] = planes[r - 1 - t];
    int64_t i = 0;
#if defined(__AVX2__)
    i = unpack_r_avx2(p, r, n, out);
#endif
    for (; i < n; i++) {
        uint64_t x = 0;
        for (int t = 0; t < r; t++)
            x |= (uint64_t)p[t][i] << (8 * t);
        x = __builtin_bswap64(transpose8(x));
        memcpy(out + 8 * i, &x, 8);
    }
}

void moed_unpack_planes(const uint8_t *const *planes, int r, int64_t n, uint8_t *out) {
    switch (r) {
    case 1: unpack_r(planes, 1, n, out); break;
    case 2: unpack_r(planes, 2, n, out); break;
    case 3: unpack_r(planes, 3, n, out); break;
    case 4: unpack_r(planes, 4, n, out); break;
    case 5: unpack_r(planes, 5, n, out); break;
    case 6: unpack_r(planes, 6, n, out); break;
    case 7: unpack_r(planes, 7, n, out); break;
    default: unpack_r(planes, 8, n, out); break;
    }
}

/* ---- int8 matrix products on the store's codes (quant/kernels/native.py) ----
 *
 * A matrix w[n, k] = s[n, g] * c[n, k] + z[n, g] (g = k / G; codes c of b <= 8 bits) is held as centred codes
 * c - 2^(b-1) (int8), in blocks of 16 rows: block b is K/4 runs of 64 bytes, run j holding codes 4j..4j+3 of
 * rows 16b..16b+15 (row after row), so that one 64-byte load feeds 16 rows' dot products with four values
 * of x. Per-group parameters are held as [blocks][K/G][16] halves: scale s and offset z + s * 2^(b-1) as
 * IEEE float16, and the group's sum of centred codes as int16 (|sum| <= 2^(b-1) * G fits for G <= 256): 6
 * bytes a group and row, not 12 as float32 (a 4-bit expert's form is 8% smaller). Rows past N are zero. x is
 * quantised per group of G to int8 (x ~ dx * xq, dx = max|x| / 127) and shifted to unsigned (xq + 128) for
 * the u8 x s8 dot product, whose excess 128 * sum is taken off in int32 (exact); centring keeps the
 * activations' rounding off the codes' middle, as onnxruntime's MatMulNBits with its zero point at the middle
 * (accuracy level 4) does. Offsets use the exact group sums of x. Codes of 4 bits or fewer are held two to a
 * byte, uncentred: the low nibbles of a 64-byte run are run 2j, the high nibbles run 2j + 1, multiplied as
 * they are and centred per group (qdot_block).
 */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define MOED_VNNI 1
#else
#define MOED_VNNI 0
#endif
/* x86 CPUs without AVX512-VNNI but with AVX2 (most laptops and desktops: Zen 2/3, Intel's client cores) run the
 * same integer dot products 8 rows at a time with vpmaddubsw (u8 x s8 pairs summed to int16, saturating) and
 * vpmaddwd: see qdot_block for how no sum saturates. */
#if !MOED_VNNI && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define MOED_AVX2 1
#else
#define MOED_AVX2 0
#endif
#include <math.h>
#include <stdlib.h>

/* The dot products' path: 2 AVX512-VNNI, 1 AVX2, 0 plain C. */
int moed_simd(void) { return MOED_VNNI ? 2 : MOED_AVX2; }

/* Bytes x - y (mod 256) of two words, byte by byte (no borrow across bytes). */
static inline uint32_t bytes_sub(uint32_t x, uint32_t y) {
    const uint32_t H = 0x80808080u;
    return ((x | H) - (y & ~H)) ^ ((x ^ ~y) & H);
}

#if defined(__AVX2__)
/* r[i]: words 0..7 of row i (i < 8) -> r[j]: word j of rows 0..7 (an 8x8 transpose of 32-bit words) */
static inline __attribute__((always_inline)) void transpose_words(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);     /* rows i, i+1: words 0 1 | 4 5 */
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]); /* words 2 3 | 6 7 */
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            u[i + 2 * h] = _mm256_unpacklo_epi64(t[i + h], t[i + 2 + h]);     /* 4 rows: word 2h | 2h + 4 */
            u[i + 2 * h + 1] = _mm256_unpackhi_epi64(t[i + h], t[i + 2 + h]); /* word 2h + 1 | 2h + 5 */
        }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
        r[j + 4] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
}
#endif

/* The sum of G codes (vpsadbw by 8 bytes where there is AVX2 and G % 32 == 0) */
static inline int32_t group_sum(const uint8_t *src, int G) {
#if defined(__AVX2__)
    if (G % 32 == 0) {
        __m256i acc = _mm256_setzero_si256();
        for (int j = 0; j < G; j += 32)
            acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_loadu_si256((const __m256i *)(src + j)),
                                                        _mm256_setzero_si256()));
        const __m128i two = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        return (int32_t)(_mm_cvtsi128_si64(two) + _mm_extract_epi64(two, 1));
    }
#endif
    int32_t sum = 0;
    for (int j = 0; j < G; j++) sum += src[j];
    return sum;
}

/* codes [rows, k] of b bits (mid = 2^(b-1)), rows <= 16, -> block b of the kernels' layout: above 4 bits centred
 * codes, a run of 4 of each of the block's 16 rows per 64 bytes; at 4 or fewer uncentred nibbles, runs 2j and
 * 2j + 1 in one 64 bytes. And each group's sum of centred codes. Rows past `rows` are zero. */
static void interleave_block(const uint8_t *codes, int rows, int64_t b, int64_t k, int G, int bits, uint8_t *out,
                             int16_t *sums) {
    const int64_t ng = k / G, runs = bits <= 4 ? k / 8 : k / 4;
    const int mid = 1 << (bits - 1);
    const uint32_t mids = 0x01010101u * (uint32_t)mid;
#if defined(__AVX2__)
    if (bits > 4 && rows == 16 && k % 32 == 0) { /* eight runs of 16 rows at a time: two 8x8 word transposes */
        const __m256i midv = _mm256_set1_epi8((char)mid);
        for (int64_t j0 = 0; j0 < runs; j0 += 8)
            for (int h = 0; h < 2; h++) {
                __m256i w[8];
                for (int i = 0; i < 8; i++)
                    w[i] = _mm256_sub_epi8(_mm256_loadu_si256((const __m256i *)(codes + (8 * h + i) * k + 4 * j0)),
                                           midv);
                transpose_words(w);
                for (int j = 0; j < 8; j++)
                    _mm256_storeu_si256((__m256i *)(out + b * 64 * runs + 64 * (j0 + j) + 32 * h), w[j]);
            }
    } else
#endif
        for (int r = 0; r < 16; r++) {
            uint8_t *dst = out + b * 64 * runs + 4 * r;
            if (r >= rows) { /* padding rows: zero codes, zero sums */
                for (int64_t j = 0; j < runs; j++) memset(dst + 64 * j, 0, 4);
                for (int64_t g = 0; g < ng; g++) sums[b * ng * 16 + r + 16 * g] = 0;
                continue;
            }
            const uint8_t *src = codes + r * k;
            if (bits <= 4) /* (the test out of the loops: each is a tight loop of its own) */
                for (int64_t j = 0; j < runs; j++) { /* byte q: code 8j + q low, 8j + 4 + q high, four at once */
                    uint32_t lo, hi;
                    memcpy(&lo, src + 8 * j, 4);
                    memcpy(&hi, src + 8 * j + 4, 4);
                    const uint32_t v = (lo & 0x0f0f0f0fu) | (hi & 0x0f0f0f0fu) << 4;
                    memcpy(dst + 64 * j, &v, 4);
                }
            else
                for (int64_t j = 0; j < runs; j++) {
                    uint32_t v;
                    memcpy(&v, src + 4 * j, 4);
                    v = bytes_sub(v, mids);
                    memcpy(dst + 64 * j, &v, 4);
                }
        }
    for (int r = 0; r < rows; r++)
        for (int64_t g = 0; g < ng; g++)
            sums[b * ng * 16 + r + 16 * g] = (int16_t)(group_sum(codes + r * k + g * G, G) - G * mid);
}

/* codes [n, k] -> the kernels' layout, block by block (interleave_block) */
void moed_interleave(const uint8_t *codes, int64_t n, int64_t k, int G, int bits, uint8_t *out, int16_t *sums) {
    for (int64_t b = 0; 16 * b < n; b++)
        interleave_block(codes + 16 * b * k, n - 16 * b < 16 ? (int)(n - 16 * b) : 16, b, k, G, bits, out, sums);
}

/* Blocks b0..b1-1 of the same from the first r bit-planes of the codes (as moed_unpack_planes takes them,
 * r = bits; moed_interleave_planes), a block of 16 rows unpacked at a time into a buffer of 16 * k bytes that
 * stays in cache: no array of all the codes. k % 8 == 0. Returns 0, or -1 if the buffer could not be had. */
static int interleave_planes_blocks(const uint8_t *const *planes, int r, int64_t n, int64_t k, int G, uint8_t *out,
                                    int16_t *sums, int64_t b0, int64_t b1) {
    uint8_t *tmp = malloc((size_t)(16 * k));
    if (tmp == NULL) return -1;
    const uint8_t *p[8];
    for (int64_t b = b0; b < b1; b++) {
        const int rows = n - 16 * b < 16 ? (int)(n - 16 * b) : 16;
        for (int t = 0; t < r; t++) p[t] = planes[t] + 2 * b * k; /* 16 rows of k codes: 2k bytes a plane */
        moed_unpack_planes(p, r, rows * k / 8, tmp);
        interleave_block(tmp, rows, b, k, G, r, out, sums);
    }
    free(tmp);
    return 0;
}

/* A float as IEEE float16 bits, rounded to nearest even (as numpy's astype(float16)); beyond float16's range,
 * infinity. */
static inline uint16_t float_half(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, 0); /* _MM_FROUND_TO_NEAREST_INT */
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);   /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  /* >= 65520 (and infinity): infinity */
    if (ax < 0x38800000u) {                                     /* below 2^-14: a subnormal (or zero) half */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(a * 16777216.f)); /* 2^24 units; 1024 is the least normal */
    }
    uint32_t h = ((ax >> 23) - 112) << 10 | (ax >> 13 & 0x3ffu);
    const uint32_t rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) h++; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
#endif
}

/* per-group float parameters [n, ng] -> float16 [blocks][ng][16] (float_half), rows past n zero. Returns 0, or
 * -1 if one is not finite as a float16. */
int moed_interleave_params(const float *p, int64_t n, int64_t ng, uint16_t *out) {
    const int64_t blocks = (n + 15) / 16;
    int bad = 0;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t g = 0; g < ng; g++)
            for (int r = 0; r < 16; r++) {
                const int64_t row = 16 * b + r;
                const uint16_t h = row < n ? float_half(p[row * ng + g]) : 0;
                bad |= (h & 0x7c00u) == 0x7c00u;
                out[(b * ng + g) * 16 + r] = h;
            }
    return bad ? -1 : 0;
}

/* An IEEE float16 (as its bits) as a float: normal, subnormal, zero, infinity and NaN (exact). */
static float half_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 31u, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else if (exp != 0) {
        bits = sign | (exp + 112) << 23 | man << 13;
    } else { /* zero or subnormal: man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* x [t, K] -> xu [t, K] = quantised x + 128 (uint8), dx and xs [t, K/G], and su [t, K/G]: each group's sum of
 * xu (packed codes are multiplied uncentred, their centre taken off per group: mid * su) */
static void quantise_x(const float *x, int t, int64_t k, int G, uint8_t *xu, float *dx, float *xs, int32_t *su) {
    const int64_t ng = k / G;
    for (int64_t i = 0; i < t * ng; i++) {
        const float *v = x + i * G;
        float amax = 0.f, sum = 0.f;
        for (int j = 0; j < G; j++) {
            amax = fmaxf(amax, fabsf(v[j]));
            sum += v[j];
        }
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t usum = 0;
        for (int j = 0; j < G; j++) {
            xu[i * G + j] = (uint8_t)(lrintf(v[j] * inv) + 128);
            usum += xu[i * G + j];
        }
        dx[i] = amax / 127.f;
        xs[i] = sum;
        su[i] = usum;
    }
}

/* The codes a row block streams through are asked for PREFETCH bytes before they are read: the hardware's own
 * prefetcher alone left the AVX2 decode product ~10-15% short of this VM's memory bandwidth (8 experts of
 * 2048x1024, 8 bits, 2 threads: 2.6 -> 2.2-2.3 ms, median of 8 alternating runs). */
#if MOED_AVX2
#define PREFETCH 4096
static inline __attribute__((always_inline)) void prefetch_ahead(const int8_t *at, int bytes) {
    for (int c = 0; c < bytes; c += 64) __builtin_prefetch(at + PREFETCH + c);
}
#endif

#if MOED_VNNI
/* Runs j and j + 1 of codes (w0, w1: 4 codes of each of 16 rows) times activations j and j + 1 of nt tokens (xg,
 * row stride k), into acc (a lone token's run j + 1 into acc2: see qdot_block). */
static inline __attribute__((always_inline)) void dot_runs(__m512i *acc, __m512i *acc2, const uint8_t *xg, int64_t k,
                                                           int j, __m512i w0, __m512i w1, const int nt) {
    for (int u = 0; u < nt; u++) {
        int32_t x0, x1;
        memcpy(&x0, xg + (int64_t)u * k + 4 * j, 4);
        memcpy(&x1, xg + (int64_t)u * k + 4 * j + 4, 4);
        acc[u] = _mm512_dpbusd_epi32(acc[u], _mm512_set1_epi32(x0), w0);
        if (nt == 1)
            acc2[u] = _mm512_dpbusd_epi32(acc2[u], _mm512_set1_epi32(x1), w1);
        else
            acc[u] = _mm512_dpbusd_epi32(acc[u], _mm512_set1_epi32(x1), w1);
    }
}
#endif

/* Tokens i..i+nt-1 (nt <= 8) of row block b: out[nt][16]. Each 64-byte load of codes feeds nt tokens' dot
 * products (two runs of them when packed: nibbles, multiplied uncentred and centred per group by mid * su).
 * nt and packed are constants where this is inlined. */
static inline __attribute__((always_inline)) void qdot_block(const uint8_t *xu, const float *dx, const float *xs,
                                                             const int32_t *su,
                                                             const int8_t *wb, const uint16_t *s, const uint16_t *z,
                                                             const int16_t *e, int64_t b, int64_t k, int G, int i,
                                                             const int nt, const int packed, int mid,
                                                             float out[][16]) {
    const int64_t ng = k / G;
#if MOED_VNNI
    const __m512i low = _mm512_set1_epi8(15);
    __m512 acc_f[8];
    for (int u = 0; u < nt; u++) acc_f[u] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        /* a lone token (decode) has two accumulators, even and odd runs: two dependency chains of dot products,
         * not one that waits out each vpdpbusd's latency (13-16% faster at 4 bits); with more tokens their
         * chains are independent already, and twice the registers would spill */
        __m512i acc[8], acc2[8];
        for (int u = 0; u < nt; u++) acc[u] = acc2[u] = _mm512_setzero_si512();
        const uint8_t *xg = xu + (int64_t)i * k + g * G;
        if (packed) {
            const int8_t *wg = wb + g * G * 8;
            for (int j = 0; j < G / 4; j += 2) {
                const __m512i p = _mm512_loadu_si512(wg + 32 * j);
                const __m512i w0 = _mm512_and_si512(p, low);
                const __m512i w1 = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
                dot_runs(acc, acc2, xg, k, j, w0, w1, nt);
            }
        } else {
            const int8_t *wg = wb + g * G * 16;
            for (int j = 0; j < G / 4; j += 2) { /* G is a multiple of 8 */
                const __m512i w0 = _mm512_loadu_si512(wg + 64 * j), w1 = _mm512_loadu_si512(wg + 64 * j + 64);
                dot_runs(acc, acc2, xg, k, j, w0, w1, nt);
            }
        }
        if (nt == 1) acc[0] = _mm512_add_epi32(acc[0], acc2[0]);
        const int64_t at = (b * ng + g) * 16;
        const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + at)));
        const __m512 zv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z + at)));
        const __m512i ev = _mm512_slli_epi32(_mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(e + at))), 7);
        for (int u = 0; u < nt; u++) {
            const int64_t q = (int64_t)(i + u) * ng + g;
            const __m512i off = packed ? _mm512_add_epi32(ev, _mm512_set1_epi32(mid * su[q])) : ev;
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[u], off));
            acc_f[u] = _mm512_fmadd_ps(dot, _mm512_mul_ps(sv, _mm512_set1_ps(dx[q])), acc_f[u]);
            acc_f[u] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xs[q]), acc_f[u]);
        }
    }
    for (int u = 0; u < nt; u++) _mm512_storeu_ps(out[u], acc_f[u]);
#elif MOED_AVX2
    /* The same integer sums as the VNNI path, rows 0-7 and 8-15 in two registers. vpmaddubsw multiplies u8 by s8
     * and adds pairs into int16, saturating: packed nibbles (0..15) times x + 128 (0..255) give pairs of at most
     * 7650, and four runs' pairs 30600, held in int16 before vpmaddwd widens them; 8-bit codes (-128..127) take x
     * + 128 as 16 * high nibble + low nibble, each pair at most 3840 and eight runs' 30720 in int16. */
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    __m256 acc_f[8][2];
    for (int u = 0; u < nt; u++) acc_f[u][0] = acc_f[u][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256i acc[8][2];
        for (int u = 0; u < nt; u++) acc[u][0] = acc[u][1] = _mm256_setzero_si256();
        const uint8_t *xg = xu + (int64_t)i * k + g * G;
        if (packed) {
            const int8_t *wg = wb + g * G * 8;
            for (int j0 = 0; j0 < G / 4; j0 += 4) { /* two 64-byte loads (four runs) a flush of the int16 sums */
                __m256i h[8][2];
                for (int u = 0; u < nt; u++) h[u][0] = h[u][1] = _mm256_setzero_si256();
                const int j1 = j0 + 4 < G / 4 ? j0 + 4 : G / 4;
                prefetch_ahead(wg + 32 * j0, 32 * (j1 - j0));
                for (int j = j0; j < j1; j += 2) {
                    const __m256i p0 = _mm256_loadu_si256((const __m256i *)(wg + 32 * j));
                    const __m256i p1 = _mm256_loadu_si256((const __m256i *)(wg + 32 * j + 32));
                    const __m256i w00 = _mm256_and_si256(p0, low);
                    const __m256i w01 = _mm256_and_si256(_mm256_srli_epi16(p0, 4), low);
                    const __m256i w10 = _mm256_and_si256(p1, low);
                    const __m256i w11 = _mm256_and_si256(_mm256_srli_epi16(p1, 4), low);
                    for (int u = 0; u < nt; u++) {
                        int32_t x0, x1;
                        memcpy(&x0, xg + (int64_t)u * k + 4 * j, 4);
                        memcpy(&x1, xg + (int64_t)u * k + 4 * j + 4, 4);
                        const __m256i xa = _mm256_set1_epi32(x0), xb = _mm256_set1_epi32(x1);
                        h[u][0] = _mm256_add_epi16(h[u][0], _mm256_add_epi16(_mm256_maddubs_epi16(xa, w00),
                                                                             _mm256_maddubs_epi16(xb, w01)));
                        h[u][1] = _mm256_add_epi16(h[u][1], _mm256_add_epi16(_mm256_maddubs_epi16(xa, w10),
                                                                             _mm256_maddubs_epi16(xb, w11)));
                    }
                }
                for (int u = 0; u < nt; u++) {
                    acc[u][0] = _mm256_add_epi32(acc[u][0], _mm256_madd_epi16(h[u][0], ones));
                    acc[u][1] = _mm256_add_epi32(acc[u][1], _mm256_madd_epi16(h[u][1], ones));
                }
            }
        } else {
            const int8_t *wg = wb + g * G * 16;
            for (int j0 = 0; j0 < G / 4; j0 += 8) { /* eight runs a flush of the int16 sums */
                __m256i hi[8][2], lo[8][2];
                for (int u = 0; u < nt; u++) hi[u][0] = hi[u][1] = lo[u][0] = lo[u][1] = _mm256_setzero_si256();
                const int j1 = j0 + 8 < G / 4 ? j0 + 8 : G / 4;
                prefetch_ahead(wg + 64 * j0, 64 * (j1 - j0));
                for (int j = j0; j < j1; j++) {
                    const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wg + 64 * j));
                    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wg + 64 * j + 32));
                    for (int u = 0; u < nt; u++) {
                        uint32_t xw;
                        memcpy(&xw, xg + (int64_t)u * k + 4 * j, 4);
                        const __m256i xl = _mm256_set1_epi32((int32_t)(xw & 0x0f0f0f0fu));
                        const __m256i xh = _mm256_set1_epi32((int32_t)(xw >> 4 & 0x0f0f0f0fu));
                        hi[u][0] = _mm256_add_epi16(hi[u][0], _mm256_maddubs_epi16(xh, w0));
                        hi[u][1] = _mm256_add_epi16(hi[u][1], _mm256_maddubs_epi16(xh, w1));
                        lo[u][0] = _mm256_add_epi16(lo[u][0], _mm256_maddubs_epi16(xl, w0));
                        lo[u][1] = _mm256_add_epi16(lo[u][1], _mm256_maddubs_epi16(xl, w1));
                    }
                }
                for (int u = 0; u < nt; u++)
                    for (int v = 0; v < 2; v++)
                        acc[u][v] = _mm256_add_epi32(acc[u][v], _mm256_add_epi32(_mm256_madd_epi16(hi[u][v], sixteen),
                                                                                 _mm256_madd_epi16(lo[u][v], ones)));
            }
        }
        const int64_t at = (b * ng + g) * 16;
        for (int v = 0; v < 2; v++) {
            const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + at + 8 * v)));
            const __m256 zv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(z + at + 8 * v)));
            const __m128i e16 = _mm_loadu_si128((const __m128i *)(e + at + 8 * v));
            const __m256i ev = _mm256_slli_epi32(_mm256_cvtepi16_epi32(e16), 7);
            for (int u = 0; u < nt; u++) {
                const int64_t q = (int64_t)(i + u) * ng + g;
                const __m256i off = packed ? _mm256_add_epi32(ev, _mm256_set1_epi32(mid * su[q])) : ev;
                const __m256 dot = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[u][v], off));
                acc_f[u][v] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sv, _mm256_set1_ps(dx[q])), acc_f[u][v]);
                acc_f[u][v] = _mm256_fmadd_ps(zv, _mm256_set1_ps(xs[q]), acc_f[u][v]);
            }
        }
    }
    for (int u = 0; u < nt; u++) {
        _mm256_storeu_ps(out[u], acc_f[u][0]);
        _mm256_storeu_ps(out[u] + 8, acc_f[u][1]);
    }
#else
    (void)su; /* codes are centred one by one here */
    for (int u = 0; u < nt; u++)
        for (int r = 0; r < 16; r++) out[u][r] = 0.f;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t at = (b * ng + g) * 16;
        float sv[16], zv[16];
        for (int r = 0; r < 16; r++) {
            sv[r] = half_float(s[at + r]);
            zv[r] = half_float(z[at + r]);
        }
        for (int u = 0; u < nt; u++) {
            int32_t acc[16] = {0};
            const uint8_t *xg = xu + (int64_t)(i + u) * k + g * G;
            for (int j = 0; j < G / 4; j++)
                for (int r = 0; r < 16; r++)
                    for (int q = 0; q < 4; q++) {
                        int c;
                        if (packed) {
                            const uint8_t byte = (uint8_t)wb[g * G * 8 + 64 * (j / 2) + 4 * r + q];
                            c = (j % 2 ? byte >> 4 : byte & 15) - mid;
                        } else {
                            c = wb[g * G * 16 + 64 * j + 4 * r + q];
                        }
                        acc[r] += c * (int32_t)xg[4 * j + q];
                    }
            const int64_t q = (int64_t)(i + u) * ng + g;
            for (int r = 0; r < 16; r++)
                out[u][r] += (float)(acc[r] - 128 * (int32_t)e[at + r]) * sv[r] * dx[q] + zv[r] * xs[q];
        }
    }
#endif
}

#define QDOT(NT, P) qdot_block(xu, dx, xs, su, wb, s, z, e, b, k, G, i, NT, P, mid, out)

/* Row blocks b0..b1-1 of y[t, n] (row stride ldy) = or += quantised x . w^T, eight tokens at a time (AVX2:
 * four) */
static void qgemm_blocks(const uint8_t *xu, const float *dx, const float *xs, const int32_t *su, int t,
                         const int8_t *w, const uint16_t *s, const uint16_t *z, const int16_t *e, int64_t n, int64_t k,
                         int G, int bits, int64_t b0, int64_t b1, float *y, int64_t ldy, int accumulate) {
    const int packed = bits <= 4, mid = 1 << (bits - 1);
    for (int64_t b = b0; b < b1; b++) {
        const int8_t *wb = w + b * (packed ? 8 : 16) * k;
        const int rows = n - 16 * b < 16 ? (int)(n - 16 * b) : 16;
        for (int i = 0; i < t;) {
            float out[8][16];
            const int nt = t - i >= 8 && !MOED_AVX2 ? 8 : t - i >= 4 ? 4 : 1; /* AVX2's 16 registers: 4 */
            if (packed) {
                if (nt == 8) QDOT(8, 1); else if (nt == 4) QDOT(4, 1); else QDOT(1, 1);
            } else {
                if (nt == 8) QDOT(8, 0); else if (nt == 4) QDOT(4, 0); else QDOT(1, 0);
            }
            for (int u = 0; u < nt; u++) {
                float *yr = y + (int64_t)(i + u) * ldy + 16 * b;
                for (int r = 0; r < rows; r++) yr[r] = accumulate ? yr[r] + out[u][r] : out[u][r];
            }
            i += nt;
        }
    }
}

/* The worker threads' job runner (below): fn(arg, part, parts) for every part, the caller running part 0. */
typedef void (*moed_task)(void *arg, int part, int parts);
static void run_parts(moed_task fn, void *arg, int parts);
static int try_run_parts(moed_task fn, void *arg, int parts);

typedef struct {
    const uint8_t *const *planes;
    int r, G;
    int64_t n, k;
    uint8_t *out;
    int16_t *sums;
    _Atomic int failed;
} planes_job;

static void planes_part(void *arg, int part, int parts) {
    planes_job *j = arg;
    const int64_t blocks = (j->n + 15) / 16;
    if (interleave_planes_blocks(j->planes, j->r, j->n, j->k, j->G, j->out, j->sums, blocks * part / parts,
                                 blocks * (part + 1) / parts))
        atomic_store(&j->failed, 1);
}

/* codes of r bits given as their first r bit-planes -> the kernels' layout (interleave_planes_blocks), its
 * blocks split over `threads` if the workers are free now (a form made while a product runs does not wait
 * for it, and does not hold up the next). Returns 0, or -1 if a buffer could not be had. */
int moed_interleave_planes(const uint8_t *const *planes, int r, int64_t n, int64_t k, int G, uint8_t *out,
                           int16_t *sums, int threads) {
    planes_job j = {planes, r, G, n, k, out, sums, 0};
    const int64_t blocks = (n + 15) / 16;
    if (threads > blocks) threads = (int)blocks;
    if (threads <= 1 || !try_run_parts(planes_part, &j, threads)) planes_part(&j, 0, 1);
    return atomic_load(&j.failed) ? -1 : 0;
}

/* An MSB-scheme matrix's form at r bits from the store's bytes: its head (scale and minimum, float16 [2][n][ng])
 * and its top r bit-planes, without the views in between: the codes as moed_interleave_planes makes them, the
 * parameters as quant.views.msb_view and quant/kernels/native.py's _prepare compute them in float32 (ISO C: no
 * contraction), d = 2^(8-r): scale s * d, offset 0 + ((minimum + s * ((d - 1) / 2)) + s * d * 2^(r-1)), then
 * interleaved as moed_interleave_params does. Returns 0, -1 if a buffer could not be had, -2 if a scale or offset
 * is not finite as a float16. */
int moed_form_msb(const uint16_t *head, const uint8_t *const *planes, int r, int64_t n, int64_t k, int G,
                  uint8_t *codes, int16_t *sums, uint16_t *s_out, uint16_t *z_out, int threads) {
    const int64_t m = n * (k / G);
    float *p = malloc(sizeof(float) * (size_t)(2 * m)); /* scales, then offsets, [n, ng] each */
    if (p == NULL || moed_interleave_planes(planes, r, n, k, G, codes, sums, threads)) {
        free(p);
        return -1;
    }
    const float d = (float)(1 << (8 - r)), c = (d - 1.f) / 2.f, mid = (float)(1 << (r - 1));
    for (int64_t i = 0; i < m; i++) {
        const float sv = half_float(head[i]), scale = sv * d, zero = half_float(head[m + i]) + sv * c;
        p[i] = scale;
        p[m + i] = 0.f + (zero + scale * mid);
    }
    const int bad = moed_interleave_params(p, n, k / G, s_out) | moed_interleave_params(p + m, n, k / G, z_out);
    free(p);
    return bad ? -2 : 0;
}

typedef struct {
    const uint8_t *xu;
    const float *dx, *xs;
    const int32_t *su;
    int t;
    const int8_t *w;
    const uint16_t *s, *z;
    const int16_t *e;
    int64_t n, k;
    int G, bits;
    int64_t b0, b1;
    float *y;
    int64_t ldy;
    int accumulate;
} qgemm_job;

static void qgemm_part(void *arg, int part, int parts) {
    const qgemm_job *j = arg;
    const int64_t nb = j->b1 - j->b0;
    qgemm_blocks(j->xu, j->dx, j->xs, j->su, j->t, j->w, j->s, j->z, j->e, j->n, j->k, j->G, j->bits,
                 j->b0 + nb * part / parts, j->b0 + nb * (part + 1) / parts, j->y, j->ldy, j->accumulate);
}

/* y[t, n] (row stride ldy) = (or += with accumulate) x[t, k] . w^T over row blocks b0..b1-1, split over
 * `threads` threads (the caller's and the workers'); w, s, z, e as moed_interleave and moed_interleave_params
 * make them. */
void moed_qgemm_mt(const float *x, int t, const int8_t *w, const uint16_t *s, const uint16_t *z, const int16_t *e,
                   int64_t n, int64_t k, int G, int bits, int64_t b0, int64_t b1, float *y, int64_t ldy,
                   int accumulate, int threads) {
    const int64_t ng = k / G;
    uint8_t *xu = malloc((size_t)(t * k));
    float *dx = malloc(sizeof(float) * (size_t)(3 * t * ng)); /* dx, xs and su */
    int32_t *su = (int32_t *)(dx + 2 * t * ng);
    quantise_x(x, t, k, G, xu, dx, dx + t * ng, su);
    qgemm_job j = {xu, dx, dx + t * ng, su, t, w, s, z, e, n, k, G, bits, b0, b1, y, ldy, accumulate};
    run_parts(qgemm_part, &j, (int)(threads < b1 - b0 ? threads : b1 - b0));
    free(xu);
    free(dx);
}

static float act_fn(float v, int act) {
    switch (act) {
    case 1: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); /* gelu (erf) */
    case 2: return v > 0.f ? v : 0.f;                                   /* relu */
    default: return v / (1.f + expf(-v));                               /* silu */
    }
}

/* An expert FFN: gate and up [f, d], down [d, f] (matrix i as w, s, z, e, G and bits [i]), its sizes and
 * activation. */
typedef struct {
    const int8_t *w[3];
    const uint16_t *s[3], *z[3];
    const int16_t *e[3];
    int G[3], bits[3];
    int64_t d, f;
    int act;
} moed_expert;

/* y[t, d] = down(act(gate x) * up x), on this thread. */
static void ffn(const float *x, int t, const moed_expert *m, float *y) {
    const int64_t d = m->d, f = m->f;
    float *h = malloc(sizeof(float) * (size_t)(2 * t * f));
    float *u = h + t * f;
    moed_qgemm_mt(x, t, m->w[0], m->s[0], m->z[0], m->e[0], f, d, m->G[0], m->bits[0], 0, (f + 15) / 16, h, f, 0, 1);
    moed_qgemm_mt(x, t, m->w[1], m->s[1], m->z[1], m->e[1], f, d, m->G[1], m->bits[1], 0, (f + 15) / 16, u, f, 0, 1);
    for (int64_t i = 0; i < t * f; i++) h[i] = act_fn(h[i], m->act) * u[i];
    moed_qgemm_mt(h, t, m->w[2], m->s[2], m->z[2], m->e[2], d, f, m->G[2], m->bits[2], 0, (d + 15) / 16, y, d, 0, 1);
    free(h);
}

/* n experts on the same x [t, d] one after another: y[i] = expert i's FFN of x ([n, t, d]). */
static void ffn_many(const float *x, int t, int n, const moed_expert *ex, float *y) {
    for (int i = 0; i < n; i++) {
        ffn(x, t, ex + i, y);
        y += (int64_t)t * ex[i].d;
    }
}

/* ---- one decode token's attention (daemon/models/attention.py) ----
 *
 * q [H, d], k and v [Hkv, d] of one new token at position `pos` of a sequence whose cache holds keys and values
 * [Hkv, cap, d] (cap > pos): q and k are rotated by cos/sin [d] (half-split pairs: x * cos + rotate_half(x) *
 * sin, rotate_half([a, b]) = [-b, a]), k and v are written at pos, and out [H, d] = softmax(q k^T * scale) v
 * over positions 0..pos, head h reading key/value head h / (H / Hkv).
 */
static void rope(const float *x, const float *cos, const float *sin, int d, float *out) {
    const int h = d / 2;
    for (int i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        out[i] = a * cos[i] + (-b) * sin[i];
        out[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

typedef struct {
    const float *q, *cos, *sin, *kcache, *vcache;
    int64_t cap, n;
    int H, Hkv, d;
    float scale;
    float *out;
} attn_job;

/* Heads part * H / parts .. (part + 1) * H / parts - 1 of moed_decode_attention, the cache already written. Scores
 * are taken four positions at a time: four independent sums, not one chain of dependent multiply-adds a position. */
static void attn_part(void *arg, int part, int parts) {
    const attn_job *j = arg;
    const int64_t n = j->n, d = j->d;
    float *qr = malloc(sizeof(float) * (size_t)(d + n));
    float *p = qr + d;
    for (int h = j->H * part / parts; h < j->H * (part + 1) / parts; h++) {
        const int kv = h / (j->H / j->Hkv);
        const float *kj = j->kcache + (int64_t)kv * j->cap * d, *vj = j->vcache + (int64_t)kv * j->cap * d;
        rope(j->q + (int64_t)h * d, j->cos, j->sin, (int)d, qr);
        int64_t t = 0;
        for (; t + 4 <= n; t += 4) {
            const float *k0 = kj + t * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t i = 0; i < d; i++) {
                s0 += qr[i] * k0[i];
                s1 += qr[i] * k1[i];
                s2 += qr[i] * k2[i];
                s3 += qr[i] * k3[i];
            }
            p[t] = s0 * j->scale;
            p[t + 1] = s1 * j->scale;
            p[t + 2] = s2 * j->scale;
            p[t + 3] = s3 * j->scale;
        }
        for (; t < n; t++) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < d; i++) s += qr[i] * kj[t * d + i];
            p[t] = s * j->scale;
        }
        float top = -INFINITY, sum = 0.f;
        for (t = 0; t < n; t++) top = fmaxf(top, p[t]);
        for (t = 0; t < n; t++) {
            p[t] = expf(p[t] - top);
            sum += p[t];
        }
        float *o = j->out + (int64_t)h * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.f;
        for (t = 0; t < n; t++) {
            const float w = p[t] / sum;
            const float *vt = vj + t * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) o[i] += w * vt[i];
        }
    }
    free(qr);
}

static int pool_threads(void);

/* A context at least this long (positions x heads x head width multiply-adds, twice) splits its heads over the
 * threads the kernels have started: a few thousand positions would otherwise take milliseconds a layer. */
#define ATTN_SPLIT (1L << 18)

void moed_decode_attention(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                           float *kcache, float *vcache, int64_t cap, int64_t pos, int H, int Hkv, int d,
                           float scale, float *out) {
    for (int j = 0; j < Hkv; j++) {
        rope(k + (int64_t)j * d, cos, sin, d, kcache + ((int64_t)j * cap + pos) * d);
        memcpy(vcache + ((int64_t)j * cap + pos) * d, v + (int64_t)j * d, sizeof(float) * (size_t)d);
    }
    attn_job job = {q, cos, sin, kcache, vcache, cap, pos + 1, H, Hkv, d, scale, out};
    int parts = pool_threads();
    if (parts > H) parts = H;
    if (parts <= 1 || (pos + 1) * H * d < ATTN_SPLIT || !try_run_parts(attn_part, &job, parts))
        attn_part(&job, 0, 1);
}

/* out [n] = x / sqrt(mean(x^2) + eps) * w (w may be NULL: 1), for `rows` rows of n */
void moed_rms_norm(const float *x, const float *w, int64_t rows, int64_t n, float eps, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; i++) out[r * n + i] = w ? xr[i] * inv * w[i] : xr[i] * inv;
    }
}

/* ---- a few threads of our own for the kernels above ----
 *
 * Python's thread pool hands a job to a worker through a queue, a futex wake and the GIL: ~0.1 ms on a
 * small VM, as long as a 4 MiB matrix takes. These workers wait for jobs spinning (yielding the core to
 * anything else that wants it) for up to SPIN_NS after their last one, so a decode step's next product
 * finds them awake; then they sleep on a condition variable, at once after moed_park (the caller is about to
 * wait for something else, a read: a spinning worker would only take the core from whoever does it). A job
 * is fn(arg, part, parts) for part 1..parts-1 on the workers while the caller runs part 0. One job at a time
 * (callers serialise on `busy`; try_run_parts runs nothing if another has them); a forked child starts its
 * own workers.
 */
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 63
#define SPIN_NS 2000000L

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_mutex_t busy;
    pid_t pid;
    int n;
    _Atomic long gen;
    _Atomic int pending;
    _Atomic int parked;
    moed_task fn;
    void *arg;
    int parts;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, 0, 0, 0, 0, 0};

/* Threads a job may be split over now: the caller and the workers started so far (none: 1). */
static int pool_threads(void) { return pool.pid == getpid() ? pool.n + 1 : 1; }

/* The workers stop spinning until the next job. */
void moed_park(void) { atomic_store_explicit(&pool.parked, 1, memory_order_relaxed); }

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

typedef struct {
    int me;    /* the worker runs part me + 1 */
    long seen; /* the job generation when it was made: it waits for the next */
} worker_start;

static void *worker_main(void *p) {
    const int me = ((worker_start *)p)->me;
    long seen = ((worker_start *)p)->seen;
    free(p);
    for (;;) {
        const long t0 = now_ns();
        int spins = 0;
        while (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen) {
            if (++spins % 64 == 0) {
                if (now_ns() - t0 > SPIN_NS || atomic_load_explicit(&pool.parked, memory_order_relaxed)) {
                    pthread_mutex_lock(&pool.mu);
                    while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                    pthread_mutex_unlock(&pool.mu);
                    break;
                }
                sched_yield();
            }
        }
        seen = atomic_load_explicit(&pool.gen, memory_order_acquire);
        if (me + 1 < pool.parts) pool.fn(pool.arg, me + 1, pool.parts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void run_parts_held(moed_task fn, void *arg, int parts);

/* fn(arg, part, parts) for every part, the caller running part 0; returns once all have. */
static void run_parts(moed_task fn, void *arg, int parts) {
    if (parts > MAX_WORKERS + 1) parts = MAX_WORKERS + 1;
    if (parts <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&pool.busy);
    run_parts_held(fn, arg, parts);
}

/* The same if no other job has the workers now (1); else nothing is run (0). */
static int try_run_parts(moed_task fn, void *arg, int parts) {
    if (parts > MAX_WORKERS + 1) parts = MAX_WORKERS + 1;
    if (parts <= 1 || pthread_mutex_trylock(&pool.busy) != 0) return 0;
    run_parts_held(fn, arg, parts);
    return 1;
}

/* run_parts with pool.busy held (released on return) */
static void run_parts_held(moed_task fn, void *arg, int parts) {
    if (pool.pid != getpid()) { /* first use, or a forked child: its workers are not there */
        pool.pid = getpid();
        pool.n = 0;
        atomic_store(&pool.gen, 0);
    }
    while (pool.n < parts - 1) {
        pthread_t th;
        pthread_attr_t at;
        worker_start *start = malloc(sizeof *start);
        start->me = pool.n;
        start->seen = atomic_load(&pool.gen);
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &at, worker_main, start) != 0) {
            free(start);
            pthread_attr_destroy(&at);
            break;
        }
        pthread_attr_destroy(&at);
        pool.n++;
    }
    if (parts - 1 > pool.n) parts = pool.n + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.parts = parts;
    atomic_store_explicit(&pool.pending, pool.n, memory_order_relaxed);
    atomic_store_explicit(&pool.parked, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(arg, 0, parts);
    int spins = 0;
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0)
        if (++spins % 64 == 0) sched_yield();
    pthread_mutex_unlock(&pool.busy);
}

typedef struct {
    const float *x;
    int t, n;
    const moed_expert *ex;
    float *y;
} ffn_job;

static void ffn_part(void *arg, int part, int parts) {
    const ffn_job *j = arg;
    const int a = j->n * part / parts, b = j->n * (part + 1) / parts;
    int64_t at = 0;
    for (int i = 0; i < a; i++) at += (int64_t)j->t * j->ex[i].d;
    ffn_many(j->x, j->t, b - a, j->ex + a, j->y + at);
}

/* n experts on the same x [t, d]: y[i] = expert i's FFN of x ([n, t, d]), dealt in consecutive runs to
 * `threads` threads. */
void moed_ffn_many_mt(const float *x, int t, int n, const moed_expert *ex, float *y, int threads) {
    ffn_job j = {x, t, n, ex, y};
    run_parts(ffn_part, &j, threads < n ? threads : n);
}
