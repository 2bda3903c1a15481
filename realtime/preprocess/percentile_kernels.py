"""Compiled kernels of realtime.preprocess.percentile.RunningPercentile (numba; see that module for the algorithm).

State of N series (series-major, row i = series i): ring (N, W) float32 samples; keys (N, B) uint64
sorted runs of each series' low set at start[i] with size[i] keys; top (N,) the largest low key;
stats (N, 2) float32 the order statistics lo and lo + 1 of the held samples. A key is the
order-preserving bit pattern of a float32 sample shifted left by sb bits, or'ed with its ring slot.
Entry points: push_chunk / push_par (frames in, values or dF/F out), pop_chunk / pop_par, all_finite.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from loopcast.realtime.jit import njit

# A frame's parameters, one int64 row per pushed frame (`RunningPercentile._params`).
SLOT, FULL, N_LIVE, NEED, HEAD, LO, HI, MOVED, UPPER = range(9)
CHUNK = 512                      # series per parallel work item (their state stays in L2 over T)
PREFETCH_AHEAD = 6               # updates between a run's prefetch and its use
THRESHOLD_TRIES = 8              # counting passes of a refill before its selection-scan fallback
IN_LOW = np.uint64(1) << np.uint64(63)   # flag bit on a listed old key (keys use <= 32 + 31 bits)
EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)    # `top` of an empty low set (no key reaches it)


@intrinsic
def _f32_bits(typingctx, x):  # pragma: no cover (compiled)
    """float32 -> its uint32 bit pattern."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):  # pragma: no cover (compiled)
    """uint32 bit pattern -> float32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _prefetch(typingctx, arr, i, j):  # pragma: no cover (compiled)
    """A read prefetch of &arr[i, j] (llvm.prefetch; a hint, never a fault)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        idx = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], sig.args[1:])]
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, idx, wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(arr, i, j), codegen


@intrinsic
def _memmove(typingctx, arr, i, dst, src, count):  # pragma: no cover (compiled)
    """Move `count` items of row i of a 2-D C array from column src to column dst (overlap-safe)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i, dst, src, count = (context.cast(builder, v, t, types.intp)
                              for v, t in zip(args[1:], sig.args[1:]))
        to = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [i, dst], wraparound=False)
        fro = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [i, src], wraparound=False)
        size = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        cgutils.raw_memmove(builder, to, fro, count, size)
        return context.get_dummy_value()
    return types.void(arr, i, dst, src, count), codegen


@njit(nogil=True, inline="always")
def _key(v, slot, sb):  # pragma: no cover (compiled)
    """Unique, order-preserving key of sample v held at `slot` (sb = bits of the slot)."""
    b = np.uint64(_f32_bits(v))
    o = (b ^ np.uint64(0xFFFFFFFF)) if b >> np.uint64(31) else (b | np.uint64(0x80000000))
    return (o << np.uint64(sb)) | np.uint64(slot)


@njit(nogil=True, inline="always")
def _value(k, sb):  # pragma: no cover (compiled)
    """The float32 sample of a key."""
    o = k >> np.uint64(sb)
    b = (o & np.uint64(0x7FFFFFFF)) if o >> np.uint64(31) else (o ^ np.uint64(0xFFFFFFFF))
    return _bits_f32(np.uint32(b))


@njit(nogil=True, inline="always")
def _lerp(a, b, g, g1, upper):  # pragma: no cover (compiled)
    """numpy's `_lerp` in float32: a + (b-a) g, or b - (b-a)(1-g) when g >= 0.5."""
    d = b - a
    return b - d * g1 if upper else a + d * g


@njit(nogil=True, error_model="numpy", inline="always")
def ratio_one(f, f0, min_baseline, clip_min, clip_max):  # pragma: no cover (compiled)
    """dF/F of one sample in float32: clip((f - f0) / max(f0, min_baseline)), as realtime.preprocess.dff."""
    return min(max((f - f0) / max(f0, min_baseline), clip_min), clip_max)


@njit(nogil=True, inline="always")
def _rank(keys, i, a, b, k):  # pragma: no cover (compiled)
    """Index of the first key >= k in the sorted keys[i, a:b]: a branch-free bisection (selects,
    not jumps, so no mispredictions; the run was prefetched)."""
    n = b - a
    while n > 1:
        half = n >> 1
        a = a + half if keys[i, a + half - 1] < k else a
        n -= half
    return a + 1 if n == 1 and keys[i, a] < k else a


