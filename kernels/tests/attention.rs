//! The split-KV decode attention generator (`attention::decode`): PTX snapshots at
//! representative specs (f16/bf16, head_dim 32/64/128, dense/sparse, merge, the fused
//! last-block merge), ptxas validation for sm_80 and sm_90 (no spills, no stack), in both merge
//! modes, parameters, launch rules, determinism and spec errors.
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without
//! it. Numerics are checked on a GPU by the root `tests/gpu_attention_decode.rs`.

mod common;

use std::collections::BTreeMap;

use kiln_codegen::kernel::{Access, GpuKernel, ParamKind};
use kiln_codegen::ptx::Target;
use kiln_ir::dtype::DType;
use kiln_kernels::attention::decode::{self, DecodeAttentionSpec, MergeMode};
use kiln_kernels::attention::PagedKv;

use common::layout;

/// The snapshot specs: Llama-3-8B decode (f16, 32 q / 8 KV heads, d 128) dense and sparse,
/// a bf16 head_dim-64 GQA-8 model, an MHA (group 1) bf16 d-128 cache, and the tiny-llama
/// preset's attention (f16, 8 q / 2 KV heads, d 32).
fn representative() -> Vec<(&'static str, DecodeAttentionSpec)> {
    vec![
        (
            "decode_dense_f16_q32_kv8_d128",
            DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), false),
        ),
        (
            "decode_sparse_f16_q32_kv8_d128",
            DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), true),
        ),
        (
            "decode_dense_bf16_q16_kv2_d64",
            DecodeAttentionSpec::new(layout(DType::BF16, 16, 2, 64), false),
        ),
        (
            "decode_sparse_bf16_q32_kv32_d128",
            DecodeAttentionSpec::new(layout(DType::BF16, 32, 32, 128), true),
        ),
        (
            "decode_dense_f16_q8_kv2_d32",
            DecodeAttentionSpec::new(layout(DType::F16, 8, 2, 32), false),
        ),
    ]
}

/// More specs that must assemble cleanly: every dtype, head_dim, group 1/2/4/8/16, page
/// sizes 1 to 256, dense and sparse, and tuning off the defaults.
fn assembled() -> Vec<DecodeAttentionSpec> {
    let mut specs: Vec<DecodeAttentionSpec> =
        representative().into_iter().map(|(_, s)| s).collect();
    for dtype in [DType::F16, DType::BF16] {
        for head_dim in [32, 64, 128] {
            for (q, kv) in [(8, 8), (32, 8), (32, 4), (64, 4), (4, 2)] {
                for sparse in [false, true] {
                    specs.push(DecodeAttentionSpec::new(
                        layout(dtype, q, kv, head_dim),
                        sparse,
                    ));
                }
            }
        }
    }
    for page_size in [1, 4, 64, 256] {
        let l = PagedKv {
            page_size,
            ..layout(DType::F16, 32, 8, 128)
        };
        specs.push(DecodeAttentionSpec::new(l, true));
    }
    let base = DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), false);
    specs.push(base.with_tuning(2, 8, 2, 3));
    specs.push(base.with_tuning(4, 2, 8, 2));
    specs.push(base.with_tuning(1, 1, 1, 8));
    let group8 = DecodeAttentionSpec::new(layout(DType::F16, 16, 2, 128), false);
    for (heads, warps, steps, stages) in [
        (2, 8, 2, 3),
        (1, 1, 1, 2),
        (4, 2, 8, 2),
        (8, 4, 4, 8),
        (4, 16, 1, 4),
    ] {
        specs.push(group8.with_tuning(heads, warps, steps, stages));
    }
    let d64 = DecodeAttentionSpec::new(layout(DType::BF16, 48, 4, 64), true);
    specs.push(d64.with_tuning(6, 4, 2, 4));
    // Head dim 32: page sizes 1 and 256, one warp (a merge of 4 groups), 16 warps, 8 steps
    // (256 tokens per stage at 4 warps), 8 heads per block.
    for page_size in [1, 256] {
        let l = PagedKv {
            page_size,
            ..layout(DType::BF16, 8, 2, 32)
        };
        specs.push(DecodeAttentionSpec::new(l, false));
        specs.push(DecodeAttentionSpec::new(l, true));
    }
    let d32 = DecodeAttentionSpec::new(layout(DType::F16, 16, 2, 32), false);
    for (heads, warps, steps, stages) in [
        (1, 1, 1, 2),
        (4, 1, 8, 8),
        (8, 4, 4, 4),
        (2, 16, 1, 4),
        (4, 4, 8, 3),
    ] {
        specs.push(d32.with_tuning(heads, warps, steps, stages));
    }
    let fused: Vec<DecodeAttentionSpec> = specs
        .iter()
        .map(|s| s.with_merge(MergeMode::LastBlock))
        .collect();
    specs.extend(fused);
    specs
}

