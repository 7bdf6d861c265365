//! The KV-append and Quest generators (`kv_append`, `quest::estimate`, `quest::top_k`): PTX
//! snapshots at representative specs, ptxas validation for sm_80 and sm_90 (no spills, no
//! stack), parameter names and launch rules, determinism and spec errors.
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without
//! it. Numerics are checked on a GPU by the root `tests/gpu_quest.rs`.

mod common;

use std::collections::BTreeMap;

use kiln_codegen::kernel::{Access, GpuKernel, ParamKind};
use kiln_codegen::ptxas;
use kiln_ir::dtype::DType;
use kiln_kernels::attention::PagedKv;
use kiln_kernels::kv_append::{self, KvAppendSpec};
use kiln_kernels::quest::{estimate, top_k, QuestEstimateSpec, QuestTopKSpec};

use common::layout;

/// Llama-3-8B (f16, GQA 4, d 128), a small MHA bf16 model with d 64, and the tiny-llama
/// preset (f16, GQA 4, d 32).
fn representative_layouts() -> Vec<(&'static str, PagedKv)> {
    vec![
        ("f16_q32_kv8_d128", layout(DType::F16, 32, 8, 128)),
        ("bf16_q8_kv8_d64", layout(DType::BF16, 8, 8, 64)),
        ("f16_q8_kv2_d32", layout(DType::F16, 8, 2, 32)),
    ]
}

/// Every dtype, head_dim (32, 64, 128) and GQA group 1, 4, 8 (and one KV head; 32 KV
/// heads), page sizes 16, 1 and 64.
fn assembled_layouts() -> Vec<PagedKv> {
    let mut layouts = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for head_dim in [32, 64, 128] {
            for (q_heads, kv_heads) in [(8, 8), (32, 8), (64, 8), (8, 1), (32, 32)] {
                layouts.push(layout(dtype, q_heads, kv_heads, head_dim));
            }
        }
    }
    for page_size in [1, 64] {
        for head_dim in [32, 128] {
            layouts.push(PagedKv {
                page_size,
                ..layout(DType::F16, 32, 8, head_dim)
            });
        }
    }
    layouts
}

fn names(kernel: &GpuKernel) -> Vec<&str> {
    kernel.params.iter().map(|p| p.name.as_str()).collect()
}

fn assemble(kernel: &GpuKernel) {
    common::assert_assembles(kernel);
    for arch in ["sm_80", "sm_90"] {
        let report = ptxas::assemble(&kernel.ptx, arch).unwrap();
        assert_eq!(
            report.stack_frame_bytes, 0,
            "{}: {}",
            kernel.entry, report.log
        );
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    }
    assert!(kernel.ptx.is_ascii(), "{}", kernel.entry);
    assert!(
        !kernel.ptx.contains(".local"),
        "{} uses local memory",
        kernel.entry
    );
}

#[test]
fn ptx_snapshots() {
    for (name, layout) in representative_layouts() {
        let append = kv_append::generate(&KvAppendSpec::pool(layout)).unwrap();
        insta::assert_snapshot!(format!("kv_append_{name}"), append.ptx);
        let estimate = estimate::generate(&QuestEstimateSpec::new(layout)).unwrap();
        insta::assert_snapshot!(format!("quest_estimate_{name}"), estimate.ptx);
    }
    let top_k = top_k::generate(&QuestTopKSpec { page_size: 16 }).unwrap();
    insta::assert_snapshot!("quest_top_k_p16", top_k.ptx);
}

#[test]
fn kernels_assemble_for_sm80_and_sm90_without_spills() {
    for layout in assembled_layouts() {
        assemble(&kv_append::generate(&KvAppendSpec::pool(layout)).unwrap());
        assemble(&estimate::generate(&QuestEstimateSpec::new(layout)).unwrap());
    }
    let tuned = QuestEstimateSpec {
        pages_per_block: 256,
        ..QuestEstimateSpec::new(layout(DType::BF16, 64, 8, 128))
    };
    assemble(&estimate::generate(&tuned).unwrap());
    for page_size in [1, 16, 64, 256] {
        assemble(&top_k::generate(&QuestTopKSpec { page_size }).unwrap());
    }
}