@njit(nogil=True, inline="always")
def _insert(keys, start, i, n, k):  # pragma: no cover (compiled)
    """Insert key k into the sorted run of series i (n keys at start[i]), shifting the shorter side
    (re-centring the run first when that side has no room)."""
    width = keys.shape[1]
    st = start[i]
    p = _rank(keys, i, st, st + n, k) - st
    left = p < n - p
    if (left and st == 0) or (not left and st + n == width):
        new_st = (width - n) >> 1
        _memmove(keys, i, new_st, st, n)
        st = new_st
    if left:
        _memmove(keys, i, st - 1, st, p)
        st -= 1
    else:
        _memmove(keys, i, st + p + 1, st + p, n - p)
    keys[i, st + p] = k
    start[i] = st
    return n + 1


@njit(nogil=True, inline="always")
def _delete(keys, start, i, n, k):  # pragma: no cover (compiled)
    """Remove key k (present) from the sorted run of series i, shifting the shorter side."""
    st = start[i]
    p = _rank(keys, i, st, st + n, k) - st
    if p < n - 1 - p:
        _memmove(keys, i, st + 1, st, p)
        start[i] = st + 1
    else:
        _memmove(keys, i, st + p, st + p + 1, n - 1 - p)
    return n - 1


@njit(nogil=True, inline="always")
def _take(keys, i, base, want, filled, k):  # pragma: no cover (compiled)
    """Put key k into the sorted buffer keys[i, base:base+filled] (its largest drops out when the
    buffer holds `want`) by an insertion step (short buffers: no search, no call); returns the new
    filled count."""
    j = base + (filled if filled < want else want - 1)
    while j > base and keys[i, j - 1] > k:
        keys[i, j] = keys[i, j - 1]
        j -= 1
    keys[i, j] = k
    return filled + 1 if filled < want else filled


@njit(nogil=True)
def _scan(ring, keys, i, s0, s1, thr, base, want, filled, lim, sb):  # pragma: no cover (compiled)
    """Slots s0..s1-1 of series i into the sorted buffer keys[i, base:base+want] of the smallest
    keys in (thr, lim); returns the new (filled, lim). Blocks of 16 samples whose values all lie
    outside [value(thr), value(lim)] are skipped after one vectorised test."""
    lo_v = _value(thr, sb) if thr > 0 else np.float32(-np.inf)
    for b0 in range(s0, s1, 16):
        b1 = min(b0 + 16, s1)
        hi_v = _value(lim, sb) if filled == want else np.float32(np.inf)
        hit = False
        for s in range(b0, b1):
            v = ring[i, s]
            hit |= (v >= lo_v) & (v <= hi_v)
        if not hit:
            continue
        for s in range(b0, b1):
            k = _key(ring[i, s], s, sb)
            if thr < k < lim:
                filled = _take(keys, i, base, want, filled, k)
                if filled == want:
                    lim = keys[i, base + want - 1]
    return filled, lim


@njit(nogil=True, inline="always")
def _count_le(ring, i, first, n_live, tau):  # pragma: no cover (compiled)
    """How many of the n_live held samples (slots from `first`, wrapping) are <= tau (vectorised)."""
    w = ring.shape[1]
    c = 0
    for s in range(first, min(first + n_live, w)):
        c += ring[i, s] <= tau
    for s in range(0, first + n_live - w):
        c += ring[i, s] <= tau
    return c


@njit(nogil=True, inline="always")
def _gather(ring, keys, i, first, n_live, tau, thr, end, sb):  # pragma: no cover (compiled)
    """Append at keys[i, end:] the keys > thr of held samples <= tau; returns the new end. Branch
    free: every key is written, the end advances only for a match (keys[i, end] must exist)."""
    w = ring.shape[1]
    for s0, s1 in ((first, min(first + n_live, w)), (0, max(0, first + n_live - w))):
        for s in range(s0, s1):
            v = ring[i, s]
            k = _key(v, s, sb)
            keys[i, end] = k
            end += (v <= tau) & (k > thr)
    return end


