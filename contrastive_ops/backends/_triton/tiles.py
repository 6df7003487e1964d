r"""Tile library of the Triton kernels: the one S-tile product, masks, row/column
tiles, block sizes and autotune configs, shared by :mod:`.sim_lse` and :mod:`.siglip`.

Every kernel that needs a tile of S = Q·Kᵀ (unscaled, fp32 accumulation) gets
it from :func:`s_tile`: the same D chunking (``chunk_d``), the same orientation
Q·Kᵀ, the same ``input_precision``.  That is what makes the backward's S
bitwise the forward's (see :mod:`.sim_lse`), so no kernel may build S another way.

Block-size rules (GPU):

* S tiles are at least 64 rows (``BLOCK_M`` ≥ 64) with a multiple of 4 warps,
  so that sm_90a runs every S product and every gradient product on ``wgmma``
  in forward and backward alike (32-row tiles compile to ``mma.sync``, whose
  fp32 sums may round differently).
* 16-bit D ≤ 128 is one chunk (the stationary tile is loaded once per program);
  wider D streams 64-wide chunks; fp32 streams 16-wide chunks.
* The backward's gradient accumulators hold up to ``max_do(dtype)`` columns of
  D (512 in 16-bit, 128 in fp32), so S is recomputed once per gradient for
  every D up to that width.

Autotuning (``configs``): at most 4 configs per kernel on the GPU, keyed on D,
the flags and log₂ buckets of B and M (``log2_bucket``), with results cached on
disk where the installed Triton supports it.  ``CONTRASTIVE_OPS_TRITON_CONFIGS=
default`` keeps the first config of every list (one compile per kernel and
specialization).  Under the interpreter one small config.
"""
from __future__ import annotations

import collections
import functools
import inspect
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

Tensor = torch.Tensor

# Tests flip this to allocate every kernel output filled with NaN, so a tile a
# kernel forgets to write shows up as NaN instead of as stale memory.
POISON_OUTPUTS = False

# Kernel launches by name (the tests read it to see which path ran).
LAUNCHES: collections.Counter = collections.Counter()


def interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty(shape, dtype, device, poison: bool = False) -> Tensor:
    """An output buffer: uninitialised, or NaN-filled when ``POISON_OUTPUTS`` (or ``poison``)."""
    if (POISON_OUTPUTS or poison) and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def wrap(kernel):
    """``wrap_triton(kernel)``, or under the interpreter, where torch < 2.13 refuses it, the kernel itself.

    ``TRITON_INTERPRET=1`` makes ``@triton.jit`` return an interpreted
    function, which torch 2.11's ``wrap_triton`` rejects (it accepts only
    ``JITFunction`` / ``Autotuner``).  The interpreter runs on CPU tensors,
    where nothing traces a Triton kernel (``torch.compile`` of the Triton
    backend is a GPU matter), so a direct launch is the same call.
    """
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if interpreting():
            return kernel
        raise


def launch(name: str, kernel, grid):
    """``wrap(kernel)[grid]``, counted in ``LAUNCHES``."""
    LAUNCHES[name] += 1
    return wrap(kernel)[grid]


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags of ``tl.dot`` for inputs of ``dtype``.

    ``UPCAST``: bf16 ``tl.dot`` is wrong in Triton's interpreter, so there (and
    only there) bf16 tiles are upcast to fp32 before the product.
    ``PREC``: 16-bit operands run on tensor cores whatever the value.  fp32
    operands run on tensor cores too, as ``tf32x3`` (three TF32 products,
    about fp32 accuracy), or as plain ``tf32`` only when the user enabled TF32
    matmuls globally (``torch.backends.cuda.matmul.allow_tf32``).  Under the
    interpreter fp32 stays exact (``ieee``).
    """
    upcast = interpreting() and dtype == torch.bfloat16
    if interpreting():
        prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    elif dtype == torch.float32:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    else:
        prec = "tf32"  # ignored for 16-bit operands
    return dict(UPCAST=upcast, PREC=prec)


# ---------------------------------------------------------------------------
# Block sizes
# ---------------------------------------------------------------------------


def chunk_d(D: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Width of the D chunks every S tile is accumulated over (forward and backward alike: it
    depends only on D and the dtype).

    On the GPU every 16-bit D ≤ 128 is one chunk (the stationary tile is loaded
    once per program); wider D streams 64-wide chunks.  fp32 (tf32x3 splits each
    operand in registers) streams 16-wide chunks: in the backward on sm_90a 128-wide
    ones spill 1.6–2.5 KB per thread, 32-wide ones 70–1,200 B, 16-wide none.  Under the
    interpreter the cap is 32, so the tests see both the one-chunk (D ≤ 32) and
    the chunked layouts.
    """
    if interpreting():
        return min(max(16, triton.next_power_of_2(D)), 32)
    return gpu_chunk_d(D, "fp32" if dtype == torch.float32 else "bf16")


def max_do(dtype: torch.dtype) -> int:
    """Widest output D-chunk of a backward accumulator (BLOCK_M × max_do fp32 in registers).

    512 for 16-bit inputs, 128 for fp32 (tf32x3 keeps split copies of the
    operands in registers: a 64 × 256 accumulator spills 1.4 KB per thread on
    sm_90a, 64 × 128 about 70 B); 64 under the interpreter, so small tests
    cover both a full-D accumulator (D ≤ 64) and several output chunks (D > 64).
    """
    if interpreting():
        return 64
    return gpu_max_do("fp32" if dtype == torch.float32 else "bf16")


GRAM_MAX_DO = 256  # the Gram backward's three accumulating loops spill beyond 64 × 256 (17 KB at 64 × 512)


