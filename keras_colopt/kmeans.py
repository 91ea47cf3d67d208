"""Exact (optimal) 1-D k-means of a batch of rows, in numpy.

`kmeans_1d(rows, k)` returns, for each row (one output channel of a kernel, or the whole
kernel as one row), the `k` centroids minimising the within-cluster sum of squares (SSE)
of that row's values: the optimum itself, not a local one (k-means++ seeding followed by
Lloyd iterations only approaches it, and depends on its random draws).

Algorithm. In one dimension the clusters of an optimal solution are contiguous runs of the
sorted values, so k-means is a shortest-path problem (Wang & Song, "Ckmeans.1d.dp",
The R Journal 3(2), 2011; Grønlund et al., "Fast exact k-means, k-medians and Bregman
divergence clustering in 1D", 2017):

1. Each row is sorted (with `keep`, only its kept values) and its equal values merged into
   one weighted point, so a row of `n` values has `d <= n` distinct points. Rows are laid
   end to end in one flat array (they may differ in length), and prefix sums of the
   weights, of w*x and of w*x^2 give the SSE of any run i..j-1 in O(1):
   `cost(i, j) = S2 - S1^2 / W` over the run (values centred on the row's mean first, which
   keeps the cancellation in that difference small).
2. `D[m][j]`, the least SSE of the first `j` points in `m` clusters, is
   `min over i < j of D[m-1][i] + cost(i, j)`. The best `i` is non-decreasing in `j` (the
   cost satisfies the quadrangle inequality), so each layer `m` is solved by divide and
   conquer: the middle `j` of a range searches the whole candidate range, the left half of
   the `j`s then only candidates up to that best `i`, the right half only those from it.
   Every recursion level of every row is evaluated at once, as flat numpy arrays (a
   segmented argmin by `np.minimum.reduceat`), so there are `k * log2(d)` numpy passes in
   all, each over at most `2 * sum(d)` candidates, whatever the number of rows.

   Each layer's search also starts no lower than the previous layer's best split at the
   same `j` (Knuth's monotonicity: with one cluster more, the last one starts no earlier),
   which about halves the candidates.
3. The best split points are kept per layer (int32, `k * sum(d)` of them) and followed back
   from `D[k][d]`; each centroid is the mean of its run.

Cost: O(k * N * log n) time and O(k * N) memory for N values in all and rows of n values.
Measured on 2 shared CPU cores: a 65,536-value kernel at k = 16 in ~0.15 s (the old
k-means++ and Lloyd routine ~0.3 s), 256 rows of 2,304 values at k = 16 in ~2.5 s,
300,000 values at k = 16 in ~1.1 s; scikit-learn's KMeans (n_init=1) takes ~0.5 s on the
last, and ~25 ms a call on small rows, so it is slower for many rows but faster on a
large single row at large k (65,536 values at k = 256: ~0.5 s against ~2.4 s exact).
Hence the threshold: a row whose `k * n * log2(n)` is past `EXACT_LIMIT` (2**27, about
2 s exact; e.g. 300k values at k >= 32, 65,536 at k = 256) is solved by scikit-learn's
`KMeans` (one dimension, k-means++ seeding, `random_state=0`, `n_init=1`) instead: a good
local optimum (0.4-8% above the optimum in our measures), not the optimum. Rows solved
exactly go in batches of at most `BATCH_LIMIT` split points (128 MiB).

Fewer distinct values than `k`: the row's distinct values are its centroids (SSE 0), the
largest repeated to make `k` (so the centroids stay sorted and no new value appears). A row
with no value at all (everything masked) gets `k` zeros.
"""

from typing import Optional

import numpy as np

# A row of n values whose k * n * log2(n) (the exact solver's candidate evaluations, up to
# a constant) is past this is solved by scikit-learn's KMeans instead.
EXACT_LIMIT = 2 ** 27
# Rows solved exactly together hold at most this many split points (int32): 128 MiB.
BATCH_LIMIT = 2 ** 25


