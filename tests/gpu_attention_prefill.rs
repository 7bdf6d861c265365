//! GPU tests of causal prefill attention over the paged KV cache
//! (`kiln_kernels::attention::prefill`) against `kiln_ir::interp`'s `Op::AttentionDecode`,
//! run per sequence on the pages gathered into a contiguous cache.
//!
//! Every problem draws fresh random inputs (seed printed; `KILN_TEST_SEED` reproduces) and
//! scatters its pages over a shuffled physical order with spare pages between them. Slots
//! past a sequence's length, spare pages, page-table entries past a sequence's pages (-1)
//! and query rows past `q_lens[b]` hold NaN, so reading any of them shows; outputs are
//! poisoned, and rows past `q_lens[b]` must stay poisoned. Planted structure: some queries
//! get a visible key aligned with them (a peaked softmax, so a key read from the wrong page,
//! slot or head shows in that row). Batches mix unequal lengths that are not multiples of
//! the page size or the tiles, chunked prefill (`q_lens < seq_lens`) and an empty sequence;
//! GQA groups 1, 2, 4 and 8; f16 and bf16; head_dim 32, 64 and 128; every stock tile the
//! layout allows (at head_dim 32 not 128 queries × 32 keys: one copy pass covers 64 rows).
//! Relative error ≤ 1e-2 per sequence and ≤ 2e-2 per (query, head) row.
//!
//! Run on a GPU machine with
//! `cargo test --release --test gpu_attention_prefill -- --ignored --nocapture`
//! (the reference is a plain f64 loop: use `--release`).

mod common;

use common::{assert_close, device, fresh_seed, random, rng, tolerance};
use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::interp;
use kiln::ir::op::{InputKind, Op};
use kiln::ir::shape::Shape;
use kiln::ir::tensor::Tensor;
use kiln_kernels::attention::paged::PageOrder;
use kiln_kernels::attention::prefill::{generate, PrefillAttentionSpec, PrefillTile};
use kiln_kernels::attention::PagedKv;
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor, LoadedKernel};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// One batch of sequences in the paged layout, on the host.
struct Problem {
    layout: PagedKv,
    /// `(q_len, seq_len)` per sequence.
    lens: Vec<(usize, usize)>,
    max_q: usize,
    max_pages: usize,
    /// `[batch, max_q, q_heads, head_dim]`; rows past `q_len` are NaN.
    q: Tensor,
    /// `[num_pages, kv_heads, page_size, head_dim]`; slots no sequence owns are NaN.
    k_pages: Tensor,
    v_pages: Tensor,
    /// `[batch, max_pages]`; entries past a sequence's pages are -1.
    page_table: Vec<i32>,
    scale: f32,
}

impl Problem {
    /// Fresh random inputs for `lens` (each `q_len ≤ seq_len`), with the planted keys.
    fn random(layout: PagedKv, lens: &[(usize, usize)], rng: &mut ChaCha8Rng) -> Problem {
        let PagedKv {
            dtype,
            q_heads,
            kv_heads,
            head_dim: d,
            page_size,
            ..
        } = layout;
        let batch = lens.len();
        let max_q = lens.iter().map(|l| l.0).max().unwrap_or(0).max(1) + 3;
        let pages_of = |len: usize| len.div_ceil(page_size);
        let max_pages = lens.iter().map(|l| pages_of(l.1)).max().unwrap_or(0).max(1);
        let used: usize = lens.iter().map(|l| pages_of(l.1)).sum();
        let num_pages = used + 3;

        // Shuffled physical pages: sequence b's logical page j is physical[next].
        let mut physical: Vec<usize> = (0..num_pages).collect();
        for i in (1..num_pages).rev() {
            let j = rng.random_range(0..=i);
            physical.swap(i, j);
        }
        let mut page_table = vec![-1i32; batch * max_pages];
        let mut next = 0;
        for (b, &(_, seq_len)) in lens.iter().enumerate() {
            for j in 0..pages_of(seq_len) {
                page_table[b * max_pages + j] = physical[next] as i32;
                next += 1;
            }
        }

        let page_shape = [num_pages, kv_heads, page_size, d];
        let mut k_pages = Tensor {
            data: vec![f32::NAN; page_shape.iter().product()],
            dtype,
            shape: page_shape.to_vec(),
        };
        let mut v_pages = k_pages.clone();
        let mut q = random(dtype, &[batch, max_q, q_heads, d], 1.0, rng);
        for (b, &(q_len, seq_len)) in lens.iter().enumerate() {
            let keys = random(dtype, &[seq_len, kv_heads, d], 1.0, rng);
            let values = random(dtype, &[seq_len, kv_heads, d], 1.0, rng);
            for t in 0..seq_len {
                for g in 0..kv_heads {
                    let page = page_table[b * max_pages + t / page_size] as usize;
                    let at = ((page * kv_heads + g) * page_size + t % page_size) * d;
                    let from = (t * kv_heads + g) * d;
                    k_pages.data[at..at + d].copy_from_slice(&keys.data[from..from + d]);
                    v_pages.data[at..at + d].copy_from_slice(&values.data[from..from + d]);
                }
            }
            let rows = q_heads * d;
            let start = (b * max_q + q_len) * rows;
            q.data[start..(b + 1) * max_q * rows].fill(f32::NAN);
        }
        let mut problem = Problem {
            layout,
            lens: lens.to_vec(),
            max_q,
            max_pages,
            q,
            k_pages,
            v_pages,
            page_table,
            scale: 1.0 / (d as f32).sqrt(),
        };
        problem.plant_aligned_keys(rng);
        problem
    }

