//! GPU numerics of the grouped expert FFN (`kiln_kernels::moe::expert_ffn`): the gate-up
//! stage into a poisoned `activated` workspace, then the down stage into a poisoned `y`,
//! compared with `kiln_ir::interp` of a one-op `Op::MoeExpertFfn` graph within the half
//! tolerance of the dense GEMV tests (1e-2 relative); NaN anywhere fails. Every case runs
//! both kernels of the spec (`ExpertFfnKernel::Gemv` and, where `H` and `I` are multiples
//! of 64, `ExpertFfnKernel::GroupedGemm`, each into fresh poisoned buffers) against the same
//! reference; the grouped GEMM has its own sweep too (9, 200 and 1000 tokens, sizes that
//! are multiples of 64 with a partial block of down's output columns).
//!
//! The dispatch (`order`, `offsets`) comes from `kiln_ir::movement::dispatch` on random
//! expert choices with planted structure: one expert no token chooses (its blocks must exit
//! without writing), one expert that is most tokens' first choice (a long run of slots per
//! block), and distinct experts per token as a router gives. Cases: f16 and bf16; E = 8,
//! k = 2 and E = 16, k = 4; 1, 3 and 200 tokens; hidden and intermediate sizes on the vector
//! path (multiples of 8, with partial 256-element chunks and partial blocks of rows), on the
//! scalar path (odd) and mixed. Weights are small (outputs of order 1) so bf16 sums stay
//! sane. Fresh inputs per run (seed printed; `KILN_TEST_SEED` reproduces it).
//!
//! Run on a GPU machine with `cargo test --test gpu_moe_expert_ffn -- --ignored`.

mod common;

use common::{assert_close, device, fresh_seed, input, random, reference, rng, tolerance};
use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::op::Op;
use kiln::ir::tensor::Tensor;
use kiln_kernels::moe::expert_ffn::{
    self, expert_param, ExpertFfnKernel, ExpertFfnStage, MoeExpertFfnSpec,
};
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const DTYPES: [DType; 2] = [DType::F16, DType::BF16];
/// (experts, top_k).
const ROUTINGS: [(usize, usize); 2] = [(8, 2), (16, 4)];
const TOKENS: [usize; 3] = [1, 3, 200];
/// (hidden, intermediate): vector path in both stages (one chunk; several chunks with a
/// partial one), scalar path in both, and each stage on a different path.
const SIZES: [(usize, usize); 5] = [(256, 128), (1024, 520), (100, 37), (64, 37), (100, 40)];
/// Token counts of the grouped-GEMM sweep: under one 64-row block per expert, several
/// blocks, many blocks (prefill).
const GEMM_TOKENS: [usize; 3] = [9, 200, 1000];
/// (hidden, intermediate) of the grouped-GEMM sweep, multiples of 64: the tiny preset's
/// (128, 256), (256, 128), and H = 320, which leaves down a partial 128-column block.
const GEMM_SIZES: [(usize, usize); 3] = [(128, 256), (256, 128), (320, 192)];

/// One expert's weights: `gate [I, H]`, `up [I, H]`, `down [H, I]`.
struct Expert {
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The problem of one case.
struct Case {
    spec: MoeExpertFfnSpec,
    tokens: usize,
    x: Tensor,
    order: Tensor,
    offsets: Tensor,
    experts: Vec<Expert>,
}

/// `tokens × k` distinct expert choices: expert `experts − 1` is never chosen, expert 0 is
/// three quarters of the tokens' first choice, the rest uniform over the allowed experts.
fn choices(tokens: usize, experts: usize, k: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let empty = experts - 1;
    let mut chosen = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::with_capacity(k);
        if rng.random_range(0..4) != 0 {
            row.push(0);
        }
        while row.len() < k {
            let e = rng.random_range(0..empty as i32);
            if !row.contains(&e) {
                row.push(e);
            }
        }
        chosen.extend(row);
    }
    Tensor::i32(&[tokens, k], &chosen)
}

