/* Greedy NMS with a fixed threshold (the SSD fork's ApplyNMSFast, eta 1) over many lists
 * of boxes at once: candidate k of a list is kept when valid and its Jaccard overlap with
 * every box kept before it is <= the threshold. Overlaps are computed only against kept
 * boxes, as the fork does, where the PyTorch form computes every pair.
 *
 * The overlap is bbox.py's `jaccard` (extent 0) operation for operation in float, so that
 * each decision is the one the PyTorch form makes, bit for bit: minimum and maximum
 * propagate NaN as torch's do, no product is fused into a sum (ISO C mode leaves GCC's
 * contraction off; the pragma and the separate statements keep it off in Clang), and
 * `!(overlap <= threshold)` clashes for NaN overlaps too. */
#pragma STDC FP_CONTRACT OFF

#include <stdint.h>

static inline float minimum(float a, float b) { return a != a || b != b ? a + b : (a < b ? a : b); }
static inline float maximum(float a, float b) { return a != a || b != b ? a + b : (a > b ? a : b); }

static float overlap(const float *a, float size_a, const float *b, float size_b) {
    float inter_w = minimum(a[2], b[2]) - maximum(a[0], b[0]);
    float inter_h = minimum(a[3], b[3]) - maximum(a[1], b[1]);
    if (!(inter_w > 0 && inter_h > 0))  /* false for NaN too: they do not meet */
        return 0.0f;
    float inter = inter_w * inter_h;
    float sizes = size_a + size_b;
    float union_ = sizes - inter;
    return inter / union_;
}

/* boxes (lists, length, 4) as (xmin, ymin, xmax, ymax), sizes and valid (lists, length),
 * kept (lists, length) written; all contiguous, bools one byte 0 or 1. */
void nms_greedy(const float *boxes, const float *sizes, const uint8_t *valid, int64_t lists, int64_t length,
                float threshold, uint8_t *kept) {
    for (int64_t list = 0; list < lists; list++) {
        const float *box = boxes + list * length * 4;
        const float *size = sizes + list * length;
        const uint8_t *allowed = valid + list * length;
        uint8_t *keep = kept + list * length;
        for (int64_t k = 0; k < length; k++) {
            keep[k] = 0;
            if (!allowed[k])
                continue;
            int64_t j = 0;
            while (j < k && !(keep[j] && !(overlap(box + k * 4, size[k], box + j * 4, size[j]) <= threshold)))
                j++;
            keep[k] = j == k;
        }
    }
}
