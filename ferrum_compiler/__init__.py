"""ferrum's compiler: frontends, IR, passes, lowering to TVM, artifact writer. Never imported by the runtime."""

__version__ = "0.1.0"

from ferrum_runtime.env import tvm_without_torch as _tvm_without_torch

_tvm_without_torch()  # before the compiler's modules import TVM
