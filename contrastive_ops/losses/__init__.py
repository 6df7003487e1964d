"""One module per loss family: the maths in the docstring, the exact PyTorch
reference, and the fused composition on the core primitives."""