@njit(nogil=True)
def _threshold(ring, keys, i, st, n, lo_c, hi_c, first, n_live, sb):  # pragma: no cover (compiled)
    """A value tau >= top with lo_c <= (held samples <= tau) - n <= hi_c: vectorised counts from a
    guess (the low set's spread extrapolated), then doubling / bisection. NaN if a few tries fail
    (heavy ties), for the caller to fall back to a selection scan."""
    top = _value(keys[i, st + n - 1], sb)
    step = (np.float64(top) - np.float64(_value(keys[i, st], sb))) * (lo_c + hi_c) / (2.0 * n)
    step = max(step, abs(np.float64(top)) * 2.0 ** -20, 1e-30)
    lo, hi = np.float64(top), np.inf
    tau = lo + step
    for _ in range(THRESHOLD_TRIES):
        t32 = max(np.float32(tau), top)
        c = _count_le(ring, i, first, n_live, t32) - n
        if lo_c <= c <= hi_c:
            return t32
        if c < lo_c:
            lo = tau
            step *= 2.0
            tau = tau + step if hi == np.inf else 0.5 * (tau + hi)
        else:
            hi = tau
            tau = 0.5 * (lo + tau)
    return np.float32(np.nan)


@njit(nogil=True)
def _refill(ring, keys, start, i, n, need, target, cap, first, n_live,
            sb):  # pragma: no cover (compiled)
    """Grow the low set of series i (n < need) with the smallest held keys above its top, to
    between need and cap keys, aiming at target: every sample <= a threshold found by counting,
    or, failing that, the target - n smallest by a selection scan. Returns the new size."""
    want = min(target, n_live) - n
    room = min(cap, n_live) - n
    st = start[i]
    if st + n + room >= keys.shape[1]:                  # make room on the right (+1: _gather)
        new_st = (keys.shape[1] - n - room - 1) >> 1
        _memmove(keys, i, new_st, st, n)
        st = new_st
        start[i] = st
    thr = keys[i, st + n - 1] if n > 0 else np.uint64(0)
    tau = _threshold(ring, keys, i, st, n, need - n, room, first, n_live, sb) if n > 0 \
        else np.float32(np.nan)
    if tau == tau:                                      # not NaN: take everything <= tau
        end = _gather(ring, keys, i, first, n_live, tau, thr, st + n, sb)
        for j in range(st + n + 1, end):                # insertion sort of the new keys
            _take(keys, i, st + n, end, j - st - n, keys[i, j])
        return end - st
    lim = EMPTY
    end = first + n_live
    w = ring.shape[1]
    filled, lim = _scan(ring, keys, i, first, min(end, w), thr, st + n, want, 0, lim, sb)
    if end > w:
        filled, lim = _scan(ring, keys, i, 0, end - w, thr, st + n, want, filled, lim, sb)
    return n + filled


@njit(nogil=True, inline="always")
def _settle(keys, start, size, top, stats, i, n, lo, hi, sb):  # pragma: no cover (compiled)
    """Store series i's new size, top key and the two order statistics it needs."""
    size[i] = n
    if n == 0:
        top[i] = EMPTY
        return
    st = start[i]
    top[i] = keys[i, st + n - 1]
    stats[i, 0] = _value(keys[i, st + lo], sb)
    stats[i, 1] = _value(keys[i, st + hi], sb)


@njit(nogil=True)
def _update(ring, keys, start, size, top, stats, i, old, old_in, kx, slot, n_live, need, cap,
            target, head, sb, lo, hi):  # pragma: no cover (compiled)
    """The rare path of a push (the new sample is already in the ring): the old key `old` leaves
    the low set if `old_in`, the new key kx enters if it belongs; refill; store size/top/stats."""
    n = size[i]
    t = top[i]
    if old_in:
        n = _delete(keys, start, i, n, old)
    if kx <= t or n == n_live - 1:
        n = _insert(keys, start, i, n, kx)
        if n > cap:
            n -= 1                                      # evict the maximum
    if n < need:
        n = _refill(ring, keys, start, i, n, need, target, cap, head, n_live, sb)
    _settle(keys, start, size, top, stats, i, n, lo, hi, sb)


@njit(nogil=True)
def _prefetch_run(keys, start, size, i):  # pragma: no cover (compiled)
    """Ask for the cache lines of series i's sorted run before it is searched."""
    st = start[i]
    for j in range(st, st + size[i], 8):
        _prefetch(keys, i, j)


