//! The softmax generator without a JIT: both compute types use 128-bit vectors with a scalar
//! tail; the signature follows the documented ABI; the spec round-trips through JSON. (That
//! they verify and compile with and without FMA is `cpu_codegen.rs`'s sweep of every spec.)

use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings;
use kiln_codegen::cpu::spec::AbiType;
use kiln_codegen::cpu::{
    build_function, signature, CpuKernelSpec, CpuTarget, ElemType, SoftmaxSpec,
};

fn host() -> OwnedTargetIsa {
    let mut flags = settings::builder();
    settings::Configurable::set(&mut flags, "opt_level", "speed").unwrap();
    cranelift_native::builder()
        .unwrap()
        .finish(settings::Flags::new(flags))
        .unwrap()
}

fn specs() -> Vec<CpuKernelSpec> {
    [ElemType::F32, ElemType::F64]
        .into_iter()
        .map(|e| SoftmaxSpec::new(e).into())
        .collect()
}

#[test]
fn softmax_uses_128_bit_vectors_and_a_scalar_tail() {
    let isa = host();
    let target = CpuTarget::from_isa(&*isa);
    for (elem, vector, scalar) in [
        (ElemType::F32, "f32x4", "f32"),
        (ElemType::F64, "f64x2", "f64"),
    ] {
        let text = build_function(&SoftmaxSpec::new(elem).into(), &target)
            .unwrap()
            .display()
            .to_string();
        // three passes (max, exp, divide), each one vector load and one scalar load
        let loads = |ty: &str| {
            text.lines()
                .filter(|l| l.contains(&format!("load.{ty} ")))
                .count()
        };
        assert_eq!(loads(vector), 3, "{text}");
        assert_eq!(loads(scalar), 3, "{text}");
        // exp stored back, the quotient stored, and the zero tail: vector and scalar each
        let stores = text.lines().filter(|l| l.contains("store ")).count();
        assert_eq!(stores, 6, "{text}");
        assert!(text.contains("fdiv"), "{text}");
    }
}

#[test]
fn softmax_signature_follows_the_documented_abi() {
    let isa = host();
    let target = CpuTarget::from_isa(&*isa);
    assert_eq!(
        SoftmaxSpec::abi().iter().map(|p| p.0).collect::<Vec<_>>(),
        [
            "x",
            "ld",
            "n",
            "row_start",
            "row_end",
            "valid",
            "valid_step",
            "scale"
        ]
    );
    for spec in specs() {
        let sig = signature(&spec, &target);
        assert_eq!(spec.abi(), SoftmaxSpec::abi());
        assert_eq!(sig.params.len(), spec.abi().len());
        assert!(sig.returns.is_empty());
        for (param, (name, ty)) in sig.params.iter().zip(spec.abi()) {
            let want = match ty {
                AbiType::Pointer | AbiType::Usize => target.pointer_type(),
                AbiType::F64 => cranelift_codegen::ir::types::F64,
            };
            assert_eq!(param.value_type, want, "{name}");
        }
        assert_eq!(build_function(&spec, &target).unwrap().signature, sig);
    }
}

#[test]
fn softmax_spec_round_trips_through_json() {
    for spec in specs() {
        let json = serde_json::to_string(&spec).unwrap();
        let back: CpuKernelSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        assert_eq!(back.cache_key(), spec.cache_key());
        spec.validate().unwrap();
    }
    assert_eq!(
        CpuKernelSpec::from(SoftmaxSpec::new(ElemType::F32)).cache_key(),
        r#"{"softmax":{"compute":"f32"}}"#
    );
    assert_ne!(specs()[0].cache_key(), specs()[1].cache_key());
}