def kmeans_1d(rows, k: int, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """The optimal `k` centroids of each row, sorted ascending.

    Args:
        rows: a 1-D array (one row) or a 2-D array (one row per channel).
        k: number of centroids per row, >= 1.
        keep: optional boolean array of `rows`' shape: only the values where it is True
            are clustered (e.g. the non-zero weights, when zero is kept apart).

    Returns:
        float64 array, `(k,)` for a 1-D input, `(rows, k)` for a 2-D one.

    Example:
        >>> kmeans_1d(np.array([0., 1., 10., 11.]), 2).tolist()
        [0.5, 10.5]
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"kmeans_1d: `k` must be an integer >= 1. Received: k={k!r}")
    x = np.asarray(rows, np.float64)
    single = x.ndim == 1
    x = x.reshape(1, -1) if single else x
    if x.ndim != 2:
        raise ValueError("kmeans_1d: `rows` must be 1-D or 2-D. "
                         f"Received: rows of shape {np.shape(rows)}")
    if keep is not None:
        keep = np.asarray(keep, bool).reshape(x.shape)
    if not np.all(np.isfinite(x if keep is None else x[keep])):
        raise ValueError("kmeans_1d: `rows` must be finite. Received: a NaN or infinity")
    counts = np.full(x.shape[0], x.shape[1]) if keep is None else keep.sum(axis=1)
    large = counts * k * np.log2(np.maximum(counts, 2)) > EXACT_LIMIT
    out = np.zeros((x.shape[0], k))
    if large.any():
        out[large] = _sklearn(x[large], k, None if keep is None else keep[large])
    exact = np.flatnonzero(~large)
    # consecutive rows, in batches of at most BATCH_LIMIT split points (one row at least)
    batch = np.cumsum(counts[exact] * k) // BATCH_LIMIT
    for b in np.unique(batch):
        rows = exact[batch == b]
        out[rows] = _exact(x[rows], k, None if keep is None else keep[rows])
    return out[0] if single else out


def sse(rows, centroids, keep: Optional[np.ndarray] = None) -> np.ndarray:
    """Within-cluster sum of squares of each row, every value at its nearest centroid.

    Args:
        rows: 1-D or 2-D array, as for `kmeans_1d`.
        centroids: `(k,)` (shared by every row) or `(rows, k)`.
        keep: optional boolean mask of the values counted.

    Returns:
        float64 scalar for a 1-D `rows`, else one value per row.
    """
    x = np.asarray(rows, np.float64)
    single = x.ndim == 1
    x = x.reshape(1, -1) if single else x
    c = np.sort(np.asarray(centroids, np.float64), axis=-1)
    c = np.broadcast_to(c, (x.shape[0], c.shape[-1]))
    mids = (c[:, 1:] + c[:, :-1]) / 2
    # the nearest centroid by bisection between midpoints (memory O(N), not O(N k))
    idx = np.stack([np.searchsorted(m, r) for m, r in zip(mids, x)]) if len(x) else x
    err = (x - np.take_along_axis(c, idx.astype(np.int64), axis=1)) ** 2
    if keep is not None:
        err = np.where(np.asarray(keep, bool).reshape(x.shape), err, 0.0)
    total = err.sum(axis=1)
    return total[0] if single else total


def _flat_points(x, keep):
    """The rows' distinct values, sorted, end to end: (values, weights, row of each,
    number per row)."""
    n_rows, n = x.shape
    if keep is None:
        v = np.sort(x, axis=1).ravel()
        row = np.repeat(np.arange(n_rows), n)
    else:
        # masked values sort last; then only the first `count` of each row are kept
        s = np.sort(np.where(keep, x, np.inf), axis=1)
        counts = keep.sum(axis=1)
        taken = np.arange(n)[None, :] < counts[:, None]
        v, row = s[taken], np.nonzero(taken)[0]
    first = np.ones(v.size, bool)
    first[1:] = (v[1:] != v[:-1]) | (row[1:] != row[:-1])
    starts = np.flatnonzero(first)
    weight = np.diff(np.append(starts, v.size)).astype(np.float64)
    return v[starts], weight, row[starts], np.bincount(row[starts], minlength=n_rows)


def _exact(x, k, keep):
    n_rows = x.shape[0]
    u, w, urow, d = _flat_points(x, keep)
    out = np.zeros((n_rows, k))
    if u.size == 0:
        return out
    offset = np.concatenate([[0], np.cumsum(d)])  # row r's points: offset[r] .. offset[r+1]-1
    # centre each row on its mean: smaller prefix sums, less cancellation in cost()
    mean = np.bincount(urow, u * w, n_rows) / np.maximum(np.bincount(urow, w, n_rows), 1)
    y = u - mean[urow]
    W = np.concatenate([[0.0], np.cumsum(w)])
    S1 = np.concatenate([[0.0], np.cumsum(w * y)])
    S2 = np.concatenate([[0.0], np.cumsum(w * y * y)])

    def cost(i, j):  # SSE of the points i..j-1 (prefix positions, same row, i < j)
        s1 = S1[j] - S1[i]
        return np.maximum(S2[j] - S2[i] - s1 * s1 / (W[j] - W[i]), 0.0)

    kr = np.minimum(k, d)  # clusters per row
    # D[p]: least SSE of a row's points up to prefix position p = offset[r] + j; layer 1
    # is one cluster from the row's start.
    D = np.zeros(u.size + 1)
    D[1:] = cost(np.repeat(offset[:-1], d), np.arange(1, u.size + 1))
    splits = []  # per layer m >= 2: the best split at each position
    # work buffers, reused level after level (fresh large arrays cost page faults); a
    # level has at most one candidate per point plus one per range
    size = 2 * u.size + n_rows + 1
    count = np.arange(size)
    cand_b, sid_b = np.empty(size, np.int64), np.empty(size, np.int64)
    x_b, y_b = np.empty(size), np.empty(size)
    for m in range(2, int(kr.max()) + 1):
        # D[i] + cost(i, j) = E[i] - (S1[j] - S1[i])^2 / (W[j] - W[i]) + S2[j]: the last
        # term is the same for every candidate i of j, so it is added after the argmin
        E = D - S2
        rows = np.flatnonzero(kr >= m)
        # j from m to d - (kr - m) (room left for the clusters after); at the last layer
        # of a row only j = d matters.
        lo = offset[rows] + np.where(kr[rows] == m, d[rows], m)
        hi = offset[rows] + d[rows] - (kr[rows] - m)
        olo = offset[rows] + m - 1
        ohi = hi - 1
        new = D.copy()
        # the previous layer's best splits bound this layer's from below (with one more
        # cluster, the last one starts no earlier: Knuth's monotonicity, which the 1-D
        # k-means cost has as it has the quadrangle inequality)
        below = splits[-1] if splits else None
        opt = np.zeros(u.size + 1, np.int32)  # the best split at each position computed
        while lo.size:
            # each range's middle j, against its candidate splits i = olo .. min(ohi, j-1),
            # all ranges' candidates end to end (segment s of range s)
            mid = (lo + hi) // 2
            first = olo if below is None else np.maximum(olo, below.take(mid))
            cnt = np.minimum(ohi, mid - 1) - first + 1
            seg = np.cumsum(cnt) - cnt
            n = int(seg[-1] + cnt[-1])
            sid, cand, x, y = sid_b[:n], cand_b[:n], x_b[:n], y_b[:n]
            sid[:] = np.repeat(count[:cnt.size], cnt)
            np.add((first - seg).take(sid), count[:n], out=cand)
            np.subtract(S1[mid].take(sid), S1.take(cand), out=x)  # take: faster than []
            np.subtract(W[mid].take(sid), W.take(cand), out=y)
            np.multiply(x, x, out=x)
            np.divide(x, y, out=x)
            val = np.subtract(E.take(cand), x, out=y)
            best = np.minimum.reduceat(val, seg)
            # any argmin of each segment will do: the leftmost optimal splits and the
            # rightmost are both monotone, so the halves' ranges still hold an optimum
            hits = np.flatnonzero(np.equal(val, best.take(sid), out=x.view(bool)[:n]))
            arg = cand.take(hits[np.searchsorted(hits, seg)])  # the first hit of each range
            new[mid] = np.maximum(best + S2[mid], 0.0)
            opt[mid] = arg
            # the halves: j in lo..mid-1 with splits up to arg, mid+1..hi from arg
            lo, hi = np.concatenate([lo, mid + 1]), np.concatenate([mid - 1, hi])
            olo, ohi = np.concatenate([olo, arg]), np.concatenate([arg, ohi])
            more = lo <= hi
            lo, hi, olo, ohi = lo[more], hi[more], olo[more], ohi[more]
        D = new
        splits.append(opt)
    # follow the splits back from each row's end
    has = np.flatnonzero(d > 0)
    ends = np.zeros((n_rows, k + 1), np.int64)
    cur = offset[has + 1].copy()
    ends[has, kr[has]] = cur
    for m in range(int(kr.max()), 1, -1):
        sel = kr[has] >= m
        cur[sel] = splits[m - 2][cur[sel]]
        ends[has[sel], m - 1] = cur[sel]
    ends[has, 0] = offset[has]
    j = np.arange(1, k + 1)[None, :]
    filled = j <= kr[:, None]
    a = np.where(filled, ends[:, :-1], 0)
    b = np.where(filled, ends[:, 1:], 1)
    cent = (S1[b] - S1[a]) / np.maximum(W[b] - W[a], 1) + mean[:, None]
    # fewer distinct values than k: repeat the largest
    last = cent[np.arange(n_rows), np.maximum(kr - 1, 0)]
    out = np.where(filled, cent, last[:, None])
    out[d == 0] = 0.0
    return out


def _sklearn(x, k, keep):
    """Rows too large for the exact solver's memory: scikit-learn's KMeans, row by row."""
    from sklearn.cluster import KMeans

    out = np.zeros((x.shape[0], k))
    for r in range(x.shape[0]):
        v = x[r] if keep is None else x[r][keep[r]]
        u = np.unique(v)
        if u.size == 0:
            continue
        if u.size <= k:
            out[r] = np.concatenate([u, np.full(k - u.size, u[-1])])
            continue
        km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(v.reshape(-1, 1))
        out[r] = np.sort(km.cluster_centers_.ravel())
    return out
