//! The tensor-core GEMM generator: PTX snapshots at representative specs, ptxas assembly
//! for sm_80 and sm_90 with zero spills, determinism and spec errors. Numerics run on a GPU
//! (root `tests/gpu_gemm.rs`).
//!
//! ptxas must be installed (`bash scripts/test.sh`); these tests fail, never skip, without it.

mod common;

use kiln_codegen::kernel::{Access, ParamKind};
use kiln_ir::dtype::DType;
use kiln_kernels::gemm::{generate, GemmSpec, GemmTile, Pipeline};
use kiln_kernels::Epilogue;

const EPILOGUES: [Epilogue; 4] = [
    Epilogue::None,
    Epilogue::Bias,
    Epilogue::Residual,
    Epilogue::SwiGlu,
];

/// The snapshotted specs: Llama-3-8B shapes (K = 4096) plain f16, Mixtral's SwiGLU up/gate
/// in bf16 (K = 4096), the bias and residual epilogues, and the small-M tile.
fn snapshot_specs() -> Vec<(&'static str, GemmSpec)> {
    vec![
        (
            "gemm_f16_plain_k4096",
            GemmSpec::new(DType::F16, 4096, Epilogue::None),
        ),
        (
            "gemm_bf16_swiglu_k4096",
            GemmSpec::new(DType::BF16, 4096, Epilogue::SwiGlu),
        ),
        (
            "gemm_f16_bias_k4096",
            GemmSpec::new(DType::F16, 4096, Epilogue::Bias),
        ),
        (
            "gemm_bf16_residual_k14336_small",
            GemmSpec {
                tile: GemmTile::small(Epilogue::Residual),
                ..GemmSpec::new(DType::BF16, 14336, Epilogue::Residual)
            },
        ),
    ]
}

#[test]
fn gemm_ptx_snapshots() {
    for (name, spec) in snapshot_specs() {
        let kernel = generate(&spec).unwrap();
        insta::assert_snapshot!(name, kernel.ptx);
    }
}

#[test]
fn every_dtype_epilogue_and_tile_assembles_without_spills() {
    for dtype in [DType::F16, DType::BF16] {
        for epilogue in EPILOGUES {
            let basic = GemmTile {
                pipeline: Pipeline::Basic,
                ..GemmTile::h100(epilogue)
            };
            for tile in [GemmTile::h100(epilogue), GemmTile::small(epilogue), basic] {
                let spec = GemmSpec {
                    tile,
                    ..GemmSpec::new(dtype, 4096, epilogue)
                };
                let kernel = generate(&spec).unwrap();
                assert_eq!(kernel.target, "sm_80");
                for arch in ["sm_80", "sm_90"] {
                    let report = common::assemble_cleanly(&kernel, arch);
                    assert_eq!(report.barriers, 1, "{}", kernel.entry);
                }
            }
        }
    }
}

#[test]
fn other_tiles_assemble_without_spills() {
    let tiles = [
        // 128×128, 8 warps of 64×32, two blocks per SM.
        GemmTile {
            block_m: 128,
            block_n: 128,
            block_k: 32,
            warps_m: 2,
            warps_n: 4,
            stages: 4,
            min_blocks_per_sm: 2,
            pipeline: Pipeline::Fragments,
        },
        // 128×128, 4 warps of 64×64, two blocks per SM.
        GemmTile {
            block_m: 128,
            block_n: 128,
            block_k: 32,
            warps_m: 2,
            warps_n: 2,
            stages: 4,
            min_blocks_per_sm: 2,
            pipeline: Pipeline::Fragments,
        },
        // 128×256 with 32-wide K slices, 4 stages.
        GemmTile {
            block_k: 32,
            stages: 4,
            ..GemmTile::h100(Epilogue::None)
        },
        // 128×128 with 64-wide K slices, 3 stages, two blocks per SM.
        GemmTile {
            block_m: 128,
            block_n: 128,
            block_k: 64,
            warps_m: 2,
            warps_n: 2,
            stages: 3,
            min_blocks_per_sm: 2,
            pipeline: Pipeline::Fragments,
        },
        // 256×128, 8 warps of 64×64.
        GemmTile {
            block_m: 256,
            block_n: 128,
            warps_m: 4,
            warps_n: 2,
            ..GemmTile::h100(Epilogue::None)
        },
        // Two stages (the shallowest ring the pipelined loop supports).
        GemmTile {
            stages: 2,
            ..GemmTile::h100(Epilogue::None)
        },
    ];
    for tile in tiles {
        let spec = GemmSpec {
            tile,
            ..GemmSpec::new(DType::F16, 4096, Epilogue::None)
        };
        let kernel = generate(&spec).unwrap();
        for arch in ["sm_80", "sm_90"] {
            common::assemble_cleanly(&kernel, arch);
        }
    }
}

