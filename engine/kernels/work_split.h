/* How a kernel's work items are shared among the parts (Python threads) that run side by side.
 *
 * Each part takes a contiguous range of the items, so the items a part runs, and the order it
 * runs them in, follow from the costs alone: both kernels rely on that to stay deterministic. */
#ifndef PDSERVE_KERNELS_WORK_SPLIT_H
#define PDSERVE_KERNELS_WORK_SPLIT_H

/* The items [*lo, *hi) of 0 .. n - 1 that `part` of `parts` runs: an item belongs to the part
 * whose equal share of the total cost holds the midpoint of the item's own cost. With a total
 * of 0, part 0 owns everything. */
static inline void owned_range(const double *cost, int n, int part, int parts, int *lo, int *hi) {
    double total = 0.0;
    for (int i = 0; i < n; i++) total += cost[i];
    double running = 0.0;
    *lo = n;
    *hi = n;
    for (int i = 0; i < n; i++) {
        int owner = total > 0 ? (int)((running + cost[i] / 2) * parts / total) : 0;
        if (owner > parts - 1) owner = parts - 1;
        if (owner == part && *lo == n) *lo = i;
        if (owner > part) {
            *hi = i;
            break;
        }
        running += cost[i];
    }
    if (*lo == n) *hi = n;
}

#endif
