//! The kernels over the model graph's contiguous KV cache `[batch, capacity, kv_heads,
//! head_dim]`, a token-major page pool ([`PageOrder::TokenMajor`]) under the identity page
//! table: the plan's `kv_append` variant ([`KvAppendSpec::plan`]: start per sequence, one
//! cache, no metadata; the in-place `KvAppend`), `quest::page_bounds` (Quest metadata from a
//! written cache) and the paged attention kernels reading token-major pages. PTX
//! snapshots at representative specs, strict ptxas assembly for sm_80 and sm_90 (no spills,
//! no stack, no warnings), parameters, launch rules and entry names, and that the head-major
//! kernels are unchanged by the order field.
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without
//! it. Numerics are checked on a GPU by the root `tests/gpu_dense_cache.rs`.

mod common;

use std::collections::BTreeMap;

use kiln_codegen::kernel::{Access, GpuKernel, ParamKind};
use kiln_ir::dtype::DType;
use kiln_kernels::attention::decode::{self, DecodeAttentionSpec};
use kiln_kernels::attention::paged::PageOrder;
use kiln_kernels::attention::prefill::{self, PrefillAttentionSpec};
use kiln_kernels::attention::PagedKv;
use kiln_kernels::kv_append::{self, AppendedCaches, KvAppendSpec, TokenAddressing};
use kiln_kernels::quest::page_bounds::{self, PageBoundsSpec};

/// The model graph's cache: token-major pages (with an identity page table).
fn layout(dtype: DType, q_heads: usize, kv_heads: usize, head_dim: usize) -> PagedKv {
    PagedKv {
        order: PageOrder::TokenMajor,
        ..common::layout(dtype, q_heads, kv_heads, head_dim)
    }
}

fn head_major(layout: PagedKv) -> PagedKv {
    PagedKv {
        order: PageOrder::HeadMajor,
        ..layout
    }
}

/// The plan's append kernel for a cache of `kv_heads` heads of `head_dim` (16-token pages).
fn plan_append(dtype: DType, kv_heads: usize, head_dim: usize) -> KvAppendSpec {
    KvAppendSpec::plan(layout(dtype, kv_heads, kv_heads, head_dim))
}

fn names(kernel: &GpuKernel) -> Vec<&str> {
    kernel.params.iter().map(|p| p.name.as_str()).collect()
}

fn scalars(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|&(n, v)| (n.to_string(), v)).collect()
}

fn assemble(kernel: &GpuKernel) {
    for arch in ["sm_80", "sm_90"] {
        common::assemble_cleanly(kernel, arch);
    }
    assert!(kernel.ptx.is_ascii(), "{}", kernel.entry);
    assert!(!kernel.ptx.contains(".local"), "{}", kernel.entry);
}

#[test]
fn ptx_snapshots() {
    let append = kv_append::generate(&plan_append(DType::F16, 8, 128)).unwrap();
    insta::assert_snapshot!("kv_append_start_single_f16_q8_kv8_d128_p16_tm", append.ptx);
    let bounds = page_bounds::generate(&PageBoundsSpec {
        layout: layout(DType::F16, 32, 8, 128),
    })
    .unwrap();
    insta::assert_snapshot!("quest_page_bounds_f16_q32_kv8_d128_tm", bounds.ptx);
    let decode = decode::generate(&DecodeAttentionSpec::new(
        layout(DType::F16, 32, 8, 128),
        false,
    ))
    .unwrap();
    insta::assert_snapshot!("decode_dense_f16_q32_kv8_d128_tm", decode.partial.ptx);
}

#[test]
fn plan_append_assembles_without_spills() {
    for dtype in [DType::F16, DType::BF16] {
        for head_dim in [32, 64, 128] {
            for kv_heads in [1, 8, 32] {
                for page_size in [1, 16] {
                    let spec = KvAppendSpec::plan(PagedKv {
                        page_size,
                        ..layout(dtype, kv_heads, kv_heads, head_dim)
                    });
                    assemble(&kv_append::generate(&spec).unwrap());
                }
            }
        }
    }
    // The other variants the spec allows: start-addressed keys and values, token arrays
    // into one cache, and the pool's kernel without metadata, in both page orders.
    let layout = layout(DType::BF16, 8, 2, 32);
    for order in [PageOrder::HeadMajor, PageOrder::TokenMajor] {
        let layout = PagedKv { order, ..layout };
        for spec in [
            KvAppendSpec {
                caches: AppendedCaches::KeysAndValues,
                ..KvAppendSpec::plan(layout)
            },
            KvAppendSpec {
                addressing: TokenAddressing::TokenArrays,
                ..KvAppendSpec::plan(layout)
            },
            KvAppendSpec {
                metadata: false,
                ..KvAppendSpec::pool(layout)
            },
        ] {
            assemble(&kv_append::generate(&spec).unwrap());
        }
    }
}