    /// Physical element offset of token `t`, KV head `g` of sequence `b`.
    fn kv_offset(&self, b: usize, t: usize, g: usize) -> usize {
        let l = &self.layout;
        let page = self.page_table[b * self.max_pages + t / l.page_size] as usize;
        ((page * l.kv_heads + g) * l.page_size + t % l.page_size) * l.head_dim
    }

    /// For a few queries per sequence, overwrites one visible key of their KV head with the
    /// query scaled so that its score is about 12: that key dominates the row's softmax.
    fn plant_aligned_keys(&mut self, rng: &mut ChaCha8Rng) {
        let l = self.layout;
        let d = l.head_dim;
        for b in 0..self.lens.len() {
            let (q_len, seq_len) = self.lens[b];
            for _ in 0..q_len.min(6) {
                let i = rng.random_range(0..q_len);
                let h = rng.random_range(0..l.q_heads);
                let visible = seq_len - (q_len - 1 - i);
                let j = rng.random_range(0..visible);
                let q_at = ((b * self.max_q + i) * l.q_heads + h) * d;
                let query = self.q.data[q_at..q_at + d].to_vec();
                let norm2: f32 = query.iter().map(|v| v * v).sum();
                let factor = 12.0 / (self.scale * norm2.max(1e-3));
                let k_at = self.kv_offset(b, j, h / l.group_size());
                for (e, v) in query.iter().enumerate() {
                    self.k_pages.data[k_at + e] = l.dtype.round(v * factor);
                }
            }
        }
    }

    /// Sequence `b`'s first `keys` cached tokens gathered from the pages: `[1, keys, Hkv, D]`
    /// of K and of V, in f32.
    fn contiguous_cache(&self, b: usize, keys: usize) -> (Tensor, Tensor) {
        let l = &self.layout;
        let d = l.head_dim;
        let mut k = Vec::with_capacity(keys * l.kv_heads * d);
        let mut v = Vec::with_capacity(keys * l.kv_heads * d);
        for t in 0..keys {
            for g in 0..l.kv_heads {
                let at = self.kv_offset(b, t, g);
                k.extend_from_slice(&self.k_pages.data[at..at + d]);
                v.extend_from_slice(&self.v_pages.data[at..at + d]);
            }
        }
        let shape = [1, keys, l.kv_heads, d];
        (Tensor::f32(&shape, k), Tensor::f32(&shape, v))
    }

    /// Queries `rows` of sequence `b`, `[1, rows, Hq, D]`, in f32.
    fn queries(&self, b: usize, rows: std::ops::Range<usize>) -> Tensor {
        let width = self.layout.q_heads * self.layout.head_dim;
        let start = (b * self.max_q + rows.start) * width;
        let end = (b * self.max_q + rows.end) * width;
        let shape = [1, rows.len(), self.layout.q_heads, self.layout.head_dim];
        Tensor::f32(&shape, self.q.data[start..end].to_vec())
    }

