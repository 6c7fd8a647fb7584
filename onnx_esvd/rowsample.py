"""A bounded, group-stratified sample of rows, streamed in batches.

The penalised refits need rows, not moments. What limits the fairness they reach is the number of
minority rows, so the sample fills groups equally ("water filling"): every group keeps all of its rows
up to a common level L, and groups with more rows keep a uniform random L of them. L is the largest
level with `sum_g min(n_g, L) <= capacity`, but never below `min_keep_per_group` (so memory is at
most about `max(capacity, k * min_keep_per_group)` kept rows, plus one batch in flight).

Which rows are kept depends only on the seed and on each row's global index (its position in the
stream), not on batch boundaries: a row's priority is a 64-bit hash of (seed, index), a group keeps
its L smallest priorities, and L only falls as rows arrive, so a row dropped early would never have
been kept at the end. Each kept row carries the weight `n_g / kept_g` (how many seen rows it stands
for), so population averages (the MSE term of a refit) can be restored.

Memory: once a group has been trimmed to L rows, the largest priority it kept is a cut that can only
fall, so an incoming row above it is dropped at once (never copied); a group is trimmed again when
its buffer passes L plus a quarter of L (at least one batch). At the end `result()` hands the rows
over (the sample is empty afterwards), optionally already in float64, without a second copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import DataError, OptionError


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_priority(index: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random priority `[n] uint64` of global row indices `[n]` for a seed."""
    with np.errstate(over="ignore"):
        salted = np.asarray(index, dtype=np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64))[0]
    return _splitmix64(salted)


#: Salt of the fold hash, so a row's fold is independent of its sampling priority (same seed).
_FOLD_SALT = 0x6F6F665F666F6C64


def fold_of(index: np.ndarray, seed: int, folds: int) -> np.ndarray:
    """Fold id `[n] int64` in 0..folds-1 of global row indices `index: [n]`: a seeded hash of the index alone,
    so it does not depend on batch sizes or on which other rows are present."""
    if not (isinstance(folds, (int, np.integer)) and folds >= 1):
        raise OptionError(f"folds={folds!r} must be a positive integer")
    prio = row_priority(index, int(seed) ^ _FOLD_SALT)
    return (prio % np.uint64(folds)).astype(np.int64)


def water_level(counts: list[int], capacity: int, floor: int) -> int:
    """Largest L with `sum min(n_g, L) <= capacity`, at least `floor` (counts: rows seen per group)."""
    if sum(counts) <= capacity:
        return max(max(counts, default=0), floor)
    ordered = sorted(counts)
    left, k = capacity, len(ordered)
    for i, c in enumerate(ordered):
        share = left // (k - i)
        if c >= share:
            return max(share, floor)
        left -= c
    return max(ordered[-1], floor)  # not reached


@dataclass(frozen=True)
class RowSample:
    """The kept rows, in stream order.

    Attributes:
        x: [n, p] (dtype as given), t: [n, m] float64, group: [n] int64, fold: [n] int64 or None,
        index: [n] int64 global row index, weight: [n] float64 (= seen_g / kept_g of the row's group),
        seen, kept: rows seen and kept per group code.
    """

    x: np.ndarray
    t: np.ndarray
    group: np.ndarray
    fold: np.ndarray | None
    index: np.ndarray
    weight: np.ndarray
    seen: dict[int, int]
    kept: dict[int, int]


