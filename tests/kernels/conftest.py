"""Kernel tests run the Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1, the default here).

TRITON_INTERPRET must be set before `triton` is first imported (Triton decorates its own tl.max etc. then).
Setting it here works when tests/kernels is collected before anything imports triton (transformers does);
for a whole-suite run the repository's tests/conftest.py should set it first. Too late, the kernels raise a
RuntimeError that says so. On a GPU machine, `TRITON_INTERPRET=0 pytest tests/kernels` runs the GPU tests
and skips the interpreter ones.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