    /// The interpreter's output for queries `rows` of sequence `b` (`[1, rows, Hq, D]`, in
    /// the dtype): `AttentionDecode` over the cache truncated to the keys the last of those
    /// rows sees, so that its rule gives each row exactly its keys.
    fn reference(&self, b: usize, rows: std::ops::Range<usize>) -> Tensor {
        let (q_len, seq_len) = self.lens[b];
        let keys = seq_len - (q_len - rows.end);
        let q = self.queries(b, rows.clone());
        let (k_cache, v_cache) = self.contiguous_cache(b, keys);
        let lengths = Tensor::i32(&[1], &[keys as i32]);
        let mut g = Graph::new("prefill_reference");
        let mut inputs: HashMap<String, Tensor> = HashMap::new();
        let mut ids = Vec::new();
        for (name, t) in [
            ("q", q),
            ("k_cache", k_cache),
            ("v_cache", v_cache),
            ("lengths", lengths),
        ] {
            let id = g
                .input(name, InputKind::Activation, t.dtype, Shape::of(&t.shape))
                .unwrap();
            ids.push(id);
            inputs.insert(name.to_string(), t);
        }
        let op = Op::AttentionDecode { scale: self.scale };
        let out = g.add1("attention", op, &ids).unwrap();
        g.output("out", out);
        let exact = interp::run(&g, &inputs).unwrap().remove("out").unwrap();
        exact.cast(self.layout.dtype)
    }

    fn upload(&self, device: &CudaDevice) -> DeviceInputs {
        let lens = |f: fn(&(usize, usize)) -> usize| {
            let values: Vec<i32> = self.lens.iter().map(|l| f(l) as i32).collect();
            DeviceTensor::upload(device, &Tensor::i32(&[values.len()], &values)).unwrap()
        };
        let table = Tensor::i32(&[self.lens.len(), self.max_pages], &self.page_table);
        DeviceInputs {
            q: DeviceTensor::upload(device, &self.q).unwrap(),
            k_pages: DeviceTensor::upload(device, &self.k_pages).unwrap(),
            v_pages: DeviceTensor::upload(device, &self.v_pages).unwrap(),
            page_table: DeviceTensor::upload(device, &table).unwrap(),
            seq_lens: lens(|l| l.1),
            q_lens: lens(|l| l.0),
        }
    }

    fn args<'a>(&self, inputs: &'a DeviceInputs, out: &'a DeviceTensor) -> Args<'a> {
        Args::new()
            .buffer("q", inputs.q.arg())
            .buffer("k_pages", inputs.k_pages.arg())
            .buffer("v_pages", inputs.v_pages.arg())
            .buffer("page_table", inputs.page_table.arg())
            .buffer("seq_lens", inputs.seq_lens.arg())
            .buffer("q_lens", inputs.q_lens.arg())
            .buffer("out", out.arg())
            .u32("batch", self.lens.len() as u32)
            .u32("max_q", self.max_q as u32)
            .u32("max_pages", self.max_pages as u32)
            .f32("scale", self.scale)
    }

    /// Uploads the inputs, launches `kernel` on a poisoned output and downloads it.
    fn run(&self, device: &CudaDevice, kernel: &LoadedKernel) -> Tensor {
        let inputs = self.upload(device);
        let out = DeviceTensor::poisoned(device, self.layout.dtype, &self.q.shape).unwrap();
        kernel.launch(&self.args(&inputs, &out)).unwrap();
        device.synchronize().unwrap();
        out.download().unwrap()
    }

    /// Rows `rows` of sequence `b` of a kernel output `[B, max_q, Hq, D]`.
    fn rows_of(&self, out: &Tensor, b: usize, rows: std::ops::Range<usize>) -> Tensor {
        let width = self.layout.q_heads * self.layout.head_dim;
        let start = (b * self.max_q + rows.start) * width;
        let end = (b * self.max_q + rows.end) * width;
        let shape = [1, rows.len(), self.layout.q_heads, self.layout.head_dim];
        Tensor {
            dtype: out.dtype,
            shape: shape.to_vec(),
            data: out.data[start..end].to_vec(),
        }
    }
}

struct DeviceInputs {
    q: DeviceTensor,
    k_pages: DeviceTensor,
    v_pages: DeviceTensor,
    page_table: DeviceTensor,
    seq_lens: DeviceTensor,
    q_lens: DeviceTensor,
}

