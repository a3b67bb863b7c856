"""GPU operators: Triton kernels that read GGUF blocks, and their launchers.

Nothing here is compiled at install time: Triton compiles a kernel the first time it
runs. Where no GPU exists the kernels still run under Triton's interpreter
(TRITON_INTERPRET=1, set before this package is imported), which is how their tests
run on CPU-only machines.
"""
