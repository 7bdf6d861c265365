//! `CpuAttention` against the reference interpreter (`kiln_ir::interp::eval` on
//! `Op::Attention { causal, .. }` and `Op::AttentionDecode` nodes): grouped-query heads
//! (q_heads = 4 · kv_heads and more), batches with unequal lengths, decode with one and several
//! new tokens, causal prefill with T = S and T > S and across query blocks, non-causal
//! prefill, head_dim 32 and 64, a planted key far larger than the others (peaked softmax).
//! Outputs are poisoned with NaN before each call, and decode caches hold NaN beyond each
//! sequence's length (never read). Sequential and Rayon (on a 4-thread pool) results are
//! bit-identical.
//!
//! Error measure: `|o − o_ref| / Σ_j p_j·|v_j|` per output element, the relative error with
//! respect to the magnitude of the terms (random signs make the output itself cancel); the
//! magnitude is the interpreter's own result on `|v|`. The plain `|o − o_ref| / max|o_ref|`
//! per (query, head) row is reported too.

use kiln_ir::dtype::DType;
use kiln_ir::graph::{Node, TensorType, ValueId};
use kiln_ir::interp::eval;
use kiln_ir::op::Op;
use kiln_ir::shape::{Bindings, Shape};
use kiln_ir::tensor::Tensor;
use kiln_runtime::cpu::{AttentionShape, CpuAttention, CpuError, CpuJit, Parallelism};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TOL: f64 = 1e-5;

fn attention() -> CpuAttention {
    CpuAttention::new(CpuJit::global().expect("host JIT")).expect("attention kernels")
}

/// The interpreter's result of `op` on `operands`.
fn interpret(op: Op, operands: &[&Tensor], out_shape: &[usize]) -> Tensor {
    let node = Node {
        op,
        inputs: (0..operands.len())
            .map(|node| ValueId { node, output: 0 })
            .collect(),
        outputs: vec![TensorType::new(DType::F32, Shape::of(out_shape))],
        label: "attention".to_string(),
        layer: None,
    };
    eval(&node, operands, &Bindings::new())
        .expect("interpreter")
        .remove(0)
}

fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

struct Case {
    shape: AttentionShape,
    /// `None`: prefill (causal flag); `Some`: decode lengths.
    lengths: Option<Vec<usize>>,
    causal: bool,
    planted: bool,
}

struct Errors {
    terms: f64,
    plain: f64,
}

