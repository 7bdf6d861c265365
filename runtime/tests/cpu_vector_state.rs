//! The upper AVX state around generated code (`kiln_runtime::cpu::vector_state`): the clear
//! cleans a dirty state (as a faer eigendecomposition leaves it), and a thread left dirty runs
//! a map and a dot kernel and comes back clean and with right results.
//!
//! What this cannot show on the AMD development and CI machines: that the wrappers' clear is
//! what cleans it. There Cranelift emits VEX encodings and the state reads clean after a kernel
//! even without the clear (checked by removing it, 2026-11-27). The slowdown the clear fixes
//! (hundreds of times, on the GPU host's Intel Xeon) is measured in `bench/RESULTS.md`. Needs a
//! host that reports XINUSE (AVX and XGETBV with ECX = 1, as the development and CI machines
//! do); elsewhere it says so and checks nothing.

use kiln_codegen::cpu::{DotSpec, ElemType, MapSpec};
use kiln_codegen::expr::Expr;
use kiln_runtime::cpu::vector_state::upper_vector_state_in_use;
use kiln_runtime::cpu::{clear_upper_vector_state, CpuJit, DotShape, Parallelism};

/// Leaves the upper halves of all of YMM0–15 dirty, as AVX library code that skips
/// `vzeroupper` does (all sixteen, so that generated code which happens to write some of them
/// with VEX encodings cannot clean the state by accident).
fn dirty_upper_state() {
    // SAFETY: only called where the host has AVX (XINUSE readable implies it); every vector
    // register is declared clobbered.
    unsafe {
        std::arch::asm!(
            "vpcmpeqd ymm0, ymm0, ymm0",
            "vmovdqa ymm1, ymm0",
            "vmovdqa ymm2, ymm0",
            "vmovdqa ymm3, ymm0",
            "vmovdqa ymm4, ymm0",
            "vmovdqa ymm5, ymm0",
            "vmovdqa ymm6, ymm0",
            "vmovdqa ymm7, ymm0",
            "vmovdqa ymm8, ymm0",
            "vmovdqa ymm9, ymm0",
            "vmovdqa ymm10, ymm0",
            "vmovdqa ymm11, ymm0",
            "vmovdqa ymm12, ymm0",
            "vmovdqa ymm13, ymm0",
            "vmovdqa ymm14, ymm0",
            "vmovdqa ymm15, ymm0",
            options(nomem, nostack),
            clobber_abi("C"),
        )
    };
}

#[test]
fn generated_code_runs_with_a_clean_upper_vector_state() {
    if upper_vector_state_in_use().is_none() {
        eprintln!("this host does not report XINUSE: nothing checked");
        return;
    }
    let jit = CpuJit::new().unwrap();
    let map = jit
        .map(MapSpec::new(
            Expr::input(0) * Expr::constant(2.0),
            1,
            ElemType::F64,
        ))
        .unwrap();
    let dot = jit.dot(DotSpec::new(ElemType::F64)).unwrap();
    let x: Vec<f64> = (0..37).map(f64::from).collect();
    let mut y = vec![0.0; 37];
    let mut c = vec![0.0; 1];

    // the probe can see a dirty state, and the explicit clear cleans it
    dirty_upper_state();
    assert_eq!(
        upper_vector_state_in_use(),
        Some(true),
        "dirtying did not show"
    );
    clear_upper_vector_state();
    assert_eq!(
        upper_vector_state_in_use(),
        Some(false),
        "vzeroupper did not clean"
    );

    dirty_upper_state();
    assert_eq!(upper_vector_state_in_use(), Some(true));
    map.run(&[&x], &mut y, Parallelism::Sequential).unwrap();
    assert_eq!(
        upper_vector_state_in_use(),
        Some(false),
        "map kernel ran dirty"
    );
    assert_eq!(y[36], 72.0);

    dirty_upper_state();
    assert_eq!(upper_vector_state_in_use(), Some(true));
    dot.run(
        &x,
        &x,
        &mut c,
        DotShape::new(1, 1, 37),
        1.0,
        0.0,
        Parallelism::Sequential,
    )
    .unwrap();
    assert_eq!(
        upper_vector_state_in_use(),
        Some(false),
        "dot kernel ran dirty"
    );
    assert_eq!(c[0], (0..37).map(|v| f64::from(v * v)).sum::<f64>());
}
