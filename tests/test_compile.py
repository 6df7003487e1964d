"""torch.compile and torch.library checks.

1. ``torch.compile(fullgraph=True)`` of a small model (Linear → loss) for every
   public function on every backend that can be compiled here: the reference,
   the extension backends (registered custom ops with fake kernels) and the
   Triton backend on a GPU only (Triton ops cannot be compiled under the
   interpreter: "Cannot access data pointer of Tensor (FakeTensor)").
   Compiled and eager values and gradients (Linear weights and bias, tensor
   temperatures / logit scales) must agree.  The compiler backend is
   ``aot_eager`` (Dynamo + AOT autograd over fake tensors: everything that
   checks the ops' registrations) unless ``$CONTRASTIVE_OPS_COMPILE_BACKEND``
   names another one; one test always runs Inductor.

2. ``torch.library.opcheck`` on every op registered under the
   ``contrastive_ops`` and ``contrastive_ops_triton`` namespaces at test time,
   with sample inputs built here per op (an op without a sample builder fails
   the test, so new ops cannot slip past).

Masks (``MASKED_CASES``): the fused compositions of
``point_token_contrast(mode="infonce")`` and of ``mv_infonce`` / ``mv_dhel``
with a mask pass the core index lists of static length (present items first,
the others with empty ranges), so they compile with ``fullgraph=True`` too and
are compared with eager, which cuts the lists after the present items.  The
one host sync left (listed in ``HOST_SYNC``) is in the dense *reference* of
point_token_contrast's ``negatives="batch"``, which compacts the co-masked
tokens by boolean indexing: it is tested with ``fullgraph=False`` and
``fullgraph=True`` is asserted to fail, so a change that removes it shows up
here.
"""
import os

import pytest
import torch

import contrastive_ops as co
import loss_cases as lc
from contrastive_ops import backends
from helpers import DEVICE

COMPILER = os.environ.get("CONTRASTIVE_OPS_COMPILE_BACKEND", "aot_eager")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Masked cases of the compositions that list present items (static-length lists).
MASKED_CASES = [
    pytest.param("point_token_contrast", dict(mode="infonce", negatives="cloud"), id="point_token_infonce_cloud"),
    pytest.param("point_token_contrast", dict(mode="infonce", negatives="batch"), id="point_token_infonce_batch"),
    pytest.param("mv_infonce", dict(mask="ragged"), id="mv_infonce_masked"),
    pytest.param("mv_infonce", dict(mask="ragged", variant="pairwise"), id="mv_infonce_pairwise_masked"),
    pytest.param("mv_dhel", dict(mask="ragged"), id="mv_dhel_masked"),
]

# Forward passes with a data-dependent size (a host sync), as (id, function, case
# overrides, backends where it syncs, why).  Dynamo cannot capture a
# data-dependent length in one graph.
HOST_SYNC = [
    ("point_token_infonce_batch", "point_token_contrast", dict(mode="infonce", negatives="batch"), ("reference",),
     "the dense reference compacts the co-masked tokens by boolean indexing"),
]


def _compile_backends():
    out = [pytest.param("reference", id="reference")]
    avail = co.available_backends()
    for name in ("cpu", "cuda", "triton"):
        ok, why = avail[name]
        marks = []
        if not ok:
            marks.append(pytest.mark.skip(reason=f"{name} backend not usable here: {why}"))
        elif DEVICE.type not in backends.backend_module(name).devices():
            marks.append(pytest.mark.skip(reason=f"{name} backend does not run on {DEVICE.type} tensors"))
        elif name == "triton" and (INTERPRETED or DEVICE.type != "cuda"):
            marks.append(pytest.mark.skip(
                reason="torch.compile of Triton ops needs a GPU (fails under TRITON_INTERPRET: FakeTensor data ptr)"))
        out.append(pytest.param(name, id=name, marks=marks))
    return out


class LossModel(torch.nn.Module):
    """Linear (near identity) on each input tensor, then the loss; scalar tensors are parameters."""

    def __init__(self, case: lc.Case, backend: str):
        super().__init__()
        D = case.tensors[0].shape[-1]
        self.lin = torch.nn.Linear(D, D)
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            self.lin.weight.copy_(torch.eye(D) + 0.1 * torch.randn(D, D, generator=g) / D ** 0.5)
            self.lin.bias.copy_(0.01 * torch.randn(D, generator=g))
        self.scalars = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v.detach().float().clone()) for k, v in case.scalars.items()})
        self.case = case
        self.backend = backend

    def forward(self, *xs):
        feats = [self.lin(x) for x in xs]
        return self.case.fn(*feats, backend=self.backend, **dict(self.scalars.items()), **self.case.kwargs)