/// The variants' entry names and parameters; the pool's kernel keeps its name.
#[test]
fn append_variants_are_named_by_what_they_do() {
    let layout = layout(DType::BF16, 8, 2, 32);
    let entry_and_params = |spec: KvAppendSpec| {
        let kernel = kv_append::generate(&spec).unwrap();
        assert_eq!(kernel.entry, spec.entry());
        let params: Vec<String> = kernel.params.iter().map(|p| p.name.clone()).collect();
        (kernel.entry, params.join(" "))
    };
    assert_eq!(
        entry_and_params(KvAppendSpec::pool(layout)),
        (
            "kv_append_bf16_q8_kv2_d32_p16_tm".to_string(),
            "new_k new_v token_seqs token_positions page_table k_pages v_pages page_max \
             page_min tokens max_pages"
                .to_string()
        )
    );
    assert_eq!(
        entry_and_params(KvAppendSpec {
            metadata: false,
            ..KvAppendSpec::pool(layout)
        }),
        (
            "kv_append_nometa_bf16_q8_kv2_d32_p16_tm".to_string(),
            "new_k new_v token_seqs token_positions page_table k_pages v_pages tokens max_pages"
                .to_string()
        )
    );
    assert_eq!(
        entry_and_params(KvAppendSpec::plan(layout)),
        (
            "kv_append_start_single_bf16_q8_kv2_d32_p16_tm".to_string(),
            "new start page_table pages batch new_tokens max_pages".to_string()
        )
    );
    assert_eq!(
        entry_and_params(KvAppendSpec {
            caches: AppendedCaches::KeysAndValues,
            ..KvAppendSpec::plan(layout)
        }),
        (
            "kv_append_start_bf16_q8_kv2_d32_p16_tm".to_string(),
            "new_k new_v start page_table k_pages v_pages batch new_tokens max_pages".to_string()
        )
    );
    assert_eq!(
        entry_and_params(KvAppendSpec {
            addressing: TokenAddressing::TokenArrays,
            ..KvAppendSpec::plan(layout)
        }),
        (
            "kv_append_single_bf16_q8_kv2_d32_p16_tm".to_string(),
            "new token_seqs token_positions page_table pages tokens max_pages".to_string()
        )
    );
}

/// The out-of-range rule in the plan's kernel: a start that is negative as i32 (at least
/// 2^31 as u32) skips the sequence, and a page index at or past `max_pages` skips the row.
#[test]
fn plan_append_guards_negative_starts_and_rows_past_the_table() {
    let ptx = kv_append::generate(&plan_append(DType::F16, 2, 64))
        .unwrap()
        .ptx;
    let guards: Vec<&str> = ptx
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("setp.lt.u32"))
        .collect();
    assert!(
        guards.iter().any(|l| l.ends_with(", 2147483648;")),
        "no negative-start guard in {guards:?}"
    );
    assert_eq!(guards.len(), 3, "chunk, start and page guards: {guards:?}");
    // No metadata buffers, no reads of the pages: the kernel only stores into the cache.
    assert!(!ptx.contains("page_max") && !ptx.contains("page_min"));
    let stores = ptx.lines().filter(|l| l.contains("st.global")).count();
    assert_eq!(stores, 1, "one 16-byte store per thread");
}

#[test]
fn page_bounds_assembles_without_spills_in_both_orders() {
    for dtype in [DType::F16, DType::BF16] {
        for head_dim in [32, 64, 128] {
            for order in [PageOrder::HeadMajor, PageOrder::TokenMajor] {
                for page_size in [1, 16, 256] {
                    let layout = PagedKv {
                        order,
                        page_size,
                        ..layout(dtype, 32, 8, head_dim)
                    };
                    assemble(&page_bounds::generate(&PageBoundsSpec { layout }).unwrap());
                }
            }
        }
    }
}