/// The Llama-3-8B spec with the merge fused into the partial kernel.
fn fused_llama(sparse: bool) -> DecodeAttentionSpec {
    DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), sparse)
        .with_merge(MergeMode::LastBlock)
}

#[test]
fn ptx_snapshots() {
    for (name, spec) in representative() {
        let kernels = decode::generate(&spec).unwrap();
        insta::assert_snapshot!(name, kernels.partial.ptx);
    }
    let spec = DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), false);
    insta::assert_snapshot!(
        "decode_merge_f16_q32_d128",
        decode::generate(&spec).unwrap().merge.unwrap().ptx
    );
    let spec = DecodeAttentionSpec::new(layout(DType::BF16, 16, 2, 64), false);
    insta::assert_snapshot!(
        "decode_merge_bf16_q16_d64",
        decode::generate(&spec).unwrap().merge.unwrap().ptx
    );
    let spec = DecodeAttentionSpec::new(layout(DType::F16, 8, 2, 32), false);
    insta::assert_snapshot!(
        "decode_merge_f16_q8_d32",
        decode::generate(&spec).unwrap().merge.unwrap().ptx
    );
    let fused = decode::generate(&fused_llama(false)).unwrap();
    assert!(fused.merge.is_none());
    insta::assert_snapshot!("decode_dense_merged_f16_q32_kv8_d128", fused.partial.ptx);
}

#[test]
fn kernels_assemble_for_sm80_and_sm90_without_spills() {
    for spec in assembled() {
        let kernels = decode::generate(&spec).unwrap();
        assert_eq!(kernels.merge.is_some(), spec.merge == MergeMode::Separate);
        for arch in ["sm_80", "sm_90"] {
            common::assemble_cleanly(&kernels.partial, arch);
            if let Some(merge) = &kernels.merge {
                common::assemble_cleanly(merge, arch);
            }
        }
        let sm90 = decode::generate_for(&spec, Target::Sm90).unwrap();
        assert_eq!(sm90.partial.target, "sm_90");
        common::assemble_cleanly(&sm90.partial, "sm_90");
    }
}

#[test]
fn kv_streams_through_16_byte_async_copies_without_atomics() {
    for (name, spec) in representative() {
        let ptx = decode::generate(&spec).unwrap().partial.ptx;
        // K and V: one zero-filling copy each per step of a stage.
        let copies = ptx.matches("cp.async.cg.shared.global").count();
        assert!(copies >= 2 * spec.steps, "{name}: {copies} copies");
        assert!(ptx.contains("cp.async.wait_group"), "{name}");
        assert!(ptx.contains("ld.shared.v4.u32"), "{name}");
        assert!(ptx.contains("ex2.approx.ftz.f32"), "{name}");
        assert!(!ptx.contains(".local"), "{name} uses local memory");
        assert!(!ptx.contains("atom.") && !ptx.contains(" red."), "{name}");
        assert!(!ptx.contains("fence."), "{name}");
        assert_eq!(ptx.contains("selected_pages"), spec.sparse, "{name}");
    }
}

#[test]
fn fused_merge_counts_splits_with_one_atomic_between_fences() {
    for sparse in [false, true] {
        let ptx = decode::generate(&fused_llama(sparse)).unwrap().partial.ptx;
        assert_eq!(ptx.matches("atom.global.add.u32").count(), 1);
        assert_eq!(ptx.matches("fence.acq_rel.gpu").count(), 2);
        assert!(!ptx.contains(" red."));
        // The partial states are read back coherently (L2), never through the nc path.
        assert!(ptx.contains("ld.global.cg.f32"));
        assert!(ptx.contains("ld.global.cg.v4.f32"));
        assert!(!ptx.contains("ld.global.nc.f32"));
        assert!(!ptx.contains("ld.global.nc.v4.f32"));
        assert!(!ptx.contains(".local"));
        assert!(ptx.contains("_merged"));
    }
}

