"""The CPU suite runs the real Triton kernels under the interpreter.

TRITON_INTERPRET is read when Triton's language module is first imported, so it is set here,
before any test module imports the kernels.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
