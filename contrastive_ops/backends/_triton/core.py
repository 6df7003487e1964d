r"""Triton kernels of the similarity-LSE core (primitive ``"sim_lse"``).

The maths is the contract of :mod:`contrastive_ops.core`::

    Q = q[row_index] (B, D)     K = k[col_index] (M, D)     S = scale · Q Kᵀ  (B, M)
    row_lse[i] = LSE_{j allowed for i} S[i, j]      col_lse[j] = LSE_{i : j allowed for i} S[i, j]

with *allowed* = ``col_start[i] <= j < col_end[i]`` minus the ``exclude[i, :]``
entries.  No kernel stores B×M: S is rebuilt tile by tile from Q and K
(``tl.dot`` over D, fp32 accumulation, inputs in their own dtype; fp32 inputs
use ``input_precision="ieee"``, never TF32).  When D fits one chunk
(``D <= BLOCK_D``, every D ≤ 128 on the GPU) the stationary tile (Q in the
row-stationary kernels, K in the column-stationary one) is loaded once per
program, not once per tile pair, and the streamed tile that built S is reused
for the gradient product.

Paths and their cost
--------------------
One product of a (B, D) and a (D, M) operand, or of B×M by M×D, costs
2·B·M·D FLOPs; below, costs are in units of B·M·D (multiply-adds counted as 2
FLOPs) and "extra memory" is what a path allocates beyond its (B, D)/(M, D)
gradients.  "CLIP" is the symmetric InfoNCE (row and column LSE, q ≠ k);
"Gram" is q *is* k (same tensor, no index lists, no ranges, no column LSE:
NT-Xent's Z·Zᵀ, MV-InfoNCE, SupCon "all", DCL), where M = B.

===============================  ========  ==========================  =============================
path                             FLOPs     extra memory                 deterministic
===============================  ========  ==========================  =============================
forward, general                 2         n_slots·M fp32 (col LSE)     yes (slots merged by torch)
forward, Gram (pairs I ≤ J)      1         n_slots·B fp32 (row parts)   yes
backward, general, two kernels   8         T_M fp32 (dscale parts)      yes            ← default
  (S recomputed in dq and dk kernels; ×n_d S recomputes if D is split into n_d output chunks)
backward, general, atomic        6         M·D fp32 (dK accumulator)    no (fp32 atomics), opt-in
  (one S recompute; D ≤ 256)
backward, Gram, mirror           4         T_B fp32                     yes            ← default
  (all tiles (I, J), dZ_I += (dS_IJ + dS_JIᵀ)·Z_J; one kernel, no dK kernel)
backward, Gram, atomic           3         B·D fp32 (dZ accumulator)    no, opt-in
  (pairs I ≤ J once: dZ_I += A·Z_J, dZ_J += Aᵀ·Z_I with A = dS_IJ + dS_JIᵀ; D ≤ 256)
backward, Gram, split            8         T_B fp32                     yes
  (k holds q's values but is another tensor, e.g. z.detach(): the mirror kernel twice, dq then dk)
===============================  ========  ==========================  =============================

So symmetric CLIP costs 2 + 8 = 10·B·M·D by default and 2 + 6 = 8 with the
atomic backward; a Gram loss costs 1 + 4 = 5·B²·D by default (it was 2 + 8)
and 1 + 3 = 4 with the atomic backward.  (n_slots ≤ 2 × the SM count; T_B, T_M
are the numbers of row / column tiles.)

Which backward runs (``backward_path``): the deterministic kernels unless the
atomic path is asked for with ``BACKWARD = "atomic"`` (module attribute, or the
environment variable ``CONTRASTIVE_OPS_TRITON_BACKWARD=atomic`` at import) and
``torch.are_deterministic_algorithms_enabled()`` is off.  The deterministic
path is the default because the library promises the same numbers run after
run (and its tests compare bit patterns), and because the atomic path trades
2·B·M·D FLOPs for B/BLOCK_M·M·D fp32 atomic adds into L2, which on 16-bit
tensor cores is not obviously faster: it must be measured on the GPU before it
becomes the default.

Forward/backward consistency: the backward's P = exp(S − lse) is at most 1
only if each S it reads is bitwise the value the forward put into that row's
(column's) LSE — at logits ~1e8 one fp32 ulp is 8, so a different rounding
gives P up to e^8 or worse.  Hence every kernel forms S with ``_scaled_s``
(the same multiply, then a select, so the product is never contracted into an
FMA with a later subtraction: in the sm_90 PTX every ``mul.f32`` by the scale
feeds only ``selp.f32``); every backward sums D in the forward's chunks
(``_chunk_d``), the atomic ones included; and in a Gram matrix pair {a, b} has
the one value at (min, max) of the product with the lower-index tile on the
left, whichever tile pair or kernel reads it (the forward never uses a
diagonal tile's lower triangle; the backward transposes instead of
recomputing).  The element (a, b) of a product is then the same sum over D
whatever the tile shape: exactly so for fp32 (``ieee``: one FMA chain per
element); for 16-bit operands the autotuned forward and backward tiles may
differ, which relies on the tensor-core result of an element not depending on
the tile shape.  Two tensors with the same values (``z``, ``z.detach()``) take
the Gram forward, so their backward reads S the Gram way too (the Gram kernel
with ``TERMS`` 1 for dq and 2 for dk).

Layers (Liger style): the ``@triton.jit`` kernels → the custom ops
``contrastive_ops_triton::sim_lse_fwd`` / ``sim_lse_bwd``
(``torch.library.triton_op``, so ``torch.compile`` traces into the kernels) →
the launchers ``sim_lse_forward`` / ``sim_lse_backward`` → the primitive object
``SIM_LSE`` used by ``contrastive_ops.core._SimLSE``.

The Gram case is detected by the primitive, not by the core: ``q is k`` (the
same tensor object — ``_SimLSE`` passes ``q.contiguous()``/``k.contiguous()``,
which is one object when the loss passed one contiguous tensor, and autograd's
saved tensors keep that identity) selects the Gram backward, which returns the
whole gradient in ``dq`` and zeros in ``dk`` (autograd sums both into the one
tensor).  The forward also takes the Gram path for two different objects with
the same data pointer, shape, strides and dtype (e.g. ``z`` and ``z.detach()``),
whose backward takes the split Gram backward (dq and dk go to different places,
but S must be read as the Gram forward built it).  ``core.sim_lse``'s signature is unchanged.

The ops live in their own namespace ``contrastive_ops_triton``: the C++
extension owns ``TORCH_LIBRARY(contrastive_ops, m)``, and keeping the Triton
ops out of it means neither registration can depend on the other's load order.
"""
from __future__ import annotations

import collections
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# Tests flip this to allocate every kernel output filled with NaN, so a tile a
# kernel forgets to write shows up as NaN instead of as stale memory.
POISON_OUTPUTS = False

# "deterministic" (default) or "atomic": see the module docstring.
BACKWARD = os.environ.get("CONTRASTIVE_OPS_TRITON_BACKWARD", "deterministic")
_ATOMIC_MAX_D = 256  # the atomic kernels hold a BLOCK × next_pow2(D) fp32 accumulator

# Kernel launches by name (the tests read it to see which path ran).
LAUNCHES: collections.Counter = collections.Counter()


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags of ``tl.dot`` for inputs of ``dtype``.

    ``UPCAST``: bf16 ``tl.dot`` is wrong in Triton's interpreter, so there (and
    only there) bf16 tiles are upcast to fp32 before the product.
    ``PREC``: "ieee" for fp32 operands (exact fp32 products, no silent TF32);
    16-bit operands run on tensor cores whatever the value.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return dict(UPCAST=upcast, PREC=prec)


