/* moed's native helpers, compiled on first use by quant/native.py (cc -O3 -march=native) and called through
 * ctypes. Each has a numpy twin it is tested against bit for bit (tests/unit/test_quant_planes.py).
 */
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

/* One call per plane count, r a constant in each: the compiler vectorises the loop over bytes. */
static inline __attribute__((always_inline)) void unpack_r(const uint8_t *const *planes, const int r, int64_t n,
                                                           uint8_t *restrict out) {
    const uint8_t *p[8];
    for (int t = 0; t < r; t++)
        p[t] = planes[r - 1 - t];
    for (int64_t i = 0; i < n; i++) {
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
