"""The grid and tile layouts of the Triton ``"sim_lse"`` kernels against the dense core.

* The split-M forward (flash-decoding: columns split when the row tiles are
  few), with its per-split row partials and per-row-tile column partials, over
  ranges that leave whole splits out of reach, index lists and exclusions.
* The backward's output D-chunks: one chunk over all of D (S chunked or not)
  and several chunks, in the dq/dk and Gram kernels.
* The Gram forward's ownership of row tiles I and T−1−I (odd and even T) and
  the Gram backward's loops before, on and after the diagonal.
* fp32 accuracy against float64 (exact ``ieee`` under the interpreter,
  ``tf32x3`` on a GPU), the precision each dtype gets, the autotune lists,
  keys and pruning, and the compile specifications.

Outputs are NaN-poisoned.  Under the interpreter: 32-row tiles, S chunks of 32,
output chunks of up to 64, 4 "SMs" (so small shapes split their columns).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from contrastive_ops.primitives.sim_lse import sim_lse_reference
from helpers import DEVICE
from helpers import triton_assert_close as assert_close
from test_triton_kernels import _check_lse, _finite, _full_kw, _i32, _reference_grads, tcore, ttiles

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERP = ttiles.interpreting()


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    monkeypatch.setattr(tcore, "BACKWARD", "deterministic")


def _launches(fn):
    before = ttiles.LAUNCHES.copy()
    out = fn()
    after = ttiles.LAUNCHES.copy()
    after.subtract(before)
    return out, {k: v for k, v in after.items() if v}


def _general(name, dtype):
    """``(q, k, kw)`` of the general (non-Gram) cases of this file."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    kw = {}
    if name == "split_plain":  # 2 row tiles, 130 columns: 3 column splits under the interpreter
        q, k = randn(40, 33), randn(130, 33)
    elif name == "split_narrow_ranges":  # ranges inside the first columns: later splits see no column
        q, k = randn(45, 20), randn(160, 20)
        start = torch.randint(0, 40, (45,), generator=g)
        kw["col_start"], kw["col_end"] = _i32(start), _i32(start + torch.randint(0, 30, (45,), generator=g))
    elif name == "split_late_ranges":  # ranges start in the last split: the first splits write -inf only
        q, k = randn(50, 24), randn(150, 24)
        start = torch.randint(100, 140, (50,), generator=g)
        kw["col_start"], kw["col_end"] = _i32(start), _i32(torch.clamp(start + 20, max=150))
    elif name == "split_index_exclude":
        q, k = randn(60, 40), randn(200, 40)
        kw["row_index"] = _i32(torch.randperm(60, generator=g)[:37])
        kw["col_index"] = _i32(torch.randperm(200, generator=g)[:140])
        kw["exclude"] = _i32(torch.randint(-1, 140, (37, 2), generator=g))
    elif name == "wide_d64":  # S in two chunks of 32, one output chunk of 64 (no tile reuse)
        q, k = randn(70, 64), randn(50, 64)
    elif name == "wide_d100":  # two output chunks of 64 (S recomputed per chunk), four S chunks
        q, k = randn(45, 100), randn(66, 100)
        kw["exclude"] = _i32(torch.randint(-1, 66, (45, 1), generator=g))
    else:
        raise KeyError(name)
    return q, k, kw


def _check_general(name, dtype, want_col):
    q, k, kw = _general(name, dtype)
    fkw = _full_kw(kw)
    scale = torch.tensor(1.7, device=DEVICE)
    (row, col), ran = _launches(lambda: tcore.sim_lse_forward(q, k, scale, want_col=want_col, **fkw))
    assert ran == {"fwd": 1}
    B = q.shape[0] if kw.get("row_index") is None else kw["row_index"].shape[0]
    M = k.shape[0] if kw.get("col_index") is None else kw["col_index"].shape[0]
    g = torch.Generator().manual_seed(3)
    g_row = torch.randn(B, generator=g).to(DEVICE)
    g_col = torch.randn(M, generator=g).to(DEVICE) if want_col else torch.empty(0, device=DEVICE)
    r_row, r_col, r_dq, r_dk, r_ds = _reference_grads(q, k, scale, kw, want_col, g_row, g_col)
    _check_lse(row, r_row, dtype, "row_lse")
    if want_col:
        _check_lse(col, r_col, dtype, "col_lse")
    (dq, dk, ds), ran = _launches(lambda: tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row, g_col))
    D = q.shape[1]
    assert ran == {"bwd_dq": 1, "bwd_dk_wide" if tcore.dk_wide(D, dtype) else "bwd_dk": 1}
    assert_close(dq.float(), r_dq, dtype, what="dq")
    assert_close(dk.float(), r_dk, dtype, what="dk")
    assert_close(ds, r_ds.float(), dtype, what="dscale")
    return q, k, kw


