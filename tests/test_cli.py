"""The command line: end to end in quick mode, the bench JSON/PNG output, the
progress bar, and a forced mismatch that must give a non-zero exit status."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types

import pytest
import torch

import contrastive_ops as co
from contrastive_ops import backends, cli
from contrastive_ops.benchmarking import cases as C
from contrastive_ops.benchmarking import selfcheck as S
from contrastive_ops.benchmarking.measure import ProgressBar
from contrastive_ops.primitives.sim_lse import DenseSimLSE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=420):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "contrastive_ops", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------
# End to end (subprocess)
# ---------------------------------------------------------------------------

def test_cli_quick_end_to_end():
    p = _run("--quick", "--sizes", "16,32", "--losses", "info_nce,siglip_loss,sinkhorn_knopp", "--no-progress")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "torch " in p.stdout and "backends:" in p.stdout
    assert "Self-check against the reference" in p.stdout
    assert "Timing forward+backward" in p.stdout
    for name in ("info_nce", "siglip_loss", "sinkhorn_knopp"):
        assert name in p.stdout
        assert f"{name}: not implemented" not in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the Triton backend runs without the interpreter")
def test_cli_checks_triton_under_the_interpreter_on_cpu():
    """Without TRITON_INTERPRET in the environment, the CLI still checks the Triton backend on CPU tensors."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "contrastive_ops", "--quick", "--no-bench", "--no-progress",
                        "--losses", "similarity_lse"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "triton/cpu/float32" in p.stdout, p.stdout
    row = next(line for line in p.stdout.splitlines() if line.strip().startswith("similarity_lse"))
    assert row.count("PASS") == 2, p.stdout  # cpu and triton