#[test]
fn the_kernel_declares_its_parameters_and_launch_rule() {
    for epilogue in EPILOGUES {
        let spec = GemmSpec::new(DType::F16, 4096, epilogue);
        let kernel = generate(&spec).unwrap();
        let names: Vec<&str> = kernel.params.iter().map(|p| p.name.as_str()).collect();
        let mut expected = vec!["x", "weight"];
        expected.extend(epilogue.extra_param());
        expected.extend(["out", "m", "n"]);
        assert_eq!(names, expected, "{epilogue:?}");
        assert_eq!(
            kernel.param("out").map(|(_, p)| p.kind),
            Some(ParamKind::Pointer(Access::Write))
        );
        assert_eq!(kernel.param("m").map(|(_, p)| p.kind), Some(ParamKind::U32));
        let scalars = std::collections::BTreeMap::from([
            ("m".to_string(), 300u64),
            ("n".to_string(), 14336u64),
        ]);
        let (grid, block) = kernel.launch.evaluate(&scalars).unwrap();
        let tile = spec.tile;
        let grid = grid.map(|v| v as usize);
        assert_eq!(
            grid,
            [300usize.div_ceil(tile.block_m), 14336 / tile.block_n, 1]
        );
        assert_eq!(block, [tile.threads() as u32, 1, 1]);
        assert_eq!(kernel.launch.shared_bytes as usize, spec.shared_bytes());
        assert!(kernel.launch.shared_bytes > 48 * 1024);
        assert!(kernel.ptx.contains("mma.sync.aligned.m16n8k16"));
        assert!(kernel
            .ptx
            .contains("ldmatrix.sync.aligned.m8n8.x4.shared.b16"));
        assert!(kernel.ptx.contains("cp.async.cg.shared.global"));
    }
    assert_eq!(
        GemmSpec::for_rows(DType::F16, 256, 4096, Epilogue::SwiGlu).tile,
        GemmTile::small(Epilogue::SwiGlu)
    );
    assert_eq!(
        GemmSpec::for_rows(DType::F16, 4096, 4096, Epilogue::None).tile,
        GemmTile::h100(Epilogue::None)
    );
    let bf16 = generate(&GemmSpec::new(DType::BF16, 4096, Epilogue::None)).unwrap();
    assert!(bf16
        .ptx
        .contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    assert!(bf16.ptx.contains("cvt.rn.bf16x2.f32"));
}

/// The pipelined main loop: one barrier per slice, placed after the fragments of the slice's
/// second-to-last step and before the `ldmatrix` of the next slice's first; the refill is
/// predicated (no branch inside the loop) and no copy zero-fills through an address.
/// `Pipeline::Basic` keeps the first version's loop under its own entry name.
#[test]
fn the_pipelined_loop_has_one_barrier_per_slice_and_no_refill_branch() {
    let spec = GemmSpec::new(DType::F16, 4096, Epilogue::None);
    let kernel = generate(&spec).unwrap();
    let body = kernel
        .ptx
        .split("$L_for_0:")
        .nth(1)
        .and_then(|rest| rest.split("$L_for_0_end:").next())
        .unwrap();
    assert_eq!(body.matches("bar.sync").count(), 1);
    assert_eq!(
        body.matches("bra ").count(),
        2,
        "loop test and back edge only"
    );
    let barrier = body.find("bar.sync").unwrap();
    let before = &body[..barrier];
    let after = &body[barrier..];
    assert_eq!(before.matches("ldmatrix").count(), 3 * 8);
    assert_eq!(after.matches("ldmatrix").count(), 8);
    assert_eq!(before.matches("mma.sync").count(), 3 * 32);
    assert_eq!(after.matches("mma.sync").count(), 32);
    assert!(!kernel.ptx.contains("], 16, "), "no source-size zero fill");

    let basic = GemmSpec {
        tile: GemmTile {
            pipeline: Pipeline::Basic,
            ..spec.tile
        },
        ..spec
    };
    let basic = generate(&basic).unwrap();
    assert_eq!(basic.entry, format!("{}_basic", kernel.entry));
    assert!(
        basic.ptx.contains("], 16, %r"),
        "Basic zero-fills through the source size"
    );
    assert_ne!(basic.ptx, kernel.ptx);
}

#[test]
fn generating_twice_gives_identical_kernels() {
    for dtype in [DType::F16, DType::BF16] {
        for epilogue in EPILOGUES {
            let spec = GemmSpec::new(dtype, 4096, epilogue);
            assert_eq!(generate(&spec).unwrap(), generate(&spec).unwrap());
        }
    }
}

#[test]
fn invalid_specs_are_rejected_with_a_reason() {
    let base = GemmSpec::new(DType::F16, 4096, Epilogue::None);
    let cases: Vec<(GemmSpec, &str)> = vec![
        (
            GemmSpec {
                dtype: DType::F32,
                ..base
            },
            "dtype",
        ),
        (GemmSpec { k: 4000, ..base }, "multiple of block_k"),
        (GemmSpec { k: 0, ..base }, "multiple of block_k"),
        (
            GemmSpec {
                tile: GemmTile {
                    block_k: 48,
                    ..base.tile
                },
                ..base
            },
            "block_k",
        ),
        (
            GemmSpec {
                tile: GemmTile {
                    block_m: 100,
                    ..base.tile
                },
                ..base
            },
            "block_m",
        ),
        (
            GemmSpec {
                tile: GemmTile {
                    block_n: 200,
                    ..base.tile
                },
                ..base
            },
            "block_n",
        ),
        (
            GemmSpec {
                tile: GemmTile {
                    stages: 1,
                    ..base.tile
                },
                ..base
            },
            "stages",
        ),
        (
            GemmSpec {
                tile: GemmTile {
                    warps_m: 3,
                    warps_n: 1,
                    ..base.tile
                },
                ..base
            },
            "warps",
        ),
        (
            GemmSpec {
                tile: GemmTile {
                    stages: 5,
                    ..base.tile
                },
                ..base
            },
            "shared memory",
        ),
        (
            GemmSpec {
                tile: GemmTile {
                    warps_m: 1,
                    warps_n: 2,
                    ..base.tile
                },
                ..base
            },
            "accumulators",
        ),
    ];
    for (spec, needle) in cases {
        let error = generate(&spec).unwrap_err();
        assert_eq!(error.family, "gemm");
        assert!(
            error.message.contains(needle),
            "{spec:?}: `{}` does not mention `{needle}`",
            error.message
        );
    }
}
