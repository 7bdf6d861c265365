//! The Cranelift CPU generators without a JIT: every spec builds a function that passes the
//! verifier and compiles for the host, with and without FMA; output is deterministic; the
//! signature follows the documented ABI; specs round-trip through JSON and invalid ones are
//! refused. RMSNorm and RoPE: their vector/scalar loop shape, and RoPE's f64 path widening f32
//! pairs and never fusing a multiply-add.

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::{settings, verify_function, Context};
use kiln_codegen::cpu::spec::AbiType;
use kiln_codegen::cpu::{
    build_function, signature, CpuCodegenError, CpuKernelSpec, CpuTarget, DotSpec, ElemType,
    ElementFormat, Int4DotSpec, MapSpec, RmsNormSpec, RopeSpec, SoftmaxSpec,
};
use kiln_codegen::expr::{BinaryOp, Expr, UnaryOp};

fn host() -> OwnedTargetIsa {
    let mut flags = settings::builder();
    settings::Configurable::set(&mut flags, "opt_level", "speed").unwrap();
    cranelift_native::builder()
        .unwrap()
        .finish(settings::Flags::new(flags))
        .unwrap()
}

const UNARY: [UnaryOp; 8] = [
    UnaryOp::Neg,
    UnaryOp::Abs,
    UnaryOp::Exp,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Recip,
    UnaryOp::Sigmoid,
    UnaryOp::Silu,
];
const BINARY: [BinaryOp; 6] = [
    BinaryOp::Add,
    BinaryOp::Sub,
    BinaryOp::Mul,
    BinaryOp::Div,
    BinaryOp::Max,
    BinaryOp::Min,
];

fn all_specs() -> Vec<CpuKernelSpec> {
    let mut specs = Vec::new();
    for elem in [ElemType::F32, ElemType::F64] {
        for op in UNARY {
            specs.push(MapSpec::new(Expr::input(0).unary(op), 1, elem).into());
        }
        for op in BINARY {
            specs.push(MapSpec::new(Expr::input(0).binary(op, Expr::input(1)), 2, elem).into());
        }
        for unroll in 1..=8 {
            let e = Expr::input(0).silu() * Expr::input(2) + Expr::constant(0.5);
            specs.push(MapSpec::new(e, 3, elem).with_unroll(unroll).into());
        }
        for rows in 1..=4 {
            for cols in 1..=4 {
                if rows * cols <= 12 {
                    specs.push(DotSpec::new(elem).with_tile(rows, cols).into());
                }
            }
        }
        specs.push(
            DotSpec::new(elem)
                .with_scale(true)
                .with_accumulate(true)
                .into(),
        );
    }
    specs.push(
        MapSpec::new(Expr::input(0) * Expr::input(1), 2, ElemType::F32)
            .with_input_formats(vec![ElementFormat::Bf16, ElementFormat::F32])
            .into(),
    );
    specs.push(
        DotSpec::new(ElemType::F32)
            .with_formats(ElementFormat::Bf16, ElementFormat::Bf16)
            .into(),
    );
    for residual in [false, true] {
        for unroll in 1..=8 {
            specs.push(
                RmsNormSpec::new()
                    .with_residual(residual)
                    .with_unroll(unroll)
                    .into(),
            );
        }
    }
    for compute in [ElemType::F32, ElemType::F64] {
        specs.push(SoftmaxSpec::new(compute).into());
    }
    for (group_size, tile_rows) in [(16, 1), (128, 4), (64, 3)] {
        specs.push(
            Int4DotSpec {
                group_size,
                tile_rows,
            }
            .into(),
        );
    }
    for rotation in [ElemType::F32, ElemType::F64] {
        for unroll in 1..=8 {
            specs.push(
                RopeSpec::new()
                    .with_rotation(rotation)
                    .with_unroll(unroll)
                    .into(),
            );
        }
    }
    specs
}

