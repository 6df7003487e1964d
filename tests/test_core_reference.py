"""The dense core reference against a brute-force loop over pairs."""
import math

import pytest
import torch

from contrastive_ops.primitives.sim_lse import sim_lse


def _loop(q, k, scale, row_index, col_index, col_start, col_end, exclude):
    Q = q if row_index is None else q[row_index.long()]
    K = k if col_index is None else k[col_index.long()]
    B, M = Q.shape[0], K.shape[0]
    row = []
    col_terms = [[] for _ in range(M)]
    for i in range(B):
        terms = []
        lo = 0 if col_start is None else int(col_start[i])
        hi = M if col_end is None else int(col_end[i])
        for j in range(lo, hi):
            if exclude is not None and j in exclude[i].tolist():
                continue
            s = float(scale) * float(Q[i].double() @ K[j].double())
            terms.append(s)
            col_terms[j].append(s)
        row.append(torch.tensor(terms, dtype=torch.float64).logsumexp(0).item() if terms else -math.inf)
    col = [torch.tensor(t, dtype=torch.float64).logsumexp(0).item() if t else -math.inf for t in col_terms]
    return torch.tensor(row, dtype=torch.float64), torch.tensor(col, dtype=torch.float64)


@pytest.mark.parametrize("case", ["plain", "index", "range", "exclude2"])
def test_core_reference_matches_loop(case):
    q = torch.randn(9, 5, dtype=torch.float64)
    k = torch.randn(11, 5, dtype=torch.float64)
    kw = dict(row_index=None, col_index=None, col_start=None, col_end=None, exclude=None)
    B, M = 9, 11
    if case == "index":
        kw["row_index"] = torch.tensor([8, 0, 3, 5])
        kw["col_index"] = torch.tensor([1, 2, 10, 7, 6])
        B, M = 4, 5
    if case in ("range", "exclude2"):
        kw["col_start"] = torch.tensor([0, 1, 2, 0, 5, 5, 11, 3, 0])
        kw["col_end"] = torch.tensor([3, 4, 11, 0, 9, 11, 11, 4, 11])
    if case == "exclude2":
        kw["exclude"] = torch.tensor([[0, 1], [-1, 2], [3, 4], [0, -1], [5, 6], [-1, -1], [0, 0], [3, 10], [4, 9]])
    scale = torch.tensor(1.7, dtype=torch.float64)
    row, col = sim_lse(q, k, scale, want_col=True, backend="reference", **kw)
    er, ec = _loop(q, k, scale, **kw)
    assert row.shape == (B,) and col.shape == (M,)
    torch.testing.assert_close(row, er)
    torch.testing.assert_close(col, ec)


def test_core_reference_gradcheck_with_empty_rows():
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    start = torch.tensor([0, 2, 6, 1])
    end = torch.tensor([6, 4, 6, 5])

    def f(q, k, scale):
        row, col = sim_lse(q, k, scale, col_start=start, col_end=end, want_col=True, backend="reference")
        # Empty rows/columns are -inf: keep them out of the loss, as losses do.
        return torch.where(torch.isfinite(row), row, 0).sum() + 0.5 * torch.where(torch.isfinite(col), col, 0).sum()

    assert torch.autograd.gradcheck(f, (q, k, scale))
