/* Caffe's ACROSS_CHANNELS LRN, forward and backward, fused: one read of each input and
 * one write of each output, where the PyTorch composition makes about fifteen passes.
 *
 *   scale[c] = k + alpha / size * sum of x[c']^2 over c' in [c - pre, c + pre]
 *   top[c]   = x[c] * scale[c]^-beta
 *   dx[c]    = dy[c] * scale[c]^-beta
 *              - 2 alpha beta / size * x[c] * sum of dy[c'] top[c'] / scale[c'] over the window
 *
 * with pre = (size - 1) / 2 and zero beyond the channel range. The window is symmetric
 * (Caffe wants an odd size), so the backward sum runs over the same window. The
 * backward recomputes scale from x instead of keeping it, so a training step saves
 * only x, as a ReLU saves only its output. Window sums are direct sums of `size` terms,
 * not Caffe's running sum, which loses precision when a large square leaves the window.
 *
 * Work is cut into items, a run of consecutive pixels of one image (a segment) each,
 * shared among OpenMP threads (see the entry points at the end).
 * - NCHW: a segment is swept channel by channel, the rows its window needs kept in ring
 *   buffers (cache-resident), so x, dy and the outputs stream through memory once and
 *   the window sums are vector additions across pixels.
 * - NHWC (channels_last): each pixel's channels are contiguous; they are squared into
 *   a zero-padded buffer and the window sums are vector additions across channels.
 *
 * Built for float and double from one body: REAL and SUFFIX are set before each
 * inclusion of the body below. */
#ifndef LRN_BODY
#define LRN_BODY

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define INLINE static inline __attribute__((always_inline))
enum { BETA_THREE_QUARTERS, BETA_OTHER };

#define REAL float
#define SUFFIX f32
#define SQRT sqrtf
#define POW powf
#include __FILE__
#undef REAL
#undef SUFFIX
#undef SQRT
#undef POW

#define REAL double
#define SUFFIX f64
#define SQRT sqrt
#define POW pow
#include __FILE__

#else

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define NAME(base) CAT(base, SUFFIX)

/* scale^-beta, and 1 / scale as a by-product. Caffe's nets use beta 0.75, which has an
 * exact form from square roots that vectorises; pow does not. Callers pass mode as a
 * constant, so each loop holds one form. */
INLINE REAL NAME(negative_power)(REAL scale, int mode, REAL beta, REAL *inverse) {
    if (mode == BETA_THREE_QUARTERS) {
        REAL root = SQRT(scale), fourth_root = SQRT(root);
        REAL five_quarters = (REAL)1 / (scale * fourth_root);  /* scale^-5/4 */
        *inverse = five_quarters * fourth_root;
        return five_quarters * root;
    }
    *inverse = (REAL)1 / scale;
    return POW(scale, -beta);
}

typedef struct {
    int64_t channels, pixels;
    REAL alpha_over_size, shift, beta, coefficient;
} NAME(params);

/* NCHW. Ring buffers of size + 1 rows: channel c sits in slot c mod (size + 1), and
 * channels below 0 or past the last are zero rows. The sweep at channel c reads the
 * size rows of its window and fills the one slot its window does not use. */
INLINE REAL *NAME(slot)(REAL *ring, int64_t c, int64_t size, int64_t width) {
    return ring + ((c % (size + 1) + size + 1) % (size + 1)) * width;
}

INLINE void NAME(window_rows)(const REAL **rows, REAL *ring, int64_t c, int64_t size, int64_t width) {
    for (int64_t i = 0; i < size; i++) rows[i] = NAME(slot)(ring, c - (size - 1) / 2 + i, size, width);
}

/* Squares of channel c's row into its slot (zeros outside the channels). */
INLINE void NAME(load_squares)(REAL *restrict ring, const REAL *restrict x, int64_t c, const NAME(params) *p,
                               int64_t size, int64_t lanes, int64_t width) {
    REAL *out = NAME(slot)(ring, c, size, width);
    if (c < 0 || c >= p->channels) {
        for (int64_t l = 0; l < lanes; l++) out[l] = 0;
        return;
    }
    const REAL *row = x + c * p->pixels;
    for (int64_t l = 0; l < lanes; l++) out[l] = row[l] * row[l];
}

