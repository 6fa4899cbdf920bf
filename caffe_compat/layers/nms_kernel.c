/* Greedy NMS with a fixed threshold (the SSD fork's ApplyNMSFast, eta 1) over many lists
 * of boxes at once: candidate k of a list is kept when valid and its Jaccard overlap with
 * every box kept before it is <= the threshold. Overlaps are computed only against kept
 * boxes, as the fork does, where the PyTorch form computes every pair.
 *
 * The overlap is bbox.py's `jaccard` (extent 0) operation for operation in float, so that
 * each decision is the one the PyTorch form makes, bit for bit: minimum and maximum
 * propagate NaN as torch's do, no product is fused into a sum (ISO C mode leaves GCC's
 * contraction off, as does its pragma below; the pragma and the separate statements keep
 * it off in Clang), and
 * `!(overlap <= threshold)` clashes for NaN overlaps too. */
#pragma STDC FP_CONTRACT OFF
/* GCC: without traps to keep, the overlap loop's selects need no branches and it
 * vectorizes; the values computed are the same. */
#pragma GCC optimize("no-trapping-math", "fp-contract=off")

#include <stdint.h>
#include <stdlib.h>

static inline float minimum(float a, float b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }
static inline float maximum(float a, float b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }

/* boxes (lists, length, 4) as (xmin, ymin, xmax, ymax), sizes and valid (lists, length),
 * kept (lists, length) written; all contiguous, bools one byte 0 or 1. The kept boxes'
 * corners and sizes are gathered column by column, so that the overlaps of a candidate
 * with all of them are one branch-free loop the compiler vectorizes. Returns 0, or -1
 * where the gathered columns could not be allocated. */
int nms_greedy(const float *boxes, const float *sizes, const uint8_t *valid, int64_t lists, int64_t length,
               float threshold, uint8_t *kept) {
    float *columns = malloc(sizeof(float) * 5 * (size_t)(length > 0 ? length : 1));
    if (!columns)
        return -1;
    float *x0 = columns, *y0 = x0 + length, *x1 = y0 + length, *y1 = x1 + length, *kept_size = y1 + length;
    for (int64_t list = 0; list < lists; list++) {
        const float *box = boxes + list * length * 4;
        const float *size = sizes + list * length;
        const uint8_t *allowed = valid + list * length;
        uint8_t *keep = kept + list * length;
        int64_t count = 0;
        for (int64_t k = 0; k < length; k++) {
            keep[k] = 0;
            if (!allowed[k])
                continue;
            const float *a = box + k * 4;
            int clash = 0;
            for (int64_t j = 0; j < count; j++) {
                float inter_w = minimum(a[2], x1[j]) - maximum(a[0], x0[j]);
                float inter_h = minimum(a[3], y1[j]) - maximum(a[1], y0[j]);
                float inter = inter_w * inter_h;
                float both = size[k] + kept_size[j];
                float union_ = both - inter;
                float ratio = inter / union_;
                /* 0 where they do not meet, NaN widths included */
                float overlap = (inter_w > 0) & (inter_h > 0) ? ratio : 0.0f;
                clash |= !(overlap <= threshold);
            }
            if (!clash) {
                keep[k] = 1;
                x0[count] = a[0], y0[count] = a[1], x1[count] = a[2], y1[count] = a[3];
                kept_size[count] = size[k];
                count++;
            }
        }
    }
    free(columns);
    return 0;
}
