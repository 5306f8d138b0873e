"""Optimal weighted 1-D k-means for look-up tables, many groups at once.

coremltools clusters every group with its vendored ``kmeans1d`` (an O(k n)
dynamic program in C++, called group after group through Python lists and
ctypes). Measured on one MiniLM FFN weight (96 groups of 6144 values) it takes
30 ms per group at 4 bits and 0.5 s at 8 bits, and its data-free path
(``enable_fast_kmeans_mode``, on by default) first rounds the weights to 4
decimals, which costs 0.8% weight error at 8 bits. coremltools has no hook for
its torch-side k-means, so this module computes the same optimum (or a better
one, for the rounded data-free path) and the palettize stage registers the
compression metadata the converter reads, as coremltools itself does.

The optimum: sort the values, merge duplicates (their weights add up), and
solve the classic dynamic program `D[m][i] = min_j D[m-1][j] + cost(j, i)` with
the divide-and-conquer optimisation (the best j is monotone in i because the
1-D squared-error cost satisfies the quadrangle inequality): O(k n log n) per
group with prefix sums, 4 bytes of back-pointers per (cluster, value) pair
(coremltools' kmeans1d keeps 16). Groups run in parallel on numba threads.
Two exact savings on top (same partitions, ties included): rows that cost more
than a near-optimal partition found on a 32x smaller problem are skipped, and
the last layer computes only the row the answer needs: 15.9 -> 10.0 ms on a group
of 32768 distinct values with 16 entries, and with numpy's sort 1.7x on the whole
k-means (docs/benchmarks.md, under scaling).
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads


@njit(cache=True, inline="always")
def _cost(p0, p1, p2, j, i):
    """Weighted squared error of sorted points j..i-1 around their weighted mean."""
    weight = p0[i] - p0[j]
    if weight <= 0.0:
        return 0.0
    total = p1[i] - p1[j]
    return max(p2[i] - p2[j] - total * total / weight, 0.0)


@njit(cache=True)
def _layers(p0, p1, p2, n, k, bound, back, tail, tail_best, tail_split):
    """The dynamic program's layers by divide and conquer; back[m, i] is where cluster m starts
    when m + 1 clusters cover the first i points. Returns the optimum's cost.

    A non-empty ``tail`` (the points beside a fixed entry: any prefix may end the free
    clusters, the rest costing tail[i]) asks for every layer's rows up to n, and fills
    tail_best[c] and tail_split[c] with the least cost[c clusters over i points] + tail[i] and
    its i as each layer is done (O(n) memory beside the back-pointers, not O(k n) of costs);
    empty, for the plain problem, only what the last row needs is computed.

    A prefix whose cost already exceeds ``bound`` (the cost of a known partition of all n points)
    cannot start any optimal partition: its row and the rows right of it (costlier still) are
    skipped and never offered to the next layer; the last layer computes only the nodes on the
    way to row n. Every row kept is computed by the same nodes with the same candidate ranges
    as in the full dynamic program, so the partition is the same, ties included."""
    keep = tail.size > 0
    previous = np.empty(n + 1)
    current = np.empty(n + 1)
    previous[0] = 0.0
    for i in range(1, n + 1):
        previous[i] = _cost(p0, p1, p2, 0, i)
    if keep:
        _best_split(previous, tail, 1, n, tail_best, tail_split, 1)
    previous_highest = n - (k - 1) if not keep else n
    usable = n  # the last row of the previous layer within the bound
    for i in range(1, n + 1):
        if previous[i] > bound:
            usable = i - 1
            break
    stack = np.empty((256, 4), dtype=np.int64)  # depth-first: at most one pending node per level, plus one
    for m in range(1, k):
        # Cluster m ends at i (exclusive) and starts at j >= m; later clusters need k - 1 - m points.
        lowest, highest = m + 1, n - (k - 1 - m) if not keep else n
        current[lowest:highest + 1] = np.inf
        stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = lowest, highest, m, min(highest - 1, usable)
        top = 1
        cutoff = highest
        while top > 0:
            top -= 1
            lo, hi, opt_lo, opt_hi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
            if lo > hi:
                continue
            mid = (lo + hi) // 2
            # Knuth's bound as well: with one cluster more, the last one starts no earlier.
            last = min(mid - 1, opt_hi)
            first = opt_lo
            if m > 1 and mid <= previous_highest and last >= back[m - 1, mid] > first:
                first = back[m - 1, mid]
            best, best_j = np.inf, first
            for j in range(first, last + 1):
                value = previous[j] + _cost(p0, p1, p2, j, mid)
                if value < best:
                    best, best_j = value, j
            current[mid] = best
            back[m, mid] = best_j
            if keep or m < k - 1:  # the last layer needs row n only: the nodes on its way, as in the full layer
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo, mid - 1, opt_lo, best_j
                top += 1
            if best <= bound:
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = mid + 1, hi, best_j, opt_hi
                top += 1
            elif mid - 1 < cutoff:
                cutoff = mid - 1
        usable = cutoff
        previous_highest = highest
        if keep:
            _best_split(current, tail, lowest, highest, tail_best, tail_split, m + 1)
        previous, current = current, previous
    return previous[n]


@njit(cache=True)
def _best_split(costs, tail, first, last, best, split, clusters):
    """best[clusters] and split[clusters]: the least costs[i] + tail[i] over rows first..last, and its i."""
    for i in range(first, last + 1):
        value = costs[i] + tail[i]
        if value < best[clusters]:
            best[clusters], split[clusters] = value, i


@njit(cache=True)
def _starts(back, n, k):
    """Start index of each of the k clusters covering the first n points, read back from layer k - 1."""
    starts = np.zeros(k, dtype=np.int64)
    end = n
    for m in range(k - 1, 0, -1):
        starts[m] = back[m, end]
        end = starts[m]
    return starts


@njit(cache=True)
def _segments(p0, p1, p2, n, k):
    """Start index of each of the k clusters of the optimal partition of n sorted points.

    The bound that lets _layers skip rows is the cost of the optimal partition of the points
    merged in runs of ``run`` (a problem ``run`` times smaller), its boundaries taken back to the
    points: it is within a hair of the optimum, and on 32768 distinct values with 16 entries the
    skipped rows take the cost evaluations from 6.15 M to about 3.6 M."""
    back = np.zeros((k, n + 1), dtype=np.int32)
    no_tail, no_best, no_split = np.empty(0), np.empty(0), np.empty(0, dtype=np.int64)  # the plain problem
    run = 32
    while run > 1 and n <= 4 * run * k:  # the merged problem keeps at least 4 points per cluster
        run //= 2
    if run == 1:
        _layers(p0, p1, p2, n, k, np.inf, back, no_tail, no_best, no_split)
        return _starts(back, n, k)
    merged = (n + run - 1) // run
    q0, q1, q2 = np.empty(merged + 1), np.empty(merged + 1), np.empty(merged + 1)
    for t in range(merged):
        q0[t], q1[t], q2[t] = p0[t * run], p1[t * run], p2[t * run]
    q0[merged], q1[merged], q2[merged] = p0[n], p1[n], p2[n]
    merged_back = np.zeros((k, merged + 1), dtype=np.int32)
    _layers(q0, q1, q2, merged, k, np.inf, merged_back, no_tail, no_best, no_split)
    merged_starts = _starts(merged_back, merged, k)
    known = 0.0  # summed in the dynamic program's order
    for c in range(k):
        end = merged_starts[c + 1] * run if c + 1 < k else n
        known = known + _cost(p0, p1, p2, merged_starts[c] * run, end)
    # The margin is far above the rounding of a few hundred additions and far below any real gap.
    if _layers(p0, p1, p2, n, k, known * (1.0 + 1e-9), back, no_tail, no_best, no_split) > known * (1.0 + 1e-9):
        _layers(p0, p1, p2, n, k, np.inf, back, no_tail, no_best, no_split)  # never seen: a rounding surprise costs time only
    return _starts(back, n, k)


@njit(cache=True)
def _merge_equal(values, weights, order):
    """Equal values merged into points: (values ascending, summed weights, counts, each value's
    point, number of points). ``order`` sorts ``values`` (equal values in any order: see below)."""
    n_values = values.size
    unique = np.empty(n_values)
    unique_weight = np.zeros(n_values)
    unique_count = np.zeros(n_values)
    slot = np.empty(n_values, dtype=np.int64)
    n = -1
    previous_value = 0.0
    for position in range(n_values):
        index = order[position]
        if n < 0 or values[index] != previous_value:
            n += 1
            previous_value = values[index]
        slot[index] = n
    # Each merged point's weight is summed, and its value (-0.0 or 0.0) taken, in index order: the
    # same whatever order the sort left equal values in (numpy's sort is not stable, and its order
    # among ties depends on the CPU's vector units).
    for index in range(n_values):
        point = slot[index]
        if unique_count[point] == 0.0:
            unique[point] = values[index]
        unique_weight[point] += weights[index]
        unique_count[point] += 1.0
    return unique, unique_weight, unique_count, slot, n + 1


@njit(cache=True)
def _centred_sums(unique, unique_weight, n):
    """Prefix sums of weight, weight x and weight x^2 around the weighted mean (float64, so
    that the subtraction in _cost stays accurate), and that mean."""
    total_weight = unique_weight[:n].sum()
    centre = (unique_weight[:n] * unique[:n]).sum() / total_weight if total_weight > 0 else unique[:n].mean()
    p0 = np.zeros(n + 1)
    p1 = np.zeros(n + 1)
    p2 = np.zeros(n + 1)
    for i in range(n):
        x = unique[i] - centre
        p0[i + 1] = p0[i] + unique_weight[i]
        p1[i + 1] = p1[i] + unique_weight[i] * x
        p2[i + 1] = p2[i] + unique_weight[i] * x * x
    return centre, p0, p1, p2


@njit(cache=True)
def _segment_means(unique, unique_count, p0, p1, centre, starts, end):
    """The entries of the clusters starting at ``starts`` (the last ending at ``end``): each its
    points' weighted mean, their plain mean when none carries weight."""
    means = np.empty(starts.size)
    for c in range(starts.size):
        begin, stop = starts[c], starts[c + 1] if c + 1 < starts.size else end
        weight = p0[stop] - p0[begin]
        if weight > 0:
            means[c] = (p1[stop] - p1[begin]) / weight + centre
        else:
            total, count = 0.0, 0.0
            for i in range(begin, stop):
                total += unique[i] * unique_count[i]
                count += unique_count[i]
            means[c] = total / count
    return means