@njit(nogil=True, error_model="numpy")
def push_chunk(ring, keys, start, size, top, stats, xs, prm, w, cap, target, sb, out, ratio,
                todo, olds, a, b):  # pragma: no cover (compiled)
    """Series a..b-1 take the frames xs (T, N), in order; with `out` (T, N), the values too, or,
    with ratio = (min_baseline, clip_min, clip_max), the dF/F of xs against them (returns how many
    baselines were floored). Per frame: one streaming pass writes the ring and lists the series
    whose low set changes (old or new sample <= top; all while the ranks move) in todo/olds[a:b]
    (old keys, high bit set = in the low set); a second pass updates those, prefetching their
    sorted runs a few series ahead (rarely in cache); a third writes the values."""
    floored = 0
    for t in range(xs.shape[0]):
        slot, full, n_live, need, head = prm[t, SLOT], prm[t, FULL] != 0, prm[t, N_LIVE], \
            prm[t, NEED], prm[t, HEAD]
        lo, hi, moved = prm[t, LO], prm[t, HI], prm[t, MOVED] != 0
        m = a
        for i in range(a, b):
            x = xs[t, i]
            old = _key(ring[i, slot], slot, sb)
            leaves = full and old <= top[i]
            ring[i, slot] = x
            if leaves or _key(x, slot, sb) <= top[i] or moved or size[i] == n_live - 1:
                todo[m] = i
                olds[m] = old | (IN_LOW if leaves else np.uint64(0))
                m += 1
        for k in range(a, m):
            if k + PREFETCH_AHEAD < m:
                _prefetch_run(keys, start, size, todo[k + PREFETCH_AHEAD])
            i = todo[k]
            _update(ring, keys, start, size, top, stats, i, olds[k] & ~IN_LOW, olds[k] >= IN_LOW,
                    _key(xs[t, i], slot, sb), slot, n_live, need, cap, target, head, sb, lo, hi)
        if out.shape[0]:
            g, g1, upper = w[t, 0], w[t, 1], prm[t, UPPER] != 0
            for i in range(a, b):
                f0 = _lerp(stats[i, 0], stats[i, 1], g, g1, upper)
                if ratio.shape[0]:
                    floored += f0 < ratio[0]
                    f0 = ratio_one(xs[t, i], f0, ratio[0], ratio[1], ratio[2])
                out[t, i] = f0
    return floored


@njit(parallel=True, nogil=True, error_model="numpy")
def push_par(ring, keys, start, size, top, stats, xs, prm, w, cap, target, sb, out, ratio, todo,
              olds, a, b):  # pragma: no cover (compiled)
    """`push_chunk` over series a..b-1, parallel over chunks of series; floored baselines summed."""
    floored = 0
    for c in numba.prange((b - a + CHUNK - 1) // CHUNK):
        floored += push_chunk(ring, keys, start, size, top, stats, xs, prm, w, cap, target, sb,
                               out, ratio, todo, olds, a + c * CHUNK, min(b, a + (c + 1) * CHUNK))
    return floored


@njit(nogil=True)
def pop_chunk(ring, keys, start, size, top, stats, head, n_live, k_need, target, cap, lo, hi, sb,
               a, b):  # pragma: no cover (compiled)
    """Series a..b-1 drop the sample at `head` (the oldest); n_live remain, from head + 1."""
    first = head + 1 if head + 1 < ring.shape[1] else 0
    need = min(k_need, n_live)
    for i in range(a, b):
        n = size[i]
        old = _key(ring[i, head], head, sb)
        if old <= top[i]:
            n = _delete(keys, start, i, n, old)
        if n < need:
            n = _refill(ring, keys, start, i, n, need, target, cap, first, n_live, sb)
        _settle(keys, start, size, top, stats, i, n, lo, hi, sb)


@njit(parallel=True, nogil=True)
def pop_par(ring, keys, start, size, top, stats, head, n_live, k_need, target, cap, lo, hi, sb,
             a, b):  # pragma: no cover (compiled)
    """`pop_chunk` over series a..b-1, parallel over chunks of series."""
    for c in numba.prange((b - a + CHUNK - 1) // CHUNK):
        pop_chunk(ring, keys, start, size, top, stats, head, n_live, k_need, target, cap, lo, hi,
                   sb, a + c * CHUNK, min(b, a + (c + 1) * CHUNK))


@njit(nogil=True)
def all_finite(x):  # pragma: no cover (compiled)
    for i in range(x.shape[0]):
        if not np.isfinite(x[i]):
            return False
    return True


