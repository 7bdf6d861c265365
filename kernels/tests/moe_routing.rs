//! The MoE routing generators (`kiln_kernels::moe::{router, dispatch, combine}`): PTX
//! snapshots at representative specs (the router over stored logits and with its linear
//! fused), ptxas for sm_80 and sm_90 without spills over the spec space (partial lane chunks,
//! the largest expert counts, fused rows of partial and many 512-byte steps, vector and
//! scalar rows),
//! determinism, launch geometry, and spec errors naming the field. Their results are checked
//! against the interpreter on a GPU by the root `tests/gpu_moe_routing.rs`.

mod common;

use common::assemble_cleanly;
use kiln_codegen::kernel::{Extent, GpuKernel};
use kiln_ir::dtype::DType;
use kiln_kernels::moe::combine::{self, MoeCombineSpec};
use kiln_kernels::moe::dispatch::{self, MoeDispatchSpec};
use kiln_kernels::moe::router::{self, MoeRouterSpec};

fn assembles(kernel: &GpuKernel) {
    for arch in ["sm_80", "sm_90"] {
        assemble_cleanly(kernel, arch);
    }
}

fn router_spec(dtype: DType, experts: usize, top_k: usize, normalize: bool) -> MoeRouterSpec {
    MoeRouterSpec {
        dtype,
        experts,
        top_k,
        normalize,
        hidden: None,
    }
}

fn fused_router_spec(
    dtype: DType,
    hidden: usize,
    experts: usize,
    top_k: usize,
    normalize: bool,
) -> MoeRouterSpec {
    MoeRouterSpec {
        hidden: Some(hidden),
        ..router_spec(dtype, experts, top_k, normalize)
    }
}

fn combine_spec(dtype: DType, hidden: usize, top_k: usize) -> MoeCombineSpec {
    MoeCombineSpec {
        dtype,
        hidden,
        top_k,
    }
}

fn names(kernel: &GpuKernel) -> Vec<&str> {
    kernel.params.iter().map(|p| p.name.as_str()).collect()
}

#[test]
fn router_snapshot_and_ptxas() {
    // Mixtral's router: 8 experts, top 2, renormalised.
    let kernel = router::generate(&router_spec(DType::BF16, 8, 2, true)).unwrap();
    insta::assert_snapshot!("moe_router_bf16_e8_k2_norm", kernel.ptx);
    assert_eq!(names(&kernel), ["logits", "weights", "experts", "tokens"]);
    assert_eq!(kernel.launch.block, [128, 1, 1]);
    assert_eq!(kernel.launch.grid[0], Extent::ceil_div("tokens", 4));
    assert!(kernel.ptx.contains("shfl.sync.bfly.b32"), "warp reductions");
    assert!(
        kernel.ptx.contains("ex2.approx.f32"),
        "softmax exponentials"
    );
    assert!(!kernel.ptx.contains(".shared"), "no shared memory");
    assert!(!kernel.ptx.contains("bar.sync"), "no block barrier");
    assemble_cleanly(&kernel, "sm_80");
    assemble_cleanly(&kernel, "sm_90");
}

#[test]
fn routers_assemble_over_the_spec_space() {
    // One expert; a partial last lane chunk (60 = 32 + 28); Qwen-MoE-like 60/top-4 and
    // 128/top-8; the largest supported row and pick count.
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (experts, top_k) in [(1, 1), (8, 2), (60, 4), (128, 8), (1024, 32)] {
            for normalize in [false, true] {
                let spec = router_spec(dtype, experts, top_k, normalize);
                let kernel = router::generate(&spec).unwrap();
                assert_eq!(kernel.entry, spec.entry());
                assembles(&kernel);
                assert_eq!(kernel, router::generate(&spec).unwrap(), "deterministic");
                // The renormalisation is a second warp sum and a division.
                assert_eq!(
                    normalize,
                    kernel.ptx.matches("div.rn.f32").count() == 2,
                    "{}",
                    kernel.entry
                );
            }
        }
    }
}

