//! JIT RoPE kernels against the reference interpreter's `Op::Rope` (`kiln_ir::interp::eval` on
//! a one-node graph), on fresh random activations of varied magnitudes, positions up to 4096
//! (duplicates and 0 included), theta 10⁴ and 5·10⁵, head sizes whose half is 4·k + 3 (the
//! scalar tail) and common ones, one token and many, outputs poisoned with NaN. The f64
//! rotation must be bit-identical to the interpreter; the f32 rotation within a few ulps of
//! each pair's magnitude. Also: tables reused across tensors with different head counts,
//! Sequential and Rayon (several pool sizes) bit-identical, operand errors.

use kiln_codegen::cpu::{ElemType, RopeSpec};
use kiln_ir::dtype::DType;
use kiln_ir::graph::{Node, TensorType};
use kiln_ir::interp;
use kiln_ir::op::Op;
use kiln_ir::shape::{Bindings, Shape};
use kiln_ir::tensor::Tensor;
use kiln_runtime::cpu::{CpuError, CpuJit, Parallelism, RopeKernel};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn jit() -> &'static CpuJit {
    CpuJit::global().expect("host JIT")
}

/// The interpreter's `Op::Rope { theta }` of `x [1, tokens, heads, head_dim]`.
fn interpret(x: &[f32], positions: &[i32], heads: usize, head_dim: usize, theta: f32) -> Vec<f32> {
    let tokens = positions.len();
    let node = Node {
        op: Op::Rope { theta },
        inputs: Vec::new(),
        outputs: vec![TensorType::new(DType::F32, Shape::default())],
        label: "test".to_string(),
        layer: None,
    };
    let x = Tensor::new(DType::F32, &[1, tokens, heads, head_dim], x.to_vec()).unwrap();
    let positions = Tensor::new(
        DType::I32,
        &[1, tokens],
        positions.iter().map(|&p| p as f32).collect(),
    )
    .unwrap();
    let mut out = interp::eval(&node, &[&x, &positions], &Bindings::new()).expect("interpreter");
    out.remove(0).data
}

/// Values whose magnitudes vary per head over `10^[-3, 3]`.
fn activations(rng: &mut ChaCha8Rng, tokens: usize, heads: usize, head_dim: usize) -> Vec<f32> {
    let mut data = Vec::with_capacity(tokens * heads * head_dim);
    for _ in 0..tokens * heads {
        let scale = 10f64.powf(rng.random_range(-3.0..3.0));
        for _ in 0..head_dim {
            data.push((scale * rng.random_range(-1.0..1.0)) as f32);
        }
    }
    data
}

/// Positions in `0..=4096`, the first token at 0 and the last at 4096 when there are several,
/// with duplicates (as in a batch of sequences).
fn positions(rng: &mut ChaCha8Rng, tokens: usize) -> Vec<i32> {
    (0..tokens)
        .map(|t| match t {
            0 => 0,
            _ if t == tokens - 1 => 4096,
            _ if t % 5 == 0 => 7,
            _ => rng.random_range(0..=4096),
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Largest relative error of `got` against `want`, per element (`|g − w| / |w|`) and per
/// pair (`|g − w| / (|x₁| + |x₂|)` with the pair's inputs).
fn errors(got: &[f32], want: &[f32], x: &[f32], head_dim: usize) -> (f64, f64) {
    let half = head_dim / 2;
    let (mut element, mut pair) = (0.0f64, 0.0f64);
    for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
        if g == w {
            continue;
        }
        let d = (f64::from(g) - f64::from(w)).abs();
        element = element.max(d / f64::from(w).abs().max(f64::MIN_POSITIVE));
        let (head, i) = (e - e % head_dim, e % head_dim % half);
        let magnitude = f64::from(x[head + i].abs()) + f64::from(x[head + i + half].abs());
        pair = pair.max(d / magnitude.max(f64::MIN_POSITIVE));
    }
    (element, pair)
}

const HEAD_DIMS: [usize; 8] = [2, 4, 6, 8, 14, 22, 64, 128];

/// Runs `rope` on fresh activations and positions (the output poisoned first) and returns
/// `(x, kernel output, interpreter output)`.
fn run_both(
    rope: &RopeKernel,
    rng: &mut ChaCha8Rng,
    [tokens, heads, head_dim]: [usize; 3],
    theta: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let x = activations(rng, tokens, heads, head_dim);
    let p = positions(rng, tokens);
    let mut out = vec![f32::NAN; x.len()];
    rope.run(
        &x,
        &p,
        &mut out,
        heads,
        head_dim,
        f64::from(theta),
        Parallelism::Rayon,
    )
    .unwrap();
    let want = interpret(&x, &p, heads, head_dim, theta);
    (x, out, want)
}

#[test]
fn f64_rotation_is_bit_identical_to_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for unroll in [1, 2, 3, 8] {
        let rope = jit().rope(RopeSpec::new().with_unroll(unroll)).unwrap();
        for theta in [10_000.0f32, 500_000.0] {
            for head_dim in HEAD_DIMS {
                for (tokens, heads) in [(1, 1), (1, 8), (5, 3), (33, 4)] {
                    let (_, out, want) =
                        run_both(&rope, &mut rng, [tokens, heads, head_dim], theta);
                    assert_eq!(
                        bits(&out),
                        bits(&want),
                        "unroll {unroll} theta {theta} head_dim {head_dim} tokens {tokens} heads {heads}"
                    );
                }
            }
        }
    }
}

#[test]
fn f32_rotation_is_within_a_few_ulps_of_each_pair() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let (mut element, mut pair) = (0.0f64, 0.0f64);
    for unroll in [1, 2, 4] {
        let rope = jit()
            .rope(
                RopeSpec::new()
                    .with_rotation(ElemType::F32)
                    .with_unroll(unroll),
            )
            .unwrap();
        for theta in [10_000.0f32, 500_000.0] {
            for head_dim in HEAD_DIMS {
                let (x, out, want) = run_both(&rope, &mut rng, [17, 5, head_dim], theta);
                let (e, q) = errors(&out, &want, &x, head_dim);
                assert!(
                    q <= 1e-6,
                    "theta {theta} head_dim {head_dim}: pair error {q:e}"
                );
                element = element.max(e);
                pair = pair.max(q);
            }
        }
    }
    eprintln!(
        "rope f32 rotation: largest error relative to the pair {pair:e}, per element {element:e} \
         (large where x₁·cos and x₂·sin cancel)"
    );
}