@njit(cache=True)
def _nearest_labels(unique, n, entries, entry_index, slot, labels):
    """Each value takes its nearest entry (``entries`` ascending; ties: the lower one). For values
    that carry weight this is their segment already (else the partition would not be optimal); a
    value with zero importance (e.g. the embedding row of a token the calibration data never used)
    is free to go anywhere in the weighted objective, and the nearest entry keeps it intact."""
    point_label = np.empty(n, dtype=np.int64)
    c = 0
    for i in range(n):
        while c + 1 < entries.size and unique[i] - entries[c] > entries[c + 1] - unique[i]:
            c += 1
        point_label[i] = entry_index[c]
    for index in range(slot.size):
        labels[index] = point_label[slot[index]]


@njit(cache=True)
def _cluster_one(values, weights, order, k, centroids, labels):
    """Optimal k-means of one group; fills centroids (ascending, zero-padded) and labels.
    ``order`` sorts ``values``."""
    unique, unique_weight, unique_count, slot, n = _merge_equal(values, weights, order)  # fewer points, same optimum
    clusters = min(k, n)
    centre, p0, p1, p2 = _centred_sums(unique, unique_weight, n)
    centroids[:] = 0.0
    centroids[:clusters] = _segment_means(unique, unique_count, p0, p1, centre, _segments(p0, p1, p2, n, clusters), n)
    _nearest_labels(unique, n, centroids[:clusters], np.arange(clusters), slot, labels)