#[test]
fn fused_router_snapshot_and_ptxas() {
    // Mixtral's router with its linear: 8 experts of 4096, top 2, renormalised.
    let spec = fused_router_spec(DType::BF16, 4096, 8, 2, true);
    let kernel = router::generate(&spec).unwrap();
    insta::assert_snapshot!("moe_router_linear_bf16_h4096_e8_k2_norm", kernel.ptx);
    assert_eq!(kernel.entry, spec.entry());
    assert_eq!(names(&kernel), ["x", "w", "weights", "experts", "tokens"]);
    assert_eq!(kernel.launch.block, [256, 1, 1]);
    assert_eq!(kernel.launch.grid[0], Extent::ceil_div("tokens", 1));
    assert!(
        kernel.ptx.contains("ld.global.nc.L1::no_allocate.v4.u32"),
        "16-byte weight loads"
    );
    assert!(
        kernel.ptx.contains("ld.global.nc.L1::evict_last.v4.u32"),
        "16-byte x loads"
    );
    assert!(kernel.ptx.contains("fma.rn.f32"), "f32 accumulation");
    assert!(
        kernel.ptx.contains(".shared .align 16 .b8 logits[32]"),
        "the logits in shared memory, sized by the experts"
    );
    assert_eq!(
        kernel.ptx.matches("bar.sync").count(),
        1,
        "one block barrier"
    );
    assert!(
        kernel.ptx.contains("ex2.approx.f32"),
        "the router's softmax"
    );
    assembles(&kernel);
}

#[test]
fn fused_routers_assemble_over_the_spec_space() {
    // (hidden, experts, top_k): Mixtral and Qwen3-MoE; a row of one 16-byte chunk (lanes
    // 1..32 read nothing); 33 chunks (one whole step and one lane more); a wide row of many
    // looped steps over the largest expert and pick counts; a partial lane chunk of experts.
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for (hidden, experts, top_k) in [
            (4096, 8, 2),
            (2048, 128, 8),
            (8, 4, 1),
            (264, 60, 4),
            (7168, 1024, 32),
        ] {
            for normalize in [false, true] {
                let spec = fused_router_spec(dtype, hidden, experts, top_k, normalize);
                let kernel = router::generate(&spec).unwrap();
                assert_eq!(kernel.entry, spec.entry());
                assert!(kernel.ptx.contains(&format!(".b8 logits[{}]", 4 * experts)));
                assembles(&kernel);
                assert_eq!(kernel, router::generate(&spec).unwrap(), "deterministic");
                assert_eq!(
                    normalize,
                    kernel.ptx.matches("div.rn.f32").count() == 2,
                    "{}",
                    kernel.entry
                );
            }
        }
    }
}

#[test]
fn dispatch_snapshot_and_ptxas() {
    let kernel = dispatch::generate(&MoeDispatchSpec { experts: 8 }).unwrap();
    insta::assert_snapshot!("moe_dispatch_e8", kernel.ptx);
    assert_eq!(names(&kernel), ["experts", "order", "offsets", "slots"]);
    assert_eq!(kernel.launch.grid[0], Extent::fixed(1));
    assert_eq!(kernel.launch.block, [dispatch::THREADS, 1, 1]);
    assert!(kernel.ptx.contains("red.shared.add.u32"), "shared counts");
    assembles(&kernel);
    for experts in [1, 7, 64, 128, 256, 300, 1024] {
        let spec = MoeDispatchSpec { experts };
        let kernel = dispatch::generate(&spec).unwrap();
        assembles(&kernel);
        assert_eq!(kernel, dispatch::generate(&spec).unwrap(), "deterministic");
    }
}

