//! Shared checks of the generator tests: every kernel assembles with ptxas for sm_80 and
//! sm_90 without spilling, and generating twice gives the same text.
#![allow(dead_code)]

use kiln_codegen::kernel::GpuKernel;
use kiln_codegen::ptxas::assemble;
use kiln_ir::dtype::DType;
use kiln_kernels::attention::paged::PageOrder;
use kiln_kernels::attention::PagedKv;

/// The attention tests' KV layout: 16-token head-major pages.
pub fn layout(dtype: DType, q_heads: usize, kv_heads: usize, head_dim: usize) -> PagedKv {
    PagedKv {
        dtype,
        q_heads,
        kv_heads,
        head_dim,
        page_size: 16,
        order: PageOrder::HeadMajor,
    }
}

/// Assembles `kernel` for sm_80 and sm_90 and asserts zero spills and no local-memory stack.
/// Returns the sm_90 register count.
pub fn assert_assembles(kernel: &GpuKernel) -> u32 {
    let mut registers = 0;
    for arch in ["sm_80", "sm_90"] {
        let report = assemble(&kernel.ptx, arch)
            .unwrap_or_else(|e| panic!("{} does not assemble for {arch}: {e}", kernel.entry));
        assert_eq!(
            report.spill_store_bytes + report.spill_load_bytes,
            0,
            "{} spills on {arch}: {report:?}",
            kernel.entry
        );
        eprintln!(
            "{} {arch}: {} registers, {} B static shared",
            kernel.entry, report.registers, report.shared_bytes
        );
        registers = report.registers;
    }
    registers
}

/// Assembles `kernel` for `arch` and fails on any ptxas error, warning, spill or stack use;
/// prints the registers and shared memory. Returns ptxas's report.
pub fn assemble_cleanly(kernel: &GpuKernel, arch: &str) -> kiln_codegen::ptxas::PtxasReport {
    let report =
        assemble(&kernel.ptx, arch).unwrap_or_else(|e| panic!("{e}\n--- PTX ---\n{}", kernel.ptx));
    assert_eq!(report.entry, kernel.entry);
    assert!(
        !report.spills(),
        "{} spills on {arch}: {} / {} bytes\n{}",
        kernel.entry,
        report.spill_store_bytes,
        report.spill_load_bytes,
        report.log
    );
    assert_eq!(report.stack_frame_bytes, 0, "{}", report.log);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    eprintln!(
        "{:<60} {:<6} {:>3} registers, {:>5} B static, {:>6} B dynamic shared",
        kernel.entry, arch, report.registers, report.shared_bytes, kernel.launch.shared_bytes
    );
    report
}

/// The expert FFN stages, in launch order.
pub const EXPERT_FFN_STAGES: [kiln_kernels::moe::expert_ffn::ExpertFfnStage; 2] = [
    kiln_kernels::moe::expert_ffn::ExpertFfnStage::GateUp,
    kiln_kernels::moe::expert_ffn::ExpertFfnStage::Down,
];

/// An expert FFN stage spec on `kernel`.
pub fn expert_ffn_spec(
    kernel: kiln_kernels::moe::expert_ffn::ExpertFfnKernel,
    dtype: DType,
    experts: usize,
    hidden: usize,
    intermediate: usize,
    top_k: usize,
    stage: kiln_kernels::moe::expert_ffn::ExpertFfnStage,
) -> kiln_kernels::moe::expert_ffn::MoeExpertFfnSpec {
    kiln_kernels::moe::expert_ffn::MoeExpertFfnSpec {
        dtype,
        experts,
        hidden,
        intermediate,
        top_k,
        stage,
        kernel,
    }
}

/// The model shapes every expert FFN kernel is assembled at, for `stage` and `dtype`: Mixtral
/// (E=8, H=4096, I=14336, k=2) and Qwen3-30B-A3B (E=128, H=2048, I=768, k=8).
pub fn expert_ffn_model_specs(
    kernel: kiln_kernels::moe::expert_ffn::ExpertFfnKernel,
    dtype: DType,
    stage: kiln_kernels::moe::expert_ffn::ExpertFfnStage,
) -> [kiln_kernels::moe::expert_ffn::MoeExpertFfnSpec; 2] {
    [
        expert_ffn_spec(kernel, dtype, 8, 4096, 14336, 2, stage),
        expert_ffn_spec(kernel, dtype, 128, 2048, 768, 8, stage),
    ]
}

/// Generates `spec` for sm_80 (assembled for sm_80 and sm_90) and for sm_90 (assembled for
/// sm_90), each without spills or warnings; returns the sm_80 kernel.
pub fn assemble_expert_ffn_cleanly(
    spec: &kiln_kernels::moe::expert_ffn::MoeExpertFfnSpec,
) -> GpuKernel {
    use kiln_kernels::moe::expert_ffn;
    let kernel = expert_ffn::generate(spec).unwrap();
    assert_eq!(kernel.target, "sm_80");
    for arch in ["sm_80", "sm_90"] {
        assemble_cleanly(&kernel, arch);
    }
    let sm90 = expert_ffn::generate_for(spec, kiln_codegen::ptx::Target::Sm90).unwrap();
    assert_eq!(sm90.target, "sm_90");
    assemble_cleanly(&sm90, "sm_90");
    kernel
}
