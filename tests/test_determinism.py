"""Run-to-run determinism: the same inputs give bitwise the same loss and gradients.

Each public function runs twice on fresh copies of the same inputs, on the
reference and on every kernel backend here, in fp32 and fp16; loss and every
gradient (temperature tensors included) must be ``torch.equal``.

A backend that reduces with atomics in an order the hardware picks is not
bitwise reproducible.  Such (backend, device) pairs are listed in
``NOT_BITWISE`` with the reason; for them the test asserts closeness instead
and says so in its output, and the functions concerned would need a
``deterministic=True`` option to give bitwise results.
"""
import warnings

import pytest
import torch

import loss_cases as lc
from helpers import DEVICE, backend_params, assert_close

# (backend, device type) -> why the kernels are not bitwise reproducible.
# Every kernel backend here reduces in a fixed order (per-block partial sums
# summed in order; no floating-point atomics), so the list is empty: a new
# entry must come with the kernel that needs it.
NOT_BITWISE = {}

BACKENDS = [pytest.param("reference", id="reference")] + backend_params()


def _twice(case, backend, dtype):
    a = lc.run_case(case, backend, dtype, device=DEVICE)
    b = lc.run_case(case, backend, dtype, device=DEVICE)
    return lc.flatten_outputs(a), lc.flatten_outputs(b)


def _case(name):
    """A mid-size default case with the options that exercise most code: masks, labels, a tensor τ."""
    over = dict(N=23, D=37, temperature_as="tensor", logit_scale_as="tensor", scale_as="tensor")
    if name in ("mv_infonce", "mv_dhel"):
        over.update(mask="ragged", V=3)
    if name == "point_token_contrast":
        over.update(B=4, G=9, negatives="batch")
    return lc.example(name, seed=11, **over)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", lc.LOSSES)