def test_cli_bench_quick_writes_json_and_png(tmp_path):
    out_dir = tmp_path / "res"
    p = _run("bench", "--out", str(out_dir), "--quick", "--losses", "clip_loss,similarity_lse,swav_loss",
             "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((out_dir / "results.json").read_text())
    for key in ("schema_version", "date", "device", "environment", "backends", "config", "methods", "cases",
                "implementations", "results"):
        assert key in doc, key
    assert doc["environment"]["device"]["name"]
    assert doc["environment"]["date"].startswith(tuple("12"))
    assert doc["config"]["dtype"] == "float32" and doc["config"]["sizes"]
    assert "8·B·M·D" in doc["methods"]["flops"] and "6·B·M·D" in doc["methods"]["flops"]
    assert set(doc["cases"]) == {"clip_loss", "similarity_lse", "swav_loss"}
    # every runnable implementation has a record per size; peers listed with reasons when missing
    assert {r["loss"] for r in doc["results"]} == {"clip_loss", "similarity_lse", "swav_loss"}
    assert "open_clip.ClipLoss" in doc["implementations"]["clip_loss"]
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    for r in ok:
        t = r["time_s"]
        assert 0 < t["min"] <= t["q25"] <= t["median"] <= t["q75"] <= t["max"]
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
        if r["loss"] != "swav_loss":
            assert r["flops"] > 0 and r["flop_per_s"] > 0
        else:
            assert r["flops"] is None
    # the open_clip peer needs nothing of ours: it is always measured when installed
    if doc["implementations"]["clip_loss"]["open_clip.ClipLoss"]["available"]:
        assert any(r["impl"] == "open_clip.ClipLoss" for r in ok)
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == sorted({f"{r['loss']}.png" for r in ok})
    assert pngs, "no chart written"


def test_write_charts_from_a_results_document(tmp_path):
    from contrastive_ops.benchmarking.charts import write_charts

    def rec(impl, kind, n, t, mem, status="ok"):
        r = {"loss": "info_nce", "impl": impl, "kind": kind, "size": n, "status": status, "pass": "fwd+bwd"}
        if status == "ok":
            r["time_s"] = dict(median=t, q25=0.9 * t, q75=1.1 * t, min=0.8 * t, max=1.3 * t, repeats=3)
            r["peak_mem_bytes"] = mem
        return r

    results = [rec("reference", "backend", n, 1e-3 * (n / 256) ** 2, 4 * n * n) for n in (256, 512, 1024)]
    results += [rec("reference", "backend", 2048, 0, 0, "oom")]
    results += [rec("triton", "backend", n, 2e-4 * (n / 256) ** 2, 600 * n) for n in (256, 512, 1024, 2048)]
    results += [rec("lightly.NTXentLoss", "peer", n, 2e-3 * (n / 256) ** 2, 8 * n * n) for n in (256, 512)]
    doc = {"environment": {"device": {"name": "Test GPU"}, "torch": "x", "contrastive_ops": "y",
                           "date": "2026-11-26T00:00:00"},
           "config": {"dtype": "float32", "dim": 128}, "methods": {"memory": "m"}, "results": results}
    paths = write_charts(doc, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["info_nce.png"]
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# Progress bar
# ---------------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_redraws_one_line():
    s = _Tty()
    bar = ProgressBar(4, label="check", stream=s, width=8)
    for _ in range(4):
        bar.update(1, note="x")
    bar.close()
    text = s.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "[########] 4/4 100%" in text
    assert "[##......] 1/4  25%" in text


def test_progress_bar_in_a_log_writes_at_most_a_line_per_tenth():
    s = io.StringIO()
    bar = ProgressBar(200, label="time", stream=s, width=10)
    for _ in range(200):
        bar.update(1)
    bar.close()
    lines = s.getvalue().splitlines()
    assert 10 <= len(lines) <= 11
    assert lines[-1].startswith("time [##########] 200/200 100%")
    assert "\r" not in s.getvalue()


def test_progress_bar_disabled_and_degenerate_total():
    s = io.StringIO()
    bar = ProgressBar(0, stream=s, enabled=False)
    bar.update(3)
    bar.close()
    assert s.getvalue() == "" and bar.done == 1
    assert "eta ?" in ProgressBar(5, stream=s).render()


# ---------------------------------------------------------------------------
# A forced mismatch gives a non-zero exit
# ---------------------------------------------------------------------------

class _DenseSimLSE(DenseSimLSE):
    """A test double of the ``"sim_lse"`` primitive: the dense core, optionally off by ``offset``."""

    def __init__(self, offset=0.0):
        self.offset = offset

    def forward(self, q, k, scale, ri, ci, cs, ce, ex, want_col, row_max=None):
        row, col = super().forward(q, k, scale, ri, ci, cs, ce, ex, want_col, row_max)
        return row + self.offset, col


@pytest.fixture
def fake_cpu_backend(monkeypatch):
    """Install a fake ``"cpu"`` backend module; returns a setter for its sim_lse offset."""
    mod = types.ModuleType("_fake_cpu_backend")
    mod.availability = lambda: (True, "test double on the dense core")
    mod.devices = lambda: {"cpu"}
    mod.dtypes = lambda: {torch.float32, torch.float64, torch.float16, torch.bfloat16}
    mod.PRIMITIVES = {"sim_lse": _DenseSimLSE()}
    monkeypatch.setitem(sys.modules, "_fake_cpu_backend", mod)
    monkeypatch.setitem(backends._MODULES, "cpu", "_fake_cpu_backend")

    def set_offset(off):
        mod.PRIMITIVES["sim_lse"].offset = off

    return set_offset


def _dense_similarity_lse(wrong_on_kernel: float):
    """A stand-in for ``co.similarity_lse``: exact on the reference, off by ``wrong_on_kernel`` elsewhere."""

    def similarity_lse(query, key, scale, *, backend="auto", process_group=None):
        name = backends.resolve(backend, op="similarity_lse", tensors=[query, key])
        dt = torch.float64 if query.dtype == torch.float64 else torch.float32
        out = (float(scale) * query.to(dt) @ key.to(dt).T).logsumexp(1)
        return out if name == "reference" else out + wrong_on_kernel

    return similarity_lse


def _check(capsys, *extra):
    rc = cli.main(["--no-bench", "--no-progress", "--backends", "cpu", *extra])
    return rc, capsys.readouterr().out


def test_forced_mismatch_in_a_loss_exits_non_zero(monkeypatch, capsys, fake_cpu_backend):
    monkeypatch.setattr(co, "similarity_lse", _dense_similarity_lse(1e-2))
    rc, out = _check(capsys, "--losses", "similarity_lse")
    assert rc == 1, out
    assert "FAIL" in out and "similarity_lse[default] on cpu/cpu/float32: loss:" in out
    monkeypatch.setattr(co, "similarity_lse", _dense_similarity_lse(0.0))
    rc, out = _check(capsys, "--losses", "similarity_lse")
    assert rc == 0, out
    assert "PASS (2)" in out


def test_forced_mismatch_in_the_backend_primitive_exits_non_zero(capsys, fake_cpu_backend):
    names = ["info_nce", "clip_loss", "nt_xent", "similarity_lse"]
    losses = ",".join(names)
    rc, out = _check(capsys, "--losses", losses)
    assert rc == 0, out  # the dense core as a backend passes
    fake_cpu_backend(1e-2)  # every row LSE off by 0.01
    rc, out = _check(capsys, "--losses", losses)
    assert rc == 1, out
    for n in names:
        assert f"FAIL {n}[" in out


def test_a_backend_exception_is_a_failure_with_its_message(monkeypatch, capsys, fake_cpu_backend):
    def broken(query, key, scale, *, backend="auto", process_group=None):
        if backends.resolve(backend, op="similarity_lse", tensors=[query, key]) != "reference":
            raise IndexError("kernel wrote out of bounds")
        return (float(scale) * query.float() @ key.float().T).logsumexp(1)

    monkeypatch.setattr(co, "similarity_lse", broken)
    rc, out = _check(capsys, "--losses", "similarity_lse")
    assert rc == 1
    assert "IndexError: kernel wrote out of bounds" in out


def test_not_implemented_error_is_a_failure(monkeypatch, capsys, fake_cpu_backend):
    """A kernel that raises NotImplementedError fails the self-check like any other error."""
    real = co.similarity_lse

    def missing(query, key, scale, *, backend="auto", process_group=None):
        if backends.resolve(backend, op="similarity_lse", tensors=[query, key]) != "reference":
            raise NotImplementedError("similarity_lse is not there")
        return real(query, key, scale, backend="reference")

    monkeypatch.setattr(co, "similarity_lse", missing)
    rc, out = _check(capsys, "--losses", "similarity_lse")
    assert rc == 1 and "NotImplementedError: similarity_lse is not there" in out
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--strict"])


def test_timing_table_compares_backend_with_reference(monkeypatch, capsys, fake_cpu_backend):
    monkeypatch.setattr(co, "similarity_lse", _dense_similarity_lse(0.0))
    rc = cli.main(["--no-check", "--no-progress", "--backends", "cpu", "--losses", "similarity_lse",
                   "--sizes", "16,32", "--quick"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("16 ", "32 "))]
    assert len(rows) == 2 and all(len(r) == 7 for r in rows), out  # N, then time / mem for 2 implementations
    assert "reference" in out and "cpu" in out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        cli.main(["--losses", "no_such_loss", "--no-bench"])
    with pytest.raises(SystemExit):
        cli.main(["--backends", "reference", "--no-bench"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--sizes", "1,x"])


def test_selfcheck_tolerances_are_the_test_suites():
    """One table and one comparison, in the library: the self-check and the tests use the same objects."""
    import helpers
    import loss_cases
    from contrastive_ops import testing

    assert S.TOL is testing.TOL and helpers.TOL is testing.TOL
    assert S.compare is testing.compare
    assert helpers.assert_close is testing.assert_close and loss_cases.assert_close is testing.assert_close


def test_options_before_or_after_bench_both_count():
    p = cli.build_parser()
    a = p.parse_args(["--quick", "--dtype", "float16", "bench", "--out", "d"])
    assert a.command == "bench" and a.quick and a.dtype == ["float16"] and a.out == "d"
    b = p.parse_args(["bench", "--out", "d", "--sizes", "8,16", "--dtype", "bfloat16", "--no-peers"])
    assert b.sizes == [8, 16] and b.dtype == "bfloat16" and b.no_peers and not b.quick
    assert p.parse_args([]).command is None