/* The window sum at lane l: unrolled in registers where size is a constant, else read
 * from sums, which sum_rows filled a row at a time (a loop over a runtime count of rows
 * inside the lane loop would not vectorise). */
INLINE REAL NAME(window_sum)(const REAL **rows, const REAL *sums, int64_t size, int64_t l, int unrolled) {
    if (!unrolled) return sums[l];
    REAL sum = rows[0][l];
    for (int64_t i = 1; i < size; i++) sum += rows[i][l];
    return sum;
}

INLINE void NAME(sum_rows)(REAL *restrict sums, const REAL **rows, int64_t size, int64_t lanes, int unrolled) {
    if (unrolled) return;
    for (int64_t l = 0; l < lanes; l++) sums[l] = rows[0][l];
    for (int64_t i = 1; i < size; i++)
        for (int64_t l = 0; l < lanes; l++) sums[l] += rows[i][l];
}

/* body(l) over the lanes and, in the same loop (one sweep over memory), the squares of
 * channel `incoming`'s row into its slot, zeros past the last channel. Uses the
 * enclosing sweep's p, x, squares, size, width and lanes. */
#define SWEEP(body, incoming)                                                                    \
    do {                                                                                         \
        int64_t incoming_ = (incoming);                                                          \
        if (incoming_ < p->channels) {                                                           \
            const REAL *in = x + incoming_ * p->pixels;                                          \
            REAL *restrict next = NAME(slot)(squares, incoming_, size, width);                   \
            _Pragma("GCC ivdep") /* next is not one of the window's rows */                      \
            for (int64_t l = 0; l < lanes; l++) {                                                \
                body(l);                                                                         \
                next[l] = in[l] * in[l];                                                         \
            }                                                                                    \
        } else {                                                                                 \
            for (int64_t l = 0; l < lanes; l++) {                                                \
                body(l);                                                                         \
            }                                                                                    \
            NAME(load_squares)(squares, x, incoming_, p, size, lanes, width);                    \
        }                                                                                        \
    } while (0)

/* `lanes` pixels of one image, every channel. size and mode are constants at each call
 * site (DISPATCH), so the window sum unrolls and each loop holds one power form. */
INLINE void NAME(forward_rows)(const NAME(params) *p, const REAL *restrict x, REAL *restrict top,
                               REAL *restrict squares, REAL *restrict sums, int64_t lanes, int64_t width,
                               int64_t size, int mode, int unrolled) {
    int64_t pre = (size - 1) / 2;
    const REAL *rows[size];
    for (int64_t c = -pre; c <= pre; c++) NAME(load_squares)(squares, x, c, p, size, lanes, width);
    for (int64_t c = 0; c < p->channels; c++) {
        NAME(window_rows)(rows, squares, c, size, width);
        NAME(sum_rows)(sums, rows, size, lanes, unrolled);
        const REAL *xr = x + c * p->pixels;
        REAL *yr = top + c * p->pixels;
#define TOP(l)                                                                                          \
    REAL inverse_scale;                                                                                 \
    REAL scale = p->shift + p->alpha_over_size * NAME(window_sum)(rows, sums, size, l, unrolled);       \
    yr[l] = xr[l] * NAME(negative_power)(scale, mode, p->beta, &inverse_scale)
        SWEEP(TOP, c + pre + 1);
#undef TOP
    }
}

/* Two stages pre channels apart: at channel a, the factor and ratio = dy * top / scale;
 * at channel b = a - pre, whose ratio window is then complete,
 * dx = dy * factor - coefficient * x * window of ratio. */
