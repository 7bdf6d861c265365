//! The causal prefill attention generator (`kiln_kernels::attention::prefill`): PTX
//! snapshots at representative specs, ptxas assembly for sm_80 and sm_90 with zero spills
//! for every dtype, head_dim, tile and a spread of GQA groups and page sizes, the declared
//! parameters and launch rule, determinism and spec errors. Numerics run on a GPU (root
//! `tests/gpu_attention_prefill.rs`).
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without it.

mod common;

use kiln_codegen::kernel::{Access, ParamKind};
use kiln_ir::dtype::DType;
use kiln_kernels::attention::prefill::{generate, PrefillAttentionSpec, PrefillTile};
use kiln_kernels::attention::PagedKv;

use common::layout;

/// Llama-3-8B (f16, 32 q heads, 8 KV heads, d 128) with the default tile, the same in bf16
/// with the wide tile, a d-64 multi-head layout (no GQA) with page size 64, and the
/// tiny-llama preset's attention (f16, 8 q heads, 2 KV heads, d 32).
fn snapshot_specs() -> Vec<(&'static str, PrefillAttentionSpec)> {
    vec![
        (
            "prefill_f16_q32_kv8_d128",
            PrefillAttentionSpec::new(layout(DType::F16, 32, 8, 128)),
        ),
        (
            "prefill_bf16_q32_kv8_d128_wide",
            PrefillAttentionSpec {
                tile: PrefillTile::wide(),
                ..PrefillAttentionSpec::new(layout(DType::BF16, 32, 8, 128))
            },
        ),
        (
            "prefill_f16_q16_kv16_d64_p64",
            PrefillAttentionSpec::new(PagedKv {
                page_size: 64,
                ..layout(DType::F16, 16, 16, 64)
            }),
        ),
        (
            "prefill_f16_q8_kv2_d32",
            PrefillAttentionSpec::new(layout(DType::F16, 8, 2, 32)),
        ),
    ]
}

#[test]
fn prefill_ptx_snapshots() {
    for (name, spec) in snapshot_specs() {
        let kernel = generate(&spec).unwrap();
        insta::assert_snapshot!(name, kernel.ptx);
    }
}

/// The stock tiles, two blocks per SM at 64 × 64, then every (block_q, block_kv) with
/// registers uncapped.
fn all_tiles(head_dim: usize) -> Vec<PrefillTile> {
    let mut tiles = vec![
        PrefillTile::h100(head_dim),
        PrefillTile::wide(),
        PrefillTile {
            block_q: 64,
            block_kv: 64,
            min_blocks_per_sm: 2,
        },
    ];
    for block_q in [64, 128] {
        for block_kv in [32, 64, 128] {
            tiles.push(PrefillTile {
                block_q,
                block_kv,
                min_blocks_per_sm: 1,
            });
        }
    }
    tiles
}

#[test]
fn every_dtype_head_dim_and_tile_assembles_without_spills() {
    for dtype in [DType::F16, DType::BF16] {
        for head_dim in [32, 64, 128] {
            for tile in all_tiles(head_dim) {
                let spec = PrefillAttentionSpec {
                    layout: layout(dtype, 32, 8, head_dim),
                    tile,
                };
                if head_dim == 32 && tile.block_q == 128 && tile.block_kv == 32 {
                    // 256 threads copy 64 rows of 64 bytes per pass: more than the tile.
                    let error = generate(&spec).unwrap_err();
                    assert!(error.message.contains("block_kv = 32"), "{error}");
                    continue;
                }
                let kernel = generate(&spec).unwrap();
                assert_eq!(kernel.target, "sm_80");
                for arch in ["sm_80", "sm_90"] {
                    let report = common::assemble_cleanly(&kernel, arch);
                    assert_eq!(report.barriers, 1, "{}", kernel.entry);
                    if tile == PrefillTile::h100(head_dim) {
                        assert!(report.registers <= 168, "{}", kernel.entry);
                    }
                }
            }
        }
    }
}

#[test]
fn gqa_groups_and_page_sizes_assemble() {
    for head_dim in [32, 128] {
        for (q_heads, kv_heads, page_size) in [(8, 8, 1), (32, 8, 16), (64, 8, 256), (28, 4, 32)] {
            let spec = PrefillAttentionSpec::new(PagedKv {
                page_size,
                ..layout(DType::BF16, q_heads, kv_heads, head_dim)
            });
            let kernel = generate(&spec).unwrap();
            common::assemble_cleanly(&kernel, "sm_90");
        }
    }
}