/// The whole-sequence check, then every (query, head) row on its own at twice the
/// tolerance: a row computed from the wrong keys stands out even where the sequence's
/// norm hides it.
fn assert_rows_close(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    let tol = tolerance(dtype);
    assert_close(what, got, want, tol);
    let d = *want.shape.last().unwrap();
    for (row, (g, w)) in got.data.chunks(d).zip(want.data.chunks(d)).enumerate() {
        let (mut error, mut norm) = (0f64, 0f64);
        for (&a, &b) in g.iter().zip(w) {
            error += (a as f64 - b as f64).powi(2);
            norm += (b as f64).powi(2);
        }
        let e = (error / norm.max(1e-30)).sqrt();
        let heads = want.shape[2];
        assert!(
            e <= 2.0 * tol,
            "{what}: query {} head {}: relative error {e:.3e}",
            row / heads,
            row % heads
        );
    }
}

/// Launches `spec` on `problem` and checks every sequence's rows against the interpreter and
/// that rows past `q_lens[b]` stayed poisoned.
fn check_problem(device: &CudaDevice, spec: &PrefillAttentionSpec, problem: &Problem) {
    let kernel = device.load(&generate(spec).unwrap()).unwrap();
    let got = problem.run(device, &kernel);
    for (b, &(q_len, seq_len)) in problem.lens.iter().enumerate() {
        let what = format!(
            "{} seq {b} (q_len {q_len}, seq_len {seq_len})",
            spec.entry_name()
        );
        if q_len > 0 {
            let want = problem.reference(b, 0..q_len);
            let rows = problem.rows_of(&got, b, 0..q_len);
            assert_rows_close(&what, &rows, &want, spec.layout.dtype);
        }
        let past = problem.rows_of(&got, b, q_len..problem.max_q);
        assert!(
            past.data.iter().all(|v| v.is_nan()),
            "{what}: a row past q_len was written"
        );
    }
}

/// Both stock tiles, 64 × 64 at two blocks per SM, and narrow / wide KV tiles (those the
/// layout allows).
fn tiles(layout: PagedKv) -> Vec<PrefillTile> {
    let mut tiles = vec![PrefillTile::h100(layout.head_dim), PrefillTile::wide()];
    for (block_q, block_kv, min_blocks_per_sm) in [(64, 64, 2), (128, 32, 1), (64, 128, 1)] {
        tiles.push(PrefillTile {
            block_q,
            block_kv,
            min_blocks_per_sm,
        });
    }
    tiles
        .into_iter()
        .filter(|&tile| PrefillAttentionSpec { layout, tile }.validate().is_ok())
        .collect()
}

/// `(q_len, seq_len)` batches: full prefill of unequal lengths (not multiples of the page
/// size or a tile; 1 token), chunked prefill (q_len < seq_len, the chunk inside or across
/// tiles), an empty sequence in the middle of a batch.
const BATCHES: [&[(usize, usize)]; 4] = [
    &[(37, 37), (200, 200), (1, 1)],
    &[(129, 300), (5, 77), (64, 64)],
    &[(150, 700), (0, 40), (81, 81)],
    &[(1, 333), (130, 131), (17, 250), (96, 97)],
];

fn check(dtype: DType, q_heads: usize, kv_heads: usize, head_dim: usize, test: &str) {
    let device = device();
    let mut rng = rng(fresh_seed(test));
    for (n, lens) in BATCHES.iter().enumerate() {
        // Page sizes 16, 8, 32 and 1 across the batches.
        let page_size = [16, 8, 32, 1][n];
        let layout = PagedKv {
            dtype,
            q_heads,
            kv_heads,
            head_dim,
            page_size,
            order: PageOrder::HeadMajor,
        };
        let problem = Problem::random(layout, lens, &mut rng);
        for tile in tiles(layout) {
            check_problem(&device, &PrefillAttentionSpec { layout, tile }, &problem);
        }
    }
}