/// Runs one case on both paths and both parallelisms; returns the worst errors.
fn run_case(case: &Case, rng: &mut ChaCha8Rng, attention: &CpuAttention) -> Errors {
    let s = case.shape;
    let (b, sq, t, hq, hkv, d) = (
        s.batch, s.queries, s.keys, s.q_heads, s.kv_heads, s.head_dim,
    );
    let group = hq / hkv;
    let q = random(rng, b * sq * hq * d);
    let mut k = random(rng, b * t * hkv * d);
    let mut v = random(rng, b * t * hkv * d);
    let scale = 1.0 / (d as f32).sqrt();
    let kv_row = |bb: usize, j: usize, kv: usize| ((bb * t + j) * hkv + kv) * d;
    // keys each sequence's first query sees
    let first_seen = |bb: usize| match &case.lengths {
        Some(lengths) => lengths[bb] + 1 - sq,
        None if case.causal => t + 1 - sq,
        None => t,
    };
    if case.planted {
        // One key per (sequence, KV head) aligned with the group's last queries: a score of
        // about 3·√d, far above the others, seen by every query.
        for bb in 0..b {
            let j = rng.random_range(0..first_seen(bb));
            for kv in 0..hkv {
                for dd in 0..d {
                    let sum: f32 = (kv * group..(kv + 1) * group)
                        .map(|h| q[((bb * sq + sq - 1) * hq + h) * d + dd])
                        .sum();
                    k[kv_row(bb, j, kv) + dd] = 3.0 * sum;
                }
            }
        }
    }
    if let Some(lengths) = &case.lengths {
        // cache rows beyond each length are garbage: never read
        for (bb, &length) in lengths.iter().enumerate() {
            for j in length..t {
                for kv in 0..hkv {
                    for dd in 0..d {
                        k[kv_row(bb, j, kv) + dd] = f32::NAN;
                        v[kv_row(bb, j, kv) + dd] = f32::NAN;
                    }
                }
            }
        }
    }
    let abs_v: Vec<f32> = v.iter().map(|x| x.abs()).collect();

    let q_shape = [b, sq, hq, d];
    let kv_shape = [b, t, hkv, d];
    let (qt, kt) = (
        Tensor::f32(&q_shape, q.clone()),
        Tensor::f32(&kv_shape, k.clone()),
    );
    let (vt, abs_vt) = (
        Tensor::f32(&kv_shape, v.clone()),
        Tensor::f32(&kv_shape, abs_v),
    );
    let (want, magnitude) = match &case.lengths {
        Some(lengths) => {
            let lengths: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
            let lt = Tensor::i32(&[b], &lengths);
            let op = Op::AttentionDecode { scale };
            (
                interpret(op.clone(), &[&qt, &kt, &vt, &lt], &q_shape),
                interpret(op, &[&qt, &kt, &abs_vt, &lt], &q_shape),
            )
        }
        None => {
            let op = Op::Attention {
                causal: case.causal,
                scale,
            };
            (
                interpret(op.clone(), &[&qt, &kt, &vt], &q_shape),
                interpret(op, &[&qt, &kt, &abs_vt], &q_shape),
            )
        }
    };

    let run = |parallelism: Parallelism| {
        let mut out = vec![f32::NAN; q.len()];
        match &case.lengths {
            Some(lengths) => {
                let lengths: Vec<f32> = lengths.iter().map(|&l| l as f32).collect();
                attention
                    .run_decode(&q, &k, &v, &lengths, s, scale, &mut out, parallelism)
                    .unwrap();
            }
            None => attention
                .run_prefill(&q, &k, &v, s, scale, case.causal, &mut out, parallelism)
                .unwrap(),
        }
        out
    };
    let got = run(Parallelism::Sequential);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    let threaded = pool.install(|| run(Parallelism::Rayon));
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&got),
        bits(&threaded),
        "threads changed the result {s:?}"
    );

    let mut errors = Errors {
        terms: 0.0,
        plain: 0.0,
    };
    for row in 0..b * sq * hq {
        let range = row * d..(row + 1) * d;
        let row_max = want.data[range.clone()]
            .iter()
            .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
        for e in range {
            let (o, w, m) = (
                f64::from(got[e]),
                f64::from(want.data[e]),
                f64::from(magnitude.data[e]),
            );
            assert!(
                o.is_finite() && w.is_finite(),
                "element {e}: {o} vs {w} {s:?}"
            );
            errors.terms = errors.terms.max((o - w).abs() / m);
            errors.plain = errors.plain.max((o - w).abs() / row_max);
        }
    }
    assert!(
        errors.terms <= TOL,
        "{s:?} lengths {:?} causal {}: relative error {:e}",
        case.lengths,
        case.causal,
        errors.terms
    );
    errors
}

fn report(name: &str, cases: &[Case]) {
    let attention = attention();
    let mut rng = ChaCha8Rng::seed_from_u64(name.len() as u64);
    let (mut terms, mut plain) = (0.0f64, 0.0f64);
    for case in cases {
        let e = run_case(case, &mut rng, &attention);
        terms = terms.max(e.terms);
        plain = plain.max(e.plain);
    }
    println!("{name}: worst relative error {terms:e} (terms), {plain:e} (row max)");
}

#[test]
fn decode_matches_the_interpreter() {
    let mut cases = Vec::new();
    for (d, planted) in [(32, true), (64, true), (64, false)] {
        // one new token, batch 2 with unequal lengths, GQA 4
        cases.push(Case {
            shape: AttentionShape::new(2, 1, 37, 8, 2, d),
            lengths: Some(vec![23, 9]),
            causal: false,
            planted,
        });
        // several new tokens; a full cache and a short one
        cases.push(Case {
            shape: AttentionShape::new(2, 3, 50, 8, 2, d),
            lengths: Some(vec![50, 17]),
            causal: false,
            planted,
        });
    }
    // lengths equal to the new tokens (the first query sees one key), GQA 8
    cases.push(Case {
        shape: AttentionShape::new(2, 5, 12, 8, 1, 32),
        lengths: Some(vec![5, 12]),
        causal: false,
        planted: false,
    });
    // more queries than one scores block
    cases.push(Case {
        shape: AttentionShape::new(1, 70, 100, 4, 1, 32),
        lengths: Some(vec![91]),
        causal: false,
        planted: true,
    });
    report("decode", &cases);
}

