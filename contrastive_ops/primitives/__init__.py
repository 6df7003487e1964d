"""The primitives every fused loss is composed of: one module per primitive.

Each module holds, in this order: the contract (shapes, dtypes, what is
returned, the maths of forward and backward, and the object a kernel backend
exposes as ``PRIMITIVES[<name>]``), the dense reference, the autograd
Function over ``backends.primitive(backend, <name>)``, and the entry the
losses call with a concrete backend name (``"reference"`` runs the dense
version).

=================  ====================  =========================================
module             backend key           entry the losses call
=================  ====================  =========================================
``sim_lse``        ``"sim_lse"``         ``sim_lse(q, k, scale, ..., backend=)``
``siglip_pairs``   ``"siglip"``          ``siglip_pairs(x, y, scale, bias, backend=)``
``sinkhorn``       ``"sinkhorn"``        ``sinkhorn(scores, epsilon, iterations, backend=)``
``swav_ce``        ``"swav_ce"``         ``swav_ce(x, t, scale, backend=)``
``sim_expect``     ``"sim_expect"``      ``sim_expect(q, k, scale, exclude=, backend=)``
``pix_pos``        ``"pix_pos_sum"``     ``pix_pos_sum(x, dx, dy, diag, ratio, H, W, backend=)``
``pix_pos``        ``"pix_pos_lse"``     ``pix_pos_lse(q, k, scale, dx, dy, diag, ratio, H, W, ...)``
``gated_lse``      ``"gated_lse"``       ``gated_lse(a, w, k, scale, col_start=, col_end=, backend=)``
``label_lse``      ``"label_lse"``       ``label_lse(q, k, scale, y_row, y_col, kind=, coef=, ..., backend=)``
=================  ====================  =========================================

Imports go one way: losses → primitives → backends → the extension.
"""