#[test]
fn every_spec_verifies_and_compiles_for_the_host_with_and_without_fma() {
    let isa = host();
    for fma in [false, true] {
        let mut target = CpuTarget::from_isa(&*isa);
        target.fma &= fma;
        for spec in all_specs() {
            let function = build_function(&spec, &target).unwrap();
            if let Err(errors) = verify_function(&function, &*isa) {
                panic!("{spec:?}: {errors}\n{}", function.display());
            }
            let text = function.display().to_string();
            assert_eq!(
                text.contains(" fma "),
                target.fma && needs_multiply_add(&spec),
                "{spec:?}"
            );
            let mut context = Context::for_function(function);
            context
                .compile(&*isa, &mut ControlPlane::default())
                .unwrap_or_else(|e| panic!("{spec:?}: {:?}", e.inner));
        }
    }
}

/// Whether a spec's code multiplies and adds (a dot, a norm's sum of squares, a softmax, or a
/// map with an exponential; never RoPE, whose f64 path must round like the interpreter).
fn needs_multiply_add(spec: &CpuKernelSpec) -> bool {
    match spec {
        CpuKernelSpec::Dot(_)
        | CpuKernelSpec::RmsNorm(_)
        | CpuKernelSpec::Softmax(_)
        | CpuKernelSpec::Int4Dot(_) => true,
        CpuKernelSpec::Rope(_) => false,
        CpuKernelSpec::Map(m) => {
            let text = format!("{:?}", m.expr);
            text.contains("Exp") || text.contains("Sigmoid") || text.contains("Silu")
        }
    }
}

#[test]
fn maps_use_128_bit_vectors_and_a_scalar_tail() {
    let isa = host();
    let target = CpuTarget::from_isa(&*isa);
    for (elem, vector, scalar) in [
        (ElemType::F32, "f32x4", "f32"),
        (ElemType::F64, "f64x2", "f64"),
    ] {
        let spec = MapSpec::new(Expr::input(0) + Expr::input(1), 2, elem).with_unroll(4);
        let text = build_function(&spec.into(), &target)
            .unwrap()
            .display()
            .to_string();
        // two inputs: four vectors each in the main loop, one in the one-vector loop, then one
        // scalar each in the tail
        let vector_loads = text
            .lines()
            .filter(|l| l.contains(&format!("load.{vector}")))
            .count();
        let scalar_loads = text
            .lines()
            .filter(|l| l.contains(&format!("load.{scalar} ")))
            .count();
        assert_eq!(vector_loads, 2 * 5, "{text}");
        assert_eq!(scalar_loads, 2, "{text}");
    }
}

#[test]
fn output_is_deterministic() {
    let isa = host();
    let target = CpuTarget::from_isa(&*isa);
    for spec in all_specs() {
        let first = build_function(&spec, &target)
            .unwrap()
            .display()
            .to_string();
        let second = build_function(&spec, &target)
            .unwrap()
            .display()
            .to_string();
        assert_eq!(first, second);
    }
}

#[test]
fn signatures_follow_the_documented_abi() {
    let isa = host();
    let target = CpuTarget::from_isa(&*isa);
    for spec in all_specs() {
        let sig = signature(&spec, &target);
        let abi = spec.abi();
        assert_eq!(sig.params.len(), abi.len());
        assert!(sig.returns.is_empty());
        for (param, (name, ty)) in sig.params.iter().zip(abi) {
            let want = match ty {
                AbiType::Pointer | AbiType::Usize => target.pointer_type(),
                AbiType::F64 => cranelift_codegen::ir::types::F64,
            };
            assert_eq!(param.value_type, want, "{name}");
        }
        assert_eq!(build_function(&spec, &target).unwrap().signature, sig);
    }
    assert_eq!(
        MapSpec::abi().iter().map(|p| p.0).collect::<Vec<_>>(),
        ["inputs", "out", "start", "end"]
    );
    assert_eq!(DotSpec::abi()[11].0, "alpha");
    assert_eq!(
        RmsNormSpec::abi().iter().map(|p| p.0).collect::<Vec<_>>(),
        [
            "x",
            "residual",
            "weight",
            "out",
            "residual_out",
            "hidden",
            "row_start",
            "row_end",
            "eps"
        ]
    );
    assert_eq!(RmsNormSpec::abi()[8].1, AbiType::F64);
    assert_eq!(
        RopeSpec::abi().iter().map(|p| p.0).collect::<Vec<_>>(),
        [
            "x",
            "out",
            "cos",
            "sin",
            "heads",
            "head_dim",
            "token_start",
            "token_end"
        ]
    );
}