def _step(model, inputs, weight, params):
    """Loss and parameter gradients of one forward/backward; ``params`` is the eager module (shared weights)."""
    out = model(*inputs)
    if out.requires_grad:
        (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}
    params.zero_grad(set_to_none=True)
    return out.detach(), grads


def _compare_compiled(name, backend, *, fullgraph, compiler=COMPILER, **over):
    over = dict(dict(N=9, D=13, B=2, G=5, K=7, M=6, temperature_as="tensor", logit_scale_as="tensor",
                     scale_as="tensor"), **over)
    case = lc.example(name, seed=2, **over)
    lc.require_backend(case, backend, torch.float32, DEVICE)
    model = LossModel(case, backend).to(DEVICE)
    inputs = [t.to(DEVICE) for t in case.tensors]
    case.kwargs = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in case.kwargs.items()}
    eager_out, eager_grads = _step(model, inputs, 1.0, model)
    weight = torch.randn(eager_out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) \
        if eager_out.dim() else torch.tensor(2.0, device=DEVICE)
    eager_out, eager_grads = _step(model, inputs, weight, model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph, backend=compiler)
    out, grads = _step(compiled, inputs, weight, model)
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{name} on {backend}: compiled loss vs eager: {m}")
    assert grads.keys() == eager_grads.keys(), f"{name}: compiled grads for {sorted(grads)}, eager {sorted(eager_grads)}"
    for k in grads:
        # The gradient of a scalar (1/τ, a logit scale) sums terms of size up to the logit scale,
        # which may cancel (e.g. to 0 when every anchor's only candidate is its positive): the
        # order in which a compiled graph adds them moves the result by ulps of those terms.
        atol = 1e-5 * max(1.0, case.sharpness) if k.startswith("scalars.") else 1e-5
        torch.testing.assert_close(grads[k], eager_grads[k], atol=atol, rtol=1e-4,
                                   msg=lambda m: f"{name} on {backend}: gradient of {k}, compiled vs eager: {m}")
    # A second call reuses the compiled graph and still agrees.
    out2, _ = _step(compiled, inputs, weight, model)
    torch.testing.assert_close(out2, eager_out, atol=1e-5, rtol=1e-5)


FULLGRAPH_CASES = [pytest.param(n, {}, id=n) for n in lc.LOSSES if n != "point_token_contrast"]
FULLGRAPH_CASES += [pytest.param("point_token_contrast", dict(mode="cosine", pairing=p), id=f"point_token_cosine_{p}")
                    for p in ("diag", "official")]
FULLGRAPH_CASES += [pytest.param("mv_infonce", dict(variant="pairwise"), id="mv_infonce_pairwise"),
                    pytest.param("supcon_loss", dict(contrast_mode="one", labels="singletons"), id="supcon_one"),
                    pytest.param("info_nce", dict(info_mode="symmetric", reduction="none"), id="info_nce_symmetric"),
                    pytest.param("dcl_loss", dict(weighted=True), id="dclw")]


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("name,over", FULLGRAPH_CASES)
def test_compile_fullgraph(name, over, backend):
    _compare_compiled(name, backend, fullgraph=True, **over)


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("name,over", MASKED_CASES)
def test_compile_fullgraph_masked(name, over, backend):
    """Masks and co-masks compile as one graph: index lists of static length, no host sync."""
    if backend in next((h[3] for h in HOST_SYNC if h[1] == name and h[2] == over), ()):
        pytest.skip("the dense reference syncs here: see test_compile_host_sync")
    _compare_compiled(name, backend, fullgraph=True, **over)


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("name,over,sync_backends,why", [pytest.param(*h[1:], id=h[0]) for h in HOST_SYNC])
def test_compile_host_sync(name, over, sync_backends, why, backend):
    """Documented host syncs: fullgraph=True fails on the data-dependent size and
    fullgraph=False matches eager; the other backends compile whole."""
    if backend not in sync_backends:
        _compare_compiled(name, backend, fullgraph=True, **over)
        return
    _compare_compiled(name, backend, fullgraph=False, **over)
    with pytest.raises(Exception, match="(?i)data.dependent|nonzero|dynamic|graph break|Unsupported"):
        _compare_compiled(name, backend, fullgraph=True, **over)


@pytest.mark.parametrize("backend", _compile_backends())
def test_compile_inductor(backend):
    """One loss through Inductor's code generation as well (the others use ``COMPILER``)."""
    _compare_compiled("info_nce", backend, fullgraph=True, compiler="inductor", reduction="none")


# ----------------------------------------------------------------------------- opcheck