def test_bitwise_run_to_run(name, backend, dtype):
    case = _case(name)
    lc.require_backend(case, backend, dtype, DEVICE)
    first, second = _twice(case, backend, dtype)
    assert len(first) == len(second)
    reason = NOT_BITWISE.get((backend, DEVICE.type))
    for i, (x, y) in enumerate(zip(first, second)):
        what = "loss" if i == 0 else f"gradient {i}"
        if reason is None:
            assert torch.equal(x, y), (
                f"{name} on {backend} ({dtype}): {what} differs between two identical runs "
                f"(max |diff| {(x.double() - y.double()).abs().max().item():.3g}); add the backend to "
                "NOT_BITWISE with the reason if this is by design"
            )
        else:
            warnings.warn(f"{name} on {backend}/{DEVICE.type}: not bitwise reproducible ({reason}); "
                          "checking closeness only")
            assert_close(x, y, dtype, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_across_thread_counts(backend):
    """CPU kernels split work over threads (per-thread column and dK partials, reduced in part
    order): bitwise reproducible for a fixed thread count (``test_bitwise_run_to_run``), and equal
    within fp32 rounding whatever the thread count."""
    if DEVICE.type != "cpu":
        pytest.skip("thread count only matters for CPU tensors")
    name = "info_nce"
    case = _case(name)
    lc.require_backend(case, backend, torch.float32, DEVICE)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lc.flatten_outputs(lc.run_case(case, backend, torch.float32, device=DEVICE))
        torch.set_num_threads(max(2, n))
        many = lc.flatten_outputs(lc.run_case(case, backend, torch.float32, device=DEVICE))
        again = lc.flatten_outputs(lc.run_case(case, backend, torch.float32, device=DEVICE))
    finally:
        torch.set_num_threads(n)
    for i, (x, y, z) in enumerate(zip(one, many, again)):
        assert torch.equal(y, z), f"{backend}: output {i} differs between two runs with the same thread count"
        assert_close(x, y, torch.float32, what=f"output {i}")

# ----------------------------------------------------------------------------- ops that are not bitwise on CUDA
#
# A GPU is not needed to find the PyTorch ops of a composition whose CUDA kernels
# accumulate with atomics in the order the hardware picks: the aten ops are the
# same on every device.  The mode below records each one a loss calls, forward
# and backward (an indexing op's backward is an accumulating scatter), and the
# test fails on any of them.  Integer accumulation is exact in any order and is
# allowed; a write without accumulation is deterministic unless two elements go
# to the same place, which the mode checks on the data.

# Accumulate into ``self`` (arg 0) in an order CUDA does not fix (floating point only).
_ACCUMULATING = {"index_add", "index_add_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
                 "index_reduce", "index_reduce_", "embedding_dense_backward", "embedding_backward",
                 "_embedding_bag_backward", "_embedding_bag_dense_backward", "histc", "cumsum", "cumsum_",
                 "cumprod", "cumprod_", "logcumsumexp", "_unsafe_masked_index_put_accumulate"}
# Take ``accumulate`` as argument 3 (``put``/``put_``: 3 as well) or a keyword.
_ACCUMULATE_ARG = {"index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put", "put", "put_"}
# Write with an index; deterministic only with distinct target positions.
_INDEXED_WRITES = {"index_copy", "index_copy_", "scatter", "scatter_"}


def _flat_positions(t, dim, index):
    """Target positions of an indexed write along ``dim`` (one row per element written)."""
    idx = index.long().movedim(dim, -1).reshape(-1, index.shape[dim] if index.dim() else 1)
    return idx


def _has_duplicates(positions) -> bool:
    """Whether an index (1-D, or one row per slice) names a target twice."""
    if positions.numel() == 0:
        return False
    p = positions.reshape(-1, positions.shape[-1]) if positions.dim() > 1 else positions.reshape(1, -1)
    s = p.sort(dim=-1).values
    return bool((s[:, 1:] == s[:, :-1]).any())


def _index_put_duplicates(self_t, indices) -> bool:
    idx = [i for i in indices if i is not None]
    if not idx or any(i.dtype == torch.bool for i in idx):
        return False
    b = torch.broadcast_tensors(*[i.long() for i in idx])
    # a linear position per written element (over the indexed dims only)
    sizes = [self_t.shape[d] for d, i in enumerate(indices) if i is not None]
    lin = torch.zeros_like(b[0])
    for i, n in zip(b, sizes):
        lin = lin * n + torch.where(i < 0, i + n, i)
    return _has_duplicates(lin.reshape(-1))


class _NonDeterministicOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op whose CUDA kernel is not run-to-run deterministic on these arguments."""

    def __init__(self):
        super().__init__()
        self.found = []

    def _where(self):
        node = torch._C._current_autograd_node()
        if node is None:
            return "forward"
        return f"backward of {node.name()}"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        floating = self_t is not None and (self_t.is_floating_point() or self_t.is_complex())
        why = None
        if name in _ACCUMULATING and (floating or kwargs.get("dtype") in (torch.float16, torch.bfloat16,
                                                                           torch.float32, torch.float64)):
            why = "sums floating-point values in an order the CUDA kernel does not fix"
        elif name == "bincount" and (len(args) > 1 and args[1] is not None or kwargs.get("weights") is not None):
            why = "bincount with weights accumulates with atomics"
        elif name in _ACCUMULATE_ARG:
            acc = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
            if acc and floating:
                why = "accumulate=True"
            elif not acc and name in ("put", "put_"):
                why = "put without accumulate is not deterministic on CUDA"
            elif not acc and _index_put_duplicates(self_t, args[1]):
                why = "writes twice to one place"
        elif name in _INDEXED_WRITES:
            dim, index = args[1], args[2]
            reduce = kwargs.get("reduce", args[4] if len(args) > 4 else None)
            if reduce is not None and floating:
                why = f"scatter with reduce={reduce!r}"
            elif _has_duplicates(_flat_positions(self_t, dim, index)):
                why = "writes twice to one place"
        if why is not None:
            self.found.append(f"aten.{name} in the {self._where()}: {why}")
        return func(*args, **kwargs)


def _guard_cases():
    out = []
    for name in lc.LOSSES:
        out.append(pytest.param(name, _case(name), id=name))
    # the paths the default cases leave out: label groups, repeated targets, masked pairs, batch negatives
    extra = {
        "supcon_loss-one": lc.example("supcon_loss", seed=3, N=11, V=3, contrast_mode="one"),
        "supcon_loss-nolabels": lc.example("supcon_loss", seed=3, N=11, V=3, labels=None),
        "info_nce-targets": lc.example("info_nce", seed=3, info_mode="targets", N=9, M=4),
        "mv_infonce-pairwise": lc.example("mv_infonce", seed=3, variant="pairwise", mask="ragged", V=3),
        "mv_dhel-mask": lc.example("mv_dhel", seed=3, mask="ragged", V=3),
        "point_token_contrast-cloud": lc.example("point_token_contrast", seed=3, B=3, G=8),
        "point_token_contrast-batch": lc.example("point_token_contrast", seed=3, B=3, G=8, negatives="batch"),
    }
    out += [pytest.param(c.name, c, id=key) for key, c in extra.items()]
    return out


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,case", _guard_cases())
def test_no_atomically_accumulating_ops(name, case, backend):
    """The compositions of the kernel backends (forward and backward) call no PyTorch op whose CUDA
    kernel accumulates in a hardware-chosen order: run on the CPU, they would be bitwise reproducible
    here and not on a GPU."""
    lc.require_backend(case, backend, torch.float32, DEVICE)
    prev = torch.are_deterministic_algorithms_enabled()
    mode = _NonDeterministicOps()
    torch.use_deterministic_algorithms(True)
    try:
        with mode:
            res = lc.run_case(case, backend, torch.float32, device=DEVICE)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.isfinite(res.out).all()
    assert not mode.found, f"{name} on {backend}: " + "; ".join(sorted(set(mode.found)))


def test_accumulating_op_guard_catches_an_indexing_backward():
    """The guard sees the backward of plain indexing (an accumulating index_put) and of index_add."""
    x = torch.randn(5, 3, requires_grad=True)
    idx = torch.tensor([0, 2, 2])
    mode = _NonDeterministicOps()
    with mode:
        x[idx].sum().backward()
        torch.zeros(5).index_add(0, idx, torch.ones(3))
        torch.zeros(5, dtype=torch.long).index_add(0, idx, torch.ones(3, dtype=torch.long))  # exact: allowed
        torch.zeros(5).index_put((idx,), torch.ones(3))  # two writes to row 2
        torch.zeros(5).index_put((torch.tensor([0, 1]),), torch.ones(2))  # distinct rows: allowed
    assert any("backward" in f and "accumulate=True" in f for f in mode.found), mode.found
    assert any("index_add in the forward: sums" in f for f in mode.found), mode.found
    assert sum("writes twice" in f for f in mode.found) == 1, mode.found
    assert len(mode.found) == 3, mode.found


@pytest.mark.parametrize("size,index", [(5, [3, 0, 3, 3, 1, 0, 4]), (4, [2]), (6, []), (3, [0, 0, 0, 0, 0, 0, 0, 0, 0])],
                         ids=["repeats", "one", "empty", "one-target"])
def test_take_rows_and_index_sum_match_indexing(size, index):
    """``take_rows``/``index_sum`` (the sums without atomics the compositions use) equal ``x[index]``
    and ``index_add``, and their gradients (each the other's adjoint) pass gradcheck and gradgradcheck."""
    from contrastive_ops.losses._common import index_sum, take_rows

    idx = torch.tensor(index, dtype=torch.long, device=DEVICE)
    x = torch.randn(size, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    v = torch.randn(len(index), 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.equal(take_rows(x, idx), x[idx])
    want = torch.zeros(size, 3, dtype=torch.float64, device=DEVICE).index_add(0, idx, v)
    torch.testing.assert_close(index_sum(v, idx, size), want, rtol=1e-13, atol=1e-13)
    ints = torch.arange(1, len(index) + 1, device=DEVICE)
    assert torch.equal(index_sum(ints, idx, size), torch.zeros(size, dtype=ints.dtype, device=DEVICE).index_add(0, idx, ints))
    if len(index):
        assert torch.autograd.gradcheck(lambda t: take_rows(t, idx), (x,))
        assert torch.autograd.gradcheck(lambda t: index_sum(t, idx, size), (v,))
        assert torch.autograd.gradgradcheck(lambda t: take_rows(t, idx) ** 2, (x,))
        assert torch.autograd.gradgradcheck(lambda t: index_sum(t, idx, size) ** 2, (v,))


def test_take_distinct_rows():
    """``take_rows(distinct=True)`` (an index without repeats): ``x[index]``, its backward one write per
    row (gradcheck, gradgradcheck), and no accumulating op in either direction."""
    from contrastive_ops.losses._common import take_rows

    idx = torch.tensor([4, 0, 2], dtype=torch.long, device=DEVICE)
    x = torch.randn(6, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.equal(take_rows(x, idx, distinct=True), x[idx])
    assert torch.autograd.gradcheck(lambda t: take_rows(t, idx, distinct=True), (x,))
    assert torch.autograd.gradgradcheck(lambda t: take_rows(t, idx, distinct=True) ** 2, (x,))
    g = torch.randn(3, 3, dtype=torch.float64, device=DEVICE)
    (gx,) = torch.autograd.grad(take_rows(x, idx, distinct=True), x, g)
    want = torch.zeros_like(x).detach()
    want[idx] = g
    assert torch.equal(gx, want)