INLINE void NAME(backward_rows)(const NAME(params) *p, const REAL *restrict x, const REAL *restrict dy,
                                REAL *restrict dx, REAL *restrict squares, REAL *restrict ratio,
                                REAL *restrict factor, REAL *restrict sums, int64_t lanes, int64_t width,
                                int64_t size, int mode, int unrolled) {
    int64_t pre = (size - 1) / 2;
    const REAL *rows[size];
    for (int64_t c = -pre; c <= pre; c++) NAME(load_squares)(squares, x, c, p, size, lanes, width);
    for (int64_t c = -pre; c < 0; c++) {
        REAL *r = NAME(slot)(ratio, c, size, width);
        for (int64_t l = 0; l < lanes; l++) r[l] = 0;
    }
    for (int64_t a = 0; a < p->channels + pre; a++) {
        REAL *r = NAME(slot)(ratio, a, size, width);
        if (a < p->channels) {
            NAME(window_rows)(rows, squares, a, size, width);
            NAME(sum_rows)(sums, rows, size, lanes, unrolled);
            const REAL *xr = x + a * p->pixels, *dyr = dy + a * p->pixels;
            REAL *f = NAME(slot)(factor, a, size, width);
#define RATIO(l)                                                                                        \
    REAL inverse_scale;                                                                                 \
    REAL scale = p->shift + p->alpha_over_size * NAME(window_sum)(rows, sums, size, l, unrolled);       \
    f[l] = NAME(negative_power)(scale, mode, p->beta, &inverse_scale);                                  \
    r[l] = dyr[l] * f[l] * xr[l] * inverse_scale
            SWEEP(RATIO, a + pre + 1);
#undef RATIO
        } else {
            for (int64_t l = 0; l < lanes; l++) r[l] = 0;
        }
        int64_t b = a - pre;
        if (b < 0) continue;
        NAME(window_rows)(rows, ratio, b, size, width);
        NAME(sum_rows)(sums, rows, size, lanes, unrolled);
        const REAL *xr = x + b * p->pixels, *dyr = dy + b * p->pixels;
        const REAL *f = NAME(slot)(factor, b, size, width);
        REAL *dxr = dx + b * p->pixels;
        for (int64_t l = 0; l < lanes; l++)
            dxr[l] = dyr[l] * f[l] - p->coefficient * xr[l] * NAME(window_sum)(rows, sums, size, l, unrolled);
    }
}

/* NHWC: `lanes` pixels, each a contiguous vector of channels. padded holds a pixel's
 * squares (then its ratios) between pre zeros on each side, which stay zero; sums gets
 * the window sums across channels. */
INLINE void NAME(channel_windows)(REAL *restrict sums, const REAL *restrict padded, int64_t channels,
                                  int64_t size) {
    for (int64_t c = 0; c < channels; c++) sums[c] = padded[c];
    for (int64_t i = 1; i < size; i++)
        for (int64_t c = 0; c < channels; c++) sums[c] += padded[c + i];
}

INLINE void NAME(forward_pixels)(const NAME(params) *p, const REAL *restrict x, REAL *restrict top,
                                 REAL *restrict padded, REAL *restrict sums, int64_t lanes, int64_t size,
                                 int mode) {
    int64_t pre = (size - 1) / 2, channels = p->channels;
    for (int64_t pixel = 0; pixel < lanes; pixel++) {
        const REAL *xp = x + pixel * channels;
        REAL *yp = top + pixel * channels;
        for (int64_t c = 0; c < channels; c++) padded[pre + c] = xp[c] * xp[c];
        NAME(channel_windows)(sums, padded, channels, size);
        for (int64_t c = 0; c < channels; c++) {
            REAL inverse_scale;
            yp[c] = xp[c] * NAME(negative_power)(p->shift + p->alpha_over_size * sums[c], mode, p->beta, &inverse_scale);
        }
    }
}