NAMESPACES = ("contrastive_ops", "contrastive_ops_triton")


def _load_op_libraries():
    """Import every backend that registers ops (quietly: a missing one simply registers none)."""
    for name in ("cpu", "cuda", "triton"):
        try:
            mod = backends.backend_module(name)
        except Exception:  # noqa: BLE001 - reported by available_backends()
            continue
        ok, _ = mod.availability()
        if ok:
            for prim in getattr(mod, "PRIMITIVES", {}).values():
                for hook in ("ensure_loaded", "load"):
                    if callable(getattr(prim, hook, None)):
                        getattr(prim, hook)()
    try:
        from contrastive_ops import _ext

        _ext.load()
    except Exception:  # noqa: BLE001
        pass


def registered_ops():
    """Every op of the library's namespaces, except the private diagnostic ones (``_``-prefixed,
    e.g. ``contrastive_ops::_cpu_last_path``, which reports the last CPU path taken, takes no
    tensor and is never called by a loss)."""
    _load_op_libraries()
    names = sorted(n for n in torch._C._dispatch_get_all_op_names()
                   if n.split("::")[0] in NAMESPACES and not n.split("::")[1].startswith("_"))
    return names


def _op(qualname):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def _f(shape, dtype, grad, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE).requires_grad_(grad)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _sim_lse_fwd_samples(grad):
    out = []
    for dt in (torch.float32, torch.float64):
        q, k = _f((5, 7), dt, grad, 1), _f((6, 7), dt, grad, 2)
        sc = torch.tensor(1.7, dtype=torch.float32 if dt != torch.float64 else dt, device=DEVICE)
        none = (None, None, None, None, None)
        out.append((q, k, sc) + none + (False,))
        out.append((q, k, sc) + none + (True,))
        # index lists, per-row ranges and exclusions
        ri, ci = _i32([4, 0, 2]), _i32([5, 1, 3, 0])
        cs, ce = _i32([0, 1, 0]), _i32([4, 3, 2])
        ex = _i32([[1, -1], [-1, -1], [0, 3]])
        out.append((q, k, sc, ri, ci, cs, ce, ex, True))
    return out


def _sim_lse_bwd_samples(fwd_qualname):
    fwd = _op(fwd_qualname)
    out = []
    for args in _sim_lse_fwd_samples(False):
        row, col = fwd(*args)
        g_row = torch.randn(row.shape, dtype=row.dtype, device=DEVICE)
        g_col = torch.randn(col.shape, dtype=col.dtype, device=DEVICE)
        out.append(tuple(args[:8]) + (row, col, g_row, g_col))
    return out


def _siglip_fwd_samples(grad):
    x, y = _f((5, 9), torch.float32, grad, 4), _f((5, 9), torch.float32, grad, 5)
    s = torch.tensor(10.0, device=DEVICE).requires_grad_(grad)
    b = torch.tensor(-3.0, device=DEVICE).requires_grad_(grad)
    return [(x, y, s, b)]


def _siglip_bwd_samples():
    return [a + (torch.tensor(1.5, device=DEVICE),) for a in _siglip_fwd_samples(False)]


def _scores():
    return _f((6, 5), torch.float32, False, 6).clamp(-1, 1)


def _swav_ce_fwd_samples(grad):
    out = []
    for dt, acc in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        x = _f((5, 7), dt, grad, 7)
        t = torch.softmax(_f((5, 7), acc, False, 8), 1)
        out.append((x, t, torch.tensor(10.0, dtype=acc, device=DEVICE).requires_grad_(grad)))
    return out


def _swav_ce_bwd_samples(fwd_qualname):
    fwd = _op(fwd_qualname)
    out = []
    for x, t, s in _swav_ce_fwd_samples(False):
        if fwd_qualname.startswith("contrastive_ops_triton") and x.dtype == torch.float64:
            continue  # Triton kernels take fp32/fp16/bf16
        _, lse = fwd(x, t, s)
        out.append((x, t, s, lse, torch.tensor(0.7, dtype=t.dtype, device=DEVICE)))
    return out


def _sim_expect_fwd_samples():
    out = []
    for dt in (torch.float32, torch.bfloat16):
        q, k = _f((6, 5), dt, False, 9), _f((7, 5), dt, False, 10)
        s = torch.tensor(0.8, dtype=torch.float32, device=DEVICE)
        out.append((q, k, s, None))
        out.append((q, k, s, torch.tensor([0, 6, -1, 2, 3, 1], dtype=torch.int32, device=DEVICE)))
    return out