#[test]
fn causal_prefill_matches_the_interpreter() {
    let mut cases = Vec::new();
    for d in [32, 64] {
        cases.push(Case {
            shape: AttentionShape::new(2, 45, 45, 4, 1, d),
            lengths: None,
            causal: true,
            planted: true,
        });
        cases.push(Case {
            shape: AttentionShape::new(2, 7, 20, 8, 2, d),
            lengths: None,
            causal: true,
            planted: d == 32,
        });
    }
    // across query blocks
    cases.push(Case {
        shape: AttentionShape::new(1, 130, 130, 4, 2, 64),
        lengths: None,
        causal: true,
        planted: true,
    });
    // one head per KV head, d not a multiple of the vector width
    cases.push(Case {
        shape: AttentionShape::new(2, 6, 6, 2, 2, 7),
        lengths: None,
        causal: true,
        planted: false,
    });
    report("causal prefill", &cases);
}

#[test]
fn non_causal_prefill_matches_the_interpreter() {
    let cases = [
        Case {
            shape: AttentionShape::new(2, 5, 9, 8, 2, 32),
            lengths: None,
            causal: false,
            planted: true,
        },
        Case {
            shape: AttentionShape::new(1, 9, 3, 4, 4, 64),
            lengths: None,
            causal: false,
            planted: false,
        },
    ];
    report("non-causal prefill", &cases);
}

#[test]
fn operand_errors_name_the_operand() {
    let attention = attention();
    let operand = |e: CpuError| match e {
        CpuError::Operand { operand, .. } => operand,
        other => panic!("{other:?}"),
    };
    let shape = AttentionShape::new(2, 2, 8, 4, 2, 4);
    let q = vec![0.0f32; 2 * 2 * 4 * 4];
    let kv = vec![0.0f32; 2 * 8 * 2 * 4];
    let mut out = vec![0.0f32; q.len()];
    let seq = Parallelism::Sequential;
    let decode = |lengths: &[f32], shape, out: &mut [f32]| {
        attention.run_decode(&q, &kv, &kv, lengths, shape, 1.0, out, seq)
    };
    assert!(decode(&[8.0, 2.0], shape, &mut out).is_ok());
    // a length beyond the capacity, below the new tokens, not an integer, NaN
    for bad in [9.0, 1.0, 3.5, f32::NAN] {
        let e = decode(&[8.0, bad], shape, &mut out).unwrap_err();
        assert_eq!(operand(e), "lengths", "{bad}");
    }
    assert_eq!(
        operand(decode(&[8.0], shape, &mut out).unwrap_err()),
        "lengths"
    );
    // heads that do not divide
    let e = decode(&[8.0, 2.0], AttentionShape::new(2, 2, 8, 4, 3, 4), &mut out).unwrap_err();
    assert_eq!(operand(e), "kv_heads");
    let e = decode(&[8.0, 2.0], AttentionShape::new(2, 2, 8, 4, 0, 4), &mut out).unwrap_err();
    assert_eq!(operand(e), "kv_heads");
    // slice lengths
    let e = decode(&[8.0, 2.0], shape, &mut out[1..]).unwrap_err();
    assert_eq!(operand(e), "out");
    let e = attention
        .run_decode(&q[1..], &kv, &kv, &[8.0, 2.0], shape, 1.0, &mut out, seq)
        .unwrap_err();
    assert_eq!(operand(e), "q");
    let e = attention
        .run_decode(&q, &kv[1..], &kv, &[8.0, 2.0], shape, 1.0, &mut out, seq)
        .unwrap_err();
    assert_eq!(operand(e), "k");
    let e = attention
        .run_prefill(&q, &kv, &kv[1..], shape, 1.0, true, &mut out, seq)
        .unwrap_err();
    assert_eq!(operand(e), "v");
    // causal attention with fewer keys than queries
    let short = AttentionShape::new(2, 2, 1, 4, 2, 4);
    let kv_short = vec![0.0f32; 2 * 2 * 4];
    let e = attention
        .run_prefill(&q, &kv_short, &kv_short, short, 1.0, true, &mut out, seq)
        .unwrap_err();
    assert_eq!(operand(e), "k");
}
