//! CPU acceptance tests of Quest page selection (issue 5): the page score is a sound bound,
//! selecting every page is dense decode attention, planted needles keep the attention mass at a
//! 1/16 budget, dense fallback and the current page, and option validation.
//!
//! Attention outputs and masses are computed with `ir::interp` (`AttentionDecode`); the mass of
//! a selection is the output of `AttentionDecode` with a value whose first channel is 1 on the
//! selected tokens and 0 elsewhere, i.e. exactly Σ_{selected j} softmax_j.

// Index loops mirror the math (token j, head kv, element e) like the interpreter does.
#![allow(clippy::needless_range_loop)]

use kiln_ir::dtype::DType;
use kiln_ir::graph::Graph;
use kiln_ir::interp;
use kiln_ir::op::{InputKind, Op};
use kiln_ir::quest::{
    group_scores, page_count, page_score, page_score_midpoint, select, select_pages, sparse_decode,
    PageMeta, QuestError, QuestOptions, Selection,
};
use kiln_ir::shape::Shape;
use kiln_ir::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Runs an `AttentionDecode` graph in the interpreter: q `[B, 1, Hq, D]`, k, v `[B, C, Hkv, D]`.
fn interp_decode(q: &Tensor, k: &Tensor, v: &Tensor, lengths: &[usize], scale: f32) -> Tensor {
    let mut g = Graph::new("decode");
    let act = |g: &mut Graph, name: &str, dtype, dims: &[usize]| {
        g.input(name, InputKind::Activation, dtype, Shape::of(dims))
            .unwrap()
    };
    let qv = act(&mut g, "q", DType::F32, &q.shape);
    let kv = act(&mut g, "k", DType::F32, &k.shape);
    let vv = act(&mut g, "v", DType::F32, &v.shape);
    let lv = act(&mut g, "len", DType::I32, &[lengths.len()]);
    let y = g
        .add1("decode", Op::AttentionDecode { scale }, &[qv, kv, vv, lv])
        .unwrap();
    g.output("y", y);
    g.verify().unwrap();
    let lens: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
    let inputs: HashMap<String, Tensor> = [
        ("q", q.clone()),
        ("k", k.clone()),
        ("v", v.clone()),
        ("len", Tensor::i32(&[lengths.len()], &lens)),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect();
    interp::run(&g, &inputs).unwrap().remove("y").unwrap()
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for (&x, &y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

// ---------------------------------------------------------------------------------------------
// (1) The page score bounds q·k of every key of the page.
// ---------------------------------------------------------------------------------------------

#[test]
fn quest_page_score_bounds_every_key() {
    let mut checked = 0usize;
    for seed in 0..200u64 {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let page_size = [1, 4, 16, 32][seed as usize % 4];
        let head_dim = [8, 64, 128][seed as usize % 3];
        let kv_heads = 1 + seed as usize % 3;
        let group = [1, 2, 4][seed as usize % 3];
        // Not a multiple of the page size in most seeds: the last page is partial.
        let length = r.random_range(1..=5 * page_size + page_size / 2 + 1);
        let spread = [0.01f32, 1.0, 100.0][seed as usize % 3];
        let keys = Tensor::normal(DType::F32, &[length, kv_heads, head_dim], spread, &mut r);
        // Rows past `length` must not count: poison them.
        let mut data = keys.data.clone();
        data.extend(std::iter::repeat_n(1e30f32, 3 * kv_heads * head_dim));
        let meta = PageMeta::from_keys(&data, length, kv_heads, head_dim, page_size).unwrap();
        assert_eq!(meta.pages, page_count(length, page_size));
        let q = Tensor::normal(DType::F32, &[kv_heads * group, head_dim], 1.0, &mut r);
        for kv in 0..kv_heads {
            let queries = &q.data[kv * group * head_dim..(kv + 1) * group * head_dim];
            let group_score = group_scores(&meta, kv, queries);
            for page in 0..meta.pages {
                let (hi, lo) = meta.bounds(page, kv);
                let tokens = page * page_size..((page + 1) * page_size).min(length);
                let mut group_max = f64::NEG_INFINITY;
                let mut tolerance = 0.0f64;
                for j in tokens {
                    let key = &data[(j * kv_heads + kv) * head_dim..][..head_dim];
                    let mut group_dot = 0.0f64;
                    for qh in queries.chunks_exact(head_dim) {
                        let score = page_score(qh, hi, lo);
                        // Exact: same order, f32, monotone rounding.
                        assert!(
                            dot_f32(qh, key) <= score,
                            "seed {seed}: page {page} token {j}: q·k {} > score {score}",
                            dot_f32(qh, key)
                        );
                        // Against the exact product, up to f32 accumulation error.
                        let magnitude: f64 = qh
                            .iter()
                            .zip(hi.iter().zip(lo))
                            .map(|(&x, (&a, &b))| (x as f64).abs() * (a.abs().max(b.abs())) as f64)
                            .sum();
                        let tol = 1e-5 * magnitude;
                        tolerance += tol;
                        assert!(dot_f64(qh, key) <= score as f64 + tol);
                        let mid = page_score_midpoint(qh, hi, lo);
                        assert!(
                            ((mid - score) as f64).abs() <= tol,
                            "seed {seed}: midpoint form {mid} vs {score}"
                        );
                        group_dot += dot_f64(qh, key);
                        checked += 1;
                    }
                    group_max = group_max.max(group_dot);
                }
                // The group score (sum over the group's query heads) bounds the group's summed
                // logit for every key of the page.
                assert!(group_max <= group_score[page] as f64 + tolerance);
            }
        }
    }
    assert!(
        checked > 30_000,
        "only {checked} (query, key) pairs checked"
    );
}

// ---------------------------------------------------------------------------------------------
// (2) Selecting every page is dense attention.
// ---------------------------------------------------------------------------------------------

#[test]
fn quest_all_pages_reproduce_dense_decode() {
    let configs = [
        // (seed, head_dim, kv_heads, group, page_size, lengths)
        (1u64, 64, 2, 1, 16, vec![1, 16, 17]),
        (2, 128, 2, 4, 16, vec![200, 37, 129]),
        (3, 128, 1, 8, 16, vec![300, 301, 15]),
        (4, 64, 4, 4, 4, vec![33, 64, 7]),
        (5, 128, 8, 1, 32, vec![250, 1, 96]),
    ];
    for (seed, d, hkv, group, page_size, lengths) in configs {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let (b, hq) = (lengths.len(), hkv * group);
        let c = lengths.iter().max().unwrap() + 5;
        let q = Tensor::normal(DType::F32, &[b, 1, hq, d], 1.0, &mut r);
        let mut k = Tensor::normal(DType::F32, &[b, c, hkv, d], 1.0, &mut r);
        let mut v = Tensor::normal(DType::F32, &[b, c, hkv, d], 1.0, &mut r);
        for (batch, &l) in lengths.iter().enumerate() {
            let row = hkv * d;
            k.data[(batch * c + l) * row..(batch + 1) * c * row].fill(1e30);
            v.data[(batch * c + l) * row..(batch + 1) * c * row].fill(f32::NAN);
        }
        let scale = 1.0 / (d as f32).sqrt();
        let dense = interp_decode(&q, &k, &v, &lengths, scale);

        let all = Selection::all(&lengths, hkv, page_size);
        let y = sparse_decode(&q, &k, &v, &lengths, scale, &all).unwrap();
        let err = y.relative_error(&dense);
        assert!(err <= 1e-5, "seed {seed}: all pages vs dense: {err}");

        // The Quest selection falls back to dense when every sequence fits the budget.
        let max_pages = lengths.iter().map(|&l| page_count(l, page_size)).max();
        let options = QuestOptions {
            budget_tokens: (max_pages.unwrap().max(2)) * page_size,
            page_size,
            skip_layers: 2,
        };
        let chosen = select(&q, &k, &lengths, &options).unwrap();
        assert_eq!(chosen, all, "seed {seed}: dense fallback");
        let y = sparse_decode(&q, &k, &v, &lengths, scale, &chosen).unwrap();
        assert!(y.relative_error(&dense) <= 1e-5);
    }
}

// ---------------------------------------------------------------------------------------------
// (3) Planted needles, an attention sink and a recency bias: a 1/16 budget keeps ≥ 90% of the
// attention mass.
// ---------------------------------------------------------------------------------------------

struct NeedleCase {
    q: Tensor,
    k: Tensor,
    lengths: Vec<usize>,
    /// Per sequence, per KV head: the token positions of the needles.
    needles: Vec<Vec<Vec<usize>>>,
}

/// Synthetic decode data. Query heads of a group share a direction (correlation 0.5) as real
/// GQA groups do. Keys: background N(0, 0.3²) (logit std ≈ 0.3 after the 1/√D scale); an
/// attention sink at position 0 along the group's mean query (logit ≥ 12 for every head); `n_needles` needles
/// per KV head at random depths, each `k = α·q_h + noise` for a random query head `h` of the
/// group (logit ≈ 12 for that head, ≈ 6 for the others); a recency bias along the group's mean
/// query over the last 64 tokens, rising linearly to logit ≈ 4 at the current token.
fn needle_case(
    seed: u64,
    lengths: &[usize],
    hkv: usize,
    group: usize,
    d: usize,
    n_needles: usize,
) -> NeedleCase {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    let (b, hq) = (lengths.len(), hkv * group);
    let c = *lengths.iter().max().unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let rho = 0.5f32;
    let sigma = 0.3f32;
    let mut q = Tensor::zeros(DType::F32, &[b, 1, hq, d]);
    let mut k = Tensor::normal(DType::F32, &[b, c, hkv, d], sigma, &mut r);
    let mut needles = vec![vec![Vec::new(); hkv]; b];
    let gauss = |r: &mut ChaCha8Rng| Tensor::normal(DType::F32, &[d], 1.0, r).data;
    for (batch, &length) in lengths.iter().enumerate() {
        for kv in 0..hkv {
            let shared = gauss(&mut r);
            let mut mean = vec![0.0f32; d];
            for g in 0..group {
                let own = gauss(&mut r);
                let base = (batch * hq + kv * group + g) * d;
                for e in 0..d {
                    let x = rho.sqrt() * shared[e] + (1.0 - rho).sqrt() * own[e];
                    q.data[base + e] = x;
                    mean[e] += x / group as f32;
                }
            }
            let qh = |g: usize| {
                let base = (batch * hq + kv * group + g) * d;
                q.data[base..base + d].to_vec()
            };
            // Smallest logit per unit of `mean` over the group's heads, so that every head of
            // the group sees the sink at logit ≥ 12.
            let unit: f32 = (0..group)
                .map(|g| scale * dot_f32(&qh(g), &mean))
                .fold(f32::INFINITY, f32::min);
            let key = |j: usize| ((batch * c + j) * hkv + kv) * d;
            let add = |k: &mut Tensor, j: usize, dir: &[f32], coeff: f32| {
                for e in 0..d {
                    k.data[key(j) + e] += coeff * dir[e];
                }
            };
            add(&mut k, 0, &mean, 12.0 / unit);
            let window = 64.min(length);
            for dist in 0..window {
                let bias = 4.0 * (1.0 - dist as f32 / window as f32);
                add(&mut k, length - 1 - dist, &mean, bias / unit);
            }
            let alpha = 12.0 / (d as f32).sqrt();
            for _ in 0..n_needles {
                let j = r.random_range(16..length - window);
                let owner = r.random_range(0..group);
                add(&mut k, j, &qh(owner), alpha);
                needles[batch][kv].push(j);
            }
        }
    }
    NeedleCase {
        q,
        k,
        lengths: lengths.to_vec(),
        needles,
    }
}

/// Attention mass of the selected tokens, per (sequence, query head), through the interpreter.
fn selected_mass(case: &NeedleCase, selection: &Selection, scale: f32) -> Vec<f64> {
    let (b, c, hkv, d) = (
        case.k.shape[0],
        case.k.shape[1],
        case.k.shape[2],
        case.k.shape[3],
    );
    let mut v = Tensor::zeros(DType::F32, &case.k.shape);
    for batch in 0..b {
        for kv in 0..hkv {
            for &page in &selection.pages[batch][kv] {
                let first = page * selection.page_size;
                let last = ((page + 1) * selection.page_size).min(case.lengths[batch]);
                for j in first..last {
                    v.data[((batch * c + j) * hkv + kv) * d] = 1.0;
                }
            }
        }
    }
    let y = interp_decode(&case.q, &case.k, &v, &case.lengths, scale);
    y.data.chunks_exact(d).map(|row| row[0] as f64).collect()
}

#[test]
fn quest_needles_keep_attention_mass_at_one_sixteenth_budget() {
    let (d, hq) = (128, 8);
    let scale = 1.0 / (d as f32).sqrt();
    let mut worst = 1.0f64;
    let mut report = Vec::new();
    for (ci, &context) in [1024usize, 2048, 4096, 8192].iter().enumerate() {
        for (gi, &group) in [1usize, 4, 8].iter().enumerate() {
            let hkv = hq / group;
            let options = QuestOptions {
                budget_tokens: context / 16,
                page_size: 16,
                skip_layers: 2,
            };
            options.validate().unwrap();
            let n_needles = (options.budget_pages() / 4).max(1);
            // Two sequences: the full context and one whose last page is partial.
            let lengths = [context, context - 5];
            let seed = 1000 + 10 * ci as u64 + gi as u64;
            let case = needle_case(seed, &lengths, hkv, group, d, n_needles);
            let selection = select(&case.q, &case.k, &case.lengths, &options).unwrap();
            for (batch, &length) in lengths.iter().enumerate() {
                let pages = page_count(length, 16);
                for kv in 0..hkv {
                    let chosen = &selection.pages[batch][kv];
                    assert_eq!(chosen.len(), options.budget_pages());
                    assert_eq!(*chosen.last().unwrap(), pages - 1, "current page");
                    for &j in &case.needles[batch][kv] {
                        assert!(chosen.contains(&(j / 16)), "needle at {j} missed");
                    }
                    assert!(chosen.contains(&0), "sink page missed");
                }
            }
            let mass = selected_mass(&case, &selection, scale);
            let min = mass.iter().cloned().fold(f64::INFINITY, f64::min);
            let mean = mass.iter().sum::<f64>() / mass.len() as f64;
            // The dense selection has mass 1 (sanity of the mass computation).
            let all = Selection::all(&case.lengths, hkv, 16);
            let full = selected_mass(&case, &all, scale);
            assert!(full.iter().all(|m| (m - 1.0).abs() < 1e-6));
            report.push(format!(
                "context {context:5} group {group}: budget {} tokens, {n_needles} needles/KV head, \
                 mass min {min:.4} mean {mean:.4}",
                options.budget_tokens
            ));
            worst = worst.min(min);
        }
    }
    for line in &report {
        println!("{line}");
    }
    assert!(
        worst >= 0.9,
        "worst attention mass {worst}:\n{}",
        report.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// (4) Dense fallback, and the current page is always selected.
// ---------------------------------------------------------------------------------------------

#[test]
fn quest_dense_fallback_and_current_page() {
    // Pages ≤ budget: everything, whatever the scores.
    assert_eq!(select_pages(&[0.0; 4], 4), vec![0, 1, 2, 3]);
    assert_eq!(select_pages(&[-1.0, 3.0], 8), vec![0, 1]);
    assert_eq!(select_pages(&[], 4), Vec::<usize>::new());
    // One page over: the lowest-scoring early page drops; the current page stays even with the
    // lowest score of all.
    assert_eq!(
        select_pages(&[3.0, 1.0, 2.0, 4.0, -100.0], 4),
        vec![0, 2, 3, 4]
    );
    // Ties go to the lower page index.
    assert_eq!(select_pages(&[1.0; 9], 3), vec![0, 1, 8]);

    // Through `select`: the current (partial) page's keys point away from the query.
    let (d, hkv, group, page_size) = (64, 2, 4, 16);
    let mut r = ChaCha8Rng::seed_from_u64(77);
    let options = QuestOptions {
        budget_tokens: 4 * page_size,
        page_size,
        skip_layers: 0,
    };
    for length in [4 * page_size, 4 * page_size + 1, 10 * page_size + 3] {
        let q = Tensor::normal(DType::F32, &[1, 1, hkv * group, d], 1.0, &mut r);
        let mut k = Tensor::normal(DType::F32, &[1, length, hkv, d], 1.0, &mut r);
        let last = page_count(length, page_size) - 1;
        for j in last * page_size..length {
            for kv in 0..hkv {
                for e in 0..d {
                    let qe: f32 = (0..group).map(|g| q.data[(kv * group + g) * d + e]).sum();
                    k.data[(j * hkv + kv) * d + e] = -10.0 * qe.signum();
                }
            }
        }
        let selection = select(&q, &k, &[length], &options).unwrap();
        for kv in 0..hkv {
            let chosen = &selection.pages[0][kv];
            if last < options.budget_pages() {
                assert_eq!(*chosen, (0..=last).collect::<Vec<_>>(), "dense fallback");
            } else {
                assert_eq!(chosen.len(), options.budget_pages());
                assert_eq!(*chosen.last().unwrap(), last, "current page");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (5) Option validation.
// ---------------------------------------------------------------------------------------------

#[test]
fn quest_option_validation_names_the_field() {
    QuestOptions::default().validate().unwrap();
    let base = QuestOptions::default();
    let cases = [
        (
            QuestOptions {
                page_size: 0,
                ..base
            },
            "page_size",
        ),
        (
            QuestOptions {
                page_size: 24,
                budget_tokens: 48,
                ..base
            },
            "page_size",
        ),
        (
            QuestOptions {
                page_size: 512,
                budget_tokens: 1024,
                ..base
            },
            "page_size",
        ),
        (
            QuestOptions {
                budget_tokens: 2050,
                ..base
            },
            "budget_tokens",
        ),
        (
            QuestOptions {
                budget_tokens: 16,
                ..base
            },
            "budget_tokens",
        ),
        (
            QuestOptions {
                budget_tokens: 0,
                ..base
            },
            "budget_tokens",
        ),
    ];
    for (options, field) in cases {
        let err = options.validate().unwrap_err();
        match &err {
            QuestError::Option { field: f, .. } => assert_eq!(*f, field, "{options:?}"),
            other => panic!("{options:?}: unexpected {other:?}"),
        }
        assert!(err.to_string().contains(field), "{err}");
        // `select` refuses bad options too.
        let q = Tensor::zeros(DType::F32, &[1, 1, 1, 4]);
        let k = Tensor::zeros(DType::F32, &[1, 8, 1, 4]);
        assert_eq!(select(&q, &k, &[8], &options).unwrap_err(), err);
    }
    // Shape errors.
    let q = Tensor::zeros(DType::F32, &[1, 2, 1, 4]);
    let k = Tensor::zeros(DType::F32, &[1, 8, 1, 4]);
    let err = select(&q, &k, &[8], &base).unwrap_err();
    assert!(err.to_string().contains("decode only"), "{err}");
    let q = Tensor::zeros(DType::F32, &[1, 1, 1, 4]);
    let err = select(&q, &k, &[9], &base).unwrap_err();
    assert!(err.to_string().contains("length 9"), "{err}");
}
