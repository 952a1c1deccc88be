/* Preparing a code table for exact nearest-code search.
 *
 * The decision bounds are those of kbit's reference backend (docs/formats.md section 2):
 * the distinct code values are sorted (equal values keep the lowest index holding them),
 * the midpoint of two neighbours is computed exactly in double precision and rounded to a
 * float32 bound on the side that reproduces the exact comparison, with ties going to the
 * lower code index. A float32 value x then belongs to code index[c], c = #{bounds < x}.
 *
 * For speed, c is found from x's top 16 bits (sign, exponent, 7 mantissa bits): ``start``
 * holds the count at the lowest value of each such bucket, and ``steps`` more
 * compare-and-increment steps finish the count, ``steps`` being the most bounds any bucket
 * spans (1 or 2 for the format's tables).
 *
 * Tables with at most one bound per bucket (all of the format's: the dynamic maps, linear,
 * FP8, NF4, FP4) also get the compact index (kb_codebook.compact): the buckets that hold
 * bounds plus one below and one above them, per sign, each entry carrying the two codes a
 * value of the bucket can take and the low bits of the bound between them. It is 22 KB
 * for the dynamic maps instead of 64 KB and needs no second lookup.
 */
#include <math.h>
#include <stddef.h>

#include "kb_internal.h"

size_t kb_codebook_size(void) { return sizeof(kb_codebook); }

int kb_codebook_steps(const kb_codebook *cb) { return cb->steps; }

