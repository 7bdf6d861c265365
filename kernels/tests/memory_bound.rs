//! The memory-bound generators (elementwise map, RMSNorm, RoPE): PTX snapshots at model
//! shapes, ptxas for sm_80 and sm_90 without spills, determinism, and spec errors.

mod common;

use common::assert_assembles;
use kiln_codegen::expr::Expr;
use kiln_ir::dtype::DType;
use kiln_kernels::elementwise::{self, ElementwiseSpec};
use kiln_kernels::rms_norm::{self, RmsNormSpec};
use kiln_kernels::rope::{self, RopeSpec};

fn swiglu_map(dtype: DType) -> ElementwiseSpec {
    ElementwiseSpec {
        dtype,
        inputs: 2,
        expr: Expr::input(0).silu() * Expr::input(1),
        scalar_inputs: vec![],
        row_inputs: vec![],
        row_width: 0,
    }
}

#[test]
fn elementwise_swiglu_snapshot_and_ptxas() {
    let kernel = elementwise::generate(&swiglu_map(DType::BF16)).unwrap();
    insta::assert_snapshot!("elementwise_swiglu_bf16", kernel.ptx);
    assert_assembles(&kernel);
    assert!(kernel.ptx.contains("ld.global.nc.v4.u32"), "16-byte loads");
    assert!(kernel.ptx.contains("st.global.v4.b32"), "16-byte stores");
    let f16 = elementwise::generate(&swiglu_map(DType::F16)).unwrap();
    assert_assembles(&f16);
    assert_ne!(f16.entry, kernel.entry);
}

#[test]
fn elementwise_every_expression_op_assembles() {
    use kiln_codegen::expr::{BinaryOp, UnaryOp};
    let mut expr = Expr::input(0);
    for op in [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
    ] {
        expr = expr.unary(op);
    }
    for op in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
        BinaryOp::Min,
    ] {
        expr = expr.binary(op, Expr::input(2));
    }
    let spec = ElementwiseSpec {
        dtype: DType::F16,
        inputs: 3,
        expr,
        scalar_inputs: vec![],
        row_inputs: vec![],
        row_width: 0,
    };
    assert_assembles(&elementwise::generate(&spec).unwrap());
}

#[test]
fn elementwise_rejects_bad_specs() {
    let mut spec = swiglu_map(DType::F32);
    let err = elementwise::generate(&spec).unwrap_err().to_string();
    assert!(err.contains("f16, bf16 or i32"), "{err}");
    spec.dtype = DType::F16;
    spec.inputs = 1;
    let err = elementwise::generate(&spec).unwrap_err().to_string();
    assert!(err.contains("reads input 1"), "{err}");
}

#[test]
fn rms_norm_snapshots_and_ptxas_at_model_shapes() {
    let llama = RmsNormSpec {
        dtype: DType::BF16,
        hidden: 4096,
        residual: true,
    };
    let kernel = rms_norm::generate(&llama).unwrap();
    insta::assert_snapshot!("rms_norm_residual_bf16_h4096", kernel.ptx);
    assert_assembles(&kernel);
    assert_eq!(kernel.launch.block[0], 512);
    // Odd shapes: a row that does not fill the last warp, and several chunks per thread.
    for hidden in [128, 2048, 5120, 8200, 14336] {
        for residual in [false, true] {
            let spec = RmsNormSpec {
                dtype: DType::F16,
                hidden,
                residual,
            };
            assert_assembles(&rms_norm::generate(&spec).unwrap());
        }
    }
    let names: Vec<_> = kernel.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "x",
            "weight",
            "residual",
            "residual_out",
            "out",
            "rows",
            "eps"
        ]
    );
}

#[test]
fn rms_norm_rejects_bad_hidden() {
    let spec = RmsNormSpec {
        dtype: DType::F16,
        hidden: 100,
        residual: false,
    };
    let err = rms_norm::generate(&spec).unwrap_err().to_string();
    assert!(err.contains("multiple of 8"), "{err}");
}

#[test]
fn rope_snapshot_and_ptxas() {
    let llama3 = RopeSpec {
        dtype: DType::F16,
        heads: 32,
        head_dim: 128,
        theta: 500_000.0,
    };
    let kernel = rope::generate(&llama3).unwrap();
    insta::assert_snapshot!("rope_f16_h32_d128", kernel.ptx);
    assert_assembles(&kernel);
    let mixtral_keys = RopeSpec {
        dtype: DType::BF16,
        heads: 8,
        head_dim: 128,
        theta: 1e6,
    };
    assert_assembles(&rope::generate(&mixtral_keys).unwrap());
    let bad = RopeSpec {
        head_dim: 72,
        ..llama3
    };
    assert!(rope::generate(&bad)
        .unwrap_err()
        .to_string()
        .contains("multiple of 16"));
}

#[test]
fn generation_is_deterministic() {
    let spec = RmsNormSpec {
        dtype: DType::BF16,
        hidden: 4096,
        residual: false,
    };
    assert_eq!(
        rms_norm::generate(&spec).unwrap(),
        rms_norm::generate(&spec).unwrap()
    );
    let map = swiglu_map(DType::F16);
    assert_eq!(
        elementwise::generate(&map).unwrap(),
        elementwise::generate(&map).unwrap()
    );
}
