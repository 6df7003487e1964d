"""Performance model of the CUDA sim_lse step (forward + backward) on an H200.

The CUDA backend (csrc/tiling.h, csrc/cuda/) runs, per tile of br × bc pairs
(B anchors × M candidates, D features, e bytes per input element):

  forward   GEMM  G = Q_b K_bᵀ          2·br·bc·D FLOPs, writes G (fp32, 4 B/pair)
            epilogue (one read of G)    reads G (4 B/pair); row partials and, with the
                                        column LSE, column partials (O(br + bc))
            merges                      O(br + bc)
  backward  GEMM  G = Q_b K_bᵀ          2·br·bc·D, writes G (4 B/pair)
            epilogue (one read of G)    reads G (4 B/pair), writes dS (e_ds B/pair)
            GEMM  dQ_b += dS K_b        2·br·bc·D, reads dS (e_ds B/pair)
            GEMM  dK_b += dSᵀ Q_b       2·br·bc·D, reads dS (e_ds B/pair)
            partial sum (dscale)        O(blocks)

so the S-sized HBM traffic is 8 B/pair forward and 8 + 3·e_ds B/pair backward
(14 for 16-bit inputs): five passes over a B×M-sized array per step, against
none for the GEMMs' own operands (Q, K: (B + M)·D·e per tile row / column).
Each kernel takes max(FLOPs / peak, bytes / bandwidth) (kernels on one stream
do not overlap) plus a launch cost; the epilogue is also bounded by the
special-function units (2 exponentials per pair forward with the column LSE,
1 without; 1–2 backward) and by instruction issue: INSTR_PER_PAIR SASS
instructions per pair (counted in the sm_90a build by benchmarks/cuda_sass.py,
checked against the source by tests/test_cuda_static.py) at 4 warp instructions
per clock per SM.  The merges of the partials are latency-bound: one global
load latency (~1 µs under load) per batch of 16 partials per thread.

The issue bound is what the first H200 run measured: the previous epilogues
(one column per thread, two warp reductions per element, the masks tested per
element, accurate expf) ran 179 / 125 SASS instructions per pair (forward /
backward loop bodies), which predicts 1.43 / 1.00 ms at B = 16384 against the
1.21 / 0.81 ms measured (results/nvidia-h200-2026-12-04-diag/profile.log),
where the HBM bound alone said 0.25 / 0.37 ms.

Ceilings (measured on the H200 of the GPU runs, see /work/shared/BUILD-NOTES.md):
~790 TFLOP/s dense bf16/fp16, ~4.3 TB/s HBM; fp32 GEMMs in IEEE fp32 (TF32
off) ~60 TFLOP/s; exp throughput 16/clk/SM × 132 SMs × 1.98 GHz.

Usage: python benchmarks/cuda_model.py [--B 65536] [--M 65536] [--D 512] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

PEAK_FLOPS = {"bf16": 790e12, "fp16": 790e12, "fp32": 60e12, "fp64": 60e12}
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
HBM_BW = 4.3e12
EXP_RATE = 16 * 132 * 1.98e9
LAUNCH_S = 4e-6  # per kernel launch on a busy stream (tiles are large: a small term)
ISSUE_RATE = 32 * 4 * 132 * 1.98e9  # thread instructions per second (4 warp instructions / clk / SM)
# SASS instructions per pair of the epilogues' main loops (python benchmarks/cuda_sass.py; fp32 tiles,
# no masks, 16-bit dS; tests/test_cuda_static.py checks them against a fresh build).
INSTR_PER_PAIR = {"lse_fwd": 25.9, "lse_bwd": 18.0, "siglip_fwd": 41.9, "siglip_bwd": 18.2}
MERGE_BATCH = 16  # partials a merge thread loads at once (csrc/cuda/epilogues.cu: kMergeBatch)
LOAD_LATENCY_S = 1e-6
SUB_ROWS, SUB_COLS = 32, 256 * 4  # rows × columns of one epilogue thread block (fp32 tiles, V = 4)


@dataclass
class Step:
    """Predicted times (seconds) of one sim_lse step."""

    gemm_s: float  # the four GEMMs alone at the ceiling (the lower bound of any tiled design)
    fwd_s: float
    bwd_s: float
    hbm_bytes: float
    flops: float
    tiles: int

    @property
    def total_s(self):
        return self.fwd_s + self.bwd_s

    @property
    def over_gemm(self):
        return self.total_s / self.gemm_s


def tile_shape(B: int, M: int) -> tuple[int, int]:
    """The CUDA backend's default tile (csrc/cuda/sim_lse_cuda.cpp: tile_shape)."""
    return min(B, 2048), min(M, 16384)


