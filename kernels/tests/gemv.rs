//! The decode GEMV generator: PTX snapshots at representative specs, ptxas validation for
//! sm_80 and sm_90 (no spills, no local memory), determinism and spec errors.
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without
//! it. Numerics are checked on a GPU by the root `tests/gpu_gemv.rs`.

mod common;

use kiln_codegen::kernel::{Access, ParamKind};
use kiln_codegen::ptx::Target;
use kiln_ir::dtype::DType;
use kiln_kernels::gemv::{self, GemvSpec};
use kiln_kernels::Epilogue;

/// The snapshot specs: Llama-3-8B decode (f16, M=1, K=4096), Mixtral's expert gate/up
/// with SwiGLU (bf16, M=4), and a batched residual projection (f16, M=16).
fn representative() -> Vec<(&'static str, GemvSpec)> {
    vec![
        (
            "gemv_f16_m1_k4096_plain",
            GemvSpec::new(DType::F16, 1, 4096, Epilogue::None),
        ),
        (
            "gemv_bf16_m4_k4096_swiglu",
            GemvSpec::new(DType::BF16, 4, 4096, Epilogue::SwiGlu),
        ),
        (
            "gemv_f16_m16_k4096_residual",
            GemvSpec::new(DType::F16, 16, 4096, Epilogue::Residual),
        ),
    ]
}

/// More specs that must assemble cleanly: every epilogue, both dtypes, K with a tail after
/// the loop, odd tuning knobs.
fn assembled() -> Vec<GemvSpec> {
    let mut specs: Vec<GemvSpec> = representative().into_iter().map(|(_, s)| s).collect();
    for dtype in [DType::F16, DType::BF16] {
        for epilogue in [
            Epilogue::None,
            Epilogue::Bias,
            Epilogue::Residual,
            Epilogue::SwiGlu,
        ] {
            for (m, k) in [(1, 256), (3, 14336), (16, 4096)] {
                specs.push(GemvSpec::new(dtype, m, k, epilogue));
            }
        }
    }
    specs.push(GemvSpec::new(DType::BF16, 2, 11008, Epilogue::Bias).with_tuning(3, 3, 3));
    specs.push(GemvSpec::new(DType::F16, 1, 4096, Epilogue::None).with_tuning(1, 8, 8));
    specs
}

#[test]
fn ptx_snapshots() {
    for (name, spec) in representative() {
        let kernel = gemv::generate(&spec).unwrap();
        insta::assert_snapshot!(name, kernel.ptx);
    }
}

#[test]
fn kernels_assemble_for_sm80_and_sm90_without_spills() {
    for spec in assembled() {
        let kernel = gemv::generate(&spec).unwrap();
        for arch in ["sm_80", "sm_90"] {
            common::assemble_cleanly(&kernel, arch);
        }
        let sm90 = gemv::generate_for(&spec, Target::Sm90).unwrap();
        assert_eq!(sm90.target, "sm_90");
        common::assemble_cleanly(&sm90, "sm_90");
    }
}

#[test]
fn weights_stream_through_16_byte_non_allocating_loads() {
    for (name, spec) in representative() {
        let ptx = gemv::generate(&spec).unwrap().ptx;
        let weight_loads = ptx.matches("ld.global.nc.L1::no_allocate.v4.u32").count();
        // Every loop iteration issues weight rows × unroll loads.
        assert!(
            weight_loads >= spec.weight_rows_per_warp() * spec.unroll,
            "{name}: {weight_loads} weight loads"
        );
        assert!(ptx.contains("ld.global.nc.L1::evict_last.v4.u32"), "{name}");
        assert!(!ptx.contains(".local"), "{name} uses local memory");
        assert!(!ptx.contains("atom.") && !ptx.contains("red."), "{name}");
        assert!(ptx.contains("shfl.sync.bfly.b32"), "{name}");
    }
}

#[test]
fn parameters_are_named_for_the_runtime() {
    let names = |spec: GemvSpec| -> Vec<String> {
        let kernel = gemv::generate(&spec).unwrap();
        kernel.params.iter().map(|p| p.name.clone()).collect()
    };
    let spec = GemvSpec::new(DType::F16, 1, 4096, Epilogue::None);
    assert_eq!(names(spec), ["x", "weight", "out", "n"]);
    let bias = GemvSpec {
        epilogue: Epilogue::Bias,
        ..spec
    };
    assert_eq!(names(bias), ["x", "weight", "out", "bias", "n"]);
    let residual = GemvSpec {
        epilogue: Epilogue::Residual,
        ..spec
    };
    assert_eq!(names(residual), ["x", "weight", "out", "residual", "n"]);

    let kernel = gemv::generate(&residual).unwrap();
    assert_eq!(
        kernel.param("out").map(|(_, p)| p.kind),
        Some(ParamKind::Pointer(Access::Write))
    );
    assert_eq!(
        kernel.param("n").map(|(i, p)| (i, p.kind)),
        Some((4, ParamKind::U32))
    );
    assert_eq!(kernel.target, "sm_80");
}

#[test]
fn launch_rule_covers_n_with_whole_warps() {
    let spec = GemvSpec::new(DType::F16, 1, 4096, Epilogue::None);
    let kernel = gemv::generate(&spec).unwrap();
    let scalars = std::collections::BTreeMap::from([("n".to_string(), 14336u64)]);
    let (grid, block) = kernel.launch.evaluate(&scalars).unwrap();
    let per_block = spec.rows_per_block() as u32;
    assert_eq!(block, [32 * spec.warps_per_block as u32, 1, 1]);
    assert_eq!(grid, [14336u32.div_ceil(per_block), 1, 1]);
    assert_eq!(kernel.launch.shared_bytes, 0);
}

#[test]
fn generation_is_deterministic() {
    for spec in assembled() {
        assert_eq!(gemv::generate(&spec), gemv::generate(&spec));
    }
    let a = GemvSpec::new(DType::F16, 1, 4096, Epilogue::None);
    let b = GemvSpec::new(DType::BF16, 1, 4096, Epilogue::None);
    assert_ne!(
        gemv::generate(&a).unwrap().entry,
        gemv::generate(&b).unwrap().entry
    );
}

#[test]
fn bad_specs_are_rejected_with_the_field_named() {
    let good = GemvSpec::new(DType::F16, 1, 4096, Epilogue::None);
    let message = |spec: GemvSpec| {
        let error = gemv::generate(&spec).unwrap_err();
        assert_eq!(error.family, "gemv");
        error.to_string()
    };
    assert!(message(GemvSpec { m: 0, ..good }).contains("m = 0"));
    assert!(message(GemvSpec { m: 17, ..good }).contains("m = 17"));
    for k in [0, 100, 4096 + 128, 8] {
        assert!(message(GemvSpec { k, ..good }).contains(&format!("k = {k}")));
    }
    assert!(message(GemvSpec {
        dtype: DType::F32,
        ..good
    })
    .contains("dtype f32"));
    assert!(message(good.with_tuning(0, 4, 4)).contains("rows_per_warp"));
    assert!(message(good.with_tuning(2, 33, 4)).contains("warps_per_block"));
    assert!(message(good.with_tuning(2, 4, 0)).contains("unroll"));
    let swiglu_m16 = GemvSpec::new(DType::BF16, 16, 4096, Epilogue::SwiGlu);
    assert!(message(swiglu_m16.with_tuning(4, 4, 1)).contains("accumulators"));
    assert!(message(good.with_tuning(8, 4, 8)).contains("loads in flight"));
}
