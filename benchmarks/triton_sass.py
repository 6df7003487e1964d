r"""The Triton tile loops of the CLIP step read from their sm_90a machine code, and a model of their
time calibrated on the H200 run: where the forward's time goes, without a GPU.

For the forward (``sim_lse_fwd``: row and column LSE of S) and the GEMM backward's dS kernel
(``sim_lse_bwd_ds``), at the tiles the dispatcher takes for a CLIP step (``fwd_plan``'s BLOCK_M
for the shape, the first config of the kernel's list), the kernel is compiled for sm_90a
(``GPUTarget("cuda", 90, 32)``, the installed Triton) and its SASS (``cuobjdump`` from Triton's
``backends/nvidia/bin``) is cut into:

* the **D loop**: the innermost loop, one BLOCK_D chunk of the S product (its HGMMA instructions);
* the **epilogue**: the rest of the column-tile loop, per thread and column tile (the online row
  LSE, the column partials, stores; the forward's first column-tile loop, over the tiles inside
  the matrix, which take no per-entry mask); for the dS kernel, which takes one tile per program,
  the rest of the kernel.  Nothing overlaps it with the tile's products: the next tile's D loop
  starts after it.  Blocks that a forward branch jumps over (``cold``: ``rows_and_cols``' exact
  fallback for tiles whose logits spread more than about 55) are left out; the table gives
  their size.

Model of one column tile on one SM (one block per SM, W warps, 4 schedulers):

    t_tile = t_mma / EFF_D  +  K_EPI · E · W / 4          (clocks)
    t_mma  = 2 · BLOCK_M · BLOCK_N · D / (790e12 / 132 / 1.98e9)

with E the epilogue's instructions per thread.  The two constants are fitted to the two forward
times the H200 measured (``costs.MEASURED["general_fwd"]``: B = M = 16384, D = 512 and 1024, 64 ×
128 tiles, Triton 3.6), using the SASS of that kernel as it was measured (``MEASURED_SASS``:
``online_rows`` + ``col_lse`` with ``tl.exp``, as each Triton compiled it): EFF_D is the D loop's
fraction of the dense bf16 rate, K_EPI the epilogue's clocks per issued instruction.  The fit
uses Triton 3.6's machine code (the GPU machine's); another Triton gives other counts, so the
script says which one it read.  In the CLIP step the dS kernel takes the longer of its tile loop
and its HBM write (its stores retire while the SM goes on), and the products the longer of their
FLOPs at cuBLAS's measured rate and their reads of dS.

    python benchmarks/triton_sass.py                       # the table
    python benchmarks/triton_sass.py --write               # benchmarks/results/triton-tile-model-sm90-<minor>.{md,json}

``tests/test_triton_sass.py`` recompiles the forward under the installed Triton and checks the
committed counts of that version, the calibration and the CLIP step's fraction of peak.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMS, CLOCK = 132, 1.98e9          # H200
DENSE_BF16 = 790e12               # measured torch.matmul bf16 rate (KINDS.md, nvidia-h200-2026-12-04)
PEAK_BF16 = 989.4e12              # datasheet dense bf16
ISSUE_PER_CLK = 4                 # warp instructions per clock per SM
CAL_B = 16384                     # the measured forward: B = M = 16384, D = 512 and 1024, bf16


@dataclass
class TileLoop:
    kernel: str
    D: int
    block_m: int
    block_n: int
    block_d: int
    warps: int
    stages: int
    registers: int
    d_loop: int        # SASS instructions of one pass of the D loop
    hgmma: int         # HGMMA instructions in it
    epilogue: int      # per thread and column tile: the column-tile loop minus its D loop and cold blocks
    fast_exp: bool
    triton: str
    cold: int = 0      # instructions of the blocks a forward branch skips (``rows_and_cols``' fallback)


def _spec(name: str, D: int, block_m: Optional[int] = None) -> dict:
    """The compile spec of ``name`` (bf16, CLIP flags) at D with the first config of its list (and
    BLOCK_M = ``block_m`` for the forward)."""
    from contrastive_ops.backends._triton import sim_lse, specs

    cands = [s for s in sim_lse.compile_specs() if s["name"] == name and s["dtype"] == "bf16" and s["D"] == D]
    if block_m is not None:
        cands = [s for s in cands if s["constexprs"]["BLOCK_M"] == block_m]
    if not cands:
        raise ValueError(f"no compile spec {name} bf16 D={D} BLOCK_M={block_m}")
    s = dict(cands[0], module="sim_lse")
    s.setdefault("divisible_by_16", specs._default_div16(s["args"]))
    return s


def _sass(spec: dict, fast_exp: bool) -> Tuple[List[Tuple[int, str]], int]:
    import triton
    from triton.backends.compiler import GPUTarget

    from contrastive_ops.backends._triton import specs

    fn = spec["fn"]
    sig = {n: ("constexpr" if n in spec["constexprs"] else spec["args"][n]) for n in fn.arg_names}
    from contrastive_ops.backends._triton import tiles

    if bool(tiles.FAST_EXP) != fast_exp:
        raise RuntimeError("FAST_EXP is fixed when the kernels are first hashed: tile_loop runs each exp mode "
                           "in a process of its own (``tile_loop_in_child``)")
    src = specs._ast_source(fn, sig, spec["constexprs"], specs.spec_attrs(spec))
    k = triton.compile(src, target=GPUTarget(*specs.TARGET),
                       options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", out)]
    return ins, int(specs._ptxas_numbers(specs._run_ptxas(k.asm["ptx"]))["registers"])


def branches(ins: List[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """(address, target) of every branch."""
    out = []
    for a, t in ins:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", t)
        if m:
            out.append((a, int(m.group(1), 16)))
    return out


def loops(ins: List[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """(first, last) address of every loop: a backward branch and its target."""
    return [(b, a) for a, b in branches(ins) if b < a]


def cold_blocks(ins: List[Tuple[int, str]], lo: int, hi: int, skip: Tuple[int, int]) -> List[Tuple[int, int]]:
    """The disjoint address ranges that forward branches in [lo, hi] jump over, leaving out those
    that hold the D loop ``skip`` (a loop's entry guard): the blocks a taken branch skips.  In the
    tile loops these are the rare paths (``rows_and_cols``' exact fallback), which the model leaves
    out of the epilogue."""
    spans = sorted((a, b) for a, b in branches(ins)
                   if lo <= a < b <= hi and not skip[0] <= a <= skip[1] and not (a < skip[0] and skip[1] < b))
    merged: List[Tuple[int, int]] = []
    for a, b in spans:
        if merged and a < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


def tile_loop(name: str, D: int, block_m: Optional[int] = None, fast_exp: bool = True) -> TileLoop:
    """Compile and cut the column-tile loop of kernel ``name`` (module docstring)."""
    import triton

    spec = _spec(name, D, block_m)
    ins, regs = _sass(spec, fast_exp)
    ls = loops(ins)
    nests = [o for o in ls if any(l != o and o[0] <= l[0] and l[1] <= o[1] for l in ls)]
    # the column-tile loop: the first loop holding a D loop (``_fwd_kernel``'s plain tiles; its
    # masked last tile is a second copy after it), else the longest loop
    outer = min(nests) if nests else max(ls, key=lambda x: x[1] - x[0])
    inner = [l for l in ls if l != outer and outer[0] <= l[0] and l[1] <= outer[1]]
    if not inner:  # one tile per program (the dS kernel): the D loop, and the whole rest of the kernel
        (i0, i1), outer = outer, (ins[0][0], ins[-1][0])
    elif len(inner) == 1:
        (i0, i1), = inner
    else:
        raise RuntimeError(f"{name} D={D}: expected one D loop inside the column-tile loop, found {len(inner)}")
    n = lambda a, b: sum(1 for x, t in ins if a <= x <= b and not t.startswith("NOP"))  # noqa: E731
    cold = sum(n(a + 1, b - 1) for a, b in cold_blocks(ins, outer[0], outer[1], (i0, i1)))
    c = spec["constexprs"]
    return TileLoop(name, D, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"], spec["num_warps"], spec["num_stages"], regs,
                    d_loop=n(i0, i1), hgmma=sum(1 for x, t in ins if i0 <= x <= i1 and "HGMMA" in t),
                    epilogue=n(*outer) - n(i0, i1) - cold, fast_exp=fast_exp, triton=triton.__version__, cold=cold)


def tile_loop_in_child(name: str, D: int, block_m: Optional[int] = None, fast_exp: bool = True) -> TileLoop:
    """``tile_loop`` in a fresh process whose ``tiles.FAST_EXP`` is set before any kernel is hashed
    (Triton folds the constexpr globals a kernel reads into keys it caches per process)."""
    args = [sys.executable, os.path.abspath(__file__), "--loop", name, str(D), str(block_m or 0)]
    out = subprocess.run(args + ([] if fast_exp else ["--exact-exp"]), capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                              "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if out.returncode != 0:
        raise RuntimeError(f"tile_loop {name} D={D}: {out.stderr[-3000:]}")
    return TileLoop(**json.loads(out.stdout.strip().splitlines()[-1]))


# The machine code of the forward the H200 measured (``online_rows`` + ``col_lse``, ``tl.exp``, 64 ×
# 128 × 64 tiles on 8 warps, 3 stages), as each Triton compiled it before ``rows_and_cols`` replaced
# that epilogue: the calibration's input, kept as it was measured.
MEASURED_SASS = {
    "3.6": dict(d_loop=89, hgmma=4, epilogue=1572, registers=128),
    "3.8": dict(d_loop=94, hgmma=4, epilogue=1630, registers=116),
}


def measured_loop(D: int, version: Optional[str] = None) -> TileLoop:
    """The measured forward's tile loop at D under Triton ``version`` (default: the installed one)."""
    import triton

    from contrastive_ops.backends._triton.tiles import triton_minor

    v = version or triton.__version__
    minor = triton_minor(v)
    if minor not in MEASURED_SASS:
        raise RuntimeError(f"no machine code of the measured forward for Triton {minor}: compile the kernel the "
                           "H200 ran (online_rows + col_lse, tl.exp) under it and add it to MEASURED_SASS")
    return TileLoop("sim_lse_fwd (measured)", D, 64, 128, 64, 8, 3, fast_exp=False, triton=v,
                    **MEASURED_SASS[minor])


def mma_clocks(t: TileLoop) -> float:
    return 2.0 * t.block_m * t.block_n * t.D / (DENSE_BF16 / SMS / CLOCK)


def epilogue_clocks(t: TileLoop) -> float:
    """Issue clocks of one tile's epilogue on one SM (before K_EPI)."""
    return t.epilogue * t.warps / ISSUE_PER_CLK


def measured_tile_clocks(D: int) -> float:
    """Clocks per column tile of the measured forward (64 × 128 tiles on 132 SMs)."""
    from contrastive_ops.backends._triton.costs import MEASURED

    rows, cols, ms = MEASURED["general_fwd"][D]
    tiles_per_sm = (rows / 64) * (cols / 128) / SMS
    return ms * 1e-3 * CLOCK / tiles_per_sm


def calibrate(t512: TileLoop, t1024: TileLoop) -> Tuple[float, float]:
    """(EFF_D, K_EPI) from the two measured forward times and the measured kernel's SASS."""
    m512, m1024 = measured_tile_clocks(512), measured_tile_clocks(1024)
    eff = (mma_clocks(t1024) - mma_clocks(t512)) / (m1024 - m512)
    k = (m512 - mma_clocks(t512) / eff) / epilogue_clocks(t512)
    return eff, k


def predict(t: TileLoop, eff: float, k: float) -> Dict[str, float]:
    """Clocks per tile, its parts and the kernel's rate in TFLOP/s of S."""
    mma = mma_clocks(t) / eff
    epi = k * epilogue_clocks(t)
    flops = 2.0 * t.block_m * t.block_n * t.D
    return dict(d_loop_clk=mma, epilogue_clk=epi, tile_clk=mma + epi,
                tflops=flops / ((mma + epi) / CLOCK) * SMS / 1e12, epilogue_share=epi / (mma + epi))


def _block_m(B: int) -> int:
    import torch

    from contrastive_ops.backends._triton import sim_lse, tiles

    tiles._SM_COUNT[0] = SMS  # fwd_plan on an H200's 132 SMs without one
    return sim_lse.fwd_plan(B, B, torch.device("cuda", 0))[0]


def clip_step(B: int, D: int, eff: float, k: float) -> Dict[str, float]:
    """Predicted CLIP step (forward + GEMM backward) at B = M, bf16: the two tile kernels from the
    model, the dS write and cuBLAS's products as ``costs`` has them."""
    from contrastive_ops.backends._triton.costs import CUBLAS_FLOPS, HBM_BYTES_PER_S

    pairs = float(B) * B
    fwd = predict(tile_loop_in_child("sim_lse_fwd", D, _block_m(B)), eff, k)
    ds = predict(tile_loop_in_child("sim_lse_bwd_ds", D), eff, k)
    t_fwd = 2 * pairs * D / (fwd["tflops"] * 1e12)
    # the dS stores retire while the SM goes on (nothing waits on them): the kernel takes the longer of
    # its tile loop and its HBM write, as the products take the longer of their FLOPs and their reads
    t_ds = max(2 * pairs * D / (ds["tflops"] * 1e12), pairs * 2 / HBM_BYTES_PER_S)
    t_mm = max(4 * pairs * D / CUBLAS_FLOPS, 2 * pairs * 2 / HBM_BYTES_PER_S)
    total = t_fwd + t_ds + t_mm
    return dict(B=B, D=D, fwd_ms=t_fwd * 1e3, ds_ms=t_ds * 1e3, products_ms=t_mm * 1e3, step_ms=total * 1e3,
                fraction_of_peak=8 * pairs * D / total / PEAK_BF16)


def report() -> dict:
    eff, k = calibrate(measured_loop(512), measured_loop(1024))
    rows = []
    for D in (512, 1024):
        m = measured_loop(D)
        rows.append(dict(asdict(m), **predict(m, eff, k)))
        for name, bm, fast in (("sim_lse_fwd", 64, False), ("sim_lse_fwd", 64, True), ("sim_lse_fwd", 128, True),
                               ("sim_lse_bwd_ds", None, True)):
            t = tile_loop_in_child(name, D, bm, fast_exp=fast)
            rows.append(dict(asdict(t), **predict(t, eff, k)))
    steps = [clip_step(B, D, eff, k) for B in (16384, 32768, 65536) for D in (512, 1024)]
    return dict(eff_d=eff, k_epi=k, measured_tile_clk={D: measured_tile_clocks(D) for D in (512, 1024)},
                rows=rows, clip=steps)


def result_path(ext: str, version: Optional[str] = None) -> str:
    """The committed result of a Triton minor version (default: the installed one)."""
    from contrastive_ops.backends._triton.tiles import triton_minor

    return os.path.join(ROOT, "benchmarks", "results", f"triton-tile-model-sm90-{triton_minor(version)}.{ext}")


def markdown(rep: dict) -> str:
    t = rep["rows"][0]["triton"]
    lines = [
        "# Triton tile loops of the CLIP step, from their sm_90a machine code",
        "",
        f"Written by `benchmarks/triton_sass.py` (Triton {t}, compiled without a GPU). Per column tile and",
        "thread: the D loop (one BLOCK_D chunk of S) and the epilogue (everything else in the column-tile",
        "loop: row LSE, column partials, stores), in SASS instructions; \"cold\": the instructions of the",
        "blocks a branch skips (the forward's exact fallback for tiles of widely spread logits), left out",
        "of the epilogue. \"(measured)\": the forward as the H200 ran it (``MEASURED_SASS``). The model",
        f"(module docstring), fitted to that run: the D loop runs at EFF_D = {rep['eff_d']:.2f} of 790",
        f"TFLOP/s and the epilogue takes K_EPI = {rep['k_epi']:.2f} clocks per issued warp instruction",
        "(4 schedulers per SM), with no overlap between them.",
        "",
        "| kernel | D | tile | warps | regs | exp | D-loop instrs | HGMMA | epilogue instrs | cold | "
        "predicted TFLOP/s | epilogue share |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["rows"]:
        lines.append(f"| {r['kernel']} | {r['D']} | {r['block_m']}x{r['block_n']}x{r['block_d']} | {r['warps']} | "
                     f"{r['registers']} | {'ftz' if r['fast_exp'] else 'tl.exp'} | {r['d_loop']} | {r['hgmma']} | "
                     f"{r['epilogue']} | {r.get('cold', 0)} | {r['tflops']:.0f} | {100 * r['epilogue_share']:.0f}% |")
    lines += ["", "Measured (calibration): "
              + ", ".join(f"D = {D}: {c:.0f} clocks per 64 × 128 tile" for D, c in rep["measured_tile_clk"].items()),
              "", "CLIP step (forward + GEMM backward, bf16) with these tile loops, the dS write under the dS kernel's",
              "loop and cuBLAS at 760 TFLOP/s; fraction of the 989 TFLOP/s dense bf16 peak for 8·B²·D:", "",
              "| B | D | forward ms | dS kernel ms | products ms | step ms | fraction of peak |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for s in rep["clip"]:
        lines.append(f"| {s['B']} | {s['D']} | {s['fwd_ms']:.2f} | {s['ds_ms']:.2f} | {s['products_ms']:.2f} | "
                     f"{s['step_ms']:.2f} | {100 * s['fraction_of_peak']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--markdown", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--write", action="store_true", help="write the installed Triton's committed table and JSON")
    p.add_argument("--loop", nargs=3, metavar=("KERNEL", "D", "BLOCK_M"), help=argparse.SUPPRESS)
    p.add_argument("--exact-exp", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this compiles for the GPU", file=sys.stderr)
        return 2
    if a.loop:  # the child of ``tile_loop_in_child``
        import triton.language as tl

        from contrastive_ops.backends._triton import tiles

        tiles.FAST_EXP = tl.constexpr(not a.exact_exp)
        name, D, bm = a.loop[0], int(a.loop[1]), int(a.loop[2]) or None
        print(json.dumps(asdict(tile_loop(name, D, bm, fast_exp=not a.exact_exp))))
        return 0
    rep = report()
    text = markdown(rep)
    print(text)
    if a.write:
        a.markdown, a.json = result_path("md"), result_path("json")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
