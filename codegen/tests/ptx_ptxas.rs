//! The ptxas driver against the real assembler: a rejected kernel's error carries the entry
//! name and ptxas' diagnostic, bad architectures are refused before running anything, and
//! a report describes the kernel it assembled. Fails (never skips) without ptxas.

use kiln_codegen::kernel::{Access, Extent, LaunchRule};
use kiln_codegen::ptx::{KernelBuilder, Target, F32};
use kiln_codegen::ptxas::{self, PtxasError};

fn tiny_kernel(target: Target) -> String {
    let mut k = KernelBuilder::new("tiny", target);
    let x = k.param_pointer("x", Access::ReadWrite);
    let value = k.ld_global::<F32>(x);
    let doubled = k.add(value, value);
    k.st_global(x, doubled);
    k.finish(LaunchRule::linear(Extent::fixed(1), 32)).ptx
}

#[test]
fn rejected_kernels_report_the_entry_and_the_diagnostic() {
    ptxas::require_ptxas().unwrap_or_else(|e| panic!("{e}"));
    let broken = tiny_kernel(Target::Sm80).replace("add.f32", "add.f99");
    let err = ptxas::assemble(&broken, "sm_80").unwrap_err();
    match &err {
        PtxasError::Rejected {
            entry,
            arch,
            stderr,
            ..
        } => {
            assert_eq!(entry, "tiny");
            assert_eq!(arch, "sm_80");
            assert!(stderr.contains("error"), "{stderr}");
        }
        other => panic!("expected a rejection, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("`tiny`") && message.contains("sm_80"),
        "{message}"
    );
}

#[test]
fn bad_architectures_are_refused() {
    let err = ptxas::assemble(&tiny_kernel(Target::Sm80), "compute_80").unwrap_err();
    assert!(matches!(err, PtxasError::BadArch { .. }), "{err}");
}

#[test]
fn reports_describe_the_assembled_kernel() {
    let report =
        ptxas::assemble(&tiny_kernel(Target::Sm90), "sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.entry, "tiny");
    assert_eq!(report.arch, "sm_90");
    assert!(report.registers > 0 && report.registers < 32, "{report:?}");
    assert!(!report.spills());
    assert_eq!(report.shared_bytes, 0);
    assert!(!report.cubin.is_empty());
    assert!(
        report.log.contains("Compiling entry function 'tiny'"),
        "{}",
        report.log
    );
}
