"""The H200 performance model (benchmarks/perf_model.py): counts, ceilings and where the work comes from."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import perf_model as pm  # noqa: E402


def test_declared_work_matches_the_kernel_structure():
    """The units sim_lse / siglip declare, from the launchers' own output chunking (GPU layout)."""
    t = pm.work_tables()
    u, e = t["units"], t["s_evals"]
    assert t["source"]["general_bwd"] == "sim_lse" and t["source"]["siglip_bwd"] == "siglip"
    assert u["general_fwd"](512) == 2 and u["gram_fwd"](512) == 1
    # dq + dk: 4 + 4 for 16-bit D <= 512; dq 6 (two output chunks) + wide dk 4 at D = 768, 1024.
    assert [u["general_bwd"](D, "bf16") for D in (64, 128, 256, 512, 768, 1024)] == [8, 8, 8, 8, 10, 10]
    assert [e["general_bwd"](D, "bf16") for D in (512, 1024)] == [2, 3]
    # Gram backward: 2·n_d + 2 with 256-wide output chunks.
    assert [u["gram_bwd"](D, "bf16") for D in (128, 256, 512, 1024)] == [4, 4, 6, 10]
    assert [u["siglip_bwd"](D, "fp16") for D in (128, 512, 1024)] == [8, 8, 12]
    # fp32: n_d = cdiv(D, 128) output chunks in dq and dk (no wide dk).
    assert [u["general_bwd"](D, "fp32") for D in (128, 512, 1024)] == [8, 20, 36]
    assert u["general_bwd"](512) == u["general_bwd"](512, "bf16")  # bf16 when no dtype is given
    # The GEMM backwards: one recompute (2) and the products (2 each), at every D.
    assert [u[p](D) for p in ("general_bwd_gemm", "gram_bwd_gemm", "siglip_bwd_gemm") for D in (64, 1024)] == \
        [6, 6, 4, 4, 6, 6]


def test_gemm_backward_counts_its_ds_buffer():
    """The GEMM backward's HBM bytes add its dS buffer: written once and read by each product."""
    t = pm.work_tables()
    B, D = 16384, 512
    fused, gemm = pm.predict("general_bwd", B, B, D, "bf16", t), pm.predict("general_bwd_gemm", B, B, D, "bf16", t)
    assert gemm["hbm_bytes"] - fused["hbm_bytes"] == 3 * B * B * 2
    gram = pm.predict("gram_bwd_gemm", B, B, D, "fp32", t)
    assert gram["hbm_bytes"] - pm.predict("gram_bwd", B, B, D, "fp32", t)["hbm_bytes"] == 2 * B * B * 4
    assert pm.clip_step(B, D, "bf16", t, "general_bwd_gemm")["units"] == 8


def test_work_follows_the_launchers_chunking(monkeypatch):
    """The declared work is computed from tiles.out_chunks, the function the launchers use."""
    from contrastive_ops.backends._triton import sim_lse

    monkeypatch.setattr(sim_lse, "out_chunks", lambda D, dtype=None, gram=False: 3)
    t = pm.work_tables()
    assert t["units"]["general_bwd"](64, "bf16") == 8 + 8 and t["units"]["gram_bwd"](64, "bf16") == 8


def test_declared_work_units_win(monkeypatch):
    """A kernel module's WORK_UNITS is what the model uses (so the model follows the code)."""
    from contrastive_ops.backends._triton import sim_lse, sinkhorn

    monkeypatch.setattr(sim_lse, "WORK_UNITS", dict(sim_lse.WORK_UNITS, general_bwd=lambda D: 6, gram_bwd=3))
    monkeypatch.setattr(sim_lse, "S_EVALS", dict(sim_lse.S_EVALS, general_bwd=1))
    t = pm.work_tables()
    assert t["units"]["general_bwd"](1024) == 6 and t["units"]["gram_bwd"](64) == 3
    assert t["source"]["general_bwd"] == "sim_lse"
    r = pm.predict("general_bwd", 32768, 32768, 512, "bf16", t)
    assert r["work_ratio"] == 6 / 8 and r["exps"] == 2 * 32768 ** 2
    monkeypatch.setattr(sinkhorn, "WORK_UNITS", {"general_bwd": 1}, raising=False)
    with pytest.raises(ValueError, match="declared by both"):
        pm.work_tables()
    monkeypatch.setattr(sinkhorn, "WORK_UNITS", {"bogus": 1}, raising=False)
    with pytest.raises(ValueError, match="unknown path"):
        pm.work_tables()


def test_prediction_is_the_binding_ceiling():
    t = pm.work_tables()
    r = pm.predict("general_fwd", 65536, 65536, 1024, "bf16", t)
    assert r["flops"] == r["units"] * 65536 ** 2 * 1024
    assert r["t_flop_s"] == pytest.approx(r["flops"] / 790e12)
    assert r["predicted_s"] == max(r["t_flop_s"], r["t_hbm_s"], r["t_exp_s"]) and r["bound"] == "tensor"
    # D = 128: two exponentials per S element cost more than the 2·D FLOPs on the tensor cores.
    assert pm.predict("general_fwd", 32768, 32768, 128, "bf16", t)["bound"] == "exp"
    # A tiny problem is bound by memory.
    assert pm.predict("general_fwd", 64, 64, 1024, "bf16", t)["bound"] == "hbm"
    c = pm.clip_step(32768, 512, "bf16", t)
    units = t["units"]["general_fwd"](512) + t["units"]["general_bwd"](512)
    assert c["fraction_of_peak"] <= 8 / units * 790 / 989.4 + 1e-9


def test_script_prints_table_and_json(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "model.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "perf_model.py"), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fraction" in proc.stdout and "general_bwd" in proc.stdout
    data = json.loads(out.read_text())
    assert {(c["B"], c["D"]) for c in data["clip"]} == {(B, D) for B in (16384, 32768, 65536) for D in (512, 1024)}
    k = next(iter(data["rows"]))
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({k: 2 * data["rows"][k]["predicted_s"]}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "perf_model.py"), "--measured",
                           str(measured)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2.00" in proc.stdout, proc.stdout[-2000:] + proc.stderr