def _sim_expect_bwd_samples(fwd_qualname):
    fwd = _op(fwd_qualname)
    out = []
    for q, k, s, ex in _sim_expect_fwd_samples():
        lse, mean = fwd(q, k, s, ex)
        out.append((q, k, s, ex, lse, mean, torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)))
    return out


def _label_lse_fwd_samples():
    out = []
    no_mix = (None, None, None, 0, 0, 0)
    for dt in (torch.float32, torch.bfloat16):
        q, k = _f((6, 5), dt, False, 17), _f((7, 5), dt, False, 18)
        s = torch.tensor(0.8, dtype=torch.float32, device=DEVICE)
        yr = torch.tensor([1.0, 2, 3, 1, 5, 2], device=DEVICE)
        yc = torch.tensor([2.0, 1, 3, 3, 0, 1, 4], device=DEVICE)
        c = torch.tensor([1.0, 0.5, 0.2, 1.0, 0.7, 0.0], device=DEVICE)
        out.append((q, k, s, yr, yc, c, _i32([0, 2, 7, 3, 0, 5]), _i32([7, 2, 7, 6, 1, 7]),
                    _i32([0, 6, -1, 2, 3, 1]), 0, False) + no_mix)
        out.append((q, k, s, yr, yc, c, _i32([0] * 6), _i32([7] * 6), _i32([-1] * 6), 3, True) + no_mix)
        # mixture mode: λ per pair from the seed and the rows' / columns' ids
        b = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.3], device=DEVICE)
        out.append((q, k, s, yr, yc, c, _i32([0, 2, 7, 3, 0, 5]), _i32([7, 2, 7, 6, 1, 7]),
                    _i32([0, 6, -1, 2, 3, 1]), 1, True, b, _i32([4, 9, 0, 2 ** 31 - 1, 7, 3]),
                    _i32([6, 5, 4, 3, 2, 1, 0]), 12345, 2, 8))
    return out


def _label_lse_bwd_samples(fwd_qualname):
    fwd = _op(fwd_qualname)
    return [args + (fwd(*args), torch.randn(6, device=DEVICE)) for args in _label_lse_fwd_samples()]


def _label_lse_uniforms_samples():
    return [(77, _i32([0, 5, 2 ** 31 - 1]), _i32([3, 1]), 4), (0, _i32([1]), _i32([0, 2, 9]), 0)]


def _gated_lse_fwd_samples():
    out = []
    for dt in (torch.float32, torch.bfloat16):
        a, k = _f((6, 5), torch.float32, False, 11), _f((7, 5), dt, False, 12)
        w = _f((6, 5), torch.float32, False, 13).abs()
        s = torch.tensor(0.8, dtype=torch.float32, device=DEVICE)
        out.append((a, w, k, s, _i32([0, 2, 7, 3, 0, 5]), _i32([7, 2, 7, 6, 1, 7])))
    return out


def _gated_lse_bwd_samples(fwd_qualname):
    fwd = _op(fwd_qualname)
    return [args + (fwd(*args), torch.randn(6, device=DEVICE)) for args in _gated_lse_fwd_samples()]


def _pix_geometry(N=2, H=3, W=4):
    from pix_cases import crops

    from contrastive_ops.primitives import pix_pos

    c1, c2 = crops(N, far=1)
    dx, dy, dg = pix_pos.geometry(c1.to(DEVICE), c2.to(DEVICE), H, W)
    return dx, dy, dg, torch.tensor(0.7, device=DEVICE), H, W


def _pix_pos_sum_samples():
    dx, dy, dg, ratio, H, W = _pix_geometry()
    return [(_f((2, H * W, 5), dt, False, 14), dx, dy, dg, ratio, H, W) for dt in (torch.float32, torch.bfloat16)]


def _pix_pos_lse_fwd_samples():
    dx, dy, dg, ratio, H, W = _pix_geometry()
    out = []
    for dt in (torch.float32, torch.bfloat16):
        q, k = _f((2, H * W, 5), dt, False, 15), _f((2, H * W, 5), dt, False, 16)
        s = torch.tensor(2.5, dtype=torch.float32, device=DEVICE)
        out += [(q, k, s, dx, dy, dg, ratio, H, W, False, 0), (q, k, s, dx, dy, dg, ratio, H, W, True, 0)]
    return out


def _pix_pos_lse_bwd_samples(fwd_qualname):
    fwd = _op(fwd_qualname)
    out = []
    for args in _pix_pos_lse_fwd_samples():
        lse_pos, lse_all = fwd(*args)
        g = torch.randn(lse_pos.shape, device=DEVICE)
        out.append(args + (lse_pos, lse_all, g, -g))
    return out