fn case(
    dtype: DType,
    (experts, top_k): (usize, usize),
    tokens: usize,
    (hidden, intermediate): (usize, usize),
    rng: &mut ChaCha8Rng,
) -> Case {
    let chosen = choices(tokens, experts, top_k, rng);
    let (order, offsets) = kiln::ir::movement::dispatch(&chosen, experts).unwrap();
    let to_i32 = |v: &[f32]| v.iter().map(|&f| f as i32).collect::<Vec<i32>>();
    let offsets = Tensor::i32(&[experts + 1], &to_i32(&offsets));
    assert_eq!(
        offsets.data[experts - 1],
        offsets.data[experts],
        "the planted empty expert"
    );
    let order = Tensor::i32(&[tokens, top_k], &to_i32(&order));
    let x = random(dtype, &[tokens, hidden], 1.0, rng);
    let in_std = 1.0 / (hidden as f32).sqrt();
    let out_std = 1.0 / (intermediate as f32).sqrt();
    let experts_weights = (0..experts)
        .map(|_| Expert {
            gate: random(dtype, &[intermediate, hidden], in_std, rng),
            up: random(dtype, &[intermediate, hidden], in_std, rng),
            down: random(dtype, &[hidden, intermediate], out_std, rng),
        })
        .collect();
    Case {
        spec: MoeExpertFfnSpec {
            dtype,
            experts,
            hidden,
            intermediate,
            top_k,
            stage: ExpertFfnStage::GateUp,
            kernel: ExpertFfnKernel::Gemv,
        },
        tokens,
        x,
        order,
        offsets,
        experts: experts_weights,
    }
}

/// The interpreter's `y [tokens, k, H]` for the case.
fn interp_reference(case: &Case) -> Tensor {
    let mut g = Graph::new("moe_expert_ffn");
    let mut named: Vec<(String, &Tensor)> = vec![
        ("x".into(), &case.x),
        ("order".into(), &case.order),
        ("offsets".into(), &case.offsets),
    ];
    for (e, expert) in case.experts.iter().enumerate() {
        named.push((expert_param("gate", e), &expert.gate));
        named.push((expert_param("up", e), &expert.up));
        named.push((expert_param("down", e), &expert.down));
    }
    let operands: Vec<_> = named.iter().map(|(n, t)| input(&mut g, n, t)).collect();
    let y = g
        .add1(
            "experts",
            Op::MoeExpertFfn {
                num_experts: case.spec.experts,
            },
            &operands,
        )
        .unwrap();
    g.output("out", y);
    let inputs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    reference(&g, &inputs)
}

/// Launches gate-up then down of `kernel` on the device; returns `y` and the `activated`
/// workspace.
fn run_kernels(device: &CudaDevice, case: &Case, kernel: ExpertFfnKernel) -> (Tensor, Tensor) {
    let spec = MoeExpertFfnSpec {
        kernel,
        ..case.spec
    };
    let slots = case.tokens * spec.top_k;
    let upload = |t: &Tensor| DeviceTensor::upload(device, t).unwrap();
    let x = upload(&case.x);
    let order = upload(&case.order);
    let offsets = upload(&case.offsets);
    let weights: Vec<[DeviceTensor; 3]> = case
        .experts
        .iter()
        .map(|e| [upload(&e.gate), upload(&e.up), upload(&e.down)])
        .collect();
    let activated =
        DeviceTensor::poisoned(device, spec.dtype, &[slots, spec.intermediate]).unwrap();
    assert_eq!(
        activated.len() * 2,
        expert_ffn::workspace_bytes(&spec, slots)
    );
    let y = DeviceTensor::poisoned(device, spec.dtype, &[case.tokens, spec.top_k, spec.hidden])
        .unwrap();

    let gate_up = expert_ffn::generate(&spec).unwrap();
    let mut args = Args::new()
        .buffer("x", x.arg())
        .buffer("order", order.arg())
        .buffer("offsets", offsets.arg())
        .buffer("activated", activated.arg())
        .u32("slots", slots as u32);
    for (e, [gate, up, _]) in weights.iter().enumerate() {
        args = args
            .buffer(&expert_param("gate", e), gate.arg())
            .buffer(&expert_param("up", e), up.arg());
    }
    device
        .load(&gate_up)
        .and_then(|loaded| loaded.launch(&args))
        .unwrap_or_else(|e| panic!("{}: {e}", gate_up.entry));

    let down_spec = MoeExpertFfnSpec {
        stage: ExpertFfnStage::Down,
        ..spec
    };
    let down = expert_ffn::generate(&down_spec).unwrap();
    let mut args = Args::new()
        .buffer("activated", activated.arg())
        .buffer("offsets", offsets.arg())
        .buffer("y", y.arg())
        .u32("slots", slots as u32);
    for (e, [_, _, weight]) in weights.iter().enumerate() {
        args = args.buffer(&expert_param("down", e), weight.arg());
    }
    device
        .load(&down)
        .and_then(|loaded| loaded.launch(&args))
        .unwrap_or_else(|e| panic!("{}: {e}", down.entry));
    device.synchronize().unwrap();
    (y.download().unwrap(), activated.download().unwrap())
}