#[test]
fn parameters_are_named_for_the_runtime() {
    let layout = layout(DType::F16, 32, 8, 128);
    let append = kv_append::generate(&KvAppendSpec::pool(layout)).unwrap();
    assert_eq!(
        names(&append),
        [
            "new_k",
            "new_v",
            "token_seqs",
            "token_positions",
            "page_table",
            "k_pages",
            "v_pages",
            "page_max",
            "page_min",
            "tokens",
            "max_pages"
        ]
    );
    assert_eq!(
        append.param("page_max").map(|(_, p)| p.kind),
        Some(ParamKind::Pointer(Access::ReadWrite))
    );
    let estimate = estimate::generate(&QuestEstimateSpec::new(layout)).unwrap();
    assert_eq!(
        names(&estimate),
        [
            "q",
            "page_max",
            "page_min",
            "page_table",
            "seq_lens",
            "scores",
            "batch",
            "max_pages"
        ]
    );
    let top_k = top_k::generate(&QuestTopKSpec::for_layout(&layout)).unwrap();
    assert_eq!(
        names(&top_k),
        [
            "scores",
            "seq_lens",
            "selected_pages",
            "selected_counts",
            "batch",
            "kv_heads",
            "max_pages",
            "budget_pages",
            "max_selected"
        ]
    );
    for kernel in [&append, &estimate, &top_k] {
        assert_eq!(kernel.target, "sm_80");
    }
}

fn scalars(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|&(n, v)| (n.to_string(), v)).collect()
}

#[test]
fn launch_rules() {
    // Append: one block row per token; kv_heads * head_dim / 8 chunks per token.
    let append = KvAppendSpec::pool(layout(DType::F16, 32, 8, 128));
    let kernel = kv_append::generate(&append).unwrap();
    let geometry = kernel
        .launch
        .evaluate(&scalars(&[("tokens", 37), ("max_pages", 4)]))
        .unwrap();
    assert_eq!(geometry, ([37, 1, 1], [128, 1, 1]));
    let wide = KvAppendSpec::pool(layout(DType::F16, 32, 32, 128));
    let geometry = kv_append::generate(&wide)
        .unwrap()
        .launch
        .evaluate(&scalars(&[("tokens", 1), ("max_pages", 4)]))
        .unwrap();
    assert_eq!(geometry, ([1, 4, 1], [128, 1, 1]));
    let narrow = KvAppendSpec::pool(layout(DType::BF16, 8, 1, 64));
    assert_eq!((narrow.threads(), narrow.blocks_per_token()), (32, 1));
    // Head dim 32 (tiny-llama): 2 KV heads x 4 chunks, one warp with 24 idle lanes; 32 KV
    // heads: 128 chunks, one full block.
    let tiny = KvAppendSpec::pool(layout(DType::F16, 8, 2, 32));
    assert_eq!(tiny.chunks_per_token(), 8);
    assert_eq!((tiny.threads(), tiny.blocks_per_token()), (32, 1));
    let geometry = kv_append::generate(&tiny)
        .unwrap()
        .launch
        .evaluate(&scalars(&[("tokens", 5), ("max_pages", 4)]))
        .unwrap();
    assert_eq!(geometry, ([5, 1, 1], [32, 1, 1]));
    let wide_d32 = KvAppendSpec::pool(layout(DType::BF16, 32, 32, 32));
    assert_eq!((wide_d32.threads(), wide_d32.blocks_per_token()), (128, 1));

    // Estimate: batch 1 at 32K context, 8 KV heads, fills more than 132 SMs.
    let spec = QuestEstimateSpec::new(layout(DType::F16, 32, 8, 128));
    let kernel = estimate::generate(&spec).unwrap();
    let (grid, block) = kernel
        .launch
        .evaluate(&scalars(&[("batch", 1), ("max_pages", 2048)]))
        .unwrap();
    assert_eq!((grid, block), ([32, 8, 1], [64, 1, 1]));
    assert!(grid.iter().product::<u32>() >= 132);
    assert_eq!(kernel.launch.shared_bytes, 0);

    // Head dim 32: the group's 4 queries take 4 · 32 · 4 bytes of shared memory.
    let tiny = QuestEstimateSpec::new(layout(DType::F16, 8, 2, 32));
    assert_eq!(tiny.query_bytes(), 4 * 32 * 4);
    let kernel = estimate::generate(&tiny).unwrap();
    assert!(kernel
        .ptx
        .contains(".shared .align 16 .b8 group_query[512]"));
    let (grid, block) = kernel
        .launch
        .evaluate(&scalars(&[("batch", 3), ("max_pages", 100)]))
        .unwrap();
    assert_eq!((grid, block), ([2, 6, 1], [64, 1, 1]));

    // Top-K: one block per (sequence, KV head).
    let kernel = top_k::generate(&QuestTopKSpec { page_size: 16 }).unwrap();
    let (grid, block) = kernel
        .launch
        .evaluate(&scalars(&[
            ("batch", 3),
            ("kv_heads", 8),
            ("max_pages", 4096),
            ("budget_pages", 256),
            ("max_selected", 256),
        ]))
        .unwrap();
    assert_eq!((grid, block), ([24, 1, 1], [top_k::THREADS, 1, 1]));
}

