"""ferrum's compiler: frontends, IR, passes, lowering to TVM, artifact writer. Never imported by the runtime."""

__version__ = "0.1.0"