INLINE void NAME(backward_pixels)(const NAME(params) *p, const REAL *restrict x, const REAL *restrict dy,
                                  REAL *restrict dx, REAL *restrict padded, REAL *restrict padded_ratio,
                                  REAL *restrict factor, REAL *restrict sums, int64_t lanes, int64_t size,
                                  int mode) {
    int64_t pre = (size - 1) / 2, channels = p->channels;
    for (int64_t pixel = 0; pixel < lanes; pixel++) {
        const REAL *xp = x + pixel * channels, *dyp = dy + pixel * channels;
        REAL *dxp = dx + pixel * channels;
        for (int64_t c = 0; c < channels; c++) padded[pre + c] = xp[c] * xp[c];
        NAME(channel_windows)(sums, padded, channels, size);
        for (int64_t c = 0; c < channels; c++) {
            REAL inverse_scale;
            factor[c] = NAME(negative_power)(p->shift + p->alpha_over_size * sums[c], mode, p->beta, &inverse_scale);
            padded_ratio[pre + c] = dyp[c] * factor[c] * xp[c] * inverse_scale;
        }
        NAME(channel_windows)(sums, padded_ratio, channels, size);
        for (int64_t c = 0; c < channels; c++) dxp[c] = dyp[c] * factor[c] - p->coefficient * xp[c] * sums[c];
    }
}

static int NAME(mode)(double beta) {
    return beta == 0.75 ? BETA_THREE_QUARTERS : BETA_OTHER;
}

/* Instantiates `call` with constants for the common case, local_size 5 and beta 0.75
 * (GoogLeNet, AlexNet, CaffeNet): its window sum unrolls into registers. */
#define DISPATCH_SIZE(call, size, mode)                                                          \
    do {                                                                                         \
        if ((size) == 5 && (mode) == BETA_THREE_QUARTERS)                                        \
            call(5, BETA_THREE_QUARTERS, 1);                                                     \
        else if ((mode) == BETA_THREE_QUARTERS)                                                  \
            call(size, BETA_THREE_QUARTERS, 0);                                                  \
        else                                                                                     \
            call(size, BETA_OTHER, 0);                                                           \
    } while (0)
/* ... and for the layout: `pixels` for channels_last, `rows` for NCHW. */
#define DISPATCH(rows, pixels, channels_last, size, mode)                                        \
    do {                                                                                         \
        if (channels_last)                                                                       \
            DISPATCH_SIZE(pixels, size, mode);                                                   \
        else                                                                                     \
            DISPATCH_SIZE(rows, size, mode);                                                     \
    } while (0)

/* Item i: image i / segments, pixels [first, first + lanes) of it; offset in elements. */
typedef struct {
    int64_t offset, lanes;
} NAME(item);

static NAME(item) NAME(locate)(int64_t i, const NAME(params) *p, int64_t segments, int64_t channels_last) {
    int64_t image = i / segments, segment = i % segments;
    int64_t first = segment * p->pixels / segments;
    NAME(item) it = {image * p->channels * p->pixels + first * (channels_last ? p->channels : 1),
                     (segment + 1) * p->pixels / segments - first};
    return it;
}

static NAME(params) NAME(make_params)(int64_t channels, int64_t pixels, int64_t size, double alpha, double beta,
                                      double k) {
    NAME(params) p = {channels, pixels, (REAL)(alpha / (double)size), (REAL)k, (REAL)beta,
                      (REAL)(2.0 * alpha * beta / (double)size)};
    return p;
}

static int NAME(forward_items)(const REAL *x, REAL *top, int64_t channels, int64_t pixels, int64_t channels_last,
                               int64_t segments, int64_t size, double alpha, double beta, double k,
                               int64_t item_begin, int64_t item_end) {
    NAME(params) p = NAME(make_params)(channels, pixels, size, alpha, beta, k);
    int mode = NAME(mode)(beta);
    int64_t width = (pixels + segments - 1) / segments;
    /* a ring of size + 1 rows and a row of sums (NCHW), or a padded channel vector and sums */
    int64_t part = channels_last ? channels + size : (size + 1) * width;
    REAL *scratch = (REAL *)calloc((size_t)(part + (channels_last ? channels : width)), sizeof(REAL));
    if (scratch == NULL) return -1;
    for (int64_t i = item_begin; i < item_end; i++) {
        NAME(item) it = NAME(locate)(i, &p, segments, channels_last);
#define ROWS(n, m, u) \
    NAME(forward_rows)(&p, x + it.offset, top + it.offset, scratch, scratch + part, it.lanes, width, n, m, u)
#define PIXELS(n, m, u) NAME(forward_pixels)(&p, x + it.offset, top + it.offset, scratch, scratch + part, it.lanes, n, m)
        DISPATCH(ROWS, PIXELS, channels_last, size, mode);
#undef ROWS
#undef PIXELS
    }
    free(scratch);
    return 0;
}