#[test]
fn the_kernel_declares_its_parameters_and_launch_rule() {
    let spec = PrefillAttentionSpec::new(layout(DType::F16, 32, 8, 128));
    let kernel = generate(&spec).unwrap();
    let names: Vec<&str> = kernel.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "q",
            "k_pages",
            "v_pages",
            "page_table",
            "seq_lens",
            "q_lens",
            "out",
            "batch",
            "max_q",
            "max_pages",
            "scale"
        ]
    );
    assert_eq!(
        kernel.param("out").map(|(_, p)| p.kind),
        Some(ParamKind::Pointer(Access::Write))
    );
    assert_eq!(
        kernel.param("scale").map(|(_, p)| p.kind),
        Some(ParamKind::F32)
    );
    let scalars = std::collections::BTreeMap::from([
        ("batch".to_string(), 3u64),
        ("max_q".to_string(), 1000u64),
        ("max_pages".to_string(), 70u64),
    ]);
    let (grid, block) = kernel.launch.evaluate(&scalars).unwrap();
    assert_eq!(grid, [32, 3, 1000u32.div_ceil(64)]);
    assert_eq!(block, [128, 1, 1]);
    assert_eq!(kernel.launch.shared_bytes as usize, spec.shared_bytes());
    assert_eq!(spec.tile, PrefillTile::h100(128));
    assert_eq!(spec.shared_bytes(), 32 * 1024);
    for needle in [
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
        "cp.async.cg.shared.global",
        "ex2.approx.f32",
        "shfl.sync.bfly.b32",
    ] {
        assert!(kernel.ptx.contains(needle), "missing {needle}");
    }
    let bf16 = generate(&PrefillAttentionSpec::new(layout(DType::BF16, 32, 8, 64))).unwrap();
    assert!(bf16
        .ptx
        .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    assert!(bf16.ptx.contains("cvt.rn.bf16x2.f32"));
}

/// The main loop: one barrier per KV tile, and per tile (d 128, 64 keys) 32 `ldmatrix` of K
/// and 64 `mma` for S, 32 `ldmatrix.trans` of V and 64 `mma` for O; 8 copy passes of K and
/// of V (128 threads move 8 rows of 256 bytes per pass). At d 32: 2 k-steps × 4 key pairs =
/// 8 `ldmatrix` of K and 16 `mma` for S, 2 d pairs × 4 key steps = 8 `ldmatrix.trans` and
/// 16 `mma` for O, 2 copy passes (32 rows of 64 bytes each).
#[test]
fn the_main_loop_has_one_barrier_and_the_expected_tensor_core_work() {
    for (head_dim, k_loads, mmas, copies) in [(128, 32, 128, 8), (32, 8, 32, 2)] {
        main_loop_work(head_dim, k_loads, mmas, copies);
    }
}

fn main_loop_work(head_dim: usize, k_loads: usize, mmas: usize, copies: usize) {
    let spec = PrefillAttentionSpec {
        tile: PrefillTile {
            block_q: 64,
            block_kv: 64,
            min_blocks_per_sm: 2,
        },
        ..PrefillAttentionSpec::new(layout(DType::F16, 32, 8, head_dim))
    };
    let kernel = generate(&spec).unwrap();
    let loop_head = kernel
        .ptx
        .lines()
        .find(|l| l.starts_with("$L_for_"))
        .expect("a main loop")
        .trim_end_matches(':')
        .to_string();
    let body = kernel
        .ptx
        .split(&format!("{loop_head}:"))
        .nth(1)
        .and_then(|rest| rest.split(&format!("{loop_head}_end:")).next())
        .unwrap();
    assert_eq!(body.matches("bar.sync").count(), 1);
    assert_eq!(body.matches("cp.async.wait_group 0").count(), 1);
    assert_eq!(
        body.matches("ldmatrix.sync.aligned.m8n8.x4.shared").count(),
        k_loads
    );
    assert_eq!(body.matches(".trans.shared").count(), k_loads);
    assert_eq!(body.matches("mma.sync").count(), mmas);
    assert_eq!(body.matches("cp.async.cg").count(), 2 * copies);
}

#[test]
fn generating_twice_gives_identical_kernels() {
    for dtype in [DType::F16, DType::BF16] {
        let spec = PrefillAttentionSpec::new(layout(dtype, 32, 8, 128));
        assert_eq!(generate(&spec).unwrap(), generate(&spec).unwrap());
    }
}

#[test]
fn invalid_specs_are_rejected_with_a_reason() {
    let base = PrefillAttentionSpec::new(layout(DType::F16, 32, 8, 128));
    let cases: Vec<(PrefillAttentionSpec, &str)> = vec![
        (
            PrefillAttentionSpec {
                layout: layout(DType::F32, 32, 8, 128),
                ..base
            },
            "dtype",
        ),
        (
            PrefillAttentionSpec {
                layout: layout(DType::F16, 32, 8, 96),
                ..base
            },
            "head_dim",
        ),
        (
            PrefillAttentionSpec {
                layout: layout(DType::F16, 32, 8, 16),
                ..base
            },
            "head_dim must be 32, 64 or 128, got 16",
        ),
        (
            PrefillAttentionSpec {
                layout: layout(DType::F16, 30, 8, 128),
                ..base
            },
            "q_heads",
        ),
        (
            PrefillAttentionSpec {
                tile: PrefillTile {
                    block_q: 96,
                    ..base.tile
                },
                ..base
            },
            "block_q",
        ),
        (
            PrefillAttentionSpec {
                tile: PrefillTile {
                    block_kv: 48,
                    ..base.tile
                },
                ..base
            },
            "block_kv",
        ),
        (
            PrefillAttentionSpec {
                tile: PrefillTile {
                    block_kv: 256,
                    ..base.tile
                },
                ..base
            },
            "block_kv",
        ),
        (
            PrefillAttentionSpec {
                tile: PrefillTile {
                    min_blocks_per_sm: 0,
                    ..base.tile
                },
                ..base
            },
            "min_blocks_per_sm",
        ),
    ];
    for (spec, needle) in cases {
        let error = generate(&spec).unwrap_err();
        assert_eq!(error.family, "prefill_attention");
        assert!(
            error.message.contains(needle),
            "{spec:?}: `{}` does not mention `{needle}`",
            error.message
        );
    }
}
