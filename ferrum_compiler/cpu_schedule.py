"""The CPU build pipeline: TVM's default Relax build, plus fusion and schedules for the ops TVM legalizes.

Our kernels (linears, attention, MoE) are hand-scheduled and marked ``tirx.is_scheduled``. Everything
else (RMSNorm, residual adds, the q/k/v and gate/up slices, RoPE, SiLU·mul, gathers) is legalized by TVM
into scalar loops that run on the calling thread, and ``tvm.compile``'s default CPU pipeline neither
fuses nor schedules them: on two cores that was about 15% of a prefill step with one core idle.

This pipeline fuses injective chains into their consumer (a slice feeding RoPE or SiLU·mul becomes a
read of the fused linear's output, no copy), then gives every unscheduled function a parallel outer
loop and a vectorized inner one: ``Reduction`` (TVM's dlight CPU rule) for norms, ``Elementwise``
below for the rest.
"""

from __future__ import annotations


def _elementwise_rule():
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
    from tvm.target.codegen import llvm_get_vector_width

    class Elementwise(CPUScheduleRule):
        """Functions whose blocks are all injective: inline the producers, run the outer loops in
        parallel and vectorize the innermost loop when its extent is a multiple of the vector width."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or not all(b.is_injective() for b in infos):
                return None
            for b in infos[:-1]:
                try:
                    sch.compute_inline(b.block_rv)
                except Exception:  # noqa: BLE001 - a block that cannot be inlined: leave the function as is
                    return None
            block = infos[-1].block_rv
            loops = sch.get_loops(block)
            if not loops:
                return None
            out_bits = max(sch.get(block).writes[0].source.dtype.bits, 8)
            lanes = max(llvm_get_vector_width(target), 128) // out_bits
            inner = loops[-1]
            extent = get_extent(sch, inner)
            vector = None
            if isinstance(extent, int) and extent >= lanes and extent % lanes == 0:
                inner, vector = sch.split(inner, factors=[None, lanes])
            outer = loops[:-1] + ([inner] if vector is not None else [])
            if not outer:
                return None  # one short loop: nothing worth a parallel launch
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            if vector is not None:
                sch.vectorize(vector)
            return sch

    return Elementwise()


def cpu_pipeline(target):
    """``tvm.compile``'s default Relax pipeline with FuseOps/FuseTIR and the CPU schedules inserted
    after legalization."""
    import tvm
    from tvm.relax import backend, transform
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential([
                backend.DispatchSampling(),
                backend.DispatchSortScan(),
                transform.LegalizeOps(),
                transform.AnnotateTIROpPattern(),
                transform.FuseOps(),
                transform.FuseTIR(),
                dl.ApplyDefaultSchedule(dl.cpu.Reduction(), _elementwise_rule()),
                transform.RewriteDataflowReshape(),
                transform.ToNonDataflow(),
                transform.RemovePurityChecking(),
                transform.CallTIRRewrite(),
                transform.StaticPlanBlockMemory(),
                transform.LowerAllocTensor(),
                transform.KillAfterLastUse(),
                transform.LowerRuntimeBuiltin(),
                transform.ComputePrimValue(),
                transform.VMShapeLower(),
                transform.AttachGlobalSymbol(),
            ])(mod)

    return pipeline