static int NAME(backward_items)(const REAL *x, const REAL *top_diff, REAL *bottom_diff, int64_t channels,
                                int64_t pixels, int64_t channels_last, int64_t segments, int64_t size, double alpha,
                                double beta, double k, int64_t item_begin, int64_t item_end) {
    NAME(params) p = NAME(make_params)(channels, pixels, size, alpha, beta, k);
    int mode = NAME(mode)(beta);
    int64_t width = (pixels + segments - 1) / segments;
    /* three rings of size + 1 rows and a row of sums (NCHW), or two padded channel
     * vectors, the factors and the sums */
    int64_t part = channels_last ? channels + size : (size + 1) * width;
    REAL *scratch = (REAL *)calloc((size_t)(4 * part), sizeof(REAL));
    if (scratch == NULL) return -1;
    for (int64_t i = item_begin; i < item_end; i++) {
        NAME(item) it = NAME(locate)(i, &p, segments, channels_last);
        const REAL *xi = x + it.offset, *dyi = top_diff + it.offset;
        REAL *dxi = bottom_diff + it.offset;
#define ROWS(n, m, u) \
    NAME(backward_rows)(&p, xi, dyi, dxi, scratch, scratch + part, scratch + 2 * part, scratch + 3 * part, it.lanes, \
                        width, n, m, u)
#define PIXELS(n, m, u) \
    NAME(backward_pixels)(&p, xi, dyi, dxi, scratch, scratch + part, scratch + 2 * part, scratch + 3 * part, \
                          it.lanes, n, m)
        DISPATCH(ROWS, PIXELS, channels_last, size, mode);
#undef ROWS
#undef PIXELS
    }
    free(scratch);
    return 0;
}

/* The entry points: images * segments items split into equal ranges, one per thread of
 * the OpenMP team, which is PyTorch's own where torch has loaded its libgomp (a second
 * pool would wait for torch's threads to stop spinning). Each element is computed the
 * same way whatever the split. Return 0, or -1 when a thread's scratch cannot be
 * allocated. */
#ifdef _OPENMP
#define THREAD_RANGE(items, begin, end)                                                          \
    int64_t begin = (items) * omp_get_thread_num() / omp_get_num_threads();                      \
    int64_t end = (items) * (omp_get_thread_num() + 1) / omp_get_num_threads()
#else
#define THREAD_RANGE(items, begin, end) int64_t begin = 0, end = (items)
#endif

int NAME(lrn_forward)(const REAL *x, REAL *top, int64_t images, int64_t channels, int64_t pixels,
                      int64_t channels_last, int64_t segments, int64_t size, double alpha, double beta, double k,
                      int64_t threads) {
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        THREAD_RANGE(images * segments, begin, end);
        failed |= NAME(forward_items)(x, top, channels, pixels, channels_last, segments, size, alpha, beta, k, begin,
                                      end) != 0;
    }
    return failed ? -1 : 0;
}

int NAME(lrn_backward)(const REAL *x, const REAL *top_diff, REAL *bottom_diff, int64_t images, int64_t channels,
                       int64_t pixels, int64_t channels_last, int64_t segments, int64_t size, double alpha,
                       double beta, double k, int64_t threads) {
    int failed = 0;
    (void)threads;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        THREAD_RANGE(images * segments, begin, end);
        failed |= NAME(backward_items)(x, top_diff, bottom_diff, channels, pixels, channels_last, segments, size,
                                       alpha, beta, k, begin, end) != 0;
    }
    return failed ? -1 : 0;
}

#undef THREAD_RANGE
#undef SWEEP
#undef DISPATCH
#undef DISPATCH_SIZE
#undef CAT2
#undef CAT
#undef NAME
#endif