def _block_d(D: int) -> int:
    """Width of the D chunks of the SigLIP kernels (a power of two, at least 16)."""
    cap = 32 if interpreting() else 64
    return max(16, min(triton.next_power_of_2(D), cap))


def _block_do(D: int) -> int:
    """Width of the output D-chunks of the backward (one program per chunk recomputes S).

    On the GPU one chunk up to D = 128, so the common widths recompute S once
    per gradient; wider D splits (the fp32 accumulator stays ≤ BLOCK×128).
    Under the interpreter it equals BLOCK_D, so small tests cover several chunks.
    """
    if interpreting():
        return _block_d(D)
    return max(16, min(triton.next_power_of_2(D), 128))


def _chunk_d(D: int) -> int:
    """Width of the D chunks S is accumulated over in the sim_lse kernels.

    On the GPU every D ≤ 128 is one chunk (``ONE_CHUNK``: the stationary tile is
    loaded once per program); wider D streams 64-wide chunks.  Under the
    interpreter the cap is 32, so the tests see both the one-chunk (D ≤ 32) and
    the chunked layouts.
    """
    p2 = max(16, triton.next_power_of_2(D))
    if interpreting():
        return min(p2, 32)
    return p2 if p2 <= 128 else 64


def _d_pad(D: int) -> int:
    """Full padded width of the atomic kernels' tiles (S in one ``tl.dot``, D ≤ 256)."""
    return max(16, triton.next_power_of_2(D))


_SM_COUNT: dict = {}


def _slot_cap(device: torch.device) -> int:
    if device.type != "cuda":
        return 3
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def n_slots(device: torch.device, n_rows: int, min_block_m: int) -> int:
    """Programs of a persistent forward grid: ≤ 2× the SM count on a GPU, 3 under the interpreter."""
    return max(1, min(_slot_cap(device), triton.cdiv(n_rows, min_block_m)))