#[test]
fn many_tokens_split_into_tasks_match_the_interpreter() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    let rope = jit().rope(RopeSpec::new()).unwrap();
    // 512 elements per token → 32 tokens per task: 10 tasks, the last one short
    let (tokens, heads, head_dim) = (300, 4, 128);
    assert!(tokens * heads * head_dim > 2 * RopeKernel::CHUNK);
    let (_, out, want) = run_both(&rope, &mut rng, [tokens, heads, head_dim], 500_000.0);
    assert_eq!(bits(&out), bits(&want));
}

#[test]
fn tables_serve_queries_and_keys_with_different_head_counts() {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let rope = jit().rope(RopeSpec::new()).unwrap();
    let (tokens, head_dim, theta) = (9, 64, 500_000.0f32);
    let p = positions(&mut rng, tokens);
    let tables = rope
        .tables(&p, head_dim, f64::from(theta), Parallelism::Rayon)
        .unwrap();
    assert_eq!((tables.tokens(), tables.head_dim()), (tokens, head_dim));
    assert_eq!(tables.rotation(), ElemType::F64);
    // the stored angle of the last token's last pair, by the interpreter's formula
    let frequency = f64::from(theta).powf(-2.0 * 31.0 / 64.0);
    let (sin, cos) = (4096.0 * frequency).sin_cos();
    assert_eq!(tables.angle(tokens - 1, 31), (cos, sin));
    for heads in [8, 2] {
        let x = activations(&mut rng, tokens, heads, head_dim);
        let mut out = vec![f32::NAN; x.len()];
        rope.run_with_tables(&x, &tables, &mut out, heads, Parallelism::Rayon)
            .unwrap();
        assert_eq!(bits(&out), bits(&interpret(&x, &p, heads, head_dim, theta)));
    }
}

#[test]
fn results_do_not_depend_on_the_parallelism() {
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    let (tokens, heads, head_dim) = (211, 6, 22);
    let x = activations(&mut rng, tokens, heads, head_dim);
    let p = positions(&mut rng, tokens);
    for rotation in [ElemType::F32, ElemType::F64] {
        let rope = jit().rope(RopeSpec::new().with_rotation(rotation)).unwrap();
        let run = |parallelism| {
            let mut out = vec![f32::NAN; x.len()];
            rope.run(&x, &p, &mut out, heads, head_dim, 10_000.0, parallelism)
                .unwrap();
            bits(&out)
        };
        let sequential = run(Parallelism::Sequential);
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            assert_eq!(
                pool.install(|| run(Parallelism::Rayon)),
                sequential,
                "{rotation:?}, {threads} threads"
            );
        }
    }
}

#[test]
fn operand_mismatches_are_errors_naming_the_operand_and_write_nothing() {
    let rope = jit().rope(RopeSpec::new()).unwrap();
    let rope32 = jit()
        .rope(RopeSpec::new().with_rotation(ElemType::F32))
        .unwrap();
    let (tokens, heads, head_dim) = (3, 2, 8);
    let x = vec![1.0f32; tokens * heads * head_dim];
    let p = vec![1, 2, 3];
    let mut out = vec![f32::NAN; x.len()];
    let par = Parallelism::Rayon;
    let message = |r: Result<(), CpuError>| r.unwrap_err().to_string();

    let m = message(rope.run(&x[1..], &p, &mut out, heads, head_dim, 1e4, par));
    assert!(m.contains("`x`") && m.contains("length 47"), "{m}");
    let m = message(rope.run(&x, &p[1..], &mut out, heads, head_dim, 1e4, par));
    assert!(m.contains("`x`") && m.contains("2 tokens"), "{m}");
    let m = message(rope.run(&x, &p, &mut out[1..], heads, head_dim, 1e4, par));
    assert!(m.contains("`out`"), "{m}");
    let m = message(rope.run(&x, &p, &mut out, heads + 1, head_dim, 1e4, par));
    assert!(m.contains("`x`"), "{m}");
    let m = message(rope.run(&x[..42], &p, &mut out[..42], heads, 7, 1e4, par));
    assert!(m.contains("`head_dim`"), "{m}");
    for theta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let m = message(rope.run(&x, &p, &mut out, heads, head_dim, theta, par));
        assert!(m.contains("`theta`"), "{m}");
    }
    let tables = rope32.tables(&p, head_dim, 1e4, par).unwrap();
    let m = message(rope.run_with_tables(&x, &tables, &mut out, heads, par));
    assert!(m.contains("`tables`") && m.contains("F32"), "{m}");
    let tables = rope.tables(&p[..2], head_dim, 1e4, par).unwrap();
    let m = message(rope.run_with_tables(&x, &tables, &mut out, heads, par));
    assert!(m.contains("`x`"), "{m}");
    assert!(out.iter().all(|v| v.is_nan()), "an error wrote");
    // no tokens or no heads: nothing to do
    rope.run(&[], &[], &mut [], heads, head_dim, 1e4, par)
        .unwrap();
    rope.run(&[], &p, &mut [], 0, head_dim, 1e4, par).unwrap();
}