SAMPLES = {
    "sim_expect_fwd": lambda q, grad: _sim_expect_fwd_samples(),
    "sim_expect_bwd": lambda q, grad: _sim_expect_bwd_samples(q.replace("sim_expect_bwd", "sim_expect_fwd")),
    "gated_lse_fwd": lambda q, grad: _gated_lse_fwd_samples(),
    "label_lse_fwd": lambda q, grad: _label_lse_fwd_samples(),
    "label_lse_bwd": lambda q, grad: _label_lse_bwd_samples(q.replace("label_lse_bwd", "label_lse_fwd")),
    "label_lse_uniforms": lambda q, grad: _label_lse_uniforms_samples(),
    "pix_pos_sum": lambda q, grad: _pix_pos_sum_samples(),
    "pix_pos_lse_fwd": lambda q, grad: _pix_pos_lse_fwd_samples(),
    "pix_pos_lse_bwd": lambda q, grad: _pix_pos_lse_bwd_samples(q.replace("pix_pos_lse_bwd", "pix_pos_lse_fwd")),
    "gated_lse_bwd": lambda q, grad: _gated_lse_bwd_samples(q.replace("gated_lse_bwd", "gated_lse_fwd")),
    "swav_ce_fwd": lambda q, grad: _swav_ce_fwd_samples(grad),
    "swav_ce_bwd": lambda q, grad: _swav_ce_bwd_samples(q.replace("swav_ce_bwd", "swav_ce_fwd")),
    "sim_lse_fwd": lambda q, grad: _sim_lse_fwd_samples(grad),
    "sim_lse_bwd": lambda q, grad: _sim_lse_bwd_samples(q.replace("sim_lse_bwd", "sim_lse_fwd")),
    "siglip_fwd": lambda q, grad: _siglip_fwd_samples(grad),
    "siglip_bwd": lambda q, grad: _siglip_bwd_samples(),
    "siglip_fwd_grads": lambda q, grad: _siglip_fwd_samples(False),  # Triton: the one-pass step
    "sinkhorn": lambda q, grad: [(_scores(), 0.05, 3), (_scores(), 0.5, 1)],
    "sinkhorn_col_lse": lambda q, grad: [(_scores(), 0.05, None),
                                         (_scores(), 0.05, torch.randn(5, device=DEVICE))],
    "sinkhorn_codes": lambda q, grad: [(_scores(), 0.05, torch.randn(5, device=DEVICE), True),
                                       (_scores(), 0.05, torch.randn(5, device=DEVICE), False)],
    "sinkhorn_codes_out": lambda q, grad: [(_scores(), 0.05, torch.randn(5, device=DEVICE), True,
                                            torch.empty(6, 5, device=DEVICE))],
}
# Ops whose autograd formula is registered on the op itself (inputs may require grad).
DIFFERENTIABLE = {"contrastive_ops::sim_lse_fwd", "contrastive_ops::siglip_fwd", "contrastive_ops::swav_ce_fwd"}


def _opcheck_params():
    try:
        names = registered_ops()
    except Exception as e:  # noqa: BLE001
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"cannot list ops: {e}"))]
    if not names:
        return [pytest.param(None, id="none", marks=pytest.mark.skip(
            reason="no op registered under contrastive_ops / contrastive_ops_triton here (no kernel backend)"))]
    return [pytest.param(n, id=n) for n in names]


@pytest.mark.parametrize("qualname", _opcheck_params())
def test_opcheck(qualname):
    ns, name = qualname.split("::")
    assert name in SAMPLES, f"no opcheck sample inputs for {qualname}: add a builder to SAMPLES in {__file__}"
    if ns == "contrastive_ops_triton":
        if INTERPRETED and DEVICE.type == "cuda":
            pytest.skip("TRITON_INTERPRET with a GPU: the Triton ops run on CPU tensors here")
        if not INTERPRETED and DEVICE.type != "cuda":
            pytest.skip("Triton ops need a GPU or TRITON_INTERPRET=1")
    op = _op(qualname)
    # Under Triton's interpreter the ops cannot see FakeTensors' data, so the AOT
    # dispatch test (which runs the real kernel on fake inputs through make_fx's
    # fake mode) is left to GPU runs; schema, fake kernel and autograd
    # registration are still checked.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if ns == "contrastive_ops_triton" and INTERPRETED:
        utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    grads = (False, True) if qualname in DIFFERENTIABLE else (False,)
    n = 0
    for grad in grads:
        for args in SAMPLES[name](qualname, grad):
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args) and ns.endswith("triton"):
                continue  # Triton kernels take fp32/fp16/bf16
            torch.library.opcheck(op, args, test_utils=utils)
            n += 1
    assert n > 0, f"no sample ran for {qualname}"