def block_do(D: int, dtype: torch.dtype = torch.bfloat16, gram: bool = False) -> int:
    """Width of the backward's output D-chunks: all of D (padded) up to ``max_do``, else equal chunks.

    One output chunk means S is recomputed once per gradient.  Beyond
    ``max_do`` the n_d = cdiv(D, max_do) chunks are made as narrow as a power
    of two allows (D = 768 in 16-bit: two chunks of 512; D = 1024: two of 512).
    ``gram``: the Gram backward's cap is ``GRAM_MAX_DO`` (256) on the GPU.
    """
    cap = max_do(dtype)
    if gram and not interpreting():
        cap = min(cap, GRAM_MAX_DO)
    return _chunk_width(D, cap)


def _chunk_width(D: int, cap: int) -> int:
    """All of D (padded to a power of two) if that is ≤ ``cap``, else the narrowest power of two
    that covers D in cdiv(D, cap) equal chunks."""
    p2 = max(16, triton.next_power_of_2(D))
    if p2 <= cap:
        return p2
    n_d = triton.cdiv(D, cap)
    return max(16, triton.next_power_of_2(triton.cdiv(D, n_d)))


def block_d(D: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Width of the D chunks of the SigLIP kernels (a power of two, at least 16; ``gpu_block_d``)."""
    fp32 = dtype == torch.float32
    return min(max(16, triton.next_power_of_2(D)), 32) if interpreting() else gpu_block_d(D, fp32)


def d_pad(D: int) -> int:
    """Full padded width of a tile that holds all of D."""
    return max(16, triton.next_power_of_2(D))


def log2_bucket(n: int) -> int:
    """Autotune key bucket of a size: ⌈log₂ n⌉ (a warm-up at B = 8 does not fix the config for B = 65536)."""
    return max(0, int(n - 1).bit_length())


_SM_COUNT: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 4 under the interpreter (so small tests split grids)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# ---------------------------------------------------------------------------
# Autotune configs
# ---------------------------------------------------------------------------

# "tune" (default): autotune over each kernel's GPU list; "default": its first config only
# (one compile per kernel and specialization, for test, sanitizer and smoke runs).
CONFIGS = os.environ.get("CONTRASTIVE_OPS_TRITON_CONFIGS", "tune")
MAX_GPU_CONFIGS = 4
_AUTOTUNE_CACHES = "cache_results" in inspect.signature(triton.autotune).parameters


def configs(block_names, gpu_choices, interp_choice) -> List[triton.Config]:
    """Autotune configs: a short Hopper list on the GPU (≤ 4), one small config under the interpreter.

    With ``CONTRASTIVE_OPS_TRITON_CONFIGS=default`` the whole list is kept here
    and the pruning (``_prune``) runs the first config that fits the shape
    and dtype, alone (no benchmark, one compile per kernel and specialization).
    """
    if interpreting():
        return [triton.Config(dict(zip(block_names, interp_choice)), num_warps=1, num_stages=1)]
    if CONFIGS not in ("tune", "default"):
        raise ValueError(f"CONTRASTIVE_OPS_TRITON_CONFIGS must be 'tune' or 'default', got {CONFIGS!r}")
    assert len(gpu_choices) <= MAX_GPU_CONFIGS, "a config list longer than the autotune budget"
    return _with_fp32(block_names, gpu_choices, [triton.Config(dict(zip(block_names, b)), num_warps=w, num_stages=s)
                                                 for b, w, s in gpu_choices])


MAX_ACC_PER_THREAD = 128  # fp32 accumulator registers per thread a backward config may hold (dKᵀ: 64)
SMEM_LIMIT = 232448  # bytes of shared memory one sm_90 program may use


def acc_fits(cfg_kwargs: dict, num_warps: int, block_do_: int) -> bool:
    """Whether a backward config's BLOCK × BLOCK_DO fp32 accumulator fits the register budget.

    The stationary block is at most max(BLOCK_M, BLOCK_N) (or BLOCK) rows; its
    accumulator takes rows·BLOCK_DO/(32·warps) registers per thread, kept ≤ 128
    so the S tile, dS and addresses fit beside it in 255 without spilling.
    The transposed dK accumulator (``DK_T``, BLOCK_DO × BLOCK_N) is kept ≤ 64 (at 128 it spills).
    """
    if cfg_kwargs.get("DK_T"):
        return cfg_kwargs["BLOCK_N"] * block_do_ <= MAX_ACC_PER_THREAD // 2 * 32 * num_warps
    rows = max(cfg_kwargs.get(n, 0) for n in ("BLOCK_M", "BLOCK_N", "BLOCK"))
    return rows * block_do_ <= MAX_ACC_PER_THREAD * 32 * num_warps


def fwd_smem(block_m: int, block_n: int, block_d: int, num_stages: int, elem: int) -> int:
    """Shared memory of a forward config (sm_90a, measured): the stationary tile and ``num_stages``
    streamed tiles; fp32 (tf32x3) also keeps a split copy of each operand."""
    if elem == 4:
        return (2 * block_m + (num_stages + 1) * block_n) * block_d * 4
    return (block_m + num_stages * block_n) * block_d * elem


# The compile gate's fault tables feed the pruning: a config the gate measured failing for a kernel,
# dtype and blocks is not autotuned where a clean one exists (``gate_faulty``, at the end of the file).


def _prune(configs_list, named_args, fn=None, **kwargs):
    """Autotune pruning of every kernel: drop the configs the compile gate measured failing for this
    kernel, dtype and blocks where another is left (``gate_faulty``), backward configs whose
    accumulator would spill (``acc_fits``) and forward configs whose tiles exceed the shared memory
    (``fwd_smem``); with ``CONFIGS == "default"`` keep the first survivor alone.  Never empty."""
    kept = _for_dtype(configs_list, named_args)
    faulty = gate_faulty(fn, named_args, kwargs)
    kept = [c for c in kept if not faulty(c)] or kept
    bdo = kwargs.get("BLOCK_DO")
    if bdo:
        kept = [c for c in kept if acc_fits({**kwargs, **c.kwargs}, c.num_warps, bdo)]
    elif "BLOCK_D" in kwargs and "TERMS" not in kwargs and "BLOCK_DP" not in kwargs:  # the forward kernels
        elem = _elem_size(named_args)

        def smem(c):
            a = {**kwargs, **c.kwargs}
            bm = a.get("BLOCK_M", a.get("BLOCK", 64))
            bn = a.get("BLOCK_N", a.get("BLOCK", 64))
            return fwd_smem(bm, bn, kwargs["BLOCK_D"], c.num_stages, elem)

        kept = [c for c in kept if smem(c) <= SMEM_LIMIT] or [min(configs_list, key=smem)]
    kept = kept or list(configs_list)[:1]
    return kept[:1] if CONFIGS == "default" else kept


def autotune(configs_list, key, reset_to_zero=None):
    """``triton.autotune`` with the pruning of ``_prune`` and on-disk result caching where the
    installed Triton has it."""
    extra = dict(cache_results=True) if _AUTOTUNE_CACHES and not interpreting() else {}
    return lambda fn: triton.autotune(configs=configs_list, key=key, reset_to_zero=reset_to_zero, **extra,
                                      prune_configs_by=dict(early_config_prune=functools.partial(_prune, fn=fn)))(fn)


# Every list: tiles of at least 64 rows, warps a multiple of 4 (wgmma), first entry = the default.
# Forward, general: BLOCK_M is chosen from the shape by the launcher (the split grid and its
# partial buffers depend on it); the autotuner picks BLOCK_N, warps and stages.
FWD_N_GPU = [((128,), 8, 3), ((64,), 4, 3), ((64,), 4, 4), ((64,), 8, 2)]  # 16-bit (fp32: FWD_N_GPU_FP32)
# Backward: BLOCK_M × BLOCK_N S tiles beside a BLOCK × BLOCK_DO accumulator (dk; SigLIP's dy).  The
# row-stationary dq (SigLIP's dx) also takes 64 × 32 tiles: beside a 64 × 512 accumulator they spill none.
BWD_GPU = [((64, 64), 8, 2), ((64, 64), 4, 2), ((128, 64), 8, 2), ((64, 128), 8, 2)]
BWD_DQ_GPU = [((64, 64), 8, 2), ((64, 64), 4, 2), ((128, 64), 8, 2), ((64, 32), 8, 2)]
# SigLIP keeps its own lists (same rules).
FWD_GPU = [((128, 128), 8, 3), ((128, 64), 4, 3), ((64, 128), 4, 3), ((64, 64), 4, 4)]
# The dk kernel with the transposed accumulator (16-bit, padded D = 512 and 1024): dKᵀ += Qᵀ·dS over
# the whole of D in one output chunk; ``acc_fits`` keeps 512 × 32 or 1024 × 16 (64 registers per thread).
DK_WIDE_GPU = [((64, 32), 8, 2), ((64, 16), 8, 2)]
# The dS kernel of the GEMM backward: an S tile and an elementwise epilogue stored to memory (a forward tile).
DS_GPU = [((128, 128), 8, 3), ((128, 64), 4, 3), ((64, 128), 4, 3), ((64, 64), 4, 4)]
DK_WIDE_MAX_D = 1024
# Atomic backward: full-width (≤ 256) tiles of Q and K.
BWD_ATOMIC_GPU = [((64, 64), 4, 2), ((64, 64), 8, 2), ((128, 64), 8, 2)]
# Square tiles (BLOCK) of the Gram kernels: tile I and tile J index the same rows.
SYM_FWD_GPU = [((), 8, 3), ((), 8, 2), ((), 4, 3), ((), 4, 4)]  # BLOCK from the shape (gram_block)
SYM_BWD_GPU = [((64,), 8, 2), ((64,), 4, 2), ((128,), 8, 2)]
SYM_ATOMIC_GPU = [((64,), 4, 2), ((64,), 8, 2), ((128,), 8, 1)]
MIN_BLOCK = 64  # smallest BLOCK_M / BLOCK_N / BLOCK of every GPU list (grid and buffer sizing)
INTERP_BLOCK = (32, 32)
INTERP_SYM = (32,)
INTERP_N = (32,)


def min_block() -> int:
    """Smallest tile of any config in this mode (buffers of per-tile partials are sized with it)."""
    return INTERP_BLOCK[0] if interpreting() else MIN_BLOCK


# ---------------------------------------------------------------------------
# Jitted tile helpers
# ---------------------------------------------------------------------------


@triton.jit
def load_tile(X, x_rows, mask, offs_d, D, stride, UPCAST: tl.constexpr):
    """Tile X[x_rows][:, offs_d] (zero outside the matrix and beyond D), upcast to fp32 if ``UPCAST``."""
    x = tl.load(X + x_rows[:, None] * stride + offs_d[None, :], mask=mask[:, None] & (offs_d < D)[None, :],
                other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def s_tile(Q, K, q_rows, k_rows, q_mask, k_mask, D, stride_q, stride_k, q_tile, k_tile,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HELD: tl.constexpr,
           UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Unscaled tile Q[q_rows] · K[k_rows]ᵀ (BLOCK_M, BLOCK_N) in fp32: THE way every kernel forms S.

    ``HELD`` (D ≤ BLOCK_D, one chunk): the caller passes both one-chunk tiles
    ``q_tile`` (BLOCK_M, BLOCK_D) and ``k_tile`` (BLOCK_N, BLOCK_D) it already
    holds (a stationary tile loaded once per program, a streamed one reused for
    the gradient product).  Otherwise D is summed in BLOCK_D chunks read from
    memory, in increasing order, and ``q_tile``/``k_tile`` are not read.
    """
    if HELD:
        acc = tl.dot(q_tile, tl.trans(k_tile), input_precision=PREC)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            a = load_tile(Q, q_rows, q_mask, d0 + offs_d, D, stride_q, UPCAST)
            b = load_tile(K, k_rows, k_mask, d0 + offs_d, D, stride_k, UPCAST)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def scaled_s(s_raw, scale, ok):
    """S = s_raw·scale on allowed pairs, −inf elsewhere: the ONE way every kernel scales S.

    At huge logits (|S| ~ 1e8, fp32 ulp 8) the backward's P = exp(S − lse) is
    only ≤ 1 if its S is bitwise the forward's, so forward and backward share
    this helper (the same product, the same multiply, rounded on its own: ``mul_rn``
    keeps the compiler from contracting ``s_raw·scale − lse`` into an FMA where no
    select stands between them, in one kernel and not in another).
    """
    return tl.where(ok, mul_rn(s_raw, scale), float("-inf"))


@triton.jit
def allowed(cols, row_mask, col_mask, cs, ce, e0, e1, HAS_RANGE: tl.constexpr, N_EXCLUDE: tl.constexpr):
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
def allowed_t(rows_i, mask_i, mask_j, e0_j, e1_j, N_EXCLUDE: tl.constexpr):
    """Gram matrices: (BLOCK_I, BLOCK_J) mask of the *transposed* pairs, True where column i is
    allowed for row j (row j's own exclusions), laid out like the tile S_IJ."""
    ok = mask_i[:, None] & mask_j[None, :]
    if N_EXCLUDE >= 1:
        ok = ok & (rows_i[:, None] != e0_j[None, :])
    if N_EXCLUDE >= 2:
        ok = ok & (rows_i[:, None] != e1_j[None, :])
    return ok


@triton.jit
def row_tile(t, B, RowIndex, ColStart, ColEnd, Exclude,
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
def col_tile(n0, M, ColIndex, BLOCK_N: tl.constexpr, HAS_COL_INDEX: tl.constexpr):
    """Columns of the column tile starting at ``n0``: positions, mask, rows of k (int64)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    if HAS_COL_INDEX:
        k_rows = tl.load(ColIndex + cols, mask=col_mask, other=0).to(tl.int64)
    else:
        k_rows = cols.to(tl.int64)
    return cols, col_mask, k_rows


@triton.jit
def col_bounds(row_mask, cs, ce, M, BLOCK_N: tl.constexpr, HAS_RANGE: tl.constexpr):
    """Column tiles a row tile must visit: from its rows' smallest start (tile-aligned) to their largest end."""
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
def lse_of(m, l):
    """m + log l of an online (max, sum) pair; −inf where nothing was summed, NaN where a NaN was."""
    return tl.where(l == 0, float("-inf"), m + tl.log(l))


@triton.jit
def online_rows(s, m_i, l_i):
    """Fold the rows of a tile S (−inf = not allowed) into the running (max, sum) pairs of its rows."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_new = l_i * fexp(m_i - m_safe) + tl.sum(fexp(s - m_safe[:, None]), 1)
    return m_new, l_new


@triton.jit
def col_lse(s):
    """LSE of each column of a tile S (−inf for a column with nothing allowed)."""
    c_max = tl.max(s, 0)
    c_safe = tl.where(c_max == float("-inf"), 0.0, c_max)
    return c_safe + tl.log(tl.sum(fexp(s - c_safe[None, :]), 0))


@triton.jit
def row_max_of(RowMax, rows, row_mask, HAS_ROW_MAX: tl.constexpr):
    """The row thresholds ``row_max`` of rows ``rows`` (+inf outside ``row_mask``); 0 when absent
    (never read then)."""
    if HAS_ROW_MAX:
        rmax = tl.load(RowMax + rows, mask=row_mask, other=float("inf"))
    else:
        rmax = 0.0
    return rmax


@triton.jit
def under_row_max(ok, s_raw, scale, rmax, HAS_ROW_MAX: tl.constexpr):
    """``ok`` without the pairs whose logit s_raw·scale exceeds their row's threshold.

    The comparison is on the very product ``scaled_s`` exponentiates (same operands, same
    multiply), and every kernel forms s_raw with ``s_tile``, so the backward drops exactly the
    pairs the forward dropped; ties within the rounding of S (``tf32x3`` for fp32 on the GPU) are
    decided on the kernel's S.  A NaN logit is kept (``not s > t``).
    """
    if HAS_ROW_MAX:
        ok = ok & ~(s_raw * scale > rmax[:, None])
    return ok


@triton.jit
def under_row_max_t(ok_t, s_raw, scale, rmax_cols, HAS_ROW_MAX: tl.constexpr):
    """Gram matrices: ``under_row_max`` of the *transposed* pairs (``allowed_t``'s layout), each column's
    own row threshold ``rmax_cols`` against the same entry of the tile."""
    if HAS_ROW_MAX:
        ok_t = ok_t & ~(s_raw * scale > rmax_cols[None, :])
    return ok_t


@triton.jit
def logaddexp(a, b):
    """log(eᵃ + eᵇ), −inf when both are −inf."""
    mx = tl.maximum(a, b)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))


# ---------------------------------------------------------------------------
# Compile specifications (sm_90a static checks)
# ---------------------------------------------------------------------------

SPEC_DS = (64, 128, 256, 512, 768, 1024)
SPEC_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FEATURE_ARGS = ("Q", "K", "Z", "X", "Y", "DQ", "DK", "DZ", "DX", "DY", "DS", "G")  # DS, G: the GEMM backwards
_INDEX_ARGS = ("RowIndex", "ColIndex", "ColStart", "ColEnd", "Exclude")  # RowMax: *fp32 like the statistics
_INT_ARGS = ("B", "M", "D", "cols_per_split", "B_LOG2", "M_LOG2", "R0", "R1")


def spec_signature(jit_fn, dtype_name: str, constexprs: dict) -> dict:
    """Triton argument types of a kernel: features in ``dtype_name``, indices i32, sizes i32, the rest fp32."""
    out = {}
    for n in jit_fn.arg_names:
        if n in constexprs:
            continue
        if n in _FEATURE_ARGS:
            out[n] = "*" + dtype_name
        elif n in _INDEX_ARGS:
            out[n] = "*i32"
        elif n in _INT_ARGS or n.startswith("stride"):
            out[n] = "i32"
        else:
            out[n] = "*fp32"
    return out


def gpu_dot_flags(dtype_name: str) -> dict:
    """``dot_flags`` as the GPU dispatcher sets them (TF32 off: fp32 is ``tf32x3``)."""
    return dict(UPCAST=False, PREC="tf32x3" if dtype_name == "fp32" else "tf32")


def spec(name, jit_fn, dtype_name, D, constexprs, num_warps, num_stages) -> dict:
    """One entry of a module's ``compile_specs()``.

    ``divisible_by_16``: the arguments Triton's launcher specializes as multiples
    of 16 for contiguous (B, D) features with D a multiple of 16 (every pointer
    from the caching allocator, every row stride, D itself); pass them to the compiler as
    ``attrs={(index,): [["tt.divisibility", 16]]}`` to compile what runs — without
    them the loads cannot be vectorized or pipelined (no ``cp.async``).
    """
    args = spec_signature(jit_fn, dtype_name, constexprs)
    div16 = [n for n, t in args.items() if t.startswith("*") or n.startswith("stride") or n == "D"]
    return dict(name=name, fn=jit_fn, args=args, constexprs=dict(constexprs), num_warps=num_warps,
                num_stages=num_stages, dtype=dtype_name, D=D, divisible_by_16=div16)


def spec_attrs(sp: dict) -> dict:
    """``attrs`` of ``triton.compiler.ASTSource`` for a ``compile_specs`` entry."""
    names = sp["fn"].arg_names
    return {(names.index(n),): [["tt.divisibility", 16]] for n in sp.get("divisible_by_16", ())}


def gpu_chunk_d(D: int, dtype_name: str = "bf16") -> int:
    """``chunk_d`` as on the GPU (for the compile specs, whatever mode this process is in)."""
    p2 = max(16, triton.next_power_of_2(D))
    if dtype_name == "fp32":
        return min(p2, 16)
    return p2 if p2 <= 128 else 64


def gpu_max_do(dtype_name: str) -> int:
    """``max_do`` as on the GPU."""
    return 128 if dtype_name == "fp32" else 512


def gpu_block_do(D: int, dtype_name: str, gram: bool = False) -> int:
    """``block_do`` as on the GPU."""
    cap = gpu_max_do(dtype_name)
    if gram:
        cap = min(cap, GRAM_MAX_DO)
    return _chunk_width(D, cap)


def spec_config(sp: dict) -> str:
    """A spec's tile config as the fault tables name it: "128x64 w8 s2" (BLOCK_M x BLOCK_N, or BLOCK)."""
    c = sp["constexprs"]
    blocks = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK") if k in c)
    return f"{blocks} w{sp['num_warps']} s{sp['num_stages']}"


@triton.jit
def held_tile(X, x_rows, mask, offs_d, D, stride, UPCAST: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """The tile X[x_rows][:, :BLOCK_D] a program holds across its loop in the one-chunk layout
    (``ONE_CHUNK``: D fits one chunk); 0 otherwise, and ``s_tile`` streams the D-chunks itself."""
    if ONE_CHUNK:
        tile = load_tile(X, x_rows, mask, offs_d, D, stride, UPCAST)
    else:
        tile = 0
    return tile


@triton.jit
def row_span(t, B, M, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_ROW_INDEX: tl.constexpr, HAS_RANGE: tl.constexpr, N_EXCLUDE: tl.constexpr):
    """``row_tile`` of row tile ``t`` and the tile-aligned column span ``[lo, hi)`` its ranges reach."""
    rows, row_mask, q_rows, cs, ce, e0, e1 = row_tile(
        t, B, RowIndex, ColStart, ColEnd, Exclude, BLOCK_M, HAS_ROW_INDEX, HAS_RANGE, N_EXCLUDE)
    lo, hi = col_bounds(row_mask, cs, ce, M, BLOCK_N, HAS_RANGE)
    return rows, row_mask, q_rows, cs, ce, e0, e1, lo, hi


# fp32 (tf32x3) lists of the forward-shaped kernels (sim_lse's forward and dS kernel, SigLIP's forward
# and G kernel).  Compiled for sm_90a, their 4-warp tiles over 64 × 64 spill with fp32 operands (the
# split copies of tf32x3: 12–1,300 B per thread under Triton 3.6 / 3.8) while the 8-warp ones do not,
# so fp32 inputs autotune over these instead.  Here, below the last @triton.jit, so that the kernels'
# lines (and the compile gate's cache keys) stay put; ``configs`` and ``_prune`` read them at call time.
FWD_N_GPU_FP32 = [((128,), 8, 3), ((64,), 8, 3), ((128,), 8, 2), ((64,), 8, 2)]
FWD_GPU_FP32 = [((128, 64), 8, 3), ((64, 128), 8, 3), ((64, 64), 8, 3), ((64, 64), 4, 3)]
DS_GPU_FP32 = [((128, 128), 8, 3), ((128, 64), 8, 3), ((64, 128), 8, 3), ((64, 64), 4, 4)]
_FP32_LISTS = {id(FWD_N_GPU): FWD_N_GPU_FP32, id(FWD_GPU): FWD_GPU_FP32, id(DS_GPU): DS_GPU_FP32}
_FP32_CONFIGS: set = set()  # ids of the Configs built from an fp32 list
_SPLIT_CONFIGS: set = set()  # ids of every Config of a kernel that has an fp32 list


def gpu_choices(gpu_list: list, dtype_name: str) -> list:
    """The GPU config list a kernel autotunes over for inputs of ``dtype_name`` (compile specs)."""
    return _FP32_LISTS.get(id(gpu_list), gpu_list) if dtype_name == "fp32" else gpu_list


def _with_fp32(block_names, gpu_list, half: List[triton.Config]) -> List[triton.Config]:
    """``half`` and, for a list with an fp32 variant, that variant's Configs (``_for_dtype`` keeps
    the ones of the launch's dtype)."""
    fp32_list = _FP32_LISTS.get(id(gpu_list))
    if fp32_list is None:
        return half
    assert len(fp32_list) <= MAX_GPU_CONFIGS, "a config list longer than the autotune budget"
    fp32 = [triton.Config(dict(zip(block_names, b)), num_warps=w, num_stages=s) for b, w, s in fp32_list]
    _FP32_CONFIGS.update(id(c) for c in fp32)
    _SPLIT_CONFIGS.update(id(c) for c in half + fp32)
    return half + fp32


def _for_dtype(configs_list, named_args) -> list:
    """The Configs of the launch's dtype where the kernel has an fp32 list (else all of them)."""
    kept = list(configs_list)
    if not any(id(c) in _SPLIT_CONFIGS for c in kept):
        return kept
    fp32 = _elem_size(named_args) == 4
    return [c for c in kept if (id(c) in _FP32_CONFIGS) == fp32] or kept


def matrix_writer(sp: dict) -> dict:
    """A spec of a kernel that stores a (rows, M) block to memory (the GEMM backwards' dS and G), for
    the common launch: B and M (and the block's bounds) multiples of 16, which Triton's launcher
    specializes; the gate then requires vectorized stores (``vector_stores``)."""
    extra = [n for n in ("B", "M", "R0", "R1") if n in sp["args"]]
    return dict(sp, divisible_by_16=list(sp["divisible_by_16"]) + extra, vector_stores=True)


# The compile gate's fault tables.  Below the last @triton.jit on purpose: a kernel's cache key (and
# so the gate's result cache) includes the line its source starts at, and edits here move none.


def triton_minor(version: Optional[str] = None) -> str:
    """The Triton minor version ("3.6" of "3.6.0", "3.8" of "3.8.0+git1a2b") of ``version``, default
    the installed one: the compile gate keeps one fault table and one result cache per minor version
    (each bundles its own ptxas, and the register allocation differs between them)."""
    v = triton.__version__ if version is None else version
    parts = v.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        raise ValueError(f"cannot read a Triton minor version from {v!r}")
    return f"{parts[0]}.{parts[1]}"


def mark_known_faults(specs: List[dict], faults: dict, where: str, version: Optional[str] = None) -> List[dict]:
    """Set ``expect_fail`` on the specs the sm_90a compile gate measured failing.

    ``faults``: Triton minor version ("3.6", as ``triton_minor``) -> ``{(name, dtype, Ds, config):
    measured fault}``, one table per Triton the gate was measured with, since each compiles with its
    own ptxas; ``Ds`` lists the feature widths that share the binary (D is a runtime argument) and
    ``config`` is ``spec_config``.  The table of ``version`` (default: the installed Triton) marks
    its rows ``xfail(strict=True)`` in the gate: a spill that appears fails, one that goes turns
    the row red until its entry goes.  An entry of any version's table that matches no spec is
    stale and raises; so does a Triton no table was measured for (the gate cannot be strict there),
    unless ``CONTRASTIVE_OPS_GATE_MEASURE=1`` (``specs --faults`` sets it to measure that Triton's
    table: every variant is then expected to pass).
    """
    if not _MARKING:  # ``_measured_faults`` reads the specs themselves
        return specs
    version = triton_minor(version)
    bad = [v for v in faults if not isinstance(v, str) or triton_minor(v) != v]
    if bad:
        raise ValueError(f"{where}: compile-gate fault tables must be keyed by Triton minor version "
                         f"(\"3.6\"), not {bad[:3]}")
    if version not in faults and os.environ.get("CONTRASTIVE_OPS_GATE_MEASURE") != "1":
        raise ValueError(
            f"{where}: no compile-gate fault table for Triton {version} (measured: {', '.join(sorted(faults))}); "
            f"run `python -m contrastive_ops.backends._triton.specs --write --faults` under Triton {version} "
            f"and add the table it prints")
    present = {(sp["name"], sp["dtype"], sp["D"], spec_config(sp)) for sp in specs}
    stale = [(v, k) for v, table in sorted(faults.items()) for k in table
             if any((k[0], k[1], d, k[3]) not in present for d in k[2])]
    if stale and os.environ.get("CONTRASTIVE_OPS_GATE_MEASURE") != "1":
        raise ValueError(f"{where}: compile-gate fault entries that match no spec: {stale}")
    index = {(n, dt, d, cfg): (ds, why) for (n, dt, ds, cfg), why in faults.get(version, {}).items() for d in ds}
    for sp in specs:
        k = (sp["name"], sp["dtype"], sp["D"], spec_config(sp))
        if k in index:
            ds, why = index[k]
            sp["expect_fail"] = (f"{k[0]} {k[1]} D={'/'.join(map(str, ds))} {k[3]}: {why} "
                                 f"(Triton {version} ptxas, sm_90a)")
    clean = {(sp["name"], sp["dtype"], sp["D"]) for sp in specs if not sp.get("expect_fail")}
    for sp in specs:  # never launched: ``_prune`` takes a clean config of the same kernel, dtype and D
        sp["pruned"] = bool(sp.get("expect_fail")) and (sp["name"], sp["dtype"], sp["D"]) in clean
    return specs


# The backward paths of the Triton primitives (``BACKWARD`` of sim_lse and siglip, both read from
# CONTRASTIVE_OPS_TRITON_BACKWARD at import; "auto" chooses between the fused kernels and the GEMM
# backward by shape, ``costs.gemm_pays``); SigLIP has no atomic kernels and runs its fused ones under "atomic".
BACKWARD_PATHS = ("auto", "deterministic", "atomic", "gemm")


def checked_backward(value: str) -> str:
    """``value`` if it names a backward path, else ValueError."""
    if value not in BACKWARD_PATHS:
        raise ValueError(f"contrastive_ops triton BACKWARD must be one of {', '.join(BACKWARD_PATHS)}, got {value!r}")
    return value


def gemm_block_rows(B: int, M: int, elem_size: int, budget: int) -> int:
    """Rows per block of the GEMM backwards' (rows, M) buffer: at most ``budget`` bytes, a multiple of
    the smallest tile (at least one tile), at most B."""
    unit = min_block()
    return min(B, max(unit, budget // max(1, M * elem_size) // unit * unit))


def gpu_block_d(D: int, fp32: bool = False) -> int:
    """SigLIP's ``block_d`` as on the GPU: 64-wide chunks, 16-wide for fp32 (as ``gpu_chunk_d``)."""
    return min(max(16, triton.next_power_of_2(D)), 16 if fp32 else 64)


def _elem_size(named_args) -> int:
    for n in ("Q", "Z", "X", "K"):
        t = named_args.get(n)
        if t is not None and hasattr(t, "element_size"):
            return t.element_size()
    return 2


def _dtype_name(named_args) -> Optional[str]:
    """"bf16" / "fp16" / "fp32" of a launch's feature operand (the compile specs' ``dtype``)."""
    for n in ("Q", "Z", "X", "K"):
        t = named_args.get(n)
        if t is not None and hasattr(t, "dtype"):
            return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(t.dtype)
    return None


_GATE_BLOCK_KEYS = ("ONE_CHUNK", "REUSE", "DK_T")
_FAULTY: Optional[dict] = None  # kernel -> {(dtype, blocks, warps, stages)} the gate measured failing


def _blocks(constexprs: dict) -> tuple:
    """What, beside the dtype, warps and stages, picks a kernel's binary among its compile specs: the
    BLOCK sizes and the layout switches (the launch flags of the specs are the common ones)."""
    return tuple(sorted((k, v) for k, v in constexprs.items() if k.startswith("BLOCK") or k in _GATE_BLOCK_KEYS))


def gate_faulty(fn, named_args, kwargs):
    """Predicate on the configs of a launch of kernel ``fn``: True for those the sm_90a compile gate
    measured failing (spills, ``mma.sync``, ...) under the installed Triton minor version for this
    dtype and these blocks, from the kernel modules' ``_GATE_FAULTS`` (none for a Triton without a
    table).  ``_prune`` drops them where another config is left, so the autotuner never launches a
    variant the gate marks when a clean one exists; ``specs`` lists those as pruned."""
    global _FAULTY
    if _FAULTY is None:
        import warnings

        try:
            _FAULTY = _measured_faults()
            if not _FAULTY and not interpreting():
                warnings.warn(f"contrastive_ops: no compile-gate fault table for Triton {triton.__version__} "
                              "(measured: 3.6, 3.8); the autotuner may launch configs that spill", RuntimeWarning)
        except Exception as e:  # noqa: BLE001 - a kernel module's specs failed: tune over every config, and say so
            warnings.warn(f"contrastive_ops: the compile gate's fault tables could not be read ({e!r}); the Triton "
                          "autotuner runs every config", RuntimeWarning)
            _FAULTY = {}
    bad = _FAULTY.get(fn, ())
    dtype = _dtype_name(named_args)
    if not bad or dtype is None:
        return lambda c: False
    return lambda c: (dtype, _blocks({**kwargs, **c.kwargs}), c.num_warps, c.num_stages) in bad


_MARKING = True  # False while ``_measured_faults`` collects the specs (``mark_known_faults`` then passes)


def kernel_modules() -> dict:
    """Every module of this package but ``specs`` (imported by name: the compile gate and
    ``gate_faulty`` read their ``compile_specs`` and ``_GATE_FAULTS``), by module name."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(__package__)
    return {info.name: importlib.import_module(f"{__package__}.{info.name}")
            for info in pkgutil.iter_modules(pkg.__path__) if info.name != "specs" and not info.name.startswith("__")}


def _measured_faults() -> dict:
    global _MARKING
    out: dict = {}
    for mod in kernel_modules().values():
        table = getattr(mod, "_GATE_FAULTS", {}).get(triton_minor())
        if not table:
            continue
        failing = {(k[0], k[1], d, k[3]) for k in table for d in k[2]}
        _MARKING = False
        try:
            spec_list = mod.compile_specs()
        finally:
            _MARKING = True
        for sp in spec_list:
            if (sp["name"], sp["dtype"], sp["D"], spec_config(sp)) in failing:
                out.setdefault(sp["fn"], set()).add(
                    (sp["dtype"], _blocks(sp["constexprs"]), sp["num_warps"], sp["num_stages"]))
    return out


# The exponential of the LSE epilogues (``online_rows``, ``col_lse``, the backwards' P): on the GPU
# ex2.approx.ftz (libdevice's fast_expf: one multiply and one MUFU instruction), whose only
# difference from ``tl.exp``'s ex2.approx is that results below 2^-126 are 0 (they are summed
# beside a term of at least 1, or weight a gradient by less than 1e-38); ``tl.exp`` spends three
# more instructions per element on them (sm_90a SASS).  The interpreter has no libdevice: ``tl.exp``.
FAST_EXP = tl.constexpr(not interpreting())


@triton.jit
def fexp(x):
    if FAST_EXP:
        y = libdevice.fast_expf(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def g_tile(Q, K, rows, rmask, cols, cmask, q, k, D, stride_q, stride_k, UPCAST: tl.constexpr, PREC: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DS: tl.constexpr):
    """G = q·kᵀ of a tile of (int32) rows and columns, as ``sim_expect`` and ``label_lse`` form it in all
    their kernels: from the held BLOCK_D-wide tiles ``q`` and ``k`` when BLOCK_DS == BLOCK_D, else over
    BLOCK_DS-wide chunks read from memory in increasing order (``s_tile``)."""
    return s_tile(Q, K, rows.to(tl.int64), cols.to(tl.int64), rmask, cmask, D, stride_q, stride_k, q, k,
                  BLOCK_M, BLOCK_N, BLOCK_DS, BLOCK_DS == BLOCK_D, UPCAST, PREC)


@triton.jit
def mul_rn(a, b):
    """a·b rounded on its own (PTX ``mul.rn``, which ptxas never fuses into an FMA; the interpreter
    rounds every operation)."""
    if FAST_EXP:
        y = libdevice.mul_rn(a, b)
    else:
        y = a * b
    return y


# The general forward stores one column reference per this many columns (a divisor of every BLOCK_N
# of its config lists, GPU and interpreter, and of the tile sweep's).
COL_REF_GROUP = tl.constexpr(16)
# A column sum of exp(S − T) below this (its largest term below 2^-86 for 64 rows) may have lost terms
# of relative size 2^-34 or more to the flush below 2^-126: ``rows_and_cols`` falls back to ``col_lse``.
SHARED_MAX_FLOOR = tl.constexpr(2.0 ** -80)


@triton.jit
def rows_and_cols(s, m_i, l_i, row_ok, col_ok):
    """``online_rows`` and the tile's column partials from ONE exponential per entry.

    P = exp(S − t) with t the tile's row maxima serves both sides: the rows add Σⱼ P·exp(t − m_new) to
    their running sums, the columns sum P·exp(t − T) = exp(S − T) with T the tile's maximum, and the
    column's LSE is T + log of that sum.  Returned as (T, sums): the caller stores the sums and T
    once per ``COL_REF_GROUP`` columns, and the log is taken where the row tiles' partials are
    merged, once per entry of the partial instead of once per column, thread and tile.  That is
    exact while every column's largest entry is within about 55 of T (its sum ≥
    ``SHARED_MAX_FLOOR``), which holds for every tile of logits spread less than that (unit features
    at scale ≤ 27 always); a tile with a column below the floor (or entirely −inf) takes each
    column's LSE with its own maximum (``col_lse``) in a branch with no dot, and returns (+inf,
    LSEs): a reference of +inf marks partials that are LSEs already.  Against ``online_rows`` +
    ``col_lse`` this saves one exponential per entry, the column max reduction across lanes and
    warps, and the logs.  Rows outside ``row_ok`` take no part in the columns (the unmasked tiles of
    ``_fwd_kernel`` leave them in S; their row sums are never stored); columns outside ``col_ok``
    (True in a tile inside the matrix) do not call for the fallback.
    """
    t = tl.max(s, 1)
    m_new = tl.maximum(m_i, t)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    t_safe = tl.where(t == float("-inf"), m_safe, t)  # a row with nothing allowed here: P = 0, weight 1
    p = fexp(s - t_safe[:, None])
    l_new = l_i * fexp(m_i - m_safe) + tl.sum(p, 1) * fexp(t_safe - m_safe)
    t_col = tl.where(row_ok, t, float("-inf"))
    big = tl.max(t_col, 0)
    c_ref = tl.where(big == float("-inf"), 0.0, big)
    c_val = tl.sum(p * fexp(t_col - c_ref)[:, None], 0)  # a row with t = −inf weighs 0
    if tl.max((col_ok & ~(c_val >= SHARED_MAX_FLOOR)).to(tl.int32), 0) > 0:
        c_ref = float("inf")
        c_val = col_lse(tl.where(row_ok[:, None], s, float("-inf")))
    return m_new, l_new, c_ref, c_val
