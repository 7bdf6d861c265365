//! The data-movement generators and the broadcast/i32 elementwise maps that take the last
//! host steps of the dense presets to the GPU: PTX snapshots of the row copy (embedding
//! gather, last-token slice) and of decode's `lengths = cache_start + 1` map, ptxas for sm_80
//! and sm_90 without spills over vector and scalar row widths, determinism, and spec errors
//! naming the field.

mod common;

use common::assert_assembles;
use kiln_codegen::expr::Expr;
use kiln_ir::dtype::DType;
use kiln_kernels::elementwise::{self, ElementwiseSpec};
use kiln_kernels::row_copy::{self, RowCopySpec, RowIndex};

fn row_copy_spec(dtype: DType, row_elements: usize, index: RowIndex) -> RowCopySpec {
    RowCopySpec {
        dtype,
        row_elements,
        index,
    }
}

/// Decode's sequence lengths: `cache_start [batch] + one []`.
fn lengths_map() -> ElementwiseSpec {
    ElementwiseSpec {
        dtype: DType::I32,
        inputs: 2,
        expr: Expr::input(0) + Expr::input(1),
        scalar_inputs: vec![1],
        row_inputs: vec![],
        row_width: 0,
    }
}

#[test]
fn gather_snapshots_and_ptxas() {
    // tiny-llama's embedding (hidden 256, vector) and an odd width (scalar path).
    let vector = row_copy::generate(&row_copy_spec(DType::BF16, 256, RowIndex::Gather)).unwrap();
    insta::assert_snapshot!("gather_bf16_h256", vector.ptx);
    assert!(vector.ptx.contains("ld.global.nc.v4.u32"), "16-byte loads");
    assert!(vector.ptx.contains("st.global.v4.u32"), "16-byte stores");
    assert!(
        vector.ptx.contains("2143322048"),
        "a bf16 NaN pair (0x7fc07fc0) fills a bad id's row"
    );
    assert_assembles(&vector);
    let scalar = row_copy::generate(&row_copy_spec(DType::F16, 13, RowIndex::Gather)).unwrap();
    insta::assert_snapshot!("gather_f16_h13", scalar.ptx);
    assert!(
        !scalar.ptx.contains(".v4"),
        "no vector access on a 26-byte row"
    );
    assert!(
        scalar.ptx.contains("32256"),
        "an f16 NaN (0x7e00) fills a bad id's row"
    );
    assert_assembles(&scalar);
    let names: Vec<_> = vector.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["table", "ids", "out", "rows", "vocab"]);
}

#[test]
fn slice_snapshot_and_ptxas() {
    let last_token = row_copy::generate(&row_copy_spec(DType::BF16, 256, RowIndex::Slice)).unwrap();
    insta::assert_snapshot!("slice_bf16_h256", last_token.ptx);
    assert_assembles(&last_token);
    let names: Vec<_> = last_token.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["x", "out", "rows", "taken", "axis_len", "start"]);
    assert!(!last_token.ptx.contains("7fc0") && !last_token.ptx.contains("2143322048"));
}

#[test]
fn row_copies_assemble_at_every_width_class() {
    // Vector rows of one chunk, of a partial warp, of several chunks per thread (hidden 4096
    // and 14336 in llama / mixtral), and scalar rows (odd, even but not whole chunks).
    for dtype in [DType::F16, DType::BF16] {
        for index in [RowIndex::Gather, RowIndex::Slice] {
            for row_elements in [1, 8, 12, 24, 200, 4096, 4100, 14336] {
                let spec = row_copy_spec(dtype, row_elements, index);
                let kernel = row_copy::generate(&spec).unwrap();
                assert_eq!(kernel.launch.block[0], spec.threads());
                assert_eq!(
                    spec.vectorized(),
                    kernel.ptx.contains(".v4."),
                    "{}",
                    kernel.entry
                );
                assert_assembles(&kernel);
                assert_eq!(kernel, row_copy::generate(&spec).unwrap(), "deterministic");
            }
        }
    }
}

#[test]
fn row_copy_rejects_bad_specs_by_field() {
    let err = row_copy::generate(&row_copy_spec(DType::BF16, 0, RowIndex::Slice))
        .unwrap_err()
        .to_string();
    assert!(err.contains("row_elements"), "{err}");
    let err = row_copy::generate(&row_copy_spec(DType::I32, 64, RowIndex::Gather))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("dtype") && err.contains("f16 or bf16"),
        "{err}"
    );
}