#[test]
fn parameters_are_named_for_the_runtime() {
    let names = |kernel: &GpuKernel| -> Vec<String> {
        kernel.params.iter().map(|p| p.name.clone()).collect()
    };
    let dense = decode::generate(&DecodeAttentionSpec::new(
        layout(DType::F16, 32, 8, 128),
        false,
    ))
    .unwrap();
    assert_eq!(
        names(&dense.partial),
        [
            "q",
            "k_pages",
            "v_pages",
            "page_table",
            "seq_lens",
            "partial_acc",
            "partial_max",
            "partial_sum",
            "batch",
            "max_pages",
            "splits",
            "scale"
        ]
    );
    let sparse = decode::generate(&DecodeAttentionSpec::new(
        layout(DType::F16, 32, 8, 128),
        true,
    ))
    .unwrap();
    assert_eq!(
        names(&sparse.partial),
        [
            "q",
            "k_pages",
            "v_pages",
            "page_table",
            "seq_lens",
            "selected_pages",
            "selected_counts",
            "partial_acc",
            "partial_max",
            "partial_sum",
            "batch",
            "max_pages",
            "max_selected",
            "splits",
            "scale"
        ]
    );
    assert_eq!(
        names(dense.merge.as_ref().unwrap()),
        [
            "partial_acc",
            "partial_max",
            "partial_sum",
            "out",
            "batch",
            "splits"
        ]
    );
    assert_eq!(
        dense.partial.param("partial_acc").map(|(_, p)| p.kind),
        Some(ParamKind::Pointer(Access::Write))
    );
    assert_eq!(
        dense.partial.param("scale").map(|(_, p)| p.kind),
        Some(ParamKind::F32)
    );
    assert_eq!(
        dense
            .merge
            .as_ref()
            .unwrap()
            .param("out")
            .map(|(_, p)| p.kind),
        Some(ParamKind::Pointer(Access::Write))
    );
    assert_eq!(dense.partial.target, "sm_80");
    assert_eq!(dense.merge.as_ref().unwrap().target, "sm_80");

    let merge_names = |sparse: bool| {
        let kernels = decode::generate(&fused_llama(sparse)).unwrap();
        assert_eq!(
            kernels.partial.param("merge_counters").map(|(_, p)| p.kind),
            Some(ParamKind::Pointer(Access::ReadWrite))
        );
        assert_eq!(
            kernels.partial.param("out").map(|(_, p)| p.kind),
            Some(ParamKind::Pointer(Access::Write))
        );
        names(&kernels.partial)
    };
    assert_eq!(
        merge_names(false),
        [
            "q",
            "k_pages",
            "v_pages",
            "page_table",
            "seq_lens",
            "partial_acc",
            "partial_max",
            "partial_sum",
            "out",
            "merge_counters",
            "batch",
            "max_pages",
            "splits",
            "scale"
        ]
    );
    assert_eq!(
        merge_names(true),
        [
            "q",
            "k_pages",
            "v_pages",
            "page_table",
            "seq_lens",
            "selected_pages",
            "selected_counts",
            "partial_acc",
            "partial_max",
            "partial_sum",
            "out",
            "merge_counters",
            "batch",
            "max_pages",
            "max_selected",
            "splits",
            "scale"
        ]
    );
}

