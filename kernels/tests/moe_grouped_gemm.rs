//! The grouped tensor-core GEMM of the expert FFN (`kiln_kernels::gemm` with a
//! `Grouping`, picked by `MoeExpertFfnSpec::kernel = GroupedGemm`): ptxas for sm_80 and
//! sm_90 without spills at Mixtral, Qwen3-MoE and tiny sizes, PTX snapshots of one small
//! spec per stage, parameter names and order identical to the GEMV stages (the plan lowering
//! binds either by name), the launch geometry, unchanged keys of GEMV and plain GEMM specs,
//! and spec errors.
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without
//! it. Numerics are checked on a GPU by the root `tests/gpu_moe_expert_ffn.rs`.

mod common;

use kiln_codegen::kernel::{Access, ParamKind};
use kiln_ir::dtype::DType;
use kiln_kernels::gemm::{self, GemmSpec, Grouping};
use kiln_kernels::moe::expert_ffn::{self, ExpertFfnKernel, ExpertFfnStage, MoeExpertFfnSpec};
use kiln_kernels::Epilogue;
use std::collections::BTreeMap;

const STAGES: [ExpertFfnStage; 2] = common::EXPERT_FFN_STAGES;
const KERNEL: ExpertFfnKernel = ExpertFfnKernel::GroupedGemm;

/// Mixtral (E=8, H=4096, I=14336, k=2), Qwen3-MoE (E=128, H=2048, I=768, k=8) and the tiny
/// preset (E=4, H=128, I=256, k=2), both stages, f16 and bf16.
fn assembled() -> Vec<MoeExpertFfnSpec> {
    let mut specs = Vec::new();
    for stage in STAGES {
        for dtype in [DType::F16, DType::BF16] {
            specs.extend(common::expert_ffn_model_specs(KERNEL, dtype, stage));
            specs.push(common::expert_ffn_spec(
                KERNEL, dtype, 4, 128, 256, 2, stage,
            ));
        }
    }
    specs
}

#[test]
fn kernels_assemble_for_sm80_and_sm90_without_spills() {
    for spec in assembled() {
        let kernel = common::assemble_expert_ffn_cleanly(&spec);
        assert!(kernel.entry.contains("_mma_"), "{}", kernel.entry);
    }
}

#[test]
fn ptx_snapshots() {
    // Four experts keep the pointer chain short; K = 128 (gate-up) and 64 (down) are two
    // and one K slices.
    let gate_up =
        common::expert_ffn_spec(KERNEL, DType::BF16, 4, 128, 64, 2, ExpertFfnStage::GateUp);
    insta::assert_snapshot!(
        "moe_gate_up_mma_bf16_e4_h128_i64_k2",
        expert_ffn::generate(&gate_up).unwrap().ptx
    );
    let down = common::expert_ffn_spec(KERNEL, DType::F16, 4, 128, 64, 2, ExpertFfnStage::Down);
    insta::assert_snapshot!(
        "moe_down_mma_f16_e4_h128_i64_k2",
        expert_ffn::generate(&down).unwrap().ptx
    );
}

#[test]
fn parameters_match_the_gemv_stages() {
    for stage in STAGES {
        let grouped = common::expert_ffn_spec(KERNEL, DType::F16, 3, 128, 64, 2, stage);
        let gemv = MoeExpertFfnSpec {
            kernel: ExpertFfnKernel::Gemv,
            ..grouped
        };
        let a = expert_ffn::generate(&grouped).unwrap();
        let b = expert_ffn::generate(&gemv).unwrap();
        let params = |k: &kiln_codegen::kernel::GpuKernel| -> Vec<(String, ParamKind)> {
            k.params.iter().map(|p| (p.name.clone(), p.kind)).collect()
        };
        assert_eq!(params(&a), params(&b), "{stage:?}");
    }
    let kernel = expert_ffn::generate(&common::expert_ffn_spec(
        KERNEL,
        DType::F16,
        3,
        128,
        64,
        2,
        ExpertFfnStage::GateUp,
    ))
    .unwrap();
    let names: Vec<&str> = kernel.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "x",
            "order",
            "offsets",
            "gate_0",
            "gate_1",
            "gate_2",
            "up_0",
            "up_1",
            "up_2",
            "activated",
            "slots"
        ]
    );
    assert_eq!(
        kernel.param("activated").map(|(_, p)| p.kind),
        Some(ParamKind::Pointer(Access::Write))
    );
}