@pytest.mark.skipif(not INTERP, reason="split counts of the interpreter's 4-SM plan")
@pytest.mark.parametrize("want_col", [True, False], ids=["col", "nocol"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["split_plain", "split_narrow_ranges", "split_late_ranges", "split_index_exclude"])
def test_split_m_forward(name, dtype, want_col):
    q, k, kw = _general(name, dtype)
    B = q.shape[0] if kw.get("row_index") is None else kw["row_index"].shape[0]
    M = k.shape[0] if kw.get("col_index") is None else kw["col_index"].shape[0]
    block_m, n_split, cps = tcore.fwd_plan(B, M, q.device)
    assert n_split >= 3 and cps % ttiles.INTERP_N[0] == 0 and (n_split - 1) * cps < M <= n_split * cps
    _check_general(name, dtype, want_col)


def test_fwd_plan_gpu_shapes(monkeypatch):
    """On 132 SMs: no split while the row tiles fill the GPU, splits of ≥ 1024 columns otherwise."""
    monkeypatch.setattr(tcore, "interpreting", lambda: False)
    monkeypatch.setattr(tcore, "sm_count", lambda device: 132)
    dev = torch.device("cpu")
    assert tcore.fwd_plan(65536, 65536, dev) == (128, 1, 65536)
    bm, n, cps = tcore.fwd_plan(4096, 65536, dev)  # 64 row tiles of 64: about 2 programs per SM
    assert bm == 64 and n == 5 and cps % 128 == 0 and n * cps >= 65536
    bm, n, cps = tcore.fwd_plan(1024, 1024, dev)  # too few columns to split
    assert n == 1 and cps >= 1024
    assert tcore.fwd_plan(1024, 0, dev)[1] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["wide_d64", "wide_d100"])