#[test]
fn launch_rules_cover_splits_heads_and_batch() {
    let spec = DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), false);
    let kernels = decode::generate(&spec).unwrap();
    let scalars = BTreeMap::from([("splits".to_string(), 33u64), ("batch".to_string(), 3)]);
    let (grid, block) = kernels.partial.launch.evaluate(&scalars).unwrap();
    assert_eq!(grid, [33, 8, 3]);
    assert_eq!(block, [32 * spec.warps as u32, 1, 1]);
    assert_eq!(
        kernels.partial.launch.shared_bytes as usize,
        spec.shared_bytes()
    );
    let merge = kernels.merge.unwrap();
    let (grid, block) = merge.launch.evaluate(&scalars).unwrap();
    assert_eq!(grid, [32 * 3, 1, 1]);
    assert_eq!(block, [decode::MERGE_THREADS as u32, 1, 1]);
    assert_eq!(merge.launch.shared_bytes, 0);

    // Head dim 32 (tiny-llama): the group of 4 in one block per KV head; four 16 KiB
    // stages of 128 tokens, then the entry list; the merge's 2176-byte scratch is static.
    let tiny = DecodeAttentionSpec::new(layout(DType::F16, 8, 2, 32), false);
    assert_eq!(tiny.stage_tokens(), 128);
    let kernels = decode::generate(&tiny).unwrap();
    let (grid, block) = kernels.partial.launch.evaluate(&scalars).unwrap();
    assert_eq!((grid, block), ([33, 2, 3], [128, 1, 1]));
    assert_eq!(tiny.shared_bytes(), 4 * (16 << 10) + 128 * 8);
    assert_eq!(
        kernels.partial.launch.shared_bytes as usize,
        tiny.shared_bytes()
    );
    let merge = kernels.merge.unwrap();
    assert_eq!(merge.launch.evaluate(&scalars).unwrap().0, [8 * 3, 1, 1]);
    assert!(merge
        .ptx
        .contains(".shared .align 16 .b8 merge_scratch[2176]"));
    assert_eq!(tiny.workspace(3, 33).acc_elements, 3 * 8 * 33 * 32);

    // Fused: the same grid; one counter per (sequence, block of a split).
    let fused = fused_llama(false);
    let partial = decode::generate(&fused).unwrap().partial;
    assert_eq!(partial.launch.evaluate(&scalars).unwrap().0, [33, 8, 3]);
    assert_eq!(partial.launch.shared_bytes as usize, fused.shared_bytes());
    let workspace = fused.workspace(3, 33);
    assert_eq!(workspace.counter_elements, 3 * 8);
    assert_eq!(workspace.stat_elements, 3 * 32 * 33);
    assert_eq!(spec.workspace(3, 33).counter_elements, 0);

    // Heads of a 16-wide group split over two blocks per KV head.
    let wide = DecodeAttentionSpec::new(layout(DType::BF16, 64, 4, 128), false);
    assert_eq!(wide.heads_per_block, 8);
    assert_eq!(wide.blocks_per_split(), 8);
    let (grid, _) = decode::generate(&wide)
        .unwrap()
        .partial
        .launch
        .evaluate(&scalars)
        .unwrap();
    assert_eq!(grid, [33, 8, 3]);
}

#[test]
fn generation_is_deterministic() {
    for spec in assembled() {
        assert_eq!(decode::generate(&spec), decode::generate(&spec));
    }
    let a = DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), false);
    let b = DecodeAttentionSpec { sparse: true, ..a };
    let ka = decode::generate(&a).unwrap();
    let kb = decode::generate(&b).unwrap();
    assert_ne!(ka.partial.entry, kb.partial.entry);
    // The merge does not depend on sparsity: one module serves both.
    assert_eq!(ka.merge, kb.merge);
    let fused = decode::generate(&a.with_merge(MergeMode::LastBlock)).unwrap();
    assert_ne!(fused.partial.entry, ka.partial.entry);
    // The default is the separate merge.
    assert_eq!(a.merge, MergeMode::Separate);
}

#[test]
fn bad_specs_are_rejected_with_the_field_named() {
    let good = DecodeAttentionSpec::new(layout(DType::F16, 32, 8, 128), false);
    let message = |spec: DecodeAttentionSpec| {
        let error = decode::generate(&spec).unwrap_err();
        assert_eq!(error.family, "attention_decode");
        error.to_string()
    };
    for head_dim in [16, 96, 256] {
        assert!(message(DecodeAttentionSpec {
            layout: PagedKv {
                head_dim,
                ..good.layout
            },
            ..good
        })
        .contains(&format!("head_dim must be 32, 64 or 128, got {head_dim}")));
    }
    assert!(message(DecodeAttentionSpec {
        layout: PagedKv {
            dtype: DType::F32,
            ..good.layout
        },
        ..good
    })
    .contains("dtype"));
    assert!(message(good.with_tuning(3, 4, 4, 4)).contains("heads_per_block = 3"));
    assert!(message(good.with_tuning(4, 3, 4, 4)).contains("warps = 3"));
    assert!(message(good.with_tuning(4, 4, 3, 4)).contains("steps = 3"));
    assert!(message(good.with_tuning(4, 4, 4, 1)).contains("stages = 1"));
    let group8 = DecodeAttentionSpec::new(layout(DType::F16, 32, 4, 128), false);
    assert!(message(group8.with_tuning(8, 4, 8, 4)).contains("scores"));
    assert!(message(good.with_tuning(4, 16, 8, 8)).contains("shared memory"));
}
