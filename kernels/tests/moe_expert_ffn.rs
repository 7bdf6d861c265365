//! The grouped expert FFN generator (`kiln_kernels::moe::expert_ffn`): ptxas for sm_80 and
//! sm_90 without spills at Mixtral, many-small-experts and odd (scalar path) sizes, PTX
//! snapshots of one small spec per stage, parameter names and order as the plan lowering
//! binds them, the launch geometry, determinism, and spec errors naming the field.
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without
//! it. Numerics are checked on a GPU by the root `tests/gpu_moe_expert_ffn.rs`.

mod common;

use kiln_codegen::kernel::{Access, ParamKind};
use kiln_ir::dtype::DType;
use kiln_kernels::moe::expert_ffn::{
    self, expert_param, expert_params, ExpertFfnKernel, ExpertFfnStage, MoeExpertFfnSpec,
    WARPS_PER_BLOCK,
};
use std::collections::BTreeMap;

const STAGES: [ExpertFfnStage; 2] = common::EXPERT_FFN_STAGES;
const KERNEL: ExpertFfnKernel = ExpertFfnKernel::Gemv;

/// Mixtral (E=8, H=4096, I=14336, k=2), many small experts (E=128, H=2048, I=768, k=8), an
/// odd size on the scalar path of both stages (H=100, I=37), and mixed paths (vector
/// gate-up with a scalar down, and the reverse).
fn assembled() -> Vec<MoeExpertFfnSpec> {
    let mut specs = Vec::new();
    for stage in STAGES {
        for dtype in [DType::F16, DType::BF16] {
            specs.extend(common::expert_ffn_model_specs(KERNEL, dtype, stage));
            specs.push(common::expert_ffn_spec(KERNEL, dtype, 8, 100, 37, 2, stage));
        }
        specs.push(common::expert_ffn_spec(
            KERNEL,
            DType::BF16,
            16,
            64,
            37,
            4,
            stage,
        ));
        specs.push(common::expert_ffn_spec(
            KERNEL,
            DType::F16,
            1,
            100,
            40,
            1,
            stage,
        ));
    }
    specs
}

#[test]
fn kernels_assemble_for_sm80_and_sm90_without_spills() {
    for spec in assembled() {
        common::assemble_expert_ffn_cleanly(&spec);
    }
}

#[test]
fn ptx_snapshots() {
    // Four experts keep the pointer-selection chain short; H = 64 takes the vector path in
    // gate-up, I = 24 in down.
    let gate_up =
        common::expert_ffn_spec(KERNEL, DType::BF16, 4, 64, 24, 2, ExpertFfnStage::GateUp);
    insta::assert_snapshot!(
        "moe_gate_up_bf16_e4_h64_i24_k2",
        expert_ffn::generate(&gate_up).unwrap().ptx
    );
    let down = common::expert_ffn_spec(KERNEL, DType::F16, 4, 64, 24, 2, ExpertFfnStage::Down);
    insta::assert_snapshot!(
        "moe_down_f16_e4_h64_i24_k2",
        expert_ffn::generate(&down).unwrap().ptx
    );
}

#[test]
fn vector_and_scalar_paths_follow_the_dot_length() {
    // Gate-up dots length H, down length I.
    let mixed = |stage| {
        expert_ffn::generate(&common::expert_ffn_spec(
            KERNEL,
            DType::BF16,
            4,
            64,
            37,
            2,
            stage,
        ))
        .unwrap()
    };
    let gate_up = mixed(ExpertFfnStage::GateUp).ptx;
    assert!(
        gate_up.contains("ld.global.nc.v4.u32"),
        "H = 64: 16-byte loads"
    );
    assert!(!gate_up.contains("ld.global.u16"), "H = 64: no scalar load");
    let down = mixed(ExpertFfnStage::Down).ptx;
    assert!(!down.contains(".v4"), "I = 37: no vector access");
    assert!(down.contains("ld.global.u16"), "I = 37: one bf16 per load");
    for ptx in [&gate_up, &down] {
        assert!(ptx.contains("shfl.sync.bfly.b32"), "warp reduction");
        assert!(!ptx.contains(".local"), "no local memory");
        assert!(
            !ptx.contains("atom.") && !ptx.contains("red."),
            "no atomics"
        );
        assert!(
            !ptx.contains("bar.sync"),
            "no barriers: warps past the rows exit"
        );
    }
    // The SwiGLU activation (ex2 for the sigmoid) belongs to gate-up only.
    assert!(gate_up.contains("ex2.approx.f32"));
    assert!(!down.contains("ex2.approx.f32"));
}

#[test]
fn parameters_are_named_and_ordered_for_the_plan_lowering() {
    let experts = 3;
    let names = |stage| -> Vec<String> {
        let kernel = expert_ffn::generate(&common::expert_ffn_spec(
            KERNEL,
            DType::F16,
            experts,
            64,
            32,
            2,
            stage,
        ))
        .unwrap();
        kernel.params.iter().map(|p| p.name.clone()).collect()
    };
    assert_eq!(
        names(ExpertFfnStage::GateUp),
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
        names(ExpertFfnStage::Down),
        [
            "activated",
            "offsets",
            "down_0",
            "down_1",
            "down_2",
            "y",
            "slots"
        ]
    );
    assert_eq!(expert_params(ExpertFfnStage::GateUp), ["gate", "up"]);
    assert_eq!(expert_params(ExpertFfnStage::Down), ["down"]);
    assert_eq!(expert_param("up", 7), "up_7");

    let access = |stage, name: &str| {
        let kernel = expert_ffn::generate(&common::expert_ffn_spec(
            KERNEL,
            DType::F16,
            experts,
            64,
            32,
            2,
            stage,
        ))
        .unwrap();
        kernel.param(name).map(|(_, p)| p.kind)
    };
    let read = Some(ParamKind::Pointer(Access::Read));
    let write = Some(ParamKind::Pointer(Access::Write));
    assert_eq!(access(ExpertFfnStage::GateUp, "activated"), write);
    assert_eq!(access(ExpertFfnStage::Down, "activated"), read);
    assert_eq!(access(ExpertFfnStage::Down, "y"), write);
    assert_eq!(access(ExpertFfnStage::GateUp, "up_2"), read);
    assert_eq!(
        access(ExpertFfnStage::GateUp, "slots"),
        Some(ParamKind::U32)
    );
}