@njit(cache=True)
def _beside_zero(xs, ws, most):
    """The points on one side of a fixed entry at zero, ``xs`` ascending and all negative: for
    l = 0..most free clusters, the least cost of l clusters over xs[:a] plus the points from a on
    taking the entry zero, over every a. Returns (cost per l, its a per l, back pointers, the
    prefix sums and their centre)."""
    n = xs.size
    most = min(most, n)
    if n == 0:
        return np.zeros(1), np.zeros(1, dtype=np.int64), np.zeros((1, 1), dtype=np.int32), 0.0, np.zeros(1), np.zeros(1)
    at_zero = np.zeros(n + 1)  # at_zero[a]: cost of xs[a:] at the entry zero
    for j in range(n - 1, -1, -1):
        at_zero[j] = at_zero[j + 1] + ws[j] * xs[j] * xs[j]
    best = np.full(most + 1, np.inf)
    split = np.zeros(most + 1, dtype=np.int64)
    best[0] = at_zero[0]
    centre, p0, p1, p2 = _centred_sums(xs, ws, n)
    back = np.zeros((max(most, 1), n + 1), dtype=np.int32)
    if most > 0:
        _layers(p0, p1, p2, n, most, np.inf, back, at_zero, best, split)
    return best, split, back, centre, p0, p1