#[test]
fn launch_covers_every_run_of_every_expert() {
    for stage in STAGES {
        let spec = common::expert_ffn_spec(KERNEL, DType::BF16, 8, 4096, 14336, 2, stage);
        let kernel = expert_ffn::generate(&spec).unwrap();
        let gemm = spec.gemm_spec();
        let t = gemm.tile;
        let scalars = BTreeMap::from([("slots".to_string(), 8192u64)]);
        let (grid, block) = kernel.launch.evaluate(&scalars).unwrap();
        let n = spec.rows();
        assert_eq!(block, [t.threads() as u32, 1, 1]);
        assert_eq!(
            grid,
            [(8192 / t.block_m) as u32, n.div_ceil(t.block_n) as u32, 8]
        );
        assert_eq!(kernel.launch.shared_bytes as usize, gemm.shared_bytes());
        assert_eq!(spec.threads(), t.threads() as u32);
    }
}

#[test]
fn ptx_exits_before_barriers_and_uses_tensor_cores() {
    for stage in STAGES {
        let ptx = expert_ffn::generate(&common::expert_ffn_spec(
            KERNEL,
            DType::BF16,
            6,
            128,
            256,
            2,
            stage,
        ))
        .unwrap()
        .ptx;
        assert!(ptx.contains("mma.sync.aligned.m16n8k16"));
        assert!(ptx.contains("cp.async"));
        assert!(ptx.contains("%ctaid.z"));
        let exit = ptx.find("ret;").expect("blocks past their run exit");
        let barrier = ptx.find("bar.sync").expect("the ring's barrier");
        assert!(exit < barrier, "the exit comes before any barrier");
        // One selp per expert after the first and per weight group.
        let groups = match stage {
            ExpertFfnStage::GateUp => 2,
            ExpertFfnStage::Down => 1,
        };
        assert_eq!(ptx.matches("selp.u64").count(), 5 * groups, "{stage:?}");
        assert_eq!(
            ptx.contains("ex2.approx.f32"),
            stage == ExpertFfnStage::GateUp
        );
    }
}

#[test]
fn default_kernels_keep_their_keys() {
    let gemv = MoeExpertFfnSpec {
        kernel: ExpertFfnKernel::Gemv,
        ..common::expert_ffn_spec(KERNEL, DType::BF16, 8, 4096, 14336, 2, ExpertFfnStage::Down)
    };
    let key = format!("{gemv:?}");
    assert!(!key.contains("kernel"), "{key}");
    let json = serde_json::to_string(&gemv).unwrap();
    assert!(!json.contains("kernel"), "{json}");
    let back: MoeExpertFfnSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, gemv);
    let grouped =
        common::expert_ffn_spec(KERNEL, DType::BF16, 8, 4096, 14336, 2, ExpertFfnStage::Down);
    assert!(format!("{grouped:?}").contains("GroupedGemm"));
    let json = serde_json::to_string(&grouped).unwrap();
    assert!(json.contains("\"kernel\":\"grouped_gemm\""), "{json}");
    assert_eq!(
        serde_json::from_str::<MoeExpertFfnSpec>(&json).unwrap(),
        grouped
    );
    assert_ne!(grouped.entry(), gemv.entry());

    let plain = GemmSpec::new(DType::BF16, 4096, Epilogue::SwiGlu);
    assert!(!format!("{plain:?}").contains("grouping"));
    assert!(!serde_json::to_string(&plain).unwrap().contains("grouping"));
    let json = serde_json::to_string(&grouped.gemm_spec()).unwrap();
    assert_eq!(
        serde_json::from_str::<GemmSpec>(&json).unwrap(),
        grouped.gemm_spec()
    );
}

#[test]
fn bad_grouped_specs_are_rejected() {
    // K must be a multiple of block_k (64).
    let odd = common::expert_ffn_spec(KERNEL, DType::BF16, 8, 100, 256, 2, ExpertFfnStage::GateUp);
    let error = expert_ffn::generate(&odd).unwrap_err();
    assert_eq!(error.family, "moe_expert_ffn");
    assert!(error.to_string().contains("multiple of block_k"), "{error}");
    // The grouped GEMM's own checks.
    let base = common::expert_ffn_spec(
        KERNEL,
        DType::BF16,
        8,
        4096,
        14336,
        2,
        ExpertFfnStage::GateUp,
    )
    .gemm_spec();
    let grouping = base.grouping.unwrap();
    let cases = [
        (
            Grouping {
                experts: 0,
                ..grouping
            },
            "experts = 0",
        ),
        (
            Grouping {
                top_k: 9,
                ..grouping
            },
            "top_k = 9",
        ),
        (Grouping { n: 12, ..grouping }, "n = 12"),
        (
            Grouping {
                gather_rows: false,
                ..grouping
            },
            "epilogue",
        ),
    ];
    for (grouping, needle) in cases {
        let bad = GemmSpec {
            grouping: Some(grouping),
            ..base
        };
        let m = gemm::generate(&bad).unwrap_err().to_string();
        assert!(m.contains(needle), "{m}");
    }
}