#[test]
fn specs_round_trip_through_json_and_key_the_cache_exactly() {
    for spec in all_specs() {
        let json = serde_json::to_string(&spec).unwrap();
        let back: CpuKernelSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        assert_eq!(back.cache_key(), spec.cache_key());
    }
    let key = |c: f64| {
        CpuKernelSpec::from(MapSpec::new(
            Expr::input(0) * Expr::constant(c),
            1,
            ElemType::F32,
        ))
        .cache_key()
    };
    assert_ne!(key(0.0), key(-0.0));
    assert_ne!(key(0.1), key(0.1 + 1e-17 * 2.0));
    assert_eq!(key(0.1), key(0.1));
    let keys: std::collections::HashSet<String> =
        all_specs().iter().map(CpuKernelSpec::cache_key).collect();
    assert_eq!(keys.len(), all_specs().len());
}

#[test]
fn invalid_specs_are_refused() {
    let isa = host();
    let target = CpuTarget::from_isa(&*isa);
    let refused = |spec: CpuKernelSpec| match build_function(&spec, &target) {
        Err(CpuCodegenError::InvalidSpec(message)) => message,
        Ok(_) => panic!("{spec:?} was accepted"),
    };
    assert!(
        refused(MapSpec::new(Expr::input(1), 1, ElemType::F32).into()).contains("reads 2 inputs")
    );
    assert!(
        refused(MapSpec::new(Expr::constant(f64::NAN), 0, ElemType::F32).into())
            .contains("not finite")
    );
    assert!(refused(MapSpec::new(Expr::input(0), 33, ElemType::F32).into()).contains("at most 32"));
    assert!(refused(
        MapSpec::new(Expr::input(0), 1, ElemType::F32)
            .with_unroll(9)
            .into()
    )
    .contains("unroll"));
    assert!(refused(
        MapSpec::new(Expr::input(0), 1, ElemType::F32)
            .with_input_formats(vec![ElementFormat::F64])
            .into()
    )
    .contains("input 0"));
    assert!(refused(DotSpec::new(ElemType::F64).with_tile(0, 1).into()).contains("tile"));
    assert!(refused(DotSpec::new(ElemType::F64).with_tile(4, 4).into()).contains("tile"));
    assert!(refused(
        DotSpec::new(ElemType::F64)
            .with_formats(ElementFormat::F64, ElementFormat::Bf16)
            .into()
    )
    .contains("operand b"));
    for unroll in [0, 9] {
        assert!(refused(RmsNormSpec::new().with_unroll(unroll).into())
            .contains(&format!("rms_norm: unroll {unroll}")));
        assert!(refused(RopeSpec::new().with_unroll(unroll).into())
            .contains(&format!("rope: unroll {unroll}")));
    }
}

