"""Compile the sim_lse kernels for an H100 (sm_90) on a machine without a GPU.

Triton's interpreter runs code the compiler rejects (loop-carried values that
change type, runtime ``if``/``while`` over tensors, shared-memory overflows), so
the interpreter tests alone do not prove the kernels build for the GPU.  This
compiles each kernel with Triton's bundled ptxas in a subprocess without
``TRITON_INTERPRET`` (tests/conftest.py sets it for this process).  About 10 s a
kernel, so opt-in: ``CONTRASTIVE_OPS_COMPILE_CHECK=1`` (``=all`` for every dtype
and both D layouts: about 6 minutes on two cores).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

_MODE = os.environ.get("CONTRASTIVE_OPS_COMPILE_CHECK", "")


@pytest.mark.skipif(not _MODE, reason="opt-in: CONTRASTIVE_OPS_COMPILE_CHECK=1 (compiles for sm_90, ~1-6 min)")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), _MODE], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _compile_all(mode: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from contrastive_ops.backends._triton import core as c

    target = GPUTarget("cuda", 90, 32)
    idx = ("RowIndex", "ColIndex", "ColStart", "ColEnd", "Exclude")
    feats = ("Q", "K", "Z", "DQ", "DK", "DZ")

    def compile_one(kern, dt, consts):
        fn = kern.fn
        sig = {n: "constexpr" if n in consts else dt if n in feats else "*i32" if n in idx
               else "i32" if n in ("B", "M", "D") or n.startswith("stride") else "*fp32" for n in fn.arg_names}
        return triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                              options=dict(num_warps=4, num_stages=2))

    dtypes = (("*fp16", "tf32"), ("*bf16", "tf32"), ("*fp32", "ieee")) if mode == "all" else (("*fp16", "tf32"),)
    layouts = ((128, True), (200, False)) if mode == "all" else ((128, True),)
    failures = 0
    for dt, prec in dtypes:
        for D, one in layouts:
            bd, dp = (128, 128) if one else (64, 256)
            base = dict(UPCAST=False, PREC=prec)
            gen = dict(base, HAS_ROW_INDEX=True, HAS_COL_INDEX=True, HAS_RANGE=True, N_EXCLUDE=2, WANT_COL=True)
            bwd = dict(BLOCK_D=bd, BLOCK_DO=128, ONE_CHUNK=one, REUSE=one)
            jobs = [
                (c._sim_lse_fwd_kernel, dict(gen, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_M=64, BLOCK_N=64)),
                (c._sim_lse_bwd_dq_kernel, dict(gen, **bwd, BLOCK_M=64, BLOCK_N=64)),
                (c._sim_lse_bwd_dk_kernel, dict(gen, **bwd, BLOCK_M=64, BLOCK_N=64)),
                (c._sim_lse_bwd_atomic_kernel, dict(gen, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_DP=dp, BLOCK_M=64,
                                                    BLOCK_N=64)),
                (c._sim_lse_gram_fwd_kernel, dict(base, N_EXCLUDE=2, BLOCK_D=bd, ONE_CHUNK=one, BLOCK=64)),
                (c._sim_lse_gram_bwd_kernel, dict(base, N_EXCLUDE=1, **bwd, TERMS=3, BLOCK=64)),
                (c._sim_lse_gram_bwd_kernel, dict(base, N_EXCLUDE=2, **bwd, TERMS=1, BLOCK=64)),
                (c._sim_lse_gram_bwd_atomic_kernel, dict(base, N_EXCLUDE=2, BLOCK_D=bd, ONE_CHUNK=one, BLOCK_DP=dp,
                                                         BLOCK=64)),
            ]
            for kern, consts in jobs:
                name = kern.fn.__name__
                try:
                    k = compile_one(kern, dt, consts)
                    print(f"ok   {name} {dt} D={D} shared={k.metadata.shared}", flush=True)
                except Exception as e:  # noqa: BLE001 - reported
                    failures += 1
                    print(f"FAIL {name} {dt} D={D}: {type(e).__name__}: {str(e)[:800]}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if _compile_all(sys.argv[1] if len(sys.argv) > 1 else "1") else 0)