#[test]
fn metadata_has_one_writer_and_no_atomics_outside_top_k() {
    let layout = layout(DType::BF16, 32, 8, 128);
    let append = kv_append::generate(&KvAppendSpec::pool(layout))
        .unwrap()
        .ptx;
    let estimate = estimate::generate(&QuestEstimateSpec::new(layout))
        .unwrap()
        .ptx;
    for ptx in [&append, &estimate] {
        assert!(!has_opcode(ptx, "atom.") && !has_opcode(ptx, "red."));
    }
    // Estimate: no fused multiply-add may change the reference's rounding.
    assert!(!estimate.contains("fma.rn.f32"));
    assert!(estimate.contains("max.f32") && estimate.contains("mul.f32"));
    // Top-K: the histogram is built with shared-memory reductions only.
    let top_k = top_k::generate(&QuestTopKSpec { page_size: 16 })
        .unwrap()
        .ptx;
    assert!(has_opcode(&top_k, "red.shared.add.u32"));
    assert!(!has_opcode(&top_k, "atom.global") && !has_opcode(&top_k, "red.global"));
}

/// Whether an instruction of `ptx` (after any guard) starts with `opcode`.
fn has_opcode(ptx: &str, opcode: &str) -> bool {
    ptx.lines().any(|line| {
        let line = line.trim_start();
        let line = match line.strip_prefix('@') {
            Some(guarded) => guarded.split_once(' ').map_or("", |(_, rest)| rest),
            None => line,
        };
        line.starts_with(opcode)
    })
}

#[test]
fn generation_is_deterministic() {
    for layout in assembled_layouts() {
        let append = KvAppendSpec::pool(layout);
        assert_eq!(kv_append::generate(&append), kv_append::generate(&append));
        let spec = QuestEstimateSpec::new(layout);
        assert_eq!(estimate::generate(&spec), estimate::generate(&spec));
    }
    let spec = QuestTopKSpec { page_size: 16 };
    assert_eq!(top_k::generate(&spec), top_k::generate(&spec));
    let a = estimate::generate(&QuestEstimateSpec::new(layout(DType::F16, 8, 8, 64))).unwrap();
    let b = estimate::generate(&QuestEstimateSpec::new(layout(DType::BF16, 8, 8, 64))).unwrap();
    assert_ne!(a.entry, b.entry);
}

#[test]
fn bad_specs_are_rejected_with_the_field_named() {
    let good = layout(DType::F16, 32, 8, 128);
    let append = |layout| kv_append::generate(&KvAppendSpec::pool(layout)).unwrap_err();
    for head_dim in [16, 96] {
        let error = append(PagedKv { head_dim, ..good });
        assert_eq!(error.family, "kv_append");
        assert!(
            error
                .to_string()
                .contains(&format!("head_dim must be 32, 64 or 128, got {head_dim}")),
            "{error}"
        );
        let error =
            estimate::generate(&QuestEstimateSpec::new(PagedKv { head_dim, ..good })).unwrap_err();
        assert_eq!(error.family, "quest_estimate");
        assert!(error.to_string().contains("head_dim"), "{error}");
    }
    assert!(append(PagedKv {
        dtype: DType::F32,
        ..good
    })
    .to_string()
    .contains("dtype"));
    assert!(append(PagedKv {
        page_size: 12,
        ..good
    })
    .to_string()
    .contains("page_size"));

    let error = estimate::generate(&QuestEstimateSpec {
        pages_per_block: 48,
        ..QuestEstimateSpec::new(good)
    })
    .unwrap_err();
    assert_eq!(error.family, "quest_estimate");
    assert!(error.to_string().contains("pages_per_block"), "{error}");
    let error = estimate::generate(&QuestEstimateSpec::new(PagedKv {
        q_heads: 30,
        ..good
    }))
    .unwrap_err();
    assert!(error.to_string().contains("q_heads"), "{error}");

    for page_size in [0, 3, 512] {
        let error = top_k::generate(&QuestTopKSpec { page_size }).unwrap_err();
        assert_eq!(error.family, "quest_top_k");
        assert!(error.to_string().contains("page_size"), "{error}");
    }
}
