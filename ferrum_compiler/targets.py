"""Compile targets (DESIGN §6): name → TVM target dict, kernel kind, default dtype, required CPU features."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferrum_runtime.artifact import host_cpu_flags
from ferrum_runtime.errors import FerrumError


class TargetError(FerrumError):
    """An unknown target name."""

# x86 instruction-set flags (as /proc/cpuinfo spells them) that generated code may rely on
X86_V3_FEATURES = ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2")
X86_V4_FEATURES = X86_V3_FEATURES + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
X86_TRACKED_FEATURES = X86_V4_FEATURES + ("avx512_vnni", "avx512_bf16", "avx512vbmi", "avx512ifma", "amx_tile")


@dataclass(frozen=True)
class TargetSpec:
    name: str
    tvm_target: dict
    kernel_kind: str  # "cpu" | "gpu": which hand-written kernel variant the schedules emit
    default_dtype: str
    cpu_features: tuple[str, ...] = ()  # features the host running the artifact must have
    notes: dict = field(default_factory=dict)

    @property
    def int_dot_isa(self) -> str | None:
        """The integer dot-product instructions the INT4 CPU kernel may use (``quant_linear.INT_DOT_ISAS``),
        or None for the portable kernel. VNNI needs an LLVM CPU model that enables it (not a generic level)."""
        if self.kernel_kind != "cpu":
            return None
        if "avx512_vnni" in self.cpu_features and "avx512bw" in self.cpu_features \
                and not str(self.notes.get("mcpu", "")).startswith("x86-64"):
            return "avx512_vnni"
        return "avx2" if "avx2" in self.cpu_features else None

    @property
    def device(self) -> str:
        return self.tvm_target["kind"] if self.kernel_kind == "gpu" else "cpu"


CUDA_ARCHES = {"cuda-sm80": "sm_80", "cuda-sm86": "sm_86", "cuda-sm89": "sm_89", "cuda-sm90": "sm_90"}
TARGET_NAMES = ("cpu", "cpu-x86-64-v3", "cpu-x86-64-v4", *CUDA_ARCHES, "metal")


def host_cpu_features() -> tuple[str, ...]:
    """The tracked x86 feature flags this machine has (empty on non-x86 or without /proc/cpuinfo)."""
    flags = host_cpu_flags()
    return tuple(x for x in X86_TRACKED_FEATURES if x in flags)


def resolve(name: str) -> TargetSpec:
    """The TargetSpec for a user-facing target name; a one-line error lists the valid names."""
    if name == "cpu":
        from tvm.target import codegen

        mcpu = str(codegen.llvm_get_system_cpu())
        features = host_cpu_features()
        if not codegen.llvm_is_valid_cpu(mcpu, "x86_64"):  # an LLVM too old for this CPU: stay portable
            mcpu = "x86-64-v4" if "avx512f" in features else "x86-64-v3" if "avx2" in features else "x86-64"
        return TargetSpec(name, {"kind": "llvm", "mcpu": mcpu}, "cpu", "float32", features, {"mcpu": mcpu})
    if name in ("cpu-x86-64-v3", "cpu-x86-64-v4"):
        level = name.removeprefix("cpu-")
        feats = X86_V3_FEATURES if level.endswith("v3") else X86_V4_FEATURES
        return TargetSpec(name, {"kind": "llvm", "mcpu": level}, "cpu", "float32", feats, {"mcpu": level})
    if name in CUDA_ARCHES:
        return TargetSpec(name, {"kind": "cuda", "arch": CUDA_ARCHES[name]}, "gpu", "float16")
    if name == "metal":
        return TargetSpec(name, {"kind": "metal"}, "gpu", "float16")
    raise TargetError(f"unknown target {name!r}; choose one of: {', '.join(TARGET_NAMES)}")