def kernel_time(flops: float, bytes_: float, peak: float, exps: float = 0.0, instrs: float = 0.0) -> float:
    return max(flops / peak, bytes_ / HBM_BW, exps / EXP_RATE, instrs / ISSUE_RATE) + LAUNCH_S


def merge_time(nparts: int) -> float:
    """One merge launch: each thread folds nparts partials, MERGE_BATCH loads in flight at a time."""
    return LAUNCH_S + math.ceil(nparts / MERGE_BATCH) * LOAD_LATENCY_S


def predict(B: int, M: int, D: int, dtype: str = "bf16", want_col: bool = True, tile=None) -> Step:
    e = ELEM_BYTES[dtype]
    acc = 8 if dtype == "fp64" else 4
    e_ds = e  # dS tiles are written in the input dtype (fp16 σ-scaled)
    peak = PEAK_FLOPS[dtype]
    br, bc = tile or tile_shape(B, M)
    nr, nc = math.ceil(B / br), math.ceil(M / bc)
    fwd = bwd = 0.0
    total_bytes = total_flops = 0.0
    for _ in range(1):  # every tile has the same shape up to the ragged edges: model the full ones
        pairs = br * bc
        gemm_flops = 2.0 * pairs * D
        operand_bytes = (br + bc) * D * e
        # forward
        f_gemm = kernel_time(gemm_flops, operand_bytes + acc * pairs, peak)
        f_epi = kernel_time(0, acc * pairs, peak, exps=(2 if want_col else 1) * pairs,
                            instrs=INSTR_PER_PAIR["lse_fwd"] * pairs)
        f_merge = merge_time(math.ceil(bc / SUB_COLS)) + (merge_time(math.ceil(br / SUB_ROWS)) if want_col else 0)
        fwd = f_gemm + f_epi + f_merge
        # backward
        b_gemm = kernel_time(gemm_flops, operand_bytes + acc * pairs, peak)
        b_epi = kernel_time(0, (acc + e_ds) * pairs, peak, exps=(2 if want_col else 1) * pairs,
                            instrs=INSTR_PER_PAIR["lse_bwd"] * pairs)
        b_dq = kernel_time(gemm_flops, e_ds * pairs + bc * D * e + 2 * br * D * acc, peak)
        b_dk = kernel_time(gemm_flops, e_ds * pairs + br * D * e + 2 * bc * D * acc, peak)
        bwd = b_gemm + b_epi + b_dq + b_dk + LAUNCH_S
        total_bytes = (2 * (operand_bytes + acc * pairs) + acc * pairs + (acc + e_ds) * pairs
                       + 2 * e_ds * pairs + (br + bc) * D * (e + 2 * acc))
        total_flops = 4 * gemm_flops
    n = nr * nc
    gemm_only = 4 * 2.0 * B * M * D / peak
    return Step(gemm_only, fwd * n, bwd * n, total_bytes * n, total_flops * n, n)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="*", default=[16384, 65536])
    p.add_argument("--M", type=int, default=None, help="candidates (default: B)")
    p.add_argument("--D", type=int, nargs="*", default=[128, 256, 512, 1024])
    p.add_argument("--dtype", default="bf16", choices=sorted(PEAK_FLOPS))
    p.add_argument("--rows-only", action="store_true", help="no column LSE")
    a = p.parse_args(argv)
    print(f"{'B':>6} {'M':>6} {'D':>5} {'tiles':>5} {'GEMMs ms':>9} {'fwd ms':>8} {'bwd ms':>8} "
          f"{'step ms':>8} {'/GEMMs':>7} {'HBM GB':>7}")
    for B in a.B:
        M = a.M or B
        for D in a.D:
            s = predict(B, M, D, a.dtype, not a.rows_only)
            print(f"{B:>6} {M:>6} {D:>5} {s.tiles:>5} {s.gemm_s * 1e3:>9.2f} {s.fwd_s * 1e3:>8.2f} "
                  f"{s.bwd_s * 1e3:>8.2f} {s.total_s * 1e3:>8.2f} {s.over_gemm:>7.2f} {s.hbm_bytes / 1e9:>7.1f}")


if __name__ == "__main__":
    main()
