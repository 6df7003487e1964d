"""Static check of the CUDA epilogue kernels, compiled for sm_90a without a GPU.

Compiles ``csrc/cuda/epilogues.cu`` with nvcc (the extension's flags, ``-arch=sm_90a``), reads
ptxas' resource report and the SASS (``cuobjdump`` from Triton's ``backends/nvidia/bin``), and
for each epilogue kernel of the sim_lse / SigLIP step finds its main loop (the longest loop closed
by a backward branch) and counts its instructions per pair of the tile:

    instrs/pair = SASS instructions of one pass of the loop / pairs the pass covers

(forward: kChunk rows × V columns per thread; backward and SigLIP: 4 unrolled rows × V columns).
The epilogues read an fp32 tile once, so an H200 runs them at HBM speed only while their issue
rate keeps up: 4 warp instructions per clock per SM, i.e. 32·4·132·1.98e9 = 3.35e13 thread
instructions/s, against 4.3e12 B/s / 4 B per pair read = 1.07e12 pairs/s: at most ~31
instructions per pair for a forward (read only), more for a backward that also writes dS.
``benchmarks/cuda_model.py`` takes its instruction counts (``INSTR_PER_PAIR``) from this script;
``tests/test_cuda_static.py`` checks that they still match the source, and that the kernels of
the fast path load 16 bytes and store 8–16 bytes per instruction and spill nothing.

Usage: python benchmarks/cuda_sass.py [--markdown benchmarks/results/cuda-epilogues-sm90.md]
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "epilogues.cu")
ISSUE_RATE = 32 * 4 * 132 * 1.98e9  # thread instructions per second on an H200 (4 schedulers per SM)

# (label, substring of the mangled name, pairs one pass of the main loop covers)
EPILOGUES = [
    ("lse_fwd fp32 (no masks)", "lse_fwd_kernelIfLi4ELb0E", 8 * 4),
    ("lse_fwd fp32 (masks)", "lse_fwd_kernelIfLi4ELb1E", 8 * 4),
    ("lse_bwd fp32 -> bf16 dS (no masks)", "lse_bwd_kernelIfN3c108BFloat16ELi4ELb0E", 4 * 4),
    ("lse_bwd fp32 -> bf16 dS (masks)", "lse_bwd_kernelIfN3c108BFloat16ELi4ELb1E", 4 * 4),
    ("lse_bwd fp32 -> fp16 dS (no masks)", "lse_bwd_kernelIfN3c104HalfELi4ELb0E", 4 * 4),
    ("lse_bwd fp32 -> fp32 dS (no masks)", "lse_bwd_kernelIffLi4ELb0E", 4 * 4),
    ("siglip_fwd fp32", "siglip_fwd_kernelIfLi4E", 4 * 4),
    ("siglip_bwd fp32 -> bf16 dL", "siglip_bwd_kernelIfN3c108BFloat16ELi4E", 4 * 4),
]
# The model's key for each counted kernel (benchmarks/cuda_model.py: INSTR_PER_PAIR).
MODEL_KEYS = {
    "lse_fwd fp32 (no masks)": "lse_fwd",
    "lse_bwd fp32 -> bf16 dS (no masks)": "lse_bwd",
    "siglip_fwd fp32": "siglip_fwd",
    "siglip_bwd fp32 -> bf16 dL": "siglip_bwd",
}


@dataclass
class Kernel:
    name: str
    regs: int = 0
    spill_bytes: int = 0
    instrs: list = field(default_factory=list)

    def main_loop(self):
        """Instructions of the longest loop (from a backward branch's target to the branch)."""
        addr = {a: i for i, (a, _) in enumerate(self.instrs)}
        best = []
        for i, (a, t) in enumerate(self.instrs):
            m = re.search(r"\bBRA (0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) <= a and int(m.group(1), 16) in addr:
                body = [x for _, x in self.instrs[addr[int(m.group(1), 16)]:i + 1]]
                if len(body) > len(best):
                    best = body
        return best


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def find_nvcc():
    """nvcc of $CUDA_HOME, on PATH or under /usr/local/cuda*; None when there is none."""
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    if shutil.which("nvcc"):
        cands.append(shutil.which("nvcc"))
    cands += sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    for c in cands:
        home = os.path.dirname(os.path.dirname(os.path.realpath(c)))
        if os.path.exists(c) and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return c
    return None


def compile_cubin(out_dir, nvcc=None, source=SOURCE):
    """Compile source for sm_90a; returns (cubin path, ptxas -v report)."""
    import torch.utils.cpp_extension as ce

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc with CUDA headers found (set CUDA_HOME)")
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    incs = [p for p in ce.include_paths() if os.path.isdir(p)]
    for base in sys.path:
        incs += sorted(glob.glob(os.path.join(base, "nvidia", "cu[0-9]*", "include")))
    incs += [sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc"), os.path.join(home, "include")]
    cubin = os.path.join(out_dir, "epilogues.cubin")
    cmd = [nvcc, "-O3", "-std=c++20", "-arch=sm_90a", "-cubin", "-o", cubin, source, "--expt-relaxed-constexpr",
           "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C"] + [f"-I{p}" for p in dict.fromkeys(incs)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{p.stderr[-4000:]}")
    return cubin, p.stderr + p.stdout


def read_kernels(cubin, ptxas_log):
    kernels = {}
    cur = None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = kernels.setdefault(m.group(1), Kernel(m.group(1)))
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur.spill_bytes = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            cur.regs = int(m.group(1))
    sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    for chunk in re.split(r"\n\s+Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ins = [(int(m.group(1), 16), m.group(2).strip())
               for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", chunk)]
        kernels.setdefault(name, Kernel(name)).instrs = ins
    return kernels


def _op(t):
    return (t.split()[1] if t.startswith("@") else t.split()[0])


def count(kernels):
    """One row per counted epilogue: per-pair instructions and the loop's memory instructions."""
    rows = []
    for label, key, pairs in EPILOGUES:
        found = [k for n, k in kernels.items() if key in n]
        if len(found) != 1:
            raise LookupError(f"{label}: {len(found)} kernels match {key!r}")
        k = found[0]
        body = k.main_loop()
        ops = collections.Counter(_op(t) for t in body)
        ld = {o: c for o, c in ops.items() if o.startswith("LDG")}
        st = {o: c for o, c in ops.items() if o.startswith("STG")}
        rows.append(dict(label=label, kernel=k.name, regs=k.regs, spill_bytes=k.spill_bytes, loop=len(body),
                         pairs=pairs, per_pair=len(body) / pairs,
                         mufu=sum(c for o, c in ops.items() if o.startswith("MUFU")) / pairs,
                         shfl=sum(c for o, c in ops.items() if o.startswith("SHFL")) / pairs,
                         loads=ld, stores=st))
    return rows


def markdown(rows, ptxas_log):
    bad = [(n, k) for n, k in _spills(ptxas_log) if k]
    lines = [
        "# CUDA epilogue kernels compiled for sm_90a (H100/H200), without a GPU",
        "",
        "Written by `python benchmarks/cuda_sass.py --markdown benchmarks/results/cuda-epilogues-sm90.md`:",
        "`csrc/cuda/epilogues.cu` compiled with nvcc for sm_90a, the main loop of each epilogue kernel",
        "read from its SASS. instrs/pair = SASS instructions of one pass of the loop / pairs it covers.",
        "An H200 issues 3.35e13 thread instructions/s; reading an fp32 tile at 4.3 TB/s is 1.07e12",
        "pairs/s, so an epilogue stays HBM-bound below ~31 instructions per pair read (the backward",
        "also writes dS: ~47 for a bf16 dS, ~63 for fp32).",
        "",
        "| kernel | regs | spills (B) | loop instrs | pairs/pass | instrs/pair | MUFU/pair | SHFL/pair "
        "| loads | stores | issue-bound ns per 1M pairs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['regs']} | {r['spill_bytes']} | {r['loop']} | {r['pairs']} | "
            f"{r['per_pair']:.1f} | {r['mufu']:.2f} | {r['shfl']:.2f} | "
            f"{', '.join(f'{c}x {o}' for o, c in sorted(r['loads'].items()))} | "
            f"{', '.join(f'{c}x {o}' for o, c in sorted(r['stores'].items()))} | "
            f"{1e6 * r['per_pair'] / ISSUE_RATE * 1e9:.0f} |")
    lines += ["", "Kernels with spills (fp64 instantiations only are expected): "
              + (", ".join(f"`{_demangle(n)}` {k} B" for n, k in bad) if bad else "none"), ""]
    return "\n".join(lines)


def _spills(ptxas_log):
    out, cur = [], None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            out.append((cur, int(m.group(1)) + int(m.group(2))))
            cur = None
    return out


def _demangle(name):
    return re.sub(r"_ZN15contrastive_ops4cuda\d+_GLOBAL__N__\w*?epilogues_cu_[0-9a-f]+", "", name)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table here")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        cubin, log = compile_cubin(d)
        rows = count(read_kernels(cubin, log))
        text = markdown(rows, log)
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
