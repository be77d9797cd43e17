"""Test set-up: Triton kernels run in the interpreter, also on a machine with a GPU.

The kernel tests hand CPU tensors to the Triton path on purpose (small shapes against a float64
reference, the same on every machine); compiled Triton would refuse them. The GPU checks of the
same kernels are bench/bench_kernels.py --parts check.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