/* #{bounds < x} by bisection over the sorted bounds. */
static int32_t count_below(const kb_codebook *cb, float x) {
    int32_t lo = 0, hi = cb->nbounds;
    while (lo < hi) {
        int32_t mid = (lo + hi) / 2;
        if (cb->bounds[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void sort_values(const float *values, int n, float *sorted, int32_t *order) {
    /* Stable insertion sort of (value, index): at most 256 entries, once per table. */
    for (int i = 0; i < n; ++i) {
        int j = i;
        while (j > 0 && (double)sorted[j - 1] > (double)values[i]) {
            sorted[j] = sorted[j - 1];
            order[j] = order[j - 1];
            --j;
        }
        sorted[j] = values[i];
        order[j] = i;
    }
}

static void fill_bounds(kb_codebook *cb) {
    for (int32_t j = 0; j < cb->nbounds; ++j) {
        double low = cb->sorted[j], high = cb->sorted[j + 1];
        double mid = (low + high) / 2;
        float mid32 = (float)mid;
        float down = nextafterf(mid32, -INFINITY);
        /* x > mid  <=> x > (largest float32 <= mid): a tie stays with the lower value;
         * x >= mid <=> x > (largest float32 <  mid): a tie goes to the upper value. */
        float at_or_below = (double)mid32 > mid ? down : mid32;
        float strictly_below = (double)mid32 >= mid ? down : mid32;
        int lower_index_wins = cb->sorted_index[j] < cb->sorted_index[j + 1];
        cb->bounds[j] = lower_index_wins ? at_or_below : strictly_below;
    }
    for (int32_t j = cb->nbounds; j < KB_MAX_CODES + KB_MAX_STEPS + 1; ++j) cb->bounds[j] = INFINITY;
}

/* The lowest and highest non-NaN float of bucket ``key``; returns 0 for an all-NaN bucket. */
static int bucket_range(uint32_t key, float *lowest, float *highest) {
    uint32_t exponent = (key >> 7) & 0xffu;
    if (exponent == 0xffu) {
        if ((key & 0x7fu) != 0) return 0; /* NaNs only */
        *lowest = *highest = kb_float(key << 16); /* +-inf (the bucket's other floats are NaN) */
        return 1;
    }
    float first = kb_float(key << 16), last = kb_float((key << 16) | 0xffffu);
    if (key & 0x8000u) { /* negative: larger bits are smaller values */
        *lowest = last;
        *highest = first;
    } else {
        *lowest = first;
        *highest = last;
    }
    return 1;
}

static void fill_tree(kb_codebook *cb) {
    cb->tree[0] = INFINITY; /* unused slot of the heap */
    for (int level = 0; level < 8; ++level) {
        const int step = 128 >> level, nodes = 1 << level;
        for (int j = 0; j < nodes; ++j) cb->tree[nodes + j] = cb->bounds[j * 2 * step + step - 1];
    }
    cb->tree16[0] = INFINITY;
    for (int level = 0; level < 4; ++level) {
        const int step = 8 >> level, nodes = 1 << level;
        for (int j = 0; j < nodes; ++j) cb->tree16[nodes + j] = cb->bounds[j * 2 * step + step - 1];
    }
}

static void fill_buckets(kb_codebook *cb) {
    int32_t steps = 0;
    for (uint32_t key = 0; key < KB_BUCKETS; ++key) {
        float lowest, highest;
        if (!bucket_range(key, &lowest, &highest)) {
            cb->start[key] = (uint8_t)cb->nbounds; /* NaN: the kernels override the count */
            continue;
        }
        int32_t first = count_below(cb, lowest);
        int32_t span = count_below(cb, highest) - first;
        cb->start[key] = (uint8_t)first;
        if (span > steps) steps = span;
    }
    memset(cb->start + KB_BUCKETS, 0, 4);
    cb->steps = steps <= KB_MAX_STEPS ? steps : -1;
}

/* The magnitudes [*low, *high] (float bits without the sign) of compact bucket ``i``. */
static void compact_bucket(const kb_codebook *cb, int32_t i, uint32_t *low, uint32_t *high) {
    const int32_t key = cb->compact_lo - 1 + i;
    if (i == 0) { /* every magnitude below the smallest bound's key (none when that key is 0) */
        *low = 0;
        *high = cb->compact_lo > 0 ? ((uint32_t)cb->compact_lo << 16) - 1u : 0;
    } else if (i == cb->compact_size - 1) { /* every magnitude above the largest bound's key */
        *low = (uint32_t)key << 16;
        *high = 0x7f800000u; /* inf; NaN is placed here too and never meets a bound */
    } else {
        *low = (uint32_t)key << 16;
        *high = *low | 0xffffu;
    }
}

static void fill_compact(kb_codebook *cb) {
    cb->compact_size = 0;
    if (cb->nbounds < 1) return;
    int32_t lo = 0x7fff, hi = 0;
    for (int32_t j = 0; j < cb->nbounds; ++j) {
        const int32_t key = (int32_t)((kb_bits(cb->bounds[j]) & 0x7fffffffu) >> 16);
        if (key < lo) lo = key;
        if (key > hi) hi = key;
    }
    /* An infinite bound shares its bucket with NaNs, which must count all bounds. */
    if (hi >= 0x7f80 || hi - lo + 3 > KB_COMPACT_MAX) return;
    cb->compact_lo = lo;
    cb->compact_hi = hi;
    cb->compact_size = hi - lo + 3;
    for (int negative = 0; negative < 2; ++negative) {
        for (int32_t i = 0; i < cb->compact_size; ++i) {
            uint32_t low, high;
            compact_bucket(cb, i, &low, &high);
            const float lowest = negative ? -kb_float(high) : kb_float(low);
            const float highest = negative ? -kb_float(low) : kb_float(high);
            /* Every value x of the bucket has lowest <= x <= highest, and the bounds b
             * with lowest <= b < highest are the ones whose side depends on x. */
            const int32_t first = count_below(cb, lowest), inside = count_below(cb, highest) - first;
            if (inside > 1) {
                cb->compact_size = 0;
                return;
            }
            uint32_t residual = 0xffffu;
            if (inside == 1) {
                const uint32_t bits = kb_bits(cb->bounds[first]);
                residual = (negative ? ~bits : bits) & 0xffffu;
            }
            const uint32_t below = (uint32_t)cb->index[first], above = (uint32_t)cb->index[first + inside];
            cb->compact[negative * cb->compact_size + i] = residual << 16 | above << 8 | below;
        }
    }
}

void kb_codebook_drop_compact(kb_codebook *cb) { cb->compact_size = 0; }

int kb_codebook_compact_size(const kb_codebook *cb) { return cb->compact_size; }

int kb_codebook_init(kb_codebook *cb, const float *values, int n) {
    if (n < 1 || n > KB_MAX_CODES) return -1;
    for (int i = 0; i < n; ++i)
        if (values[i] != values[i]) return -1;
    float sorted[KB_MAX_CODES];
    int32_t order[KB_MAX_CODES];
    sort_values(values, n, sorted, order);
    /* Equal values (FP4's two zeros, a padded linear map's zeros) collapse onto the lowest
     * index holding them: the first of them in the stable order. */
    int32_t distinct = 0;
    for (int i = 0; i < n; ++i) {
        if (distinct > 0 && (double)sorted[i] == (double)cb->sorted[distinct - 1]) continue;
        cb->sorted[distinct] = sorted[i];
        cb->sorted_index[distinct] = order[i];
        ++distinct;
    }
    cb->ncodes = n;
    cb->nbounds = distinct - 1;
    cb->identity = 1;
    for (int32_t c = 0; c < KB_MAX_CODES; ++c) {
        cb->index[c] = c < distinct ? cb->sorted_index[c] : cb->sorted_index[distinct - 1];
        if (c < distinct && cb->index[c] != c) cb->identity = 0;
    }
    fill_bounds(cb);
    fill_tree(cb);
    fill_buckets(cb);
    fill_compact(cb);
    return 0;
}
