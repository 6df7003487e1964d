"""One module per loss family: the maths in the docstring, the exact PyTorch
reference, the fused composition on the primitives (``contrastive_ops.primitives``)
and the public function.  Loss modules import primitives, never each other;
what they share is in ``_common`` and ``_present_first``."""