#[test]
fn i32_lengths_map_snapshot_and_ptxas() {
    let kernel = elementwise::generate(&lengths_map()).unwrap();
    insta::assert_snapshot!("elementwise_i32_lengths", kernel.ptx);
    assert!(
        kernel.entry.starts_with("elementwise_i32_2in_s1_"),
        "{}",
        kernel.entry
    );
    assert!(kernel.ptx.contains("add.s32"), "integer arithmetic");
    assert!(
        !kernel.ptx.contains(".f32"),
        "no float arithmetic in an i32 map"
    );
    assert!(
        kernel.ptx.contains("ld.global.nc.v4.s32"),
        "16-byte loads of in0"
    );
    assert_assembles(&kernel);
    assert_eq!(kernel, elementwise::generate(&lengths_map()).unwrap());
    // Every integer operation assembles: sub, mul, max, min, neg, abs and constants.
    let expr = ((Expr::input(0) - Expr::input(1)) * Expr::constant(3.0))
        .max(Expr::input(2))
        .min(Expr::constant(-7.0))
        .unary(kiln_codegen::expr::UnaryOp::Neg)
        .unary(kiln_codegen::expr::UnaryOp::Abs);
    let spec = ElementwiseSpec {
        dtype: DType::I32,
        inputs: 3,
        expr,
        scalar_inputs: vec![0, 2],
        row_inputs: vec![],
        row_width: 0,
    };
    assert_assembles(&elementwise::generate(&spec).unwrap());
}

#[test]
fn half_maps_take_scalar_inputs() {
    // `x * s` with `s` one element, in both half dtypes.
    for dtype in [DType::F16, DType::BF16] {
        let spec = ElementwiseSpec {
            dtype,
            inputs: 2,
            expr: Expr::input(0) * Expr::input(1),
            scalar_inputs: vec![1],
            row_inputs: vec![],
            row_width: 0,
        };
        let kernel = elementwise::generate(&spec).unwrap();
        assert!(kernel.entry.contains("_2in_s1_"), "{}", kernel.entry);
        assert_assembles(&kernel);
        let full = ElementwiseSpec {
            scalar_inputs: vec![],
            ..spec.clone()
        };
        assert_ne!(
            elementwise::generate(&full).unwrap().entry,
            kernel.entry,
            "a scalar input is a different kernel"
        );
    }
}

#[test]
fn elementwise_rejects_float_only_i32_steps_and_bad_scalar_inputs() {
    for (expr, named) in [
        (Expr::input(0).silu(), "silu"),
        (Expr::input(0).sigmoid(), "sigmoid"),
        (Expr::input(0).exp(), "exp"),
        (Expr::input(0) / Expr::input(0), "div"),
        (Expr::input(0) + Expr::constant(0.5), "constant 0.5"),
    ] {
        let spec = ElementwiseSpec {
            dtype: DType::I32,
            inputs: 1,
            expr,
            scalar_inputs: vec![],
            row_inputs: vec![],
            row_width: 0,
        };
        let err = elementwise::generate(&spec).unwrap_err().to_string();
        assert!(err.contains(named) && err.contains("float-only"), "{err}");
    }
    for scalar_inputs in [vec![2], vec![1, 1], vec![1, 0]] {
        let spec = ElementwiseSpec {
            scalar_inputs,
            ..lengths_map()
        };
        let err = elementwise::generate(&spec).unwrap_err().to_string();
        assert!(err.contains("scalar_inputs"), "{err}");
    }
    let spec = ElementwiseSpec {
        dtype: DType::F32,
        ..lengths_map()
    };
    let err = elementwise::generate(&spec).unwrap_err().to_string();
    assert!(err.contains("dtype"), "{err}");
}

/// Qwen2-MoE's gated shared expert: `out + sigmoid(gate) · shared`, the gate (input 1) one
/// element per row of `width` output elements.
fn gated_map(dtype: DType, width: usize) -> ElementwiseSpec {
    ElementwiseSpec {
        dtype,
        inputs: 3,
        expr: Expr::input(0) + Expr::input(1).sigmoid() * Expr::input(2),
        scalar_inputs: vec![],
        row_inputs: vec![1],
        row_width: width,
    }
}