def n_pair_slots(device: torch.device, n_rows: int, min_block: int) -> int:
    """Programs of a persistent grid over the tile pairs I ≤ J of a Gram matrix."""
    t = triton.cdiv(n_rows, min_block)
    return max(1, min(_slot_cap(device), t * (t + 1) // 2))


# "tune" (default): autotune over each kernel's GPU list; "default": its first config only
# (one compile per kernel and specialization, for test, sanitizer and smoke runs).
CONFIGS = os.environ.get("CONTRASTIVE_OPS_TRITON_CONFIGS", "tune")


def _configs(block_names, gpu_choices, interp_choice) -> List[triton.Config]:
    """Autotune configs: a Hopper-oriented sweep on the GPU, one small config under the interpreter."""
    if interpreting():
        return [triton.Config(dict(zip(block_names, interp_choice)), num_warps=1, num_stages=1)]
    if CONFIGS not in ("tune", "default"):
        raise ValueError(f"CONTRASTIVE_OPS_TRITON_CONFIGS must be 'tune' or 'default', got {CONFIGS!r}")
    if CONFIGS == "default":
        gpu_choices = gpu_choices[:1]
    out = []
    for blocks, warps, stages in gpu_choices:
        out.append(triton.Config(dict(zip(block_names, blocks)), num_warps=warps, num_stages=stages))
    return out


# (BLOCK_M, BLOCK_N) tiles of S for H100: 128×128 / 128×64 / 64×128 with 4–8 warps
# and 2–4 pipeline stages.  With one D chunk up to 128 wide the stationary tile
# stays in shared memory (≤ 32 KiB in 16-bit, 64 KiB in fp32) beside the
# pipelined streamed tiles; configs that do not fit the 228 KiB are dropped by
# the autotuner (OutOfResources counts as an infinite time).
_FWD_GPU = [
    ((128, 128), 8, 3), ((128, 128), 8, 4), ((128, 64), 4, 3), ((128, 64), 8, 4),
    ((64, 128), 4, 3), ((64, 64), 4, 4), ((64, 64), 4, 2), ((128, 128), 4, 2),
]
_BWD_GPU = [
    ((128, 64), 8, 3), ((64, 128), 8, 3), ((64, 64), 4, 3), ((128, 128), 8, 2),
    ((64, 64), 4, 2), ((32, 128), 4, 3),
]
# Atomic backward: full-width (≤ 256) tiles of Q and K, a BLOCK_M × D fp32 dQ
# accumulator and a BLOCK_N × D dK product per step, so smaller tiles and few stages.
_BWD_ATOMIC_GPU = [
    ((64, 64), 4, 2), ((64, 64), 8, 2), ((128, 64), 8, 2), ((128, 32), 8, 2), ((64, 32), 4, 2),
]
# Square tiles (BLOCK) of the Gram kernels: tile I and tile J index the same rows.
_SYM_FWD_GPU = [((128,), 8, 3), ((128,), 8, 2), ((128,), 4, 3), ((64,), 4, 3), ((64,), 4, 4)]
_SYM_BWD_GPU = [((128,), 8, 2), ((64,), 4, 3), ((64,), 8, 2), ((64,), 4, 2), ((32,), 4, 3)]
_SYM_ATOMIC_GPU = [((64,), 4, 2), ((64,), 8, 2), ((128,), 8, 1), ((32,), 4, 2)]
_MIN_BLOCK = 32  # smallest BLOCK_M / BLOCK_N / BLOCK of every config list (grid sizing)
_INTERP_BLOCK = (32, 32)
_INTERP_SYM = (32,)


# ---------------------------------------------------------------------------
# Shared tile helpers
# ---------------------------------------------------------------------------


@triton.jit
def _load_tile(X, x_rows, mask, offs_d, D, stride, UPCAST: tl.constexpr):
    """Tile X[x_rows][:, offs_d] (zero outside the matrix and beyond D), upcast to fp32 if ``UPCAST``."""
    x = tl.load(X + x_rows[:, None] * stride + offs_d[None, :], mask=mask[:, None] & (offs_d < D)[None, :],
                other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Unscaled tile Q[q_rows] · K[k_rows]ᵀ (BLOCK_M, BLOCK_N) in fp32, over D in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        a = tl.load(Q + q_rows[:, None] * stride_q + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        b = tl.load(K + k_rows[:, None] * stride_k + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def _scaled_s(s_raw, scale, ok):
    """S = s_raw·scale on allowed pairs, −inf elsewhere: the ONE way every kernel forms S.

    At huge logits (|S| ~ 1e8, fp32 ulp 8) the backward's P = exp(S − lse) is
    only ≤ 1 if its S is bitwise the forward's, so forward and backward share
    this helper (the same product, the same multiply; the select between the
    multiply and any later subtraction also keeps the compiler from contracting
    ``s_raw·scale − lse`` into an FMA in one kernel and not in another).
    """
    return tl.where(ok, s_raw * scale, float("-inf"))


@triton.jit
def _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE: tl.constexpr, N_EXCLUDE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: inside the matrix, inside [col_start, col_end), not excluded."""
    ok = row_mask[:, None] & col_mask[None, :]
    if HAS_RANGE:
        ok = ok & (cols[None, :] >= cs[:, None]) & (cols[None, :] < ce[:, None])
    if N_EXCLUDE >= 1:
        ok = ok & (cols[None, :] != e0[:, None])
    if N_EXCLUDE >= 2:
        ok = ok & (cols[None, :] != e1[:, None])
    return ok


@triton.jit
def _allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE: tl.constexpr):
    """Gram matrices: (BLOCK_I, BLOCK_J) mask of the *transposed* pairs, True where column i is
    allowed for row j (row j's own exclusions), laid out like the tile S_IJ."""
    ok = mask_i[:, None] & mask_j[None, :]
    if N_EXCLUDE >= 1:
        ok = ok & (rows_i[:, None] != e0_j[None, :])
    if N_EXCLUDE >= 2:
        ok = ok & (rows_i[:, None] != e1_j[None, :])
    return ok


@triton.jit
def _row_tile(t, B, RowIndex, ColStart, ColEnd, Exclude,
              BLOCK_M: tl.constexpr, HAS_ROW_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
              N_EXCLUDE: tl.constexpr):
    """Rows of row tile ``t``: positions, mask, rows of q (int64), range bounds, exclusions."""
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    if HAS_ROW_INDEX:
        q_rows = tl.load(RowIndex + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        q_rows = rows.to(tl.int64)
    if HAS_RANGE:
        cs = tl.load(ColStart + rows, mask=row_mask, other=0)
        ce = tl.load(ColEnd + rows, mask=row_mask, other=0)
    else:
        cs = rows
        ce = rows
    if N_EXCLUDE >= 1:
        e0 = tl.load(Exclude + rows * N_EXCLUDE, mask=row_mask, other=-1)
    else:
        e0 = rows
    if N_EXCLUDE >= 2:
        e1 = tl.load(Exclude + rows * N_EXCLUDE + 1, mask=row_mask, other=-1)
    else:
        e1 = e0
    return rows, row_mask, q_rows, cs, ce, e0, e1


@triton.jit
def _col_tile(n0, M, ColIndex, BLOCK_N: tl.constexpr, HAS_COL_INDEX: tl.constexpr):
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    if HAS_COL_INDEX:
        k_rows = tl.load(ColIndex + cols, mask=col_mask, other=0).to(tl.int64)
    else:
        k_rows = cols.to(tl.int64)
    return cols, col_mask, k_rows


@triton.jit
def _col_bounds(row_mask, cs, ce, M, BLOCK_N: tl.constexpr, HAS_RANGE: tl.constexpr):
    """Column tiles a row tile must visit: from its rows' smallest start to their largest end."""
    if HAS_RANGE:
        nonempty = row_mask & (ce > cs)
        lo = tl.maximum(tl.min(tl.where(nonempty, cs, M), 0), 0)
        hi = tl.minimum(tl.max(tl.where(nonempty, ce, 0), 0), M)
        lo = (lo // BLOCK_N) * BLOCK_N
    else:
        lo = 0
        hi = M
    return lo, hi


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


@triton.jit
def _pair_range(pid, nprog, T):
    """Share of program ``pid`` of the T·(T+1)/2 tile pairs I ≤ J of a Gram matrix.

    The pairs are numbered row-major over the upper triangle (row tile I holds
    pairs off(I) .. off(I+1)−1 with off(I) = I·T − I·(I−1)/2); each program takes
    one contiguous run [p0, p1) of equal length, so the work is balanced
    whatever T (a row-tile-per-program split would give tile 0 T times the work
    of tile T−1).  Returns p0, p1 and the first pair (I, J).
    """
    total = T * (T + 1) // 2
    per = tl.cdiv(total, nprog)
    p0 = tl.minimum(pid * per, total)
    p1 = tl.minimum(p0 + per, total)
    ti = pid * 0
    while (ti < T - 1) & ((ti + 1) * T - ((ti + 1) * ti) // 2 <= p0):
        ti += 1
    tj = ti + p0 - (ti * T - (ti * (ti - 1)) // 2)
    return p0, p1, ti, tj


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
# Online log-sum-exp (one pass over S).  For row i, after visiting column tiles
# 1..t with running max m and running sum l = Σ exp(S_ij − m):
#     m' = max(m, max_j S_ij),   l' = l·exp(m − m') + Σ_j exp(S_ij − m'),
# and row_lse = m + log l at the end (−inf when l = 0: nothing allowed).
# Disallowed pairs enter as S = −inf, i.e. exp(·) = 0; m is replaced by 0 while
# it is still −inf so that no −inf − (−inf) = NaN ever appears.
#
# Column LSE in the SAME pass: the program that owns a row tile also knows the
# tile's column partial c_j = LSE_{i in tile} S_ij; it folds c_j into its own
# slot of ColPart (n_slots, M) with logaddexp.  Slots are merged afterwards by
# col_lse = LSE over slots.  A slot is only touched by its program, so no
# atomics; the grid is persistent (n_slots programs loop over row tiles), which
# bounds the buffer to O(n_slots·M) and never B×M.  Each program first fills its
# slot with −inf, so the buffer needs no initialisation and re-running the
# kernel (autotuning) is idempotent.
@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N"), _FWD_GPU, _INTERP_BLOCK),
                 key=["D", "HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL"])
@triton.jit
def _sim_lse_fwd_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColPart,
    B, M, D, stride_q, stride_k,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(Scale)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slot = ColPart + pid.to(tl.int64) * M
    if WANT_COL:
        for n0 in range(0, M, BLOCK_N):
            tl.store(slot + n0 + offs_n, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=n0 + offs_n < M)
        tl.debug_barrier()
    for t in range(pid, tl.cdiv(B, BLOCK_M), nprog):
        rows, row_mask, q_rows, cs, ce, e0, e1 = _row_tile(
            t, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
        lo, hi = _col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
        if ONE_CHUNK:  # the Q tile is loaded once per row tile
            q_tile = _load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols, col_mask, k_rows = _col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
            if ONE_CHUNK:
                k_tile = _load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
                s_raw = tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC)
            else:
                s_raw = _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
                                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
            ok = _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
            s = _scaled_s(s_raw, scale, ok)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
            if WANT_COL:
                c_max = tl.max(s, 0)
                c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
                c_lse = c_safe + tl.log(tl.sum(tl.exp(s - c_safe[None, :]), 0))
                old = tl.load(slot + cols, mask=col_mask, other=float("-inf"))
                tl.store(slot + cols, _logaddexp(old, c_lse), mask=col_mask)
                # the next row tile re-reads these columns, possibly from other threads
                tl.debug_barrier()
        lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
        tl.store(RowLse + rows, lse, mask=row_mask)


# Gram forward (q is k, M = B, no index lists, no ranges, row LSE only).  S is
# symmetric, so each tile pair I ≤ J is built once, and each pair {a, b} of rows
# has ONE value: entry (min, max) of the tile product Z_I·Z_Jᵀ with the
# lower-index tile on the left (``_canonical``; the two fp32 roundings of
# z_a·z_b and z_b·z_a may differ, by up to 8 at logits ~1e8, and the backward
# must use for each row exactly the values its LSE was built from):
#   * row tile I's statistics take S_IJ[a, b] for b ≥ a with row I's
#     exclusions, online in registers as above;
#   * row tile J's statistics take S_IJ[a, b] for a < b, i.e. the column
#     reduction of the strict upper part of S_IJ with row J's exclusions
#     (``_allowed_t``), folded with logaddexp into the program's slot of
#     RowPart (n_slots, B) — exactly the column-partial scheme of the general
#     kernel.  For J > I every entry has a < b; on the diagonal tile this is
#     the strict upper triangle, so the lower triangle is never used;
#   * when a program leaves row tile I (end of the row or of its run of pairs)
#     it folds I's registers into the same slot.
# row_lse = LSE over slots (torch).  Half the tile products of the general
# kernel; deterministic (each slot has one writer, fixed order).
@triton.autotune(configs=_configs(("BLOCK",), _SYM_FWD_GPU, _INTERP_SYM), key=["D", "N_EXCLUDE"])
@triton.jit
def _sim_lse_gram_fwd_kernel(
    Z, Scale, Exclude, RowPart, B, D, stride_z,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(Scale)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    slot = RowPart + pid.to(tl.int64) * B
    for n0 in range(0, B, BLOCK):
        tl.store(slot + n0 + offs, tl.full((BLOCK,), float("-inf"), tl.float32), mask=n0 + offs < B)
    tl.debug_barrier()
    T = tl.cdiv(B, BLOCK)
    p0, p1, ti, tj = _pair_range(pid, nprog, T)
    if ONE_CHUNK:
        zi = _load_tile(Z, (ti * BLOCK + offs).to(tl.int64), ti * BLOCK + offs < B, offs_d, D, stride_z, UPCAST)
    m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK,), tl.float32)
    for p in range(p0, p1):
        rows_i, mask_i, z_rows_i, cs, ce, e0_i, e1_i = _row_tile(
            ti, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = _row_tile(
            tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        if ONE_CHUNK:
            zj = _load_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST)
            s_raw = tl.dot(zi, tl.trans(zj), input_precision=PREC)
        else:
            s_raw = _s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z,
                            BLOCK, BLOCK, BLOCK_D, UPCAST, PREC)
        # rows of I against columns J: entries b ≥ a (all of them when J > I)
        ok_r = _allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
        s_r = _scaled_s(s_raw, scale, ok_r & (rows_i[:, None] <= rows_j[None, :]))
        m_new = tl.maximum(m_i, tl.max(s_r, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s_r - m_safe[:, None]), 1)
        m_i = m_new
        # rows of J against columns I: the mirrored entries a < b
        ok_c = _allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
        s_c = _scaled_s(s_raw, scale, ok_c & (rows_i[:, None] < rows_j[None, :]))
        c_max = tl.max(s_c, 0)
        c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
        c_lse = c_safe + tl.log(tl.sum(tl.exp(s_c - c_safe[None, :]), 0))
        old = tl.load(slot + rows_j, mask=mask_j, other=float("-inf"))
        tl.store(slot + rows_j, _logaddexp(old, c_lse), mask=mask_j)
        tl.debug_barrier()
        if (tj == T - 1) | (p == p1 - 1):  # leaving row tile I: fold its registers into the slot
            lse = tl.where(l_i > 0, m_i + tl.log(l_i), float("-inf"))
            old = tl.load(slot + rows_i, mask=mask_i, other=float("-inf"))
            tl.store(slot + rows_i, _logaddexp(old, lse), mask=mask_i)
            tl.debug_barrier()
            m_i = tl.full((BLOCK,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK,), tl.float32)
        tj += 1
        if tj == T:
            ti += 1
            tj = ti
            if ONE_CHUNK:
                zi = _load_tile(Z, (ti * BLOCK + offs).to(tl.int64), ti * BLOCK + offs < B, offs_d, D, stride_z,
                                UPCAST)


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
# With P_row = exp(S − row_lse[:, None]), P_col = exp(S − col_lse[None, :]):
#     ∂L/∂S_ij = dS_ij = g_row_i·P_row_ij + g_col_j·P_col_ij    (allowed pairs, else 0)
# and S = scale·Q Kᵀ gives
#     dQ = scale·dS K,   dK = scale·dSᵀ Q,   dscale = Σ_ij dS_ij·(Q Kᵀ)_ij.
# An LSE of −inf (empty set) is replaced by +inf, so its P is exp(−inf) = 0 and
# contributes no gradient.  P is recomputed from the saved LSEs; the tile of dS
# is cast to the input dtype for the second product (fp32 for fp32 inputs).


@triton.jit
def _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL: tl.constexpr):
    s = _scaled_s(s_raw, scale, ok)
    lse_r = tl.where(lse_r == float("-inf"), float("inf"), lse_r)
    ds = g_r[:, None] * tl.exp(s - lse_r[:, None])
    if WANT_COL:
        lse_c = tl.load(ColLse + cols, mask=col_mask, other=float("-inf"))
        lse_c = tl.where(lse_c == float("-inf"), float("inf"), lse_c)
        g_c = tl.load(GradCol + cols, mask=col_mask, other=0.0)
        ds += g_c[None, :] * tl.exp(s - lse_c[None, :])
    return tl.where(ok, ds, 0.0)


# Row-stationary: one program per (row tile, output D-chunk) streams the column
# tiles, recomputing S over the full D, and accumulates dQ rows of its chunk
# in fp32; the chunk-0 program also sums dS·(Q Kᵀ) for dscale (one partial per
# row tile, summed by torch: deterministic).  ONE_CHUNK: the Q tile is loaded
# once; REUSE (one chunk that is also the single output chunk): the K tile
# that built S is the operand of dS·K.
@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N"), _BWD_GPU, _INTERP_BLOCK),
                 key=["D", "HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL"])
@triton.jit
def _sim_lse_bwd_dq_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DQ, DscalePart,
    B, M, D, stride_q, stride_k, stride_dq,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1 = _row_tile(
        pid_m, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lo, hi = _col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
    lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
    g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_mask = offs_o < D
    if ONE_CHUNK:
        q_tile = _load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols, col_mask, k_rows = _col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
        if ONE_CHUNK:
            k_tile = _load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
            s_raw = tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC)
        else:
            s_raw = _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
        ok = _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
        dscale += tl.sum(ds * s_raw, 1)
        if REUSE:
            kt = k_tile
        else:
            kt = _load_tile(K, k_rows, col_mask, offs_o, D, stride_k, UPCAST)
        acc = tl.dot(ds.to(kt.dtype), kt, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DQ + q_rows[:, None] * stride_dq + offs_o[None, :], acc.to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & o_mask[None, :])
    if pid_d == 0:
        tl.store(DscalePart + pid_m, tl.sum(dscale, 0))


# Column-stationary: one program per (column tile, output D-chunk) streams the
# row tiles (skipping those whose ranges miss its columns) and accumulates dK
# = scale·dSᵀ Q for its chunk.  Recomputing S here instead of atomically adding
# into dK keeps both gradients deterministic.  ONE_CHUNK: the K tile is loaded
# once; REUSE: the Q tile that built S is the operand of dSᵀ·Q.
@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N"), _BWD_GPU, _INTERP_BLOCK),
                 key=["D", "HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL"])
@triton.jit
def _sim_lse_bwd_dk_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DK,
    B, M, D, stride_q, stride_k, stride_dk,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    n0 = pid_n * BLOCK_N
    cols, col_mask, k_rows = _col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_mask = offs_o < D
    if ONE_CHUNK:
        k_tile = _load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for t in range(0, tl.cdiv(B, BLOCK_M)):
        rows, row_mask, q_rows, cs, ce, e0, e1 = _row_tile(
            t, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
        lo, hi = _col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
        if (lo < n0 + BLOCK_N) & (hi > n0):
            if ONE_CHUNK:
                q_tile = _load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
                s_raw = tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC)
            else:
                s_raw = _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
                                BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
            ok = _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
            lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
            g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
            ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
            if REUSE:
                qt = q_tile
            else:
                qt = _load_tile(Q, q_rows, row_mask, offs_o, D, stride_q, UPCAST)
            acc = tl.dot(tl.trans(ds.to(qt.dtype)), qt, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DK + k_rows[:, None] * stride_dk + offs_o[None, :], acc.to(DK.dtype.element_ty),
             mask=col_mask[:, None] & o_mask[None, :])


# Single-recompute backward (opt-in, D ≤ 256): one row-stationary program per
# row tile holds the whole padded width BLOCK_DP of Q and K tiles, builds S
# exactly as the forward does (one ``tl.dot`` when D is one chunk, else the
# forward's BLOCK_D chunks re-read from memory), keeps dQ in a BLOCK_M × BLOCK_DP fp32 accumulator and
# emits dK_J += scale·dS_IJᵀ·Q_I for every column tile it visits with fp32
# atomics into DKAcc (k.shape, fp32, zeroed; cast by torch afterwards).
# 6·B·M·D instead of 8 (S is built once, not once per gradient).
#
# Why atomics and not per-program slot buffers: every row tile contributes to
# every column tile of dK, so a deterministic slot scheme needs one (M, D) fp32
# buffer per concurrently running program — n_slots·M·D·4 bytes, e.g.
# 264 · 65536 · 256 · 4 B = 17.7 GB on an H100 — against the O((B+M)·D) memory
# promise.  The order of the fp32 atomic adds varies from run to run, so dK
# is reproducible only to rounding: the path is never taken when
# ``torch.are_deterministic_algorithms_enabled()``.
@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_N"), _BWD_ATOMIC_GPU, _INTERP_BLOCK),
                 key=["D", "HAS_ROW_INDEX", "HAS_COL_INDEX", "HAS_RANGE", "N_EXCLUDE", "WANT_COL"],
                 reset_to_zero=["DKAcc"])
@triton.jit
def _sim_lse_bwd_atomic_kernel(
    Q, K, Scale, RowIndex, ColIndex, ColStart, ColEnd, Exclude, RowLse, ColLse, GradRow, GradCol,
    DQ, DKAcc, DscalePart,
    B, M, D, stride_q, stride_k, stride_dq, stride_acc,
    HAS_ROW_INDEX: tl.constexpr, HAS_COL_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr,
    N_EXCLUDE: tl.constexpr, WANT_COL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    scale = tl.load(Scale)
    rows, row_mask, q_rows, cs, ce, e0, e1 = _row_tile(
        pid_m, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lo, hi = _col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
    lse_r = tl.load(RowLse + rows, mask=row_mask, other=float("-inf"))
    g_r = tl.load(GradRow + rows, mask=row_mask, other=0.0)
    offs_d = tl.arange(0, BLOCK_DP)
    d_mask = offs_d < D
    q_tile = _load_tile(Q, q_rows, row_mask, offs_d, D, stride_q, UPCAST)
    acc = tl.zeros((BLOCK_M, BLOCK_DP), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols, col_mask, k_rows = _col_tile(n0, M, ColIndex, BLOCK_N, HAS_COL_INDEX)
        k_tile = _load_tile(K, k_rows, col_mask, offs_d, D, stride_k, UPCAST)
        if ONE_CHUNK:  # BLOCK_DP == BLOCK_D: the forward's single product
            s_raw = tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC)
        else:  # the forward's BLOCK_D chunks, in its order (one wide product rounds differently)
            s_raw = _s_tile(Q, K, q_rows, k_rows, row_mask, col_mask, D, stride_q, stride_k,
                            BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, PREC)
        ok = _allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE, N_EXCLUDE)
        ds = _ds_tile(s_raw, scale, ok, lse_r, g_r, ColLse, GradCol, cols, col_mask, WANT_COL)
        dscale += tl.sum(ds * s_raw, 1)
        ds_lo = ds.to(k_tile.dtype)
        acc = tl.dot(ds_lo, k_tile, acc, input_precision=PREC)
        dk = tl.dot(tl.trans(ds_lo), q_tile, input_precision=PREC) * scale
        tl.atomic_add(DKAcc + k_rows[:, None] * stride_acc + offs_d[None, :], dk,
                      mask=col_mask[:, None] & d_mask[None, :])
    acc = acc * scale
    tl.store(DQ + q_rows[:, None] * stride_dq + offs_d[None, :], acc.to(DQ.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])
    tl.store(DscalePart + pid_m, tl.sum(dscale, 0))


# Gram backward (q is k).  With only row LSEs, dS_ij = g_i·exp(S_ij − lse_i) on
# pairs allowed for row i, and the gradient of the one feature tensor Z is
#     dZ = scale·(dS + dSᵀ)·Z,   i.e.  dZ_I = scale·Σ_J A_IJ·Z_J,  A_IJ = dS_IJ + (dS_JI)ᵀ,
# where both dS_IJ (row I's statistics and exclusions) and (dS_JI)ᵀ (row J's)
# are read off the one tile S_IJ = S_JIᵀ.  dscale = Σ_ij dS_ij·(Z Zᵀ)_ij.
#
# Every S value is the forward's (see the Gram forward): pair {a, b} is entry
# (min, max) of Z_I·Z_Jᵀ with I ≤ J.  So a kernel that needs the tile pair
# with I > J builds Z_J·Z_Iᵀ and works in its transposed layout, and on a
# diagonal tile the lower triangle is replaced by the transposed upper one
# (``_canonical``), never recomputed as its own dot product.


@triton.jit
def _canonical(s_raw, rows_i, rows_j):
    """Diagonal tile (rows_i == rows_j): entry (a, b) of the symmetric S taken from (min, max)."""
    return tl.where(rows_i[:, None] <= rows_j[None, :], s_raw, tl.trans(s_raw))


@triton.jit
def _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j):
    """dS_IJ and (dS_JI)ᵀ, both laid out like the tile S_IJ (rows I, columns J)."""
    lse_i = tl.where(lse_i == float("-inf"), float("inf"), lse_i)
    lse_j = tl.where(lse_j == float("-inf"), float("inf"), lse_j)
    ds = tl.where(ok, g_i[:, None] * tl.exp(_scaled_s(s_raw, scale, ok) - lse_i[:, None]), 0.0)
    ds_t = tl.where(ok_t, g_j[None, :] * tl.exp(_scaled_s(s_raw, scale, ok_t) - lse_j[None, :]), 0.0)
    return ds, ds_t


# Deterministic Gram backward: row-stationary over ALL column tiles J (not
# only J ≥ I), so dZ_I is complete in one program's registers and written
# once, with no dK kernel: S once + one product = 4·B²·D (the general path
# spends 8).  One program per (row tile, output D-chunk) as in the dq kernel.
# For J < I the tile is built as Z_J·Z_Iᵀ (the forward's order) and used
# transposed: A_IJ·Z_J = (A_JI)ᵀ·Z_J with A_JI laid out like that tile.
#
# TERMS selects the gradient: 3 (q is k) the whole A = dS_IJ + (dS_JI)ᵀ;
# 1 only dS_IJ (dq = scale·dS·K of a key that holds the same values but is a
# different tensor for autograd, e.g. z.detach()); 2 only (dS_JI)ᵀ (its dk =
# scale·dSᵀ·Q).  The forward took the Gram path for those too, so their
# backward must read the same canonical S.
@triton.autotune(configs=_configs(("BLOCK",), _SYM_BWD_GPU, _INTERP_SYM), key=["D", "N_EXCLUDE", "TERMS"])
@triton.jit
def _sim_lse_gram_bwd_kernel(
    Z, Scale, Exclude, RowLse, GradRow, DZ, DscalePart,
    B, D, stride_z, stride_dz,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ONE_CHUNK: tl.constexpr, REUSE: tl.constexpr,
    TERMS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    scale = tl.load(Scale)
    ti = pid_m
    rows_i, mask_i, z_rows_i, cs, ce, e0_i, e1_i = _row_tile(
        ti, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
    lse_i = tl.load(RowLse + rows_i, mask=mask_i, other=float("-inf"))
    g_i = tl.load(GradRow + rows_i, mask=mask_i, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    o_mask = offs_o < D
    if ONE_CHUNK:
        zi = _load_tile(Z, z_rows_i, mask_i, offs_d, D, stride_z, UPCAST)
    acc = tl.zeros((BLOCK, BLOCK_DO), tl.float32)
    dscale = tl.zeros((BLOCK,), tl.float32)
    for tj in range(0, tl.cdiv(B, BLOCK)):
        rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = _row_tile(
            tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        lse_j = tl.load(RowLse + rows_j, mask=mask_j, other=float("-inf"))
        g_j = tl.load(GradRow + rows_j, mask=mask_j, other=0.0)
        if ONE_CHUNK:
            zj = _load_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST)
        if REUSE:
            zo = zj
        else:
            zo = _load_tile(Z, z_rows_j, mask_j, offs_o, D, stride_z, UPCAST)
        if tj >= ti:  # the forward's tile Z_I·Z_Jᵀ, rows I
            if ONE_CHUNK:
                s_raw = tl.dot(zi, tl.trans(zj), input_precision=PREC)
            else:
                s_raw = _s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z,
                                BLOCK, BLOCK, BLOCK_D, UPCAST, PREC)
            if tj == ti:
                s_raw = _canonical(s_raw, rows_i, rows_j)
            ok = _allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
            ok_t = _allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
            ds, ds_t = _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j)
            dscale += tl.sum(ds * s_raw, 1)
            if TERMS == 3:
                a = ds + ds_t
            elif TERMS == 1:
                a = ds
            else:
                a = ds_t
            acc = tl.dot(a.to(zo.dtype), zo, acc, input_precision=PREC)
        else:  # the forward's tile Z_J·Z_Iᵀ, rows J: every quantity below is laid out (J, I)
            if ONE_CHUNK:
                s_raw = tl.dot(zj, tl.trans(zi), input_precision=PREC)
            else:
                s_raw = _s_tile(Z, Z, z_rows_j, z_rows_i, mask_j, mask_i, D, stride_z, stride_z,
                                BLOCK, BLOCK, BLOCK_D, UPCAST, PREC)
            ok = _allowed(rows_i, mask_j, mask_i, cs, ce, e0_j, e1_j, False, N_EXCLUDE)
            ok_t = _allowed_t(rows_j, mask_j, mask_i, e0_i, e1_i, N_EXCLUDE)
            ds_j, ds_it = _gram_ds(s_raw, scale, ok, ok_t, lse_j, g_j, lse_i, g_i)  # dS_JI, (dS_IJ)ᵀ
            dscale += tl.sum(ds_it * s_raw, 0)
            if TERMS == 3:
                a_t = ds_j + ds_it
            elif TERMS == 1:
                a_t = ds_it
            else:
                a_t = ds_j
            acc = tl.dot(tl.trans(a_t.to(zo.dtype)), zo, acc, input_precision=PREC)
    acc = acc * scale
    tl.store(DZ + z_rows_i[:, None] * stride_dz + offs_o[None, :], acc.to(DZ.dtype.element_ty),
             mask=mask_i[:, None] & o_mask[None, :])
    if pid_d == 0:
        tl.store(DscalePart + pid_m, tl.sum(dscale, 0))


# Atomic Gram backward (opt-in, D ≤ 256): each pair I ≤ J once (the balanced
# pair runs of ``_pair_range``), S_IJ built once as the forward builds it
# (its D chunks; on the diagonal tile the lower triangle is the transposed
# upper one, ``_canonical``), then
#     dZ_I += A_IJ·Z_J   (registers, flushed with one atomic add when leaving I)
#     dZ_J += A_IJᵀ·Z_I  (J > I: fp32 atomics into DZAcc)
# with A_IJ = dS_IJ + (dS_JI)ᵀ; on the diagonal tile A_II already holds both
# directions, so only the first update applies.  3·B²·D; dscale sums dS_IJ
# over the diagonal tile and A_IJ over the others (each pair of S counted once
# per direction).  Not deterministic (atomic order): see the general atomic kernel.
@triton.autotune(configs=_configs(("BLOCK",), _SYM_ATOMIC_GPU, _INTERP_SYM), key=["D", "N_EXCLUDE"],
                 reset_to_zero=["DZAcc"])
@triton.jit
def _sim_lse_gram_bwd_atomic_kernel(
    Z, Scale, Exclude, RowLse, GradRow, DZAcc, DscalePart,
    B, D, stride_z, stride_acc,
    N_EXCLUDE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_DP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scale = tl.load(Scale)
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_DP)
    d_mask = offs_d < D
    T = tl.cdiv(B, BLOCK)
    p0, p1, ti, tj = _pair_range(pid, nprog, T)
    zi = _load_tile(Z, (ti * BLOCK + offs).to(tl.int64), ti * BLOCK + offs < B, offs_d, D, stride_z, UPCAST)
    acc = tl.zeros((BLOCK, BLOCK_DP), tl.float32)
    dscale = tl.zeros((BLOCK,), tl.float32)
    for p in range(p0, p1):
        rows_i, mask_i, z_rows_i, cs, ce, e0_i, e1_i = _row_tile(
            ti, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        rows_j, mask_j, z_rows_j, cs, ce, e0_j, e1_j = _row_tile(
            tj, B, Exclude, Exclude, Exclude, Exclude, BLOCK, False, False, N_EXCLUDE)
        zj = _load_tile(Z, z_rows_j, mask_j, offs_d, D, stride_z, UPCAST)
        if ONE_CHUNK:  # S_IJ as the Gram forward builds it (see the general atomic kernel)
            s_raw = tl.dot(zi, tl.trans(zj), input_precision=PREC)
        else:
            s_raw = _s_tile(Z, Z, z_rows_i, z_rows_j, mask_i, mask_j, D, stride_z, stride_z,
                            BLOCK, BLOCK, BLOCK_D, UPCAST, PREC)
        if tj == ti:
            s_raw = _canonical(s_raw, rows_i, rows_j)
        ok = _allowed(rows_j, mask_i, mask_j, cs, ce, e0_i, e1_i, False, N_EXCLUDE)
        ok_t = _allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE)
        lse_i = tl.load(RowLse + rows_i, mask=mask_i, other=float("-inf"))
        g_i = tl.load(GradRow + rows_i, mask=mask_i, other=0.0)
        lse_j = tl.load(RowLse + rows_j, mask=mask_j, other=float("-inf"))
        g_j = tl.load(GradRow + rows_j, mask=mask_j, other=0.0)
        ds, ds_t = _gram_ds(s_raw, scale, ok, ok_t, lse_i, g_i, lse_j, g_j)
        a = ds + ds_t
        dscale += tl.sum(tl.where(tj == ti, ds, a) * s_raw, 1)
        a_lo = a.to(zj.dtype)
        acc = tl.dot(a_lo, zj, acc, input_precision=PREC)
        if tj > ti:
            dzj = tl.dot(tl.trans(a_lo), zi, input_precision=PREC) * scale
            tl.atomic_add(DZAcc + z_rows_j[:, None] * stride_acc + offs_d[None, :], dzj,
                          mask=mask_j[:, None] & d_mask[None, :])
        if (tj == T - 1) | (p == p1 - 1):  # leaving row tile I
            tl.atomic_add(DZAcc + z_rows_i[:, None] * stride_acc + offs_d[None, :], acc * scale,
                          mask=mask_i[:, None] & d_mask[None, :])
            acc = tl.zeros((BLOCK, BLOCK_DP), tl.float32)
        tj += 1
        if tj == T:
            ti += 1
            tj = ti
            zi = _load_tile(Z, (ti * BLOCK + offs).to(tl.int64), ti * BLOCK + offs < B, offs_d, D, stride_z,
                            UPCAST)
    tl.store(DscalePart + pid, tl.sum(dscale, 0))


# ---------------------------------------------------------------------------
# Custom ops and launchers
# ---------------------------------------------------------------------------


def _flags(q, row_index, col_index, col_start, col_end, exclude, want_col) -> dict:
    return dict(
        HAS_ROW_INDEX=row_index is not None,
        HAS_COL_INDEX=col_index is not None,
        HAS_RANGE=col_start is not None or col_end is not None,
        N_EXCLUDE=0 if exclude is None else int(exclude.shape[1]),
        WANT_COL=bool(want_col),
        **_dot_flags(q.dtype),
    )


def _sizes(q, k, row_index, col_index) -> Tuple[int, int, int]:
    B = q.shape[0] if row_index is None else row_index.shape[0]
    M = k.shape[0] if col_index is None else col_index.shape[0]
    return B, M, q.shape[1]


def _ranges(q, B, M, col_start, col_end):
    """Fill in the missing half of a range with its default (0 or M)."""
    if col_start is None and col_end is None:
        return None, None
    if col_start is None:
        col_start = torch.zeros(B, dtype=torch.int32, device=q.device)
    if col_end is None:
        col_end = torch.full((B,), M, dtype=torch.int32, device=q.device)
    return col_start, col_end


def _ptr(t: Optional[Tensor], fallback: Tensor) -> Tensor:
    """Kernels take every pointer; a flag off means the argument is never read."""
    return fallback if t is None else t


def _launch(name: str, kernel, grid):
    """``wrap_triton(kernel)[grid]``, counted in ``LAUNCHES``."""
    LAUNCHES[name] += 1
    return torch.library.wrap_triton(kernel)[grid]


def _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col) -> bool:
    """The Gram kernels cover q is k with no index lists, no ranges and no column LSE."""
    return (bool(gram) and row_index is None and col_index is None and col_start is None
            and col_end is None and not want_col and q.shape == k.shape)


def same_values(q: Tensor, k: Tensor) -> bool:
    """True when ``q`` and ``k`` hold the same values: the same tensor, or two views of one
    storage with the same data pointer, shape, strides and dtype.  Fake tensors (tracing)
    have no data pointer: there only ``q is k`` counts."""
    if q is k:
        return True
    if torch.compiler.is_compiling():
        return False
    try:
        return (q.device == k.device and q.dtype == k.dtype and q.shape == k.shape
                and q.stride() == k.stride() and q.data_ptr() == k.data_ptr())
    except RuntimeError:
        return False


def backward_path(D: int) -> str:
    """``"atomic"`` or ``"deterministic"``: which backward the launcher takes (module docstring)."""
    if BACKWARD not in ("deterministic", "atomic"):
        raise ValueError(f"contrastive_ops triton BACKWARD must be 'deterministic' or 'atomic', got {BACKWARD!r}")
    if BACKWARD == "atomic" and D <= _ATOMIC_MAX_D and not torch.are_deterministic_algorithms_enabled():
        return "atomic"
    return "deterministic"


@torch.library.triton_op("contrastive_ops_triton::sim_lse_fwd", mutates_args=())
def _sim_lse_fwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    want_col: bool, gram: bool = False,
) -> Tuple[Tensor, Tensor]:
    """``gram=True`` promises that ``k`` holds the same values as ``q`` (Gram kernel when it applies)."""
    B, M, D = _sizes(q, k, row_index, col_index)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col)
    block_d = _chunk_d(D)
    if _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col) and B > 0:
        slots = n_pair_slots(q.device, B, _MIN_BLOCK)
        row_part = _empty((slots, B), torch.float32, q.device)  # each program fills its slot first
        _launch("gram_fwd", _sim_lse_gram_fwd_kernel, (slots,))(
            q, scale, _ptr(exclude, scale), row_part, B, D, q.stride(0),
            N_EXCLUDE=flags["N_EXCLUDE"], UPCAST=flags["UPCAST"], PREC=flags["PREC"],
            BLOCK_D=block_d, ONE_CHUNK=D <= block_d,
        )
        return torch.logsumexp(row_part, 0), torch.empty((0,), dtype=torch.float32, device=q.device)
    row_lse = _empty((B,), torch.float32, q.device)
    slots = n_slots(q.device, B, _MIN_BLOCK)
    # Every slot is filled by its program before use, so no initialisation here.
    col_part = _empty((slots if want_col else 0, M), torch.float32, q.device)
    if B > 0:
        _launch("fwd", _sim_lse_fwd_kernel, (slots,))(
            q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
            _ptr(col_end, scale), _ptr(exclude, scale), row_lse, _ptr(col_part if want_col else None, row_lse),
            B, M, D, q.stride(0), k.stride(0),
            BLOCK_D=block_d, ONE_CHUNK=D <= block_d, **flags,
        )
    if want_col:
        col_lse = torch.logsumexp(col_part, 0) if B > 0 else torch.full((M,), float("-inf"), device=q.device)
    else:
        col_lse = torch.empty((0,), dtype=torch.float32, device=q.device)
    return row_lse, col_lse


@_sim_lse_fwd_op.register_fake
def _(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, gram=False):
    B, M, _ = _sizes(q, k, row_index, col_index)
    return q.new_empty((B,), dtype=torch.float32), q.new_empty((M if want_col else 0,), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::sim_lse_bwd", mutates_args=())
def _sim_lse_bwd_op(
    q: Tensor, k: Tensor, scale: Tensor,
    row_index: Optional[Tensor], col_index: Optional[Tensor],
    col_start: Optional[Tensor], col_end: Optional[Tensor], exclude: Optional[Tensor],
    row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
    gram: bool = False, atomic: bool = False, same: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``gram=True`` promises that q *is* k for autograd: where the Gram kernel applies, the whole
    gradient of that one tensor is returned in dq and dk is zero.  ``same=True`` promises only that
    k holds q's values (the forward took the Gram kernel): where it applies, dq and dk come from
    the Gram kernel's separate terms, so the backward reads the forward's S.  ``atomic=True`` takes
    the single-recompute kernels (non-deterministic; D ≤ 256, else ignored)."""
    want_col = col_lse.numel() > 0
    B, M, D = _sizes(q, k, row_index, col_index)
    col_start, col_end = _ranges(q, B, M, col_start, col_end)
    flags = _flags(q, row_index, col_index, col_start, col_end, exclude, want_col)
    launch = B > 0 and M > 0
    atomic = bool(atomic) and D <= _ATOMIC_MAX_D
    block_d, block_do = _chunk_d(D), _block_do(D)
    one_chunk = D <= block_d
    # The atomic kernels' full-width tiles are the forward's single chunk when D is one chunk.
    assert not one_chunk or block_d == _d_pad(D)
    n_d = triton.cdiv(D, block_do)
    dot_flags = dict(UPCAST=flags["UPCAST"], PREC=flags["PREC"])

    gram_kw = dict(N_EXCLUDE=flags["N_EXCLUDE"], BLOCK_D=block_d, BLOCK_DO=block_do, ONE_CHUNK=one_chunk,
                   REUSE=one_chunk and n_d == 1 and block_do == block_d, **dot_flags)

    def gram_mirror(terms: int, name: str, dscale_part: Tensor) -> Tensor:
        out = _empty(q.shape, q.dtype, q.device)
        _launch(name, _sim_lse_gram_bwd_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK"]), n_d))(
            q, scale, _ptr(exclude, scale), row_lse, grad_row, out, dscale_part,
            B, D, q.stride(0), out.stride(0), TERMS=terms, **gram_kw,
        )
        return out

    if not gram and same and _gram_applies(True, q, k, row_index, col_index, col_start, col_end, want_col):
        # k holds q's values but is another tensor for autograd (e.g. z.detach()): dq = scale·dS·K
        # and dk = scale·dSᵀ·Q from the Gram kernel's two terms (the forward's S, read the same way).
        if not launch:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros((), dtype=torch.float32, device=q.device)
        dscale_part = torch.zeros((triton.cdiv(B, _MIN_BLOCK),), dtype=torch.float32, device=q.device)
        dq = gram_mirror(1, "gram_bwd_dq", dscale_part)
        dk = gram_mirror(2, "gram_bwd_dk", torch.zeros_like(dscale_part))
        return dq, dk, dscale_part.sum()

    if _gram_applies(gram, q, k, row_index, col_index, col_start, col_end, want_col):
        dk = torch.zeros_like(k)
        if not launch:
            return torch.zeros_like(q), dk, torch.zeros((), dtype=torch.float32, device=q.device)
        if atomic:
            slots = n_pair_slots(q.device, B, _MIN_BLOCK)
            dz_acc = torch.zeros((B, D), dtype=torch.float32, device=q.device)
            dscale_part = _empty((slots,), torch.float32, q.device)
            _launch("gram_bwd_atomic", _sim_lse_gram_bwd_atomic_kernel, (slots,))(
                q, scale, _ptr(exclude, scale), row_lse, grad_row, dz_acc, dscale_part,
                B, D, q.stride(0), dz_acc.stride(0),
                N_EXCLUDE=flags["N_EXCLUDE"], BLOCK_D=block_d, ONE_CHUNK=one_chunk, BLOCK_DP=_d_pad(D),
                **dot_flags,
            )
            return dz_acc.to(q.dtype), dk, dscale_part.sum()
        dscale_part = torch.zeros((triton.cdiv(B, _MIN_BLOCK),), dtype=torch.float32, device=q.device)
        dz = gram_mirror(3, "gram_bwd", dscale_part)
        return dz, dk, dscale_part.sum()

    # Rows outside an index list get no gradient: those outputs start at zero.
    dq = _empty(q.shape, q.dtype, q.device) if row_index is None and launch else torch.zeros_like(q)
    dscale_part = torch.zeros((triton.cdiv(B, _MIN_BLOCK),), dtype=torch.float32, device=q.device)
    common = (q, k, scale, _ptr(row_index, scale), _ptr(col_index, scale), _ptr(col_start, scale),
              _ptr(col_end, scale), _ptr(exclude, scale), row_lse, _ptr(col_lse if want_col else None, row_lse),
              grad_row, _ptr(grad_col if want_col else None, grad_row))
    if atomic:
        dk_acc = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        if launch:
            _launch("bwd_atomic", _sim_lse_bwd_atomic_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),))(
                *common, dq, dk_acc, dscale_part, B, M, D, q.stride(0), k.stride(0), dq.stride(0),
                dk_acc.stride(0), BLOCK_D=block_d, ONE_CHUNK=one_chunk, BLOCK_DP=_d_pad(D), **flags,
            )
        return dq, dk_acc.to(k.dtype), dscale_part.sum()
    dk = _empty(k.shape, k.dtype, k.device) if col_index is None and launch else torch.zeros_like(k)
    reuse = one_chunk and n_d == 1 and block_do == block_d
    if launch:
        _launch("bwd_dq", _sim_lse_bwd_dq_kernel, lambda meta: (triton.cdiv(B, meta["BLOCK_M"]), n_d))(
            *common, dq, dscale_part, B, M, D, q.stride(0), k.stride(0), dq.stride(0),
            BLOCK_D=block_d, BLOCK_DO=block_do, ONE_CHUNK=one_chunk, REUSE=reuse, **flags,
        )
        _launch("bwd_dk", _sim_lse_bwd_dk_kernel, lambda meta: (triton.cdiv(M, meta["BLOCK_N"]), n_d))(
            *common, dk, B, M, D, q.stride(0), k.stride(0), dk.stride(0),
            BLOCK_D=block_d, BLOCK_DO=block_do, ONE_CHUNK=one_chunk, REUSE=reuse, **flags,
        )
    return dq, dk, dscale_part.sum()


@_sim_lse_bwd_op.register_fake
def _(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col,
      gram=False, atomic=False, same=False):
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=torch.float32)


def sim_lse_forward(q, k, scale, row_index=None, col_index=None, col_start=None, col_end=None,
                    exclude=None, want_col=False, *, gram: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Row (B,) and column (M,) LSEs in fp32; the column one is 0-element unless ``want_col``.

    ``gram``: None detects it (``same_values(q, k)``); the Gram kernel runs when
    it is true and there are no index lists, no ranges and no column LSE.
    """
    if gram is None:
        gram = same_values(q, k)
    return torch.ops.contrastive_ops_triton.sim_lse_fwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude, bool(want_col), bool(gram))


def sim_lse_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                     row_lse, col_lse, grad_row, grad_col, *, gram: Optional[bool] = None,
                     atomic: Optional[bool] = None, same: Optional[bool] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(dq like q, dk like k, dscale 0-dim fp32)`` for upstream gradients ``grad_row``/``grad_col``.

    ``gram``: None means ``q is k`` (then, where the Gram kernel applies, dq is the
    whole gradient of the one tensor and dk is zero; their sum is the gradient
    either way).  ``same``: None means ``same_values(q, k)``, the forward's
    test: where the forward took the Gram kernel, the backward must read S the
    way it did, so two tensors holding the same values (``z``, ``z.detach()``)
    get dq and dk from the Gram kernel's separate terms.  ``atomic``: None
    means ``backward_path(D) == "atomic"``.
    """
    if gram is None:
        gram = q is k
    if same is None:
        same = same_values(q, k)
    if atomic is None:
        atomic = backward_path(q.shape[1]) == "atomic"
    return torch.ops.contrastive_ops_triton.sim_lse_bwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude,
        row_lse, col_lse, grad_row.float().contiguous(), grad_col.float().contiguous(), bool(gram), bool(atomic),
        bool(gram or same))


class _SimLSEPrimitive:
    """The ``"sim_lse"`` primitive of the Triton backend (see ``contrastive_ops.core``)."""

    @staticmethod
    def forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col):
        gram = same_values(q, k)
        return sim_lse_forward(q.contiguous(), k.contiguous(), scale.float().reshape(()), row_index,
                               col_index, col_start, col_end, exclude, want_col, gram=gram)

    @staticmethod
    def backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                 grad_row, grad_col):
        gram = q is k  # one tensor for autograd: dq + dk is what it receives
        same = same_values(q, k)  # the forward's test: it took the Gram kernel
        dq, dk, dscale = sim_lse_backward(q.contiguous(), k.contiguous(), scale.float().reshape(()),
                                          row_index, col_index, col_start, col_end, exclude,
                                          row_lse, col_lse, grad_row, grad_col, gram=gram, same=same)
        return dq, dk, dscale.to(scale.dtype)


SIM_LSE = _SimLSEPrimitive()