#[test]
fn launch_is_one_warp_per_row_and_one_block_row_per_expert() {
    for stage in STAGES {
        let spec = common::expert_ffn_spec(KERNEL, DType::BF16, 8, 4096, 14336, 2, stage);
        let kernel = expert_ffn::generate(&spec).unwrap();
        let scalars = BTreeMap::from([("slots".to_string(), 2u64)]);
        let (grid, block) = kernel.launch.evaluate(&scalars).unwrap();
        let rows = match stage {
            ExpertFfnStage::GateUp => 14336,
            ExpertFfnStage::Down => 4096,
        };
        assert_eq!(block, [32 * WARPS_PER_BLOCK as u32, 1, 1]);
        assert_eq!(grid, [rows / WARPS_PER_BLOCK as u32, 8, 1]);
        assert_eq!(kernel.launch.shared_bytes, 0);
    }
    // A partial last block of rows.
    let odd = common::expert_ffn_spec(KERNEL, DType::F16, 5, 100, 37, 2, ExpertFfnStage::GateUp);
    let kernel = expert_ffn::generate(&odd).unwrap();
    let (grid, _) = kernel.launch.evaluate(&BTreeMap::new()).unwrap();
    assert_eq!(grid, [37u32.div_ceil(WARPS_PER_BLOCK as u32), 5, 1]);
    assert_eq!(
        expert_ffn::workspace_bytes(&odd, 6),
        6 * 37 * 2,
        "activated is [slots, I] halves"
    );
}

#[test]
fn every_expert_pointer_is_selectable() {
    // One setp per expert after the first, one selp per expert and group after the first.
    for (stage, groups) in [(ExpertFfnStage::GateUp, 2), (ExpertFfnStage::Down, 1)] {
        let experts = 6;
        let ptx = expert_ffn::generate(&common::expert_ffn_spec(
            KERNEL,
            DType::F16,
            experts,
            64,
            32,
            2,
            stage,
        ))
        .unwrap()
        .ptx;
        assert_eq!(ptx.matches("selp.u64").count(), (experts - 1) * groups);
        for e in 1..experts {
            let compared = ptx.lines().any(|line| {
                line.contains("setp.eq.u32") && line.trim_end().ends_with(&format!(", {e};"))
            });
            assert!(compared, "expert {e} is compared");
        }
    }
}

#[test]
fn generation_is_deterministic() {
    for spec in assembled() {
        assert_eq!(expert_ffn::generate(&spec), expert_ffn::generate(&spec));
    }
    let a = common::expert_ffn_spec(
        KERNEL,
        DType::F16,
        8,
        4096,
        14336,
        2,
        ExpertFfnStage::GateUp,
    );
    let b = MoeExpertFfnSpec {
        stage: ExpertFfnStage::Down,
        ..a
    };
    let c = MoeExpertFfnSpec {
        dtype: DType::BF16,
        ..a
    };
    let entries: Vec<String> = [a, b, c]
        .iter()
        .map(|s| expert_ffn::generate(s).unwrap().entry)
        .collect();
    assert_eq!(entries[0], "moe_gate_up_f16_e8_h4096_i14336_k2");
    assert_eq!(entries[1], "moe_down_f16_e8_h4096_i14336_k2");
    assert_eq!(entries[2], "moe_gate_up_bf16_e8_h4096_i14336_k2");
}

#[test]
fn stage_serialises_in_snake_case() {
    let json = serde_json::to_string(&ExpertFfnStage::GateUp).unwrap();
    assert_eq!(json, "\"gate_up\"");
    let spec =
        common::expert_ffn_spec(KERNEL, DType::BF16, 8, 4096, 14336, 2, ExpertFfnStage::Down);
    let back: MoeExpertFfnSpec =
        serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn bad_specs_are_rejected_with_the_field_named() {
    let good = common::expert_ffn_spec(
        KERNEL,
        DType::BF16,
        8,
        4096,
        14336,
        2,
        ExpertFfnStage::GateUp,
    );
    let message = |spec: MoeExpertFfnSpec| {
        let error = expert_ffn::generate(&spec).unwrap_err();
        assert_eq!(error.family, "moe_expert_ffn");
        error.to_string()
    };
    assert!(message(MoeExpertFfnSpec {
        dtype: DType::F32,
        ..good
    })
    .contains("dtype"));
    for experts in [0, expert_ffn::MAX_EXPERTS + 1] {
        let m = message(MoeExpertFfnSpec { experts, ..good });
        assert!(m.contains(&format!("experts = {experts}")), "{m}");
    }
    for hidden in [0, expert_ffn::MAX_WIDTH + 1] {
        let m = message(MoeExpertFfnSpec { hidden, ..good });
        assert!(m.contains(&format!("hidden = {hidden}")), "{m}");
    }
    let m = message(MoeExpertFfnSpec {
        intermediate: 0,
        ..good
    });
    assert!(m.contains("intermediate = 0"), "{m}");
    for top_k in [0, 9] {
        let m = message(MoeExpertFfnSpec { top_k, ..good });
        assert!(m.contains(&format!("top_k = {top_k}")), "{m}");
    }
    assert!(good.validate().is_ok());
}