class StratifiedSample:
    """Streaming group-stratified reservoir: `add` batches, then `result()`."""

    def __init__(self, capacity: int = 200_000, min_keep_per_group: int = 5_000, seed: int = 0) -> None:
        if capacity < 1 or min_keep_per_group < 0:
            raise OptionError(f"sample capacity {capacity} must be >= 1 and min_keep_per_group "
                              f"{min_keep_per_group} >= 0")
        self.capacity, self.min_keep, self.seed = int(capacity), int(min_keep_per_group), int(seed)
        self._rows = 0
        self._seen: dict[int, int] = {}
        self._chunks: dict[int, list[tuple]] = {}
        self._buffered: dict[int, int] = {}
        self._has_fold: bool | None = None
        self._width: tuple[int, int] | None = None
        self._cut: dict[int, int] = {}  # per group: rows with a larger priority can never be kept
        self._result: RowSample | None = None

    @property
    def seen(self) -> dict[int, int]:
        return dict(sorted(self._seen.items()))

    #: An upper bound on the level known in advance (a shard given the whole data set's level): rows above it
    #: could never be kept, so a shard ships at most that many rows per group. None: no bound.
    cap: int | None = None

    def level(self) -> int:
        """Current per-group level L (rows kept per group that has more)."""
        level = water_level(list(self._seen.values()), self.capacity, self.min_keep)
        return level if self.cap is None else min(level, int(self.cap))

    def add(self, x: np.ndarray, t: np.ndarray, group: np.ndarray, fold: np.ndarray | None = None,
            index: np.ndarray | None = None) -> None:
        """Add a batch: `x: [n, p]`, `t: [n, m]` (or [n]), `group: [n]` int codes, `fold: [n]` int or None,
        `index: [n]` the rows' global indices (increasing; default: their position in this stream). With global
        indices, samples of disjoint shards `merge` into exactly the sample of all their rows."""
        x = np.asarray(x)
        n = x.shape[0]
        t = np.asarray(t, dtype=np.float64).reshape(n, -1)
        group = np.asarray(group).ravel()
        if group.shape[0] != n or t.shape[0] != n:
            raise DataError(f"batch has {n} rows of x but {t.shape[0]} targets and {group.shape[0]} group codes")
        if not np.issubdtype(group.dtype, np.integer):
            raise DataError(f"group codes must be integers, got dtype {group.dtype}")
        if self._has_fold is None:
            self._has_fold = fold is not None
            self._width = (x.shape[1], t.shape[1])
        if (fold is not None) != self._has_fold:
            raise DataError("fold ids must be given for every batch or for none")
        if (x.shape[1], t.shape[1]) != self._width:
            raise DataError(f"batch widths {(x.shape[1], t.shape[1])} differ from the first batch's {self._width}")
        fold = None if fold is None else np.asarray(fold, dtype=np.int64).ravel()
        if index is None:
            index = np.arange(self._rows, self._rows + n, dtype=np.int64)
        else:
            index = np.asarray(index, dtype=np.int64).ravel()
            if index.shape[0] != n:
                raise DataError(f"batch has {n} rows of x but {index.shape[0]} row indices")
        self._rows += n
        prio = row_priority(index, self.seed)
        codes, inverse = np.unique(group, return_inverse=True)
        for c, code in enumerate(codes.tolist()):
            sel = np.flatnonzero(inverse == c)
            self._seen[code] = self._seen.get(code, 0) + sel.size
            if code in self._cut:
                sel = sel[prio[sel] <= np.uint64(self._cut[code])]
            chunk = (x[sel], t[sel], None if fold is None else fold[sel], index[sel], prio[sel])
            self._chunks.setdefault(code, []).append(chunk)
            self._buffered[code] = self._buffered.get(code, 0) + sel.size
        level = self.level()
        slack = max(level // 4, n)
        for code in self._chunks:
            if self._buffered[code] > level + slack:
                self._trim(code, level)

    def _trim(self, code: int, level: int) -> None:
        """Keep the `level` smallest priorities of group `code` in one block (only the kept rows are copied)."""
        chunks = self._chunks[code]
        prio = np.concatenate([c[4] for c in chunks]) if len(chunks) > 1 else chunks[0][4]
        keep = None
        if prio.size > level:
            keep = np.sort(np.argpartition(prio, level - 1)[:level]) if level > 0 else np.zeros(0, dtype=np.int64)
            if level > 0:
                self._cut[code] = int(prio[keep].max())
        if keep is None and len(chunks) == 1:
            return
        offsets = np.cumsum([0] + [c[4].size for c in chunks])
        bounds = None if keep is None else np.searchsorted(keep, offsets)
        parts = []
        for i in range(5):
            if chunks[0][i] is None:
                parts.append(None)
            elif keep is None:
                parts.append(np.concatenate([c[i] for c in chunks]))
            else:
                parts.append(np.concatenate([c[i][keep[bounds[j]:bounds[j + 1]] - offsets[j]]
                                             for j, c in enumerate(chunks)]))
        self._chunks[code] = [tuple(parts)]
        self._buffered[code] = parts[4].size

    def result(self, dtype: np.dtype | type | None = None) -> RowSample:
        """The kept rows of every group, sorted by global row index; `x` in `dtype` (default: as added).

        The buffered rows are handed over (freed as they are copied) and the result is kept: later calls
        return the same rows (in `dtype`)."""
        if not self._seen:
            raise DataError("the row sample is empty: no rows were added")
        if self._result is not None:
            done = self._result
            if dtype is not None and done.x.dtype != np.dtype(dtype):
                done = dataclasses.replace(done, x=done.x.astype(dtype))
            return done
        level = self.level()
        for code in self._chunks:
            self._trim(code, level)
        codes = sorted(self._chunks)
        parts = [self._chunks[c][0] for c in codes]
        self._chunks, self._buffered = {}, {}
        kept = {c: int(p[4].size) for c, p in zip(codes, parts)}
        group = np.concatenate([np.full(kept[c], c, dtype=np.int64) for c in codes])
        weight = np.concatenate([np.full(kept[c], self._seen[c] / kept[c]) for c in codes if kept[c]])
        index = np.concatenate([p[3] for p in parts])
        order = np.argsort(index, kind="stable")
        fold = np.concatenate([p[2] for p in parts])[order] if self._has_fold else None
        t = np.concatenate([p[1] for p in parts])[order]
        # x: one output array, filled group by group (each group's block freed as soon as it is copied)
        total = int(index.size)
        x = np.empty((total, parts[0][0].shape[1]), dtype=parts[0][0].dtype if dtype is None else dtype)
        where = np.empty(total, dtype=np.int64)
        where[order] = np.arange(total)  # output row of each concatenated row
        start = 0
        for i in range(len(parts)):
            block = parts[i][0]
            x[where[start:start + block.shape[0]]] = block
            start += block.shape[0]
            parts[i] = None
        self._result = RowSample(x=x, t=t, group=group[order], fold=fold, index=index[order], weight=weight[order],
                                 seen={c: self._seen[c] for c in codes}, kept=kept)
        return self._result

    # -- sharding: kept rows depend only on (seed, global row index), so disjoint shards merge exactly --------

    def parts(self) -> tuple[dict[int, int], dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """(seen per group code, {code: (x [n, p], t [n, m] float64, index [n] int64)}) after trimming every group to
        the current level: what a shard's sample must keep for `merge`. Samples with fold ids have no parts."""
        if self._has_fold:
            raise DataError("a sample with fold ids cannot be sharded")
        level = self.level()
        for code in self._chunks:
            self._trim(code, level)
        return dict(self._seen), {c: (ch[0][0], ch[0][1], ch[0][3]) for c, ch in self._chunks.items()}

    @classmethod
    def from_parts(cls, capacity: int, min_keep_per_group: int, seed: int, seen: dict[int, int],
                   parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> "StratifiedSample":
        """A sample holding `parts` (see `parts`); the priorities are recomputed from (seed, index)."""
        out = cls(capacity, min_keep_per_group, seed)
        for code, (x, t, index) in parts.items():
            index = np.asarray(index, dtype=np.int64)
            out._chunks[int(code)] = [(x, np.asarray(t, dtype=np.float64), None, index, row_priority(index, out.seed))]
            out._buffered[int(code)] = index.size
            out._has_fold, out._width = False, (x.shape[1], t.shape[1])
        out._seen = {int(c): int(n) for c, n in seen.items()}
        out._rows = sum(out._seen.values())
        return out

    def merge(self, other: "StratifiedSample") -> "StratifiedSample":
        """The sample of both shards' rows (disjoint global row indices): the union of the kept rows trimmed to
        the water level of the summed counts, which is exactly the sample one stream of all rows keeps."""
        if (self.capacity, self.min_keep, self.seed) != (other.capacity, other.min_keep, other.seed):
            raise DataError(f"cannot merge row samples of different settings (capacity, min keep, seed): "
                            f"{(self.capacity, self.min_keep, self.seed)} vs {(other.capacity, other.min_keep, other.seed)}")
        seen_a, parts_a = self.parts()
        seen_b, parts_b = other.parts()
        if parts_a and parts_b:
            wa, wb = next(iter(parts_a.values())), next(iter(parts_b.values()))
            if (wa[0].shape[1], wa[1].shape[1]) != (wb[0].shape[1], wb[1].shape[1]):
                raise DataError("cannot merge row samples of different widths")
        seen = {c: seen_a.get(c, 0) + seen_b.get(c, 0) for c in set(seen_a) | set(seen_b)}
        parts = {}
        for c in set(parts_a) | set(parts_b):
            both = [p for p in (parts_a.get(c), parts_b.get(c)) if p is not None]
            parts[c] = tuple(np.concatenate([p[i] for p in both]) for i in range(3))
        out = StratifiedSample.from_parts(self.capacity, self.min_keep, self.seed, seen, parts)
        level = out.level()
        for code in out._chunks:
            out._trim(code, level)
        return out
