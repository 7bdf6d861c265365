//! Type rules of the fused ops that `ir::rewrite` introduces: each rejects malformed operands
//! with a message that says what was expected.

use kiln_ir::dtype::DType;
use kiln_ir::graph::TensorType;
use kiln_ir::op::{MapStep, Op};
use kiln_ir::shape;
use kiln_ir::verify::infer;

fn t(dtype: DType, shape: kiln_ir::shape::Shape) -> TensorType {
    TensorType::new(dtype, shape)
}

#[track_caller]
fn rejects(op: &Op, operands: &[TensorType], expected: &str) {
    let err = infer(op, operands).expect_err("expected a type error");
    assert!(
        err.to_string().contains(expected),
        "{err:?} does not mention {expected:?}"
    );
}

#[test]
fn fused_map_checks_its_program_and_broadcasts_its_operands() {
    use MapStep::*;
    let x = t(DType::F16, shape!["batch", 1, 8]);
    let y = t(DType::F16, shape![8]);
    let ok = Op::FusedMap {
        steps: vec![
            Operand { index: 0 },
            Operand { index: 1 },
            Mul { a: 0, b: 1 },
        ],
    };
    assert_eq!(
        infer(&ok, &[x.clone(), y.clone()]).unwrap(),
        vec![x.clone()]
    );
    rejects(&ok, &[x.clone(), t(DType::F32, shape![8])], "same dtype");
    rejects(
        &ok,
        &[x.clone(), t(DType::F16, shape![3])],
        "do not broadcast",
    );
    let forward = Op::FusedMap {
        steps: vec![
            Operand { index: 0 },
            Add { a: 0, b: 2 },
            Operand { index: 1 },
        ],
    };
    rejects(&forward, &[x.clone(), y.clone()], "does not come before");
    let unused = Op::FusedMap {
        steps: vec![Operand { index: 0 }, Silu { x: 0 }],
    };
    rejects(&unused, &[x.clone(), y.clone()], "operand 1 is not read");
    let dead = Op::FusedMap {
        steps: vec![Operand { index: 0 }, Silu { x: 0 }, Sigmoid { x: 0 }],
    };
    rejects(
        &dead,
        std::slice::from_ref(&x),
        "step 1 is computed but never used",
    );
    rejects(&ok, &[t(DType::I32, shape![8]), y], "float");
}

#[test]
fn swiglu_linear_needs_stacked_weights() {
    let x = t(DType::BF16, shape!["batch", 1, 16]);
    let w = t(DType::BF16, shape![12, 16]);
    assert_eq!(
        infer(&Op::SwiGluLinear, &[x.clone(), w]).unwrap(),
        vec![t(DType::BF16, shape!["batch", 1, 6])]
    );
    rejects(
        &Op::SwiGluLinear,
        &[x.clone(), t(DType::BF16, shape![7, 16])],
        "even",
    );
    rejects(&Op::SwiGluLinear, &[x, t(DType::BF16, shape![12, 8])], "H");
}

#[test]
fn linear_add_takes_a_bias_or_a_residual_but_never_grows() {
    let x = t(DType::F32, shape![2, 8]);
    let w = t(DType::F32, shape![4, 8]);
    let out = vec![t(DType::F32, shape![2, 4])];
    for addend in [shape![4], shape![2, 4], shape![1, 4], shape![]] {
        let ops = [x.clone(), w.clone(), t(DType::F32, addend)];
        assert_eq!(infer(&Op::LinearAdd, &ops).unwrap(), out);
    }
    let grows = [x.clone(), w.clone(), t(DType::F32, shape![3, 2, 4])];
    rejects(&Op::LinearAdd, &grows, "without enlarging");
    let dtype = [x, w, t(DType::F16, shape![4])];
    rejects(&Op::LinearAdd, &dtype, "same dtype");
}

#[test]
fn add_rms_norm_has_two_results_of_the_input_type() {
    let x = t(DType::F32, shape!["batch", 1, 8]);
    let w = t(DType::F32, shape![8]);
    let op = Op::AddRmsNorm { eps: 1e-5 };
    assert_eq!(
        infer(&op, &[x.clone(), x.clone(), w.clone()]).unwrap(),
        vec![x.clone(), x.clone()]
    );
    rejects(&op, &[x.clone(), t(DType::F32, shape![8]), w], "same type");
    rejects(
        &Op::AddRmsNorm { eps: 0.0 },
        &[x.clone(), x.clone(), t(DType::F32, shape![8])],
        "eps",
    );
}

#[test]
fn quantized_linear_follows_dequantize_then_linear() {
    let scheme = kiln_ir::op::QuantScheme {
        bits: 4,
        group_size: 32,
        symmetric: true,
        clip: 1.0,
    };
    let op = Op::QuantizedLinear { scheme };
    let x = t(DType::F16, shape!["tokens", 64]);
    let q = t(DType::I4, shape![16, 64]);
    let scale = t(DType::F16, shape![16, 2]);
    assert_eq!(
        infer(&op, &[x.clone(), q.clone(), scale.clone()]).unwrap(),
        vec![t(DType::F16, shape!["tokens", 16])]
    );
    rejects(
        &op,
        &[x.clone(), t(DType::I8, shape![16, 64]), scale.clone()],
        "i4",
    );
    rejects(&op, &[x, q, scale.clone(), scale], "expected 3 operands");
}

#[test]
fn causal_mask_has_the_scores_batch_queries_and_keys() {
    let scores = t(DType::F32, shape!["batch", 8, "seq", "seq"]);
    assert_eq!(
        infer(&Op::CausalMask, std::slice::from_ref(&scores)).unwrap(),
        vec![t(DType::F32, shape!["batch", 1, "seq", "seq"])]
    );
    let lengths = t(DType::I32, shape!["batch"]);
    assert!(infer(&Op::CausalMask, &[scores.clone(), lengths]).is_ok());
    rejects(
        &Op::CausalMask,
        &[scores.clone(), t(DType::F32, shape!["batch"])],
        "i32",
    );
    rejects(&Op::CausalMask, &[t(DType::F32, shape![2, 3])], "rank 4");
    rejects(&Op::CausalMask, &[], "1 or 2 operands");
}