#[test]
fn row_kernel_specs_have_stable_json_and_malformed_json_is_refused() {
    assert_eq!(
        CpuKernelSpec::from(RmsNormSpec::new().with_residual(true)).cache_key(),
        r#"{"rms_norm":{"residual":true,"unroll":4}}"#
    );
    assert_eq!(
        CpuKernelSpec::from(RopeSpec::new()).cache_key(),
        r#"{"rope":{"rotation":"f64","unroll":2}}"#
    );
    // not representable: a rotation precision that does not exist, a missing field
    for bad in [
        r#"{"rope":{"rotation":"f16","unroll":2}}"#,
        r#"{"rope":{"unroll":2}}"#,
        r#"{"rms_norm":{"residual":1,"unroll":4}}"#,
    ] {
        assert!(serde_json::from_str::<CpuKernelSpec>(bad).is_err(), "{bad}");
    }
    // representable but invalid: refused by validation
    let spec: CpuKernelSpec =
        serde_json::from_str(r#"{"rms_norm":{"residual":false,"unroll":0}}"#).unwrap();
    assert!(spec.validate().is_err());
}

/// Lines of `text` that contain `pattern`.
fn count(text: &str, pattern: &str) -> usize {
    text.lines().filter(|l| l.contains(pattern)).count()
}

#[test]
fn rms_norm_uses_f32x4_accumulators_and_a_scalar_tail() {
    let isa = host();
    let target = CpuTarget::from_isa(&*isa);
    for residual in [false, true] {
        for unroll in [1u32, 3, 4] {
            let spec = RmsNormSpec::new()
                .with_residual(residual)
                .with_unroll(unroll);
            let text = build_function(&spec.into(), &target)
                .unwrap()
                .display()
                .to_string();
            // vector groups per pass: `unroll` in the main loop, one more in the one-vector
            // loop when unrolled; each pass has one scalar group
            let groups = unroll + u32::from(unroll > 1);
            let loads_per_group = if residual { 2 + 2 } else { 1 + 2 };
            let stores_per_group = if residual { 2 } else { 1 };
            let what = format!("residual {residual} unroll {unroll}\n{text}");
            assert_eq!(
                count(&text, "load.f32x4"),
                (groups * loads_per_group) as usize,
                "{what}"
            );
            assert_eq!(
                count(&text, "load.f32 "),
                loads_per_group as usize,
                "{what}"
            );
            assert_eq!(
                count(&text, "store notrap"),
                (stores_per_group * (groups + 1)) as usize,
                "{what}"
            );
            assert_eq!(count(&text, "sqrt"), 1, "{what}");
        }
    }
}

#[test]
fn rope_rotates_vectors_without_fusing_and_widens_for_f64() {
    let isa = host();
    let mut target = CpuTarget::from_isa(&*isa);
    target.fma = true;
    // vector loads per group: f32 rotation reads x₁, x₂, cos and sin as f32x4; f64 rotation
    // reads cos and sin as f64x2 and each x pair as one 64-bit integer load
    for (rotation, vector, loads) in [
        (ElemType::F32, "f32x4", [("load.f32x4", 4)].as_slice()),
        (
            ElemType::F64,
            "f64x2",
            &[("load.f64x2", 2), ("load.i64", 2)],
        ),
    ] {
        let spec = RopeSpec::new().with_rotation(rotation).with_unroll(2);
        let text = build_function(&spec.into(), &target)
            .unwrap()
            .display()
            .to_string();
        assert!(!text.contains(" fma"), "{text}");
        // three vector groups: two unrolled, one in the one-vector loop
        for &(load, per_group) in loads {
            assert_eq!(count(&text, load), per_group * 3, "{load}\n{text}");
        }
        // four rounded products per group: three vector groups and the scalar tail
        assert_eq!(count(&text, " fmul "), 4 * (3 + 1), "{text}");
        assert!(text.contains(vector), "{text}");
        if rotation == ElemType::F64 {
            // x pairs: two per group, widened; results narrowed; scalar tail promotes
            assert_eq!(count(&text, "fvpromote_low"), 2 * 3, "{text}");
            assert_eq!(count(&text, "fvdemote"), 2 * 3, "{text}");
            assert_eq!(count(&text, "fpromote"), 2, "{text}");
            assert_eq!(count(&text, "fdemote"), 2, "{text}");
        } else {
            assert!(!text.contains("fpromote") && !text.contains("fvpromote"));
        }
    }
}