#[test]
fn token_major_attention_assembles_without_spills() {
    for (dtype, head_dim) in [
        (DType::F16, 128),
        (DType::BF16, 128),
        (DType::F16, 32),
        (DType::BF16, 32),
    ] {
        let layout = layout(dtype, 32, 8, head_dim);
        for sparse in [false, true] {
            let kernels = decode::generate(&DecodeAttentionSpec::new(layout, sparse)).unwrap();
            assert!(
                kernels.partial.entry.contains("_tm"),
                "{}",
                kernels.partial.entry
            );
            assemble(&kernels.partial);
            if let Some(merge) = &kernels.merge {
                assemble(merge);
            }
        }
        let kernel = prefill::generate(&PrefillAttentionSpec::new(layout)).unwrap();
        assert!(kernel.entry.contains("_tm"), "{}", kernel.entry);
        assemble(&kernel);
        let wide = PrefillAttentionSpec {
            tile: prefill::PrefillTile::wide(),
            ..PrefillAttentionSpec::new(layout)
        };
        assemble(&prefill::generate(&wide).unwrap());
        let append = kv_append::generate(&KvAppendSpec::pool(layout)).unwrap();
        assert!(append.entry.ends_with("_tm"), "{}", append.entry);
        assemble(&append);
    }
}

#[test]
fn orders_differ_only_for_token_major() {
    let token = layout(DType::BF16, 32, 8, 128);
    let head = head_major(token);
    assert_eq!(head.tag(), "bf16_q32_kv8_d128_p16");
    assert_eq!(token.tag(), "bf16_q32_kv8_d128_p16_tm");
    let decode_head = decode::generate(&DecodeAttentionSpec::new(head, false)).unwrap();
    let decode_token = decode::generate(&DecodeAttentionSpec::new(token, false)).unwrap();
    assert_ne!(decode_head.partial.ptx, decode_token.partial.ptx);
    assert_eq!(decode_head.partial.params, decode_token.partial.params);
    assert_eq!(decode_head.partial.launch, decode_token.partial.launch);
    let prefill_head = prefill::generate(&PrefillAttentionSpec::new(head)).unwrap();
    let prefill_token = prefill::generate(&PrefillAttentionSpec::new(token)).unwrap();
    assert_ne!(prefill_head.ptx, prefill_token.ptx);
    assert_eq!(prefill_head.params, prefill_token.params);
    assert_eq!(prefill_head.launch, prefill_token.launch);
    // The merge kernel does not read the cache: identical in both orders but for its name.
    let merge_head = decode_head.merge.unwrap();
    let merge_token = decode_token.merge.unwrap();
    assert_eq!(
        merge_head.ptx.replace(&merge_head.entry, ""),
        merge_token.ptx.replace(&merge_token.entry, "")
    );
}

#[test]
fn parameters_are_named_for_the_runtime() {
    let append = kv_append::generate(&plan_append(DType::BF16, 8, 128)).unwrap();
    assert_eq!(
        append.entry,
        "kv_append_start_single_bf16_q8_kv8_d128_p16_tm"
    );
    assert_eq!(
        names(&append),
        [
            "new",
            "start",
            "page_table",
            "pages",
            "batch",
            "new_tokens",
            "max_pages"
        ]
    );
    let kind = |kernel: &GpuKernel, name: &str| kernel.param(name).map(|(_, p)| p.kind);
    assert_eq!(kind(&append, "new"), Some(ParamKind::Pointer(Access::Read)));
    assert_eq!(
        kind(&append, "start"),
        Some(ParamKind::Pointer(Access::Read))
    );
    assert_eq!(
        kind(&append, "pages"),
        Some(ParamKind::Pointer(Access::Write))
    );
    assert_eq!(kind(&append, "max_pages"), Some(ParamKind::U32));

    let bounds = page_bounds::generate(&PageBoundsSpec {
        layout: layout(DType::F16, 32, 8, 128),
    })
    .unwrap();
    assert_eq!(bounds.entry, "quest_page_bounds_f16_q32_kv8_d128_p16_tm");
    assert_eq!(
        names(&bounds),
        [
            "k_pages",
            "page_table",
            "seq_lens",
            "page_max",
            "page_min",
            "batch",
            "max_pages",
            "new_tokens"
        ]
    );
    assert_eq!(
        kind(&bounds, "page_max"),
        Some(ParamKind::Pointer(Access::Write))
    );
    for kernel in [&append, &bounds] {
        assert_eq!(kernel.target, "sm_80");
        assert!(!kernel.ptx.contains("atom.") && !kernel.ptx.contains(" red."));
    }
}