def test_output_chunks(name, dtype):
    q, _, _ = _general(name, dtype)
    D = q.shape[1]
    bdo = tcore.block_do(D, dtype)
    if INTERP:
        assert (bdo, -(-D // bdo)) == {64: (64, 1), 100: (64, 2)}[D]
        assert tcore.chunk_d(D) == 32
        # several dq chunks: 16-bit dK in one transposed 128-wide accumulator, fp32 in the dq chunks
        assert tcore.dk_wide(D, dtype) == (D == 100 and dtype != torch.float32)
    _check_general(name, dtype, True)


def test_block_do_gpu_widths(monkeypatch):
    """S once per gradient up to D = 512 in 16-bit (128 in fp32, 256 in the Gram backward); D = 768 and
    1024 in two chunks.  S chunks: 16-bit one chunk up to 128 then 64 wide, fp32 16 wide (SigLIP's the
    same, at most 64).  The transposed dk accumulator takes 16-bit D of 512 and 1024 padded."""
    monkeypatch.setattr(ttiles, "interpreting", lambda: False)
    monkeypatch.setattr(tcore, "interpreting", lambda: False)
    for D, bf16, f32 in [(64, 64, 64), (128, 128, 128), (200, 256, 128), (256, 256, 128), (512, 512, 128),
                         (768, 512, 128), (1024, 512, 128)]:
        assert ttiles.block_do(D, torch.bfloat16) == bf16, D
        assert ttiles.block_do(D, torch.float32) == f32, D
        assert ttiles.gpu_block_do(D, "bf16") == bf16 and ttiles.gpu_block_do(D, "fp32") == f32
        gram = min(bf16, ttiles.GRAM_MAX_DO)  # the Gram backward's accumulator stops at 256
        assert ttiles.block_do(D, torch.bfloat16, gram=True) == gram == ttiles.gpu_block_do(D, "bf16", gram=True)
        assert ttiles.chunk_d(D, torch.bfloat16) == (max(64, D) if D <= 128 else 64) == ttiles.gpu_chunk_d(D)
        assert ttiles.chunk_d(D, torch.float32) == 16 == ttiles.gpu_chunk_d(D, "fp32")
        assert ttiles.block_d(D, torch.float32) == 16 and ttiles.block_d(D, torch.bfloat16) == 64
        assert tcore.dk_wide(D, torch.bfloat16) == (D >= 257) and not tcore.dk_wide(D, torch.float32)
    for D in (100, 128, 200):  # the Gram kernels stream two chunks where 16-bit would hold one tile
        assert tcore.gram_chunk_d(D, torch.bfloat16) == 64 and tcore.gram_chunk_d(D, torch.float32) == 16
    assert tcore.gram_chunk_d(64, torch.float16) == 32 and tcore.gram_chunk_d(40, torch.bfloat16) == 32
    assert tcore.gram_chunk_d(32, torch.float16) == 32
    bf, f32 = torch.bfloat16, torch.float32  # fp32 Gram matrices: the GEMM Gram backward, at any size
    assert tcore.backward_path(128, 64, 64, f32, gram=True) == "gemm"
    assert tcore.backward_path(128, 64, 64, bf, gram=True) == tcore.backward_path(128, 64, 64, f32) == "deterministic"
    for D, bd in ((8, 16), (32, 32), (257, 64), (1025, 64)):
        assert ttiles.block_d(D, torch.bfloat16) == bd and ttiles.block_d(D, torch.float32) == min(bd, 16)
        assert tcore.dk_wide(D, torch.float16) == (D == 257)


def _gram(B, D, dtype, exclude_self=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    exclude = _i32(torch.arange(B).reshape(B, 1)) if exclude_self else None
    return Z, exclude


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", [(70, 20), (100, 24), (128, 40), (33, 100)],
                         ids=["T3-odd", "T4-even", "T4-full", "T2-two-out-chunks"])
def test_gram_tile_ownership_and_loops(B, D, dtype):
    """Gram forward (program p owns row tiles p and T−1−p: odd T leaves the middle tile alone) and the
    Gram backward's loops before / on / after the diagonal, against the dense core."""
    if not tcore.gram_kernels_take(dtype):
        pytest.skip("fp32 Gram inputs take the general kernels on GPUs (test_fp32_gram_routing_on_gpus)")
    Z, exclude = _gram(B, D, dtype, seed=B + D)
    scale = torch.tensor(1.3, device=DEVICE)
    (row, col), ran = _launches(lambda: tcore.sim_lse_forward(Z, Z, scale, exclude=exclude))
    assert ran == {"gram_fwd": 1} and col.numel() == 0
    g_row = torch.randn(B, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    r_row, _, r_dz, _, r_ds = _reference_grads(Z, Z, scale, {"exclude": exclude}, False, g_row, None)
    _check_lse(row, r_row, dtype, "row_lse")
    args = (Z, Z, scale, None, None, None, None, exclude, row, col, g_row, torch.empty(0, device=DEVICE))
    (dq, dk, ds), ran = _launches(lambda: tcore.sim_lse_backward(*args))
    assert ran == {"gram_bwd": 1}
    assert_close((dq.float() + dk.float()), r_dz, dtype, what="dz")
    assert_close(ds, r_ds.float(), dtype, what="dscale")


@pytest.mark.parametrize("gram", [False, True], ids=["clip", "gram"])
def test_fp32_accuracy_against_float64(gram):
    """fp32 inputs (``ieee`` under the interpreter, ``tf32x3`` on the GPU) are as accurate as the dense
    fp32 reference: each error against float64 within 4× the reference's own (plus fp32 rounding of
    the values), row/col LSE and every gradient."""
    g = torch.Generator().manual_seed(17)
    B, M, D = (96, 96, 72) if gram else (70, 90, 72)
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    k = q if gram else torch.randn(M, D, generator=g, dtype=torch.float64)
    scale64 = torch.tensor(4.0, dtype=torch.float64)
    exclude = _i32(torch.arange(B).reshape(B, 1)) if gram else None
    want_col = not gram
    g_row = torch.randn(B, generator=g, dtype=torch.float64)
    g_col = torch.randn(M, generator=g, dtype=torch.float64) if want_col else torch.empty(0, dtype=torch.float64)

    def dense(qq, kk, ss, same):
        qq = qq.detach().requires_grad_()
        kk = qq if same else kk.detach().requires_grad_()
        row, col = sim_lse_reference(qq, kk, ss, want_col=want_col, exclude=exclude)
        loss = (g_row.to(qq) * _finite(row)).sum()  # qq's dtype and device (float64 on the host, fp32 on DEVICE)
        if want_col:
            loss = loss + (g_col.to(qq) * _finite(col)).sum()
        grads = torch.autograd.grad(loss, (qq,) if same else (qq, kk))
        return [row, col, *grads]

    exact = dense(q, k, scale64, gram)
    q32 = q.float().to(DEVICE)
    k32 = q32 if gram else k.float().to(DEVICE)
    ref32 = dense(q32, k32, scale64.float().to(DEVICE), gram)
    s32 = scale64.float().to(DEVICE)
    row, col = tcore.sim_lse_forward(q32, k32, s32, exclude=exclude, want_col=want_col)
    dq, dk, _ = tcore.sim_lse_backward(q32, k32, s32, None, None, None, None, exclude, row, col,
                                       g_row.float().to(DEVICE), g_col.float().to(DEVICE))
    got = [row, col, dq + dk] if gram else [row, col, dq, dk]
    for what, a, r, e in zip(["row_lse", "col_lse", "dq", "dk"], got, ref32, exact):
        if e is None or e.numel() == 0:
            continue
        e = _finite(e.detach()).cpu()
        err_kernel = float((_finite(a.detach()).double().cpu() - e).abs().max())
        err_ref = float((_finite(r.detach()).double().cpu() - e).abs().max())
        floor = 2.0 ** -23 * float(e.abs().max())  # one fp32 rounding of the largest value
        assert err_kernel <= 4 * err_ref + 4 * floor, f"{what}: kernel {err_kernel:.3g}, fp32 reference {err_ref:.3g}"


def test_dot_precision_per_dtype(monkeypatch):
    """fp32 runs on tensor cores as tf32x3 on the GPU, tf32 only when the user allowed TF32; exact
    fp32 under the interpreter; bf16 upcast only under the interpreter."""
    monkeypatch.setattr(ttiles, "interpreting", lambda: False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert ttiles.dot_flags(torch.float32) == dict(UPCAST=False, PREC="tf32x3")
    assert ttiles.dot_flags(torch.bfloat16)["UPCAST"] is False
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert ttiles.dot_flags(torch.float32)["PREC"] == "tf32"
    monkeypatch.setattr(ttiles, "interpreting", lambda: True)
    assert ttiles.dot_flags(torch.float32)["PREC"] == "ieee"
    assert ttiles.dot_flags(torch.bfloat16) == dict(UPCAST=True, PREC="ieee")


def test_autotune_lists_keys_and_pruning(monkeypatch):
    """≤ 4 configs per kernel on the GPU, tiles ≥ 64 rows and warps a multiple of 4 (wgmma), the
    first fitting config alone with CONTRASTIVE_OPS_TRITON_CONFIGS=default, B and M in the keys as
    log₂ buckets, and configs whose accumulator would spill or whose tiles overflow shared memory pruned."""
    lists = [ttiles.FWD_N_GPU, ttiles.BWD_GPU, ttiles.BWD_DQ_GPU, ttiles.FWD_GPU, ttiles.BWD_ATOMIC_GPU, ttiles.SYM_FWD_GPU,
             ttiles.SYM_BWD_GPU, ttiles.SYM_ATOMIC_GPU, ttiles.DS_GPU, ttiles.FWD_N_GPU_FP32, ttiles.FWD_GPU_FP32,
             ttiles.DS_GPU_FP32]
    for lst in lists:
        assert 1 <= len(lst) <= ttiles.MAX_GPU_CONFIGS
        for blocks, warps, _ in lst:  # the dq list's 32 is BLOCK_N: the N side of S and the K side of dS·K
            assert warps % 4 == 0 and all(b >= (32 if lst is ttiles.BWD_DQ_GPU and i == 1 else 64)
                                          for i, b in enumerate(blocks)), lst
    monkeypatch.setattr(ttiles, "interpreting", lambda: False)
    import triton

    bwd = ttiles.configs(("BLOCK_M", "BLOCK_N"), ttiles.BWD_GPU, None)
    assert len(bwd) == len(ttiles.BWD_GPU)
    kept = ttiles._prune(bwd, {}, BLOCK_DO=512)  # 64 × 512 fp32 accumulators need 8 warps and 64-row tiles
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [(64, 64, 8)]
    assert ttiles._prune(bwd, {}, BLOCK_DO=128) == bwd
    # The forward-shaped kernels autotune fp32 inputs over their own list (8-warp tiles: the 4-warp
    # ones spill with tf32x3 operands), 16-bit inputs over the first one.
    fwd = ttiles.configs(("BLOCK_N",), ttiles.FWD_N_GPU, None)
    n16 = len(ttiles.FWD_N_GPU)
    assert len(fwd) == n16 + len(ttiles.FWD_N_GPU_FP32)
    assert [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in fwd[n16:]] == \
        [(bn, w, st) for (bn,), w, st in ttiles.FWD_N_GPU_FP32]
    f32, b16 = dict(Q=torch.empty(0)), dict(Q=torch.empty(0, dtype=torch.bfloat16))
    assert ttiles._prune(fwd, b16, BLOCK_D=128, BLOCK_M=128) == fwd[:n16]
    kept = ttiles._prune(fwd, f32, BLOCK_D=128, BLOCK_M=128)  # tf32x3 tiles: 128 × 128 × 3 stages is 384 KB
    assert 1 <= len(kept) < len(fwd) - n16 and all(c in fwd[n16:] for c in kept)
    assert all(ttiles.fwd_smem(128, c.kwargs["BLOCK_N"], 128, c.num_stages, 4) <= ttiles.SMEM_LIMIT for c in kept)
    assert ttiles._prune(bwd, f32, BLOCK_DO=128) == bwd  # a kernel without an fp32 list keeps its one list
    assert ttiles.gpu_choices(ttiles.DS_GPU, "fp32") is ttiles.DS_GPU_FP32
    assert ttiles.gpu_choices(ttiles.DS_GPU, "bf16") is ttiles.DS_GPU
    assert ttiles.gpu_choices(ttiles.BWD_GPU, "fp32") is ttiles.BWD_GPU
    assert ttiles.fwd_smem(128, 128, 128, 3, 4) == 393216 and ttiles.fwd_smem(128, 128, 128, 3, 2) == 131072
    monkeypatch.setattr(ttiles, "CONFIGS", "default")  # the first config that fits, alone
    assert ttiles._prune(bwd, {}, BLOCK_DO=128) == bwd[:1]
    assert ttiles._prune(fwd, b16, BLOCK_D=128, BLOCK_M=128) == fwd[:1]  # the first fitting one of the dtype's list
    assert ttiles._prune(fwd, f32, BLOCK_D=128, BLOCK_M=128) == kept[:1]
    monkeypatch.setattr(ttiles, "CONFIGS", "fast")
    with pytest.raises(ValueError, match="CONTRASTIVE_OPS_TRITON_CONFIGS"):
        ttiles.configs(("BLOCK_M",), ttiles.BWD_GPU, None)
    for kern in (tcore._fwd_kernel, tcore._bwd_dq_kernel, tcore._bwd_dk_kernel):
        assert "B_LOG2" in kern.keys and "M_LOG2" in kern.keys
    for kern in (tcore._gram_fwd_kernel, tcore._gram_bwd_kernel):
        assert "B_LOG2" in kern.keys
    assert [ttiles.log2_bucket(n) for n in (1, 2, 3, 8, 9, 4096, 4097)] == [0, 1, 2, 3, 4, 12, 13]
    assert isinstance(triton.Config, type)


def test_compile_specs():
    """Every spec names a jitted kernel, types every non-constexpr argument, and stays within the
    register rule; every dtype and D of the compile gate is covered for each kernel."""
    import triton

    from contrastive_ops.backends._triton import siglip as tsiglip

    for mod, names in ((tcore, {"sim_lse_fwd", "sim_lse_gram_fwd", "sim_lse_bwd_dq", "sim_lse_bwd_dk",
                                "sim_lse_bwd_dk_wide", "sim_lse_gram_bwd", "sim_lse_bwd_ds", "sim_lse_gram_ds",
                                "sim_lse_bwd_atomic", "sim_lse_gram_bwd_atomic"}),
                       (tsiglip, {"siglip_fwd", "siglip_bwd_dx", "siglip_bwd_dy", "siglip_bwd_g", "siglip_g_loss"})):
        specs = mod.compile_specs()
        assert {s["name"] for s in specs} == names
        for s in specs:
            # the @triton.jit function (an InterpretedFunction under the interpreter), not the Autotuner
            assert isinstance(s["fn"], (triton.runtime.jit.JITFunction, triton.runtime.interpreter.InterpretedFunction))
            assert not isinstance(s["fn"], triton.runtime.Autotuner)
            assert set(s["args"]) | set(s["constexprs"]) == set(s["fn"].arg_names)
            assert s["dtype"] in ("bf16", "fp16", "fp32") and s["D"] in ttiles.SPEC_DS
            assert s["num_warps"] % 4 == 0
            # S tiles of ≥ 64 rows (wgmma's M); the wide dk kernel's 16 or 32 columns are the N side of both
            # products, as are the 32 columns of the row-stationary dq and dx kernels (S's N, dS·K's K)
            narrow_n = s["constexprs"].get("DK_T") or s["name"] in ("sim_lse_bwd_dq", "siglip_bwd_dx")
            assert all(v >= 64 for n, v in s["constexprs"].items() if n in ("BLOCK_M", "BLOCK_N", "BLOCK")
                       if not (n == "BLOCK_N" and narrow_n))
            if "BLOCK_DO" in s["constexprs"]:
                assert ttiles.acc_fits(s["constexprs"], s["num_warps"], s["constexprs"]["BLOCK_DO"])
            if s["name"] in ("sim_lse_fwd", "sim_lse_gram_fwd", "sim_lse_bwd_ds", "sim_lse_gram_ds"):
                c = s["constexprs"]
                bm, bn = c.get("BLOCK_M", c.get("BLOCK")), c.get("BLOCK_N", c.get("BLOCK"))
                elem = 4 if s["dtype"] == "fp32" else 2
                assert ttiles.fwd_smem(bm, bn, c["BLOCK_D"], s["num_stages"], elem) <= ttiles.SMEM_LIMIT
        for name in names:
            got = {(s["dtype"], s["D"]) for s in specs if s["name"] == name}
            if name == "sim_lse_bwd_dk_wide":  # 16-bit D of 512 to 1024
                assert got == {(dt, D) for dt in ("bf16", "fp16") for D in (512, 768, 1024)}
                continue
            want = {(dt, D) for dt in ("bf16", "fp16", "fp32") for D in ttiles.SPEC_DS}
            if name == "sim_lse_gram_bwd":  # fp32 Gram matrices take the GEMM Gram backward
                want -= {("fp32", D) for D in ttiles.SPEC_DS}
            if name in ("sim_lse_bwd_atomic", "sim_lse_gram_bwd_atomic"):  # opt-in, 16-bit, D ≤ 256
                want = {(dt, D) for dt in ("bf16", "fp16") for D in ttiles.SPEC_DS if D <= 256}
            if name == "sim_lse_bwd_dk":
                want -= {(dt, D) for dt in ("bf16", "fp16") for D in (512, 768, 1024)}
            assert got == want, name


def test_poison_switch_on_the_kernel_module(monkeypatch):
    """``POISON_OUTPUTS`` on the sim_lse module poisons its outputs without ``tiles.POISON_OUTPUTS``."""
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", False)
    monkeypatch.setattr(tcore, "POISON_OUTPUTS", True)
    out = tcore._empty((3,), torch.float32, torch.device("cpu"))
    assert torch.isnan(out).all()


def test_fp32_gram_routing_on_gpus(monkeypatch):
    """On a GPU fp32 Gram inputs take the general kernels (forward and backward alike); 16-bit ones
    and every dtype under the interpreter keep the Gram kernels."""
    import contrastive_ops.backends._triton.sim_lse as sl

    z32 = torch.zeros(8, 4)
    z16 = z32.to(torch.bfloat16)
    args = (None, None, None, None, False)
    assert sl._gram_applies(True, z32, z32, *args)  # the interpreter: fp32 too
    monkeypatch.setattr(sl, "interpreting", lambda: False)
    assert not sl.gram_kernels_take(torch.float32) and sl.gram_kernels_take(torch.bfloat16)
    assert not sl._gram_applies(True, z32, z32, *args)
    assert sl._gram_applies(True, z16, z16, *args)
    monkeypatch.setattr(sl, "GRAM_FP32_ON_GPU", True)
    assert sl._gram_applies(True, z32, z32, *args)