#[test]
fn row_input_map_snapshot_and_ptxas() {
    let kernel = elementwise::generate(&gated_map(DType::BF16, 64)).unwrap();
    insta::assert_snapshot!("elementwise_bf16_gated_rows_w64", kernel.ptx);
    assert!(
        kernel.entry.starts_with("elementwise_bf16_3in_r1_w64_"),
        "{}",
        kernel.entry
    );
    // Eight lanes per chunk, eight chunks per row: one gate load per chunk, at chunk / 8.
    assert!(kernel.ptx.contains("div.u32"), "the chunk's row");
    assert_eq!(
        kernel.ptx.matches("ld.global.nc.v4.u32").count(),
        2,
        "16-byte loads of the full-length inputs only"
    );
    assert!(kernel.ptx.contains("st.global.v4.b32"), "16-byte stores");
    assert_assembles(&kernel);
    assert_eq!(
        kernel,
        elementwise::generate(&gated_map(DType::BF16, 64)).unwrap()
    );
    let full = ElementwiseSpec {
        row_inputs: vec![],
        row_width: 0,
        ..gated_map(DType::BF16, 64)
    };
    assert_ne!(elementwise::generate(&full).unwrap().entry, kernel.entry);
    assert_ne!(
        elementwise::generate(&gated_map(DType::BF16, 128))
            .unwrap()
            .entry,
        kernel.entry,
        "the row width is part of the name"
    );
}

#[test]
fn row_input_maps_assemble_at_every_width_class() {
    // Whole chunks per row (one load per chunk; one chunk a row at 8), rows that chunks
    // straddle (100, 12, 3: a load per lane), and Qwen2-MoE-sized rows; i32 rows too.
    for dtype in [DType::F16, DType::BF16] {
        for width in [8, 64, 4096, 100, 12, 3] {
            let kernel = elementwise::generate(&gated_map(dtype, width)).unwrap();
            let per_lane = width % 8 != 0;
            // The straddling chunk loads the gate eight times with 16-bit loads.
            let narrow_loads = kernel.ptx.matches("ld.global.u16").count()
                + kernel.ptx.matches("ld.global.f16").count()
                + kernel.ptx.matches("ld.global.b16").count();
            if per_lane {
                assert!(narrow_loads >= 9, "{}: {narrow_loads}", kernel.entry);
            } else {
                assert!(narrow_loads <= 4, "{}: {narrow_loads}", kernel.entry);
            }
            assert_assembles(&kernel);
        }
    }
    for width in [4, 6] {
        let spec = ElementwiseSpec {
            dtype: DType::I32,
            inputs: 2,
            expr: Expr::input(0) + Expr::input(1),
            scalar_inputs: vec![],
            row_inputs: vec![0],
            row_width: width,
        };
        let kernel = elementwise::generate(&spec).unwrap();
        assert!(kernel.entry.contains("_2in_r0_w"), "{}", kernel.entry);
        assert_assembles(&kernel);
    }
}

#[test]
fn elementwise_rejects_bad_row_inputs_by_field() {
    for row_inputs in [vec![3], vec![1, 1], vec![2, 1]] {
        let spec = ElementwiseSpec {
            row_inputs,
            ..gated_map(DType::F16, 64)
        };
        let err = elementwise::generate(&spec).unwrap_err().to_string();
        assert!(err.contains("row_inputs"), "{err}");
    }
    let both = ElementwiseSpec {
        scalar_inputs: vec![1],
        ..gated_map(DType::F16, 64)
    };
    let err = elementwise::generate(&both).unwrap_err().to_string();
    assert!(
        err.contains("row_inputs") && err.contains("scalar"),
        "{err}"
    );
    for (row_inputs, row_width) in [(vec![1], 0), (vec![], 64)] {
        let spec = ElementwiseSpec {
            row_inputs,
            row_width,
            ..gated_map(DType::F16, 64)
        };
        let err = elementwise::generate(&spec).unwrap_err().to_string();
        assert!(err.contains("row_width"), "{err}");
    }
    // A map without row inputs writes no row fields, so older specs read as before.
    let json = serde_json::to_string(&ElementwiseSpec::new(DType::F16, 1, Expr::input(0))).unwrap();
    assert!(!json.contains("row_"), "{json}");
    let back: ElementwiseSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, ElementwiseSpec::new(DType::F16, 1, Expr::input(0)));
}
