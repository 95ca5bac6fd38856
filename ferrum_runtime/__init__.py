"""ferrum's runtime: loads artifacts with TVM's runtime library only; never imports ferrum_compiler."""
