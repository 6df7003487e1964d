"""The benchmark module shared by the command line and benchmarks/: peers compute
the same loss as the reference, FLOP counts follow the documented convention,
timing/memory measurements see what they should, the sweep records failures."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from contrastive_ops.benchmarking import cases as C
from contrastive_ops.benchmarking import peers as P
from contrastive_ops.benchmarking import measure as M
from contrastive_ops.benchmarking import sweep as W


PEER_CASES = [(name, p) for name, peers in P.PEERS.items() for p in peers]


@pytest.mark.parametrize("name,peer", PEER_CASES, ids=[f"{name}-{p.name}" for name, p in PEER_CASES])
def test_peer_adapter_computes_the_reference_loss(name, peer):
    """A benchmark compares like with like only if every peer computes the same loss.

    Peers that run on CPU tensors are checked in float64 at 1e-6; CUDA-only peers (Triton kernels)
    on a GPU in float32 at their ``check_tol``.
    """
    on_cpu = "cpu" in peer.devices
    if not on_cpu and not torch.cuda.is_available():
        pytest.skip(f"{peer.name} runs on {list(peer.devices)} tensors only and no GPU is here")
    if importlib.util.find_spec(peer.module) is None:
        pytest.skip(f"{peer.module} not installed")
    case = C.CASES[name]
    n = 24
    device, dtype = ("cpu", torch.float64) if on_cpu else ("cuda", torch.float32)
    atol, rtol = (1e-6, 1e-6) if on_cpu else peer.check_tol
    ref_in = case.make(n, 16, dtype, device, small=True)
    peer_in = C.cast_inputs(ref_in, dtype)
    ref = case.call("reference", ref_in)
    got = peer.build(peer_in.kwargs)(*peer_in.args)
    torch.testing.assert_close(got.to(ref.dtype), ref, atol=atol, rtol=rtol)
    if not ref_in.differentiable:
        return
    ref_g = torch.autograd.grad(ref, ref_in.leaves())
    got_g = torch.autograd.grad(got, peer_in.leaves(), allow_unused=True)
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a.to(b.dtype), b, atol=atol, rtol=rtol)


def test_gpu_only_peers_are_listed_with_a_reason_off_gpu():
    """siglip-kernel and flash-sinkhorn are benchmarked on CUDA only; elsewhere they say why not."""
    names = {name: {p.name for p in peers} for name, peers in P.PEERS.items()}
    assert "siglip_kernel" in names["siglip_loss"] and "flash_sinkhorn" in names["sinkhorn_knopp"]
    for loss, peer in (("siglip_loss", "siglip_kernel"), ("sinkhorn_knopp", "flash_sinkhorn")):
        case = C.CASES[loss]
        impl = {i.name: i for i in C.implementations(case, case.make(8, 8, small=True), compile_reference=False)}[peer]
        assert impl.run is None
        assert impl.why_not in (f"{peer} is not installed", "runs on ['cuda'] tensors only"), impl.why_not


def _flash_sinkhorn_dense(x, y, eps, iterations):
    """flash-sinkhorn's alternating updates (GeomLoss convention, cost ½‖x − y‖², uniform weights,
    f = g = 0 at the start, f then g in each iteration; it centres both clouds first), dense."""
    mu = (x.mean(0) + y.mean(0)) / 2
    cost = 0.5 * ((x - mu)[:, None, :] - (y - mu)[None, :, :]).pow(2).sum(-1)
    n, m = cost.shape
    f, g = x.new_zeros(n), x.new_zeros(m)
    for _ in range(iterations):
        f = -eps * torch.logsumexp((g[None, :] - cost) / eps - math.log(m), 1)
        g = -eps * torch.logsumexp((f[:, None] - cost) / eps - math.log(n), 0)
    return f, g


@pytest.mark.parametrize("variant", C.CASES["sinkhorn_knopp"].variants)
@pytest.mark.parametrize("small", [True, False])
def test_flash_sinkhorn_bridge_gives_swav_codes(variant, small):
    """The conversion of scores into flash-sinkhorn's point clouds and of its potentials into codes,
    checked on CPU with the peer's update written densely (the peer's kernels need CUDA)."""
    from contrastive_ops.losses.swav import swav_released_sinkhorn

    scores = C.CASES["sinkhorn_knopp"].make(30, 16, torch.float64, variant=variant, small=small).args[0]
    want = swav_released_sinkhorn(scores.clone(), 0.05, 3)
    got = P.flash_sinkhorn_codes(scores, 0.05, 3, solve=_flash_sinkhorn_dense)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
    got_t1 = P.flash_sinkhorn_codes(scores, 0.1, 1, solve=_flash_sinkhorn_dense)
    torch.testing.assert_close(got_t1, swav_released_sinkhorn(scores.clone(), 0.1, 1), atol=1e-10, rtol=1e-8)


def test_flash_sinkhorn_bridge_from_points_needs_equal_sample_norms():
    from contrastive_ops.losses.swav import swav_released_sinkhorn

    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(40, 8, generator=g, dtype=torch.float64), dim=1)
    protos = torch.randn(13, 8, generator=g, dtype=torch.float64)  # prototype norms may differ
    s = z @ protos.T
    got = P.flash_sinkhorn_codes_from_points(protos, z, s, 0.05, 3, solve=_flash_sinkhorn_dense)
    torch.testing.assert_close(got, swav_released_sinkhorn(s.clone(), 0.05, 3), atol=1e-10, rtol=1e-8)
    # Samples of unequal norms: the first prototype update sees a per-sample factor SwAV does not.
    z2 = z * torch.linspace(0.5, 1.5, 40, dtype=torch.float64)[:, None]
    s2 = z2 @ protos.T
    off = P.flash_sinkhorn_codes_from_points(protos, z2, s2, 0.05, 3, solve=_flash_sinkhorn_dense)
    assert (off - swav_released_sinkhorn(s2.clone(), 0.05, 3)).abs().max() > 1e-3


def test_compiled_reference_is_the_reference():
    case = C.CASES["info_nce"]
    inp = case.make(16, 8)
    ref = case.call("reference", inp)
    impl = {i.name: i for i in C.implementations(case, inp, peers=False)}["torch.compile(reference)"]
    torch.testing.assert_close(impl.run(inp), ref)


@pytest.mark.parametrize("name,variant,prim", [("hydra_loss", "filter", "gated_lse"),
                                                ("supremix_loss", "weighted", "label_lse")])
def test_a_variant_needing_a_primitive_is_not_applicable_without_it(monkeypatch, name, variant, prim):
    """A backend that runs the loss but lacks a primitive the variant needs is reported with the reason."""
    case = C.CASES[name]
    inp = case.make(8, 16, variant=variant, small=True)
    assert prim in inp.needs
    real = C.backends.has_primitive
    monkeypatch.setattr(C.backends, "has_primitive", lambda b, p: p != prim and real(b, p))
    why = C.backend_why_not(case, "cpu", inp)
    assert why is not None and prim in why, why
    assert C.backend_why_not(case, "reference", inp) is None
    assert prim not in case.make(8, 16, small=True).needs  # the default variant runs without it


def test_inputs_are_deterministic_and_device_independent():
    for case in C.CASES.values():
        a = case.make(20, 8, small=True)
        b = case.make(20, 8, small=True)
        for x, y in zip(a.tensors(), b.tensors()):
            assert torch.equal(x, y), case.name
        assert a.shapes == b.shapes and a.flops == b.flops
        meta = case.make(20, 8, device="meta", small=True)
        assert meta.shapes == a.shapes and meta.flops == a.flops


@pytest.mark.parametrize("name,expected", [
    ("info_nce", 6 * 100 * 100 * 32),
    ("clip_loss", 8 * 100 * 100 * 32),
    ("siglip_loss", 6 * 100 * 100 * 32),
    ("nt_xent", 6 * 200 * 200 * 32),
    ("mv_infonce", 6 * (C.VIEWS * 100) ** 2 * 32),
    ("mv_dhel", C.VIEWS * 6 * 100 * 100 * 32),
    ("supcon_loss", 6 * (C.SUPCON_VIEWS * 100) ** 2 * 32),
    ("dcl_loss", 2 * 6 * 100 * 200 * 32),
    ("dhel_loss", 2 * 6 * 100 * 100 * 32),
    ("similarity_lse", 6 * 100 * 100 * 32),
    ("selfcon_loss", 6 * (C.SELFCON_EXITS * 100) ** 2 * 32),
    ("supremix_loss", 6 * 200 * 200 * 32 + 4 * 200 * 200 * 32),
    ("sepclr_loss", 4 * 6 * 100 * 100 * 32 + 2 * 6 * 100 * 100 * (32 + 16)),
    ("cacr_loss", C.CACR_VIEWS * (C.CACR_VIEWS - 1) // 2 * 6 * 100 * 100 * 32),
    ("hydra_loss", 2 * 6 * 100 * 200 * 32),
    ("sinkhorn_knopp", None),
    ("swav_loss", None),
    ("pixpro_loss", None),
    ("pixcontrast_loss", None),
])
def test_flop_counts_follow_the_convention(name, expected):
    assert C.CASES[name].make(100, 32, device="meta").flops == expected


def test_point_token_flops_count_co_masked_pairs_per_cloud():
    inp = C.CASES["point_token_contrast"].make(256, 16)
    f1, f2, m1, m2 = inp.args
    c = (m1 & m2).sum(1).long()
    assert inp.flops == 8 * 16 * int((c * c).sum())
    assert f1.shape == (256 // C.TOKENS, C.TOKENS, 16)


def test_timing_statistics():
    t = M.summarize([3.0, 1.0, 2.0, 10.0, 4.0])
    assert (t.min, t.q25, t.median, t.q75, t.max, t.repeats) == (1.0, 2.0, 3.0, 4.0, 10.0, 5)
    calls = []
    timing = M.time_step(lambda: calls.append(1), "cpu", warmup=2, min_repeats=4, max_repeats=4, min_time=0)
    assert timing.repeats == 4 and len(calls) == 6


def test_cpu_peak_memory_sees_a_transient_buffer():
    x = torch.randn(256, 64)

    def step():
        s = x @ x.T  # 256 KiB, freed before the step returns
        s = s.exp()  # a second 256 KiB buffer while the first is alive
        return float(s[0, 0])

    peak = M.peak_memory(step, "cpu")
    assert 2 * 256 * 256 * 4 <= peak < 4 * 256 * 256 * 4


def test_memory_of_the_reference_grows_quadratically_and_a_kernel_backend_would_not_store_it():
    case = C.CASES["similarity_lse"]
    inp = case.make(64, 16)
    case.call("reference", inp)
    impl = C.Impl("reference", "backend", lambda i: case.call("reference", i))
    small = M.peak_memory(M.make_step(impl, case.make(256, 16)), "cpu")
    big = M.peak_memory(M.make_step(impl, case.make(512, 16)), "cpu")
    assert big > 3 * small and big >= 512 * 512 * 4


def _fake_impl(name, fn):
    return C.Impl(name, "backend", fn)


def test_sweep_records_oom_errors_and_slowness_and_continues(monkeypatch):
    case = C.CASES["similarity_lse"]
    inp = case.make(8, 8)
    case.call("reference", inp)

    def oom(i):
        if i.tensors()[0].shape[0] >= 64:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return case.call("reference", i)

    def broken(i):
        raise RuntimeError("an illegal memory access was encountered")

    cost = {"t": 0.0}  # seconds the fake clock charges for the last step

    def slow(i):
        cost["t"] = 0.15 * (i.tensors()[0].shape[0] / 32) ** 2
        return case.call("reference", i)

    def fake_time_step(step, device, **kw):  # a deterministic clock: 1 ms, or what ``slow`` charges
        cost["t"] = 1e-3
        step()
        return M.summarize([cost["t"]])

    fakes = [C.Impl("reference", "backend", lambda i: case.call("reference", i)),
             _fake_impl("oomy", oom), _fake_impl("broken", broken), C.Impl("sleepy", "peer", slow)]
    monkeypatch.setattr(C, "implementations", lambda *a, **k: fakes)
    monkeypatch.setattr(W.C, "implementations", lambda *a, **k: fakes)
    monkeypatch.setattr(W, "time_step", fake_time_step)
    cfg = W.SweepConfig(sizes=[32, 64, 128], losses=["similarity_lse"], dim=8, max_point_s=1.0, budget_s=60,
                        min_repeats=1, max_repeats=2, min_time=0.0, memory=False)
    doc = W.run_sweep(cfg)
    st = {(r["impl"], r["size"]): r["status"] for r in doc["results"]}
    assert st[("reference", 32)] == st[("reference", 64)] == st[("reference", 128)] == "ok"
    assert (st[("oomy", 32)], st[("oomy", 64)], st[("oomy", 128)]) == ("ok", "oom", "skipped")
    assert st[("broken", 32)] == "error" and st[("broken", 64)] == "skipped"
    # 0.15 s at 32 predicts 0.6 s at 64 (runs) and 2.4 s at 128 (> 1 s: too slow)
    assert (st[("sleepy", 64)], st[("sleepy", 128)]) == ("ok", "too_slow")
    errs = W.backend_errors(doc)
    assert [(r["impl"], r["size"]) for r in errs] == [("broken", 32)]
    assert "illegal memory access" in errs[0]["detail"]
    text = "\n".join(W.format_tables(doc))
    assert "OOM" in text and "ERROR broken N=32" in text and "slow" in text


def test_sweep_stops_at_the_time_budget(monkeypatch):
    case = C.CASES["similarity_lse"]
    case.call("reference", case.make(8, 8))
    cfg = W.SweepConfig(sizes=[16, 32], losses=["similarity_lse"], dim=8, budget_s=0.0, peers=False,
                        compile_reference=False, min_repeats=1, min_time=0.0, memory=False)
    doc = W.run_sweep(cfg)
    ref = [r for r in doc["results"] if r["impl"] == "reference"]
    assert [r["status"] for r in ref] == ["skipped", "skipped"]
    assert "budget" in ref[0]["detail"]


def test_environment_reports_the_extension_build_record(monkeypatch):
    import sys
    import types

    from contrastive_ops.benchmarking import envinfo

    rec = types.ModuleType("contrastive_ops._build_info")
    rec.TORCH_VERSION, rec.CUDA_VERSION, rec.WITH_EXT, rec.WITH_CUDA = "2.14.1", "13.0", True, True
    monkeypatch.setitem(sys.modules, "contrastive_ops._build_info", rec)
    info = envinfo.build_info()
    assert info == {"TORCH_VERSION": "2.14.1", "CUDA_VERSION": "13.0", "WITH_EXT": True, "WITH_CUDA": True}
    env = envinfo.environment("cpu")
    text = "\n".join(envinfo.format_environment(env, {"reference": (True, "plain"), "cuda": (False, "no GPU")}))
    assert "extension build: CUDA_VERSION=13.0, TORCH_VERSION=2.14.1, WITH_CUDA=True, WITH_EXT=True" in text
    assert "cuda       no   no GPU" in text and env["device"]["type"] == "cpu" and env["torch"] == torch.__version__
