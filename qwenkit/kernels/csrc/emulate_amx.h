/* Tests only (QK_EMULATE_AMX): the AMX tile instructions quant.c uses, in plain C after the
   pseudocode of Intel's instruction set reference, so the AMX code path runs (slowly) on a CPU
   without AMX and is checked against the reference. One tile state per thread, as in hardware. */
#ifndef QWENKIT_EMULATE_AMX_H
#define QWENKIT_EMULATE_AMX_H

#include <stdint.h>
#include <string.h>

typedef struct {
    int rows, colsb;
    uint8_t data[16][64];
} qk_tile;

static __thread qk_tile qk_tiles[8];

static inline void qk_tile_loadconfig(const void *config) {
    const uint8_t *c = config;
    for (int t = 0; t < 8; t++) {
        uint16_t colsb;
        memcpy(&colsb, c + 16 + 2 * t, sizeof colsb);
        qk_tiles[t].colsb = colsb;
        qk_tiles[t].rows = c[48 + t];
        memset(qk_tiles[t].data, 0, sizeof qk_tiles[t].data);
    }
}

static inline void qk_tile_loadd(int t, const void *base, long stride) {
    memset(qk_tiles[t].data, 0, sizeof qk_tiles[t].data);
    for (int r = 0; r < qk_tiles[t].rows; r++)
        memcpy(qk_tiles[t].data[r], (const uint8_t *)base + r * stride, qk_tiles[t].colsb);
}

static inline void qk_tile_stored(int t, void *base, long stride) {
    for (int r = 0; r < qk_tiles[t].rows; r++) memcpy((uint8_t *)base + r * stride, qk_tiles[t].data[r], qk_tiles[t].colsb);
}

/* TDPBSSD: dst.dword[m][n] += sum over k of the 4 signed byte products of a.dword[m][k] and b.dword[k][n]. */
static inline void qk_tile_dpbssd(int dst, int a, int b) {
    qk_tile *c = &qk_tiles[dst], *ta = &qk_tiles[a], *tb = &qk_tiles[b];
    for (int m = 0; m < c->rows; m++)
        for (int n = 0; n < c->colsb / 4; n++) {
            int32_t acc;
            memcpy(&acc, &c->data[m][4 * n], sizeof acc);
            for (int k = 0; k < ta->colsb / 4; k++)
                for (int i = 0; i < 4; i++) acc += (int8_t)ta->data[m][4 * k + i] * (int8_t)tb->data[k][4 * n + i];
            memcpy(&c->data[m][4 * n], &acc, sizeof acc);
        }
}

#undef _tile_loadconfig
#undef _tile_release
#undef _tile_zero
#undef _tile_loadd
#undef _tile_stored
#undef _tile_dpbssd
#define _tile_loadconfig(config) qk_tile_loadconfig(config)
#define _tile_release() ((void)0)
#define _tile_zero(t) memset(qk_tiles[t].data, 0, sizeof qk_tiles[t].data)
#define _tile_loadd(t, base, stride) qk_tile_loadd(t, base, stride)
#define _tile_stored(t, base, stride) qk_tile_stored(t, base, stride)
#define _tile_dpbssd(dst, a, b) qk_tile_dpbssd(dst, a, b)

#endif