@njit(cache=True)
def _cluster_one_keeping_zero(values, weights, order, k, table, labels):
    """Optimal k-means of one group with entry 0 fixed at zero (a pruned weight stays zero) and
    k - 1 free entries (ascending, zero-padded): the free clusters lie on either side of the
    points that take zero, so each side is its own dynamic program (the negative values, and
    the positive ones mirrored), kept for every number of clusters and every split, and the
    best division of the k - 1 entries between the sides wins. A value closer to zero than to
    any entry becomes zero too: that costs less than spending an entry on it."""
    unique, unique_weight, unique_count, slot, n = _merge_equal(values, weights, order)
    negatives = 0
    while negatives < n and unique[negatives] < 0.0:
        negatives += 1
    first_positive = negatives + 1 if negatives < n and unique[negatives] == 0.0 else negatives
    right = n - first_positive
    mirrored = -unique[first_positive:n][::-1].copy()
    mirrored_weight = unique_weight[first_positive:n][::-1].copy()
    mirrored_count = unique_count[first_positive:n][::-1].copy()  # for a weightless cluster's plain mean
    free = min(k - 1, negatives + right)
    left_best, left_split, left_back, left_centre, left_p0, left_p1 = _beside_zero(
        unique[:negatives].copy(), unique_weight[:negatives].copy(), free)
    right_best, right_split, right_back, right_centre, right_p0, right_p1 = _beside_zero(
        mirrored, mirrored_weight, free)
    best, left_clusters = np.inf, max(0, free - right)
    for clusters in range(max(0, free - right), min(free, negatives) + 1):
        value = left_best[clusters] + right_best[free - clusters]
        if value < best:
            best, left_clusters = value, clusters
    right_clusters = free - left_clusters
    table[:] = 0.0
    if left_clusters > 0:
        end = left_split[left_clusters]
        table[1:1 + left_clusters] = _segment_means(unique[:negatives], unique_count[:negatives], left_p0, left_p1,
                                                    left_centre, _starts(left_back, end, left_clusters), end)
    if right_clusters > 0:  # mirrored clusters run from the largest value down
        end = right_split[right_clusters]
        table[1 + left_clusters:1 + free] = -_segment_means(mirrored, mirrored_count, right_p0, right_p1, right_centre,
                                                            _starts(right_back, end, right_clusters), end)[::-1]
    # The entries ascending, with their places in the table: the negative ones, zero (entry 0), the positive ones.
    entries = np.concatenate((table[1:1 + left_clusters], np.zeros(1), table[1 + left_clusters:1 + free]))
    entry_index = np.concatenate((np.arange(1, 1 + left_clusters), np.zeros(1, dtype=np.int64),
                                  np.arange(1 + left_clusters, 1 + free)))
    _nearest_labels(unique, n, entries, entry_index, slot, labels)