/// Head dim 32 (the tiny presets; 64-byte rows, swizzle key `(row >> 1) & 3`): tiny-llama's
/// heads (GQA 4) in f16, tiny-mixtral's (GQA 2) in bf16, and multi-head.
#[test]
#[ignore = "needs a CUDA device"]
fn prefill_f16_d32_gqa4_matches_the_interpreter() {
    check(DType::F16, 8, 2, 32, "prefill_f16_d32_group4");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_bf16_d32_gqa2_matches_the_interpreter() {
    check(DType::BF16, 4, 2, 32, "prefill_bf16_d32_group2");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_bf16_d32_mha_matches_the_interpreter() {
    check(DType::BF16, 4, 4, 32, "prefill_bf16_d32_group1");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_f16_d64_mha_matches_the_interpreter() {
    check(DType::F16, 4, 4, 64, "prefill_f16_d64_group1");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_bf16_d64_gqa8_matches_the_interpreter() {
    check(DType::BF16, 16, 2, 64, "prefill_bf16_d64_group8");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_f16_d128_gqa4_matches_the_interpreter() {
    check(DType::F16, 8, 2, 128, "prefill_f16_d128_group4");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_bf16_d128_gqa4_matches_the_interpreter() {
    check(DType::BF16, 8, 2, 128, "prefill_bf16_d128_group4");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_f16_d128_gqa8_matches_the_interpreter() {
    check(DType::F16, 8, 1, 128, "prefill_f16_d128_group8");
}

#[test]
#[ignore = "needs a CUDA device"]
fn prefill_bf16_d128_mha_matches_the_interpreter() {
    check(DType::BF16, 2, 2, 128, "prefill_bf16_d128_group1");
}

/// Page sizes at the extremes the layout allows (1 and 256, larger than every KV tile) and a
/// page as large as the KV tile; the extremes at head_dim 32 too.
#[test]
#[ignore = "needs a CUDA device"]
fn prefill_extreme_page_sizes_match_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("prefill_page_sizes"));
    for (page_size, head_dim) in [(1, 128), (64, 128), (256, 128), (1, 32), (256, 32)] {
        let layout = PagedKv {
            dtype: DType::BF16,
            q_heads: 8,
            kv_heads: 2,
            head_dim,
            page_size,
            order: PageOrder::HeadMajor,
        };
        let problem = Problem::random(layout, &[(300, 600), (45, 45)], &mut rng);
        for tile in [PrefillTile::h100(layout.head_dim), PrefillTile::wide()] {
            check_problem(&device, &PrefillAttentionSpec { layout, tile }, &problem);
        }
    }
}

/// Times batch 1 at 4K and 16K tokens (full causal prefill), 32 query heads, 8 KV heads,
/// d 128, pages of 16 in shuffled order, f16 and bf16, for every tile, and prints TFLOP/s
/// (causal: `2 · 2 · Hq · d · S² / 2` FLOPs). Checks a few query rows (near the end and in
/// the middle) of each result against the interpreter. Never asserts a speed.
#[test]
#[ignore = "needs a CUDA device"]
fn prefill_throughput_at_4k_and_16k_tokens() {
    let device = device();
    let mut rng = rng(fresh_seed("prefill_throughput"));
    let mut table = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for tokens in [4096usize, 16384] {
            let layout = PagedKv {
                dtype,
                q_heads: 32,
                kv_heads: 8,
                head_dim: 128,
                page_size: 16,
                order: PageOrder::HeadMajor,
            };
            let problem = Problem::random(layout, &[(tokens, tokens)], &mut rng);
            let inputs = problem.upload(&device);
            for tile in tiles(layout) {
                let spec = PrefillAttentionSpec { layout, tile };
                let kernel = device.load(&generate(&spec).unwrap()).unwrap();
                let out = DeviceTensor::poisoned(&device, dtype, &problem.q.shape).unwrap();
                let args = problem.args(&inputs, &out);
                let timing = device
                    .time(|| kernel.launch(&args).map(drop), 3, 20)
                    .unwrap();
                let flops = 2.0 * (32 * 128) as f64 * (tokens * tokens) as f64;
                let tflops = flops / (timing.median_ms * 1e-3) / 1e12;
                table.push(format!(
                    "{:<58} S={tokens:<6} {:>8.3} ms {:>7.1} TFLOP/s",
                    spec.entry_name(),
                    timing.median_ms,
                    tflops
                ));
                let got = out.download().unwrap();
                for rows in [tokens - 3..tokens, tokens / 2..tokens / 2 + 2] {
                    let want = problem.reference(0, rows.clone());
                    let band = problem.rows_of(&got, 0, rows.clone());
                    let what = format!("{} rows {rows:?}", spec.entry_name());
                    assert_rows_close(&what, &band, &want, dtype);
                }
            }
        }
    }
    eprintln!(
        "causal prefill, batch 1, 32 q heads, 8 KV heads, d 128 on {}",
        device.info()
    );
    for line in &table {
        eprintln!("{line}");
    }
}