/// The kernels a case runs: the GEMV always, the grouped GEMM where its spec is valid.
fn kernels(spec: &MoeExpertFfnSpec) -> Vec<ExpertFfnKernel> {
    let grouped = MoeExpertFfnSpec {
        kernel: ExpertFfnKernel::GroupedGemm,
        ..*spec
    };
    let mut kernels = vec![ExpertFfnKernel::Gemv];
    if grouped.validate().is_ok()
        && (MoeExpertFfnSpec {
            stage: ExpertFfnStage::Down,
            ..grouped
        })
        .validate()
        .is_ok()
    {
        kernels.push(ExpertFfnKernel::GroupedGemm);
    }
    kernels
}

fn check(device: &CudaDevice, case: &Case) {
    check_kernels(device, case, &kernels(&case.spec));
}

fn check_kernels(device: &CudaDevice, case: &Case, kernels: &[ExpertFfnKernel]) {
    let expected = interp_reference(case);
    for &kernel in kernels {
        let (y, activated) = run_kernels(device, case, kernel);
        let spec = MoeExpertFfnSpec {
            kernel,
            ..case.spec
        };
        let what = format!("{} tokens={}", spec.entry(), case.tokens);
        if let Some(i) = activated.data.iter().position(|v| !v.is_finite()) {
            panic!("{what}: activated element {i} is {}", activated.data[i]);
        }
        assert_close(&what, &y, &expected, tolerance(case.spec.dtype));
    }
}

fn sweep(dtype: DType, test: &str) {
    let device = device();
    let mut rng = rng(fresh_seed(test));
    for routing in ROUTINGS {
        for sizes in SIZES {
            for tokens in TOKENS {
                check(&device, &case(dtype, routing, tokens, sizes, &mut rng));
            }
        }
    }
}

/// The grouped GEMM at prefill-like token counts (each case also runs the GEMV).
fn gemm_sweep(dtype: DType, test: &str) {
    let device = device();
    let mut rng = rng(fresh_seed(test));
    for routing in ROUTINGS {
        for sizes in GEMM_SIZES {
            for tokens in GEMM_TOKENS {
                let case = case(dtype, routing, tokens, sizes, &mut rng);
                assert!(kernels(&case.spec).contains(&ExpertFfnKernel::GroupedGemm));
                check(&device, &case);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn grouped_gemm_f16_matches_interp() {
    gemm_sweep(DTYPES[0], "moe_grouped_gemm_f16");
}

#[test]
#[ignore = "needs a CUDA device"]
fn grouped_gemm_bf16_matches_interp() {
    gemm_sweep(DTYPES[1], "moe_grouped_gemm_bf16");
}

#[test]
#[ignore = "needs a CUDA device"]
fn expert_ffn_f16_matches_interp() {
    sweep(DTYPES[0], "moe_expert_ffn_f16");
}

#[test]
#[ignore = "needs a CUDA device"]
fn expert_ffn_bf16_matches_interp() {
    sweep(DTYPES[1], "moe_expert_ffn_bf16");
}

/// Every slot goes to one expert (all others empty, expert 0's blocks included): 200 and
/// 1000 tokens × k = 2 in one run of all slots through expert 4, in slot order; both
/// kernels (the sizes are multiples of 64).
#[test]
#[ignore = "needs a CUDA device"]
fn one_expert_takes_every_slot() {
    let device = device();
    let mut rng = rng(fresh_seed("moe_expert_ffn_one_expert"));
    for dtype in DTYPES {
        for tokens in [200usize, 1000] {
            let slots = 2 * tokens as i32;
            let mut case = case(dtype, (8, 2), tokens, (256, 128), &mut rng);
            let identity: Vec<i32> = (0..slots).collect();
            case.order = Tensor::i32(&[tokens, 2], &identity);
            case.offsets = Tensor::i32(&[9], &[0, 0, 0, 0, 0, slots, slots, slots, slots]);
            assert!(kernels(&case.spec).contains(&ExpertFfnKernel::GroupedGemm));
            check(&device, &case);
        }
    }
}