#[test]
fn combine_snapshots_and_ptxas() {
    // Mixtral-like top 2 over 16-byte chunks, and an odd width on the scalar path.
    let vector = combine::generate(&combine_spec(DType::BF16, 256, 2)).unwrap();
    insta::assert_snapshot!("moe_combine_bf16_h256_k2_v16", vector.ptx);
    assert_eq!(names(&vector), ["y", "order", "weights", "out", "tokens"]);
    assert_eq!(vector.launch.grid[0], Extent::ceil_div("tokens", 1));
    assert!(vector.ptx.contains("ld.global.nc.v4.u32"), "16-byte loads");
    assert!(
        vector.ptx.contains("atom.shared.min.u32"),
        "lowest position wins"
    );
    assembles(&vector);
    let scalar = combine::generate(&combine_spec(DType::F16, 13, 2)).unwrap();
    insta::assert_snapshot!("moe_combine_f16_h13_k2_s2", scalar.ptx);
    assert!(
        !scalar.ptx.contains(".v4"),
        "no vector access on a 26-byte row"
    );
    assembles(&scalar);
}

#[test]
fn combines_assemble_at_every_width_class() {
    for dtype in [DType::F16, DType::BF16] {
        for hidden in [1, 8, 13, 256, 4096, 4100, 14336] {
            for top_k in [1, 2, 8, 32] {
                let spec = combine_spec(dtype, hidden, top_k);
                let kernel = combine::generate(&spec).unwrap();
                assert_eq!(kernel.launch.block[0], spec.threads());
                assert_eq!(spec.vectorized(), kernel.ptx.contains(".v4."));
                assembles(&kernel);
                assert_eq!(kernel, combine::generate(&spec).unwrap(), "deterministic");
            }
        }
    }
}

#[test]
fn bad_specs_are_refused_naming_the_field() {
    let router_err = |spec: MoeRouterSpec| router::generate(&spec).unwrap_err().to_string();
    let err = router_err(router_spec(DType::BF16, 0, 1, true));
    assert!(
        err.contains("experts") && err.contains("moe_router"),
        "{err}"
    );
    let err = router_err(router_spec(DType::BF16, 2048, 2, true));
    assert!(err.contains("experts"), "{err}");
    let err = router_err(router_spec(DType::F16, 8, 9, false));
    assert!(err.contains("top_k"), "{err}");
    let err = router_err(router_spec(DType::F16, 128, 33, false));
    assert!(err.contains("top_k"), "{err}");
    let err = router_err(router_spec(DType::F16, 8, 0, false));
    assert!(err.contains("top_k"), "{err}");
    let err = router_err(router_spec(DType::I32, 8, 2, false));
    assert!(err.contains("dtype"), "{err}");
    assert!(router_spec(DType::F32, 1024, 32, true).validate().is_ok());
    for hidden in [0, 12, 4100, (1 << 20) + 8] {
        let err = router_err(fused_router_spec(DType::BF16, hidden, 8, 2, true));
        assert!(
            err.contains("hidden") && err.contains("moe_router"),
            "{err}"
        );
    }
    assert!(fused_router_spec(DType::F32, 1 << 20, 1024, 32, true)
        .validate()
        .is_ok());

    for experts in [0, 1025] {
        let err = dispatch::generate(&MoeDispatchSpec { experts })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("experts") && err.contains("moe_dispatch"),
            "{err}"
        );
    }

    let combine_err = |spec: MoeCombineSpec| combine::generate(&spec).unwrap_err().to_string();
    let err = combine_err(combine_spec(DType::BF16, 0, 2));
    assert!(
        err.contains("hidden") && err.contains("moe_combine"),
        "{err}"
    );
    let err = combine_err(combine_spec(DType::BF16, 64, 0));
    assert!(err.contains("top_k"), "{err}");
    let err = combine_err(combine_spec(DType::BF16, 64, 33));
    assert!(err.contains("top_k"), "{err}");
    let err = combine_err(combine_spec(DType::F32, 64, 2));
    assert!(err.contains("dtype"), "{err}");
}