#[test]
fn launch_rules() {
    // Append: one block row per (token, sequence); 8 KV heads of d 128 = 128 chunks.
    let spec = plan_append(DType::F16, 8, 128);
    let kernel = kv_append::generate(&spec).unwrap();
    let geometry = kernel
        .launch
        .evaluate(&scalars(&[
            ("batch", 3),
            ("new_tokens", 37),
            ("max_pages", 256),
        ]))
        .unwrap();
    assert_eq!(geometry, ([37, 1, 3], [128, 1, 1]));
    assert_eq!(kernel.launch.shared_bytes, 0);
    let wide = plan_append(DType::F16, 32, 128);
    assert_eq!((wide.threads(), wide.blocks_per_token()), (128, 4));
    let geometry = kv_append::generate(&wide)
        .unwrap()
        .launch
        .evaluate(&scalars(&[
            ("batch", 2),
            ("new_tokens", 1),
            ("max_pages", 256),
        ]))
        .unwrap();
    assert_eq!(geometry, ([1, 4, 2], [128, 1, 1]));
    let narrow = plan_append(DType::BF16, 1, 64);
    assert_eq!((narrow.threads(), narrow.blocks_per_token()), (32, 1));

    // Page bounds: ceil(new_tokens / page_size) pages per (KV head, sequence), one warp each.
    let kernel = page_bounds::generate(&PageBoundsSpec {
        layout: layout(DType::F16, 32, 8, 128),
    })
    .unwrap();
    let rule = |new_tokens| {
        kernel
            .launch
            .evaluate(&scalars(&[
                ("batch", 2),
                ("max_pages", 256),
                ("new_tokens", new_tokens),
            ]))
            .unwrap()
    };
    assert_eq!(rule(1), ([1, 8, 2], [32, 1, 1]));
    assert_eq!(rule(4096), ([256, 8, 2], [32, 1, 1]));
    assert_eq!(rule(17), ([2, 8, 2], [32, 1, 1]));
    // Head dim 32: the same rule; a warp is 4 chunks x 8 token slots per pass.
    let kernel = page_bounds::generate(&PageBoundsSpec {
        layout: layout(DType::BF16, 8, 2, 32),
    })
    .unwrap();
    let geometry = kernel
        .launch
        .evaluate(&scalars(&[
            ("batch", 2),
            ("max_pages", 256),
            ("new_tokens", 17),
        ]))
        .unwrap();
    assert_eq!(geometry, ([2, 2, 2], [32, 1, 1]));
}

#[test]
fn generation_is_deterministic() {
    let spec = plan_append(DType::BF16, 8, 64);
    assert_eq!(kv_append::generate(&spec), kv_append::generate(&spec));
    for order in [PageOrder::HeadMajor, PageOrder::TokenMajor] {
        let spec = PageBoundsSpec {
            layout: PagedKv {
                order,
                ..layout(DType::F16, 8, 8, 64)
            },
        };
        assert_eq!(page_bounds::generate(&spec), page_bounds::generate(&spec));
    }
}

#[test]
fn bad_specs_are_rejected_with_the_field_named() {
    let good = layout(DType::F16, 8, 8, 128);
    let append = |layout| kv_append::generate(&KvAppendSpec::plan(layout)).unwrap_err();
    let error = append(PagedKv {
        dtype: DType::F32,
        ..good
    });
    assert_eq!(error.family, "kv_append");
    assert!(error.to_string().contains("dtype"), "{error}");
    let error = append(PagedKv {
        head_dim: 60,
        ..good
    });
    assert!(
        error
            .to_string()
            .contains("head_dim must be 32, 64 or 128, got 60"),
        "{error}"
    );
    let error = append(PagedKv {
        kv_heads: 0,
        ..good
    });
    assert!(error.to_string().contains("kv_heads"), "{error}");
    // Metadata only with token arrays and keys and values.
    for spec in [
        KvAppendSpec {
            metadata: true,
            ..KvAppendSpec::plan(good)
        },
        KvAppendSpec {
            metadata: true,
            caches: AppendedCaches::KeysAndValues,
            ..KvAppendSpec::plan(good)
        },
        KvAppendSpec {
            caches: AppendedCaches::Single,
            ..KvAppendSpec::pool(good)
        },
    ] {
        let error = kv_append::generate(&spec).unwrap_err();
        assert!(error.to_string().contains("metadata needs"), "{error}");
    }

    let error = page_bounds::generate(&PageBoundsSpec {
        layout: PagedKv {
            page_size: 12,
            ..layout(DType::F16, 32, 8, 128)
        },
    })
    .unwrap_err();
    assert_eq!(error.family, "quest_page_bounds");
    assert!(error.to_string().contains("page_size"), "{error}");
    let error = page_bounds::generate(&PageBoundsSpec {
        layout: layout(DType::F16, 32, 8, 16),
    })
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("head_dim must be 32, 64 or 128, got 16"),
        "{error}"
    );
}