@njit(cache=True, parallel=True)
def _cluster_groups(values, weights, order, k, centroids, labels, keep_zero):
    for group in prange(values.shape[0]):
        if keep_zero:
            _cluster_one_keeping_zero(values[group], weights[group], order[group], k, centroids[group], labels[group])
        else:
            _cluster_one(values[group], weights[group], order[group], k, centroids[group], labels[group])


def cluster_groups(values: np.ndarray, k: int, weights: np.ndarray | None = None,
                   threads: int | None = None, keep_zero: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Optimal k-means of each row of ``values`` (groups x n), weighted by ``weights``.

    Returns (centroids: groups x k float64, ascending and zero-padded when a group
    has fewer than k distinct values; labels: groups x n int64). With ``keep_zero``
    entry 0 is zero and the k - 1 others ascending (sparse palettization's table: a
    pruned weight stays zero, and so does any value nearer zero than to every entry)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"values must be a non-empty (groups, n) array, got shape {values.shape}")
    weights = np.ones_like(values) if weights is None else np.ascontiguousarray(weights, dtype=np.float64)
    if weights.shape != values.shape:
        raise ValueError(f"weights shape {weights.shape} != values shape {values.shape}")
    if (weights < 0).any() or not np.isfinite(weights).all() or not np.isfinite(values).all():
        raise ValueError("values and weights must be finite, weights non-negative")
    centroids = np.zeros((values.shape[0], k))
    labels = np.zeros(values.shape, dtype=np.int64)
    saved = get_num_threads()
    if threads:
        set_num_threads(max(1, min(threads, saved)))
    try:
        # numpy sorts 7x faster than numba's argsort (vectorised on x86); about 1 M values at a time
        # keeps the index array small beside the layer.
        chunk = max(1, 2 ** 20 // values.shape[1])
        for begin in range(0, values.shape[0], chunk):
            part = slice(begin, begin + chunk)
            _cluster_groups(values[part], weights[part], np.argsort(values[part], axis=1), k,
                            centroids[part], labels[part], keep_zero)
    finally:
        set_num_threads(saved)
    return centroids, labels


def weighted_error(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                   weights: np.ndarray | None = None) -> float:
    """Sum over groups of the (weighted) squared error of values against their centroids."""
    error = (np.take_along_axis(centroids, labels, axis=1) - values) ** 2
    return float((error if weights is None else error * weights).sum())


def lut_function(weight: np.ndarray, n_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """coremltools.optimize.coreml's extension point, ``OpPalettizerConfig(mode="custom",
    lut_function=functools.partial(lut_function, n_bits=...))``: one group's table
    (2**n_bits entries, in the weight's dtype) and every value's index, by the optimal
    k-means. One group per call, on the calling thread (coremltools calls it group by group)."""
    values = np.asarray(weight, dtype=np.float64).ravel()
    centroids, labels = np.zeros(2 ** n_bits), np.zeros(values.size, dtype=np.int64)
    _cluster_one(values, np.ones_like(values), np.argsort(values), 2 ** n_bits, centroids, labels)
    return centroids.astype(weight.dtype), labels.astype(np.uint8)
