//! GPU numerics of the paged KV append (`kiln_kernels::kv_append`) and the Quest kernels
//! (`kiln_kernels::quest`) against the host references: a host model of the pages and
//! `kiln::ir::quest` (`PageMeta::from_keys`, `group_scores`, `select_pages`, `select`). Every
//! test needs a CUDA device: run with `cargo test --test gpu_quest -- --ignored`.
//!
//! Each test draws fresh random inputs (seed printed; `KILN_TEST_SEED` reproduces it),
//! poisons what the kernel must write (NaN pages, stale finite metadata from a "previous
//! owner", NaN scores and `0x7f7f7f7f` selections) and compares exactly: stored keys, values
//! and metadata bit for bit, page scores bit for bit (the estimate follows the reference's
//! f32 order), selections entry for entry. Any NaN fails. Batches mix unequal lengths that are
//! not multiples of the page size; decode steps append into partial pages and open fresh
//! ones; pages of a freed sequence are reused; GQA groups 1, 4 and 8, f16 and bf16, head_dim
//! 32, 64 and 128.

mod common;

use kiln::ir::dtype::DType;
use kiln::ir::quest::{self, PageMeta, QuestOptions};
use kiln::ir::tensor::Tensor;
use kiln_codegen::kernel::GpuKernel;
use kiln_kernels::attention::paged::PageOrder;
use kiln_kernels::attention::PagedKv;
use kiln_kernels::kv_append::{self, KvAppendSpec};
use kiln_kernels::quest::{estimate, top_k, QuestEstimateSpec, QuestTopKSpec};
use kiln_runtime::cuda::{Args, CudaDevice, DeviceBuffer, DeviceTensor};
use kiln_runtime::kv::{AppendBatch, BatchTables, DeviceKvCache, PagedKvCache, SeqId};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const PAGE_SIZE: usize = 16;

/// Stale metadata a recycled page holds before its first new token: far outside the keys'
/// range, so combining a fresh page with it (instead of starting over) shows.
const STALE_MAX: f32 = 1000.0;
const STALE_MIN: f32 = -1000.0;

fn layout(dtype: DType, q_heads: usize, kv_heads: usize, head_dim: usize) -> PagedKv {
    PagedKv {
        dtype,
        q_heads,
        kv_heads,
        head_dim,
        page_size: PAGE_SIZE,
        order: PageOrder::HeadMajor,
    }
}

/// f16 and bf16 × head_dim 32, 64 and 128 × GQA groups 1, 4 and 8 (one case with one KV
/// head); GQA 4 with 2 KV heads at d 32 is the tiny-llama preset.
fn layouts() -> Vec<PagedKv> {
    let mut all = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for head_dim in [32, 64, 128] {
            for (q_heads, kv_heads) in [(2, 2), (8, 2), (8, 1)] {
                all.push(layout(dtype, q_heads, kv_heads, head_dim));
            }
        }
    }
    all
}

fn launch(device: &CudaDevice, kernel: &GpuKernel, args: &Args<'_>) {
    device
        .load(kernel)
        .and_then(|loaded| loaded.launch(args))
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.entry));
    device
        .synchronize()
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.entry));
}

/// Exact equality of two f32 values that must both be numbers (`-0 == +0`).
fn same(got: f32, want: f32) -> bool {
    !got.is_nan() && !want.is_nan() && got == want
}

// ----- host model of the paged cache ---------------------------------------------------------

/// One sequence as the host sees it: every key and value appended so far, `[len, kv, d]`.
struct HostSeq {
    id: SeqId,
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The host page pool, the device cache and the host model of every live sequence.
struct Fixture {
    layout: PagedKv,
    pool: PagedKvCache,
    cache: DeviceKvCache,
    seqs: Vec<HostSeq>,
}

impl Fixture {
    /// A pool of `num_pages` pages: keys and values poisoned, metadata stale.
    fn new(device: &CudaDevice, layout: PagedKv, num_pages: usize) -> Fixture {
        let pool = PagedKvCache::new(num_pages, layout.page_size).unwrap();
        let mut cache = DeviceKvCache::new(device, layout, num_pages, 1).unwrap();
        let layer = &mut cache.layers[0];
        let pages_shape = layer.k_pages.shape.clone();
        let meta_shape = layer.page_max.shape.clone();
        layer.k_pages = DeviceTensor::poisoned(device, layout.dtype, &pages_shape).unwrap();
        layer.v_pages = DeviceTensor::poisoned(device, layout.dtype, &pages_shape).unwrap();
        let stale = |v| Tensor::full(layout.dtype, &meta_shape, v);
        layer.page_max = DeviceTensor::upload(device, &stale(STALE_MAX)).unwrap();
        layer.page_min = DeviceTensor::upload(device, &stale(STALE_MIN)).unwrap();
        Fixture {
            layout,
            pool,
            cache,
            seqs: Vec::new(),
        }
    }

    fn row(&self) -> usize {
        self.layout.kv_heads * self.layout.head_dim
    }

    fn add(&mut self) -> SeqId {
        let id = self.pool.add_sequence();
        self.seqs.push(HostSeq {
            id,
            keys: Vec::new(),
            values: Vec::new(),
        });
        id
    }

    fn free(&mut self, id: SeqId) {
        self.pool.free(id).unwrap();
        self.seqs.retain(|s| s.id != id);
    }

    fn host(&mut self, id: SeqId) -> &mut HostSeq {
        self.seqs
            .iter_mut()
            .find(|s| s.id == id)
            .expect("live sequence")
    }

    /// Appends `requests` (sequence, new tokens) with the kernel on fresh random keys and
    /// values, and records them in the host model.
    fn append(
        &mut self,
        device: &CudaDevice,
        requests: &[(SeqId, usize)],
        rng: &mut ChaCha8Rng,
    ) -> AppendBatch {
        let batch = self.pool.append(requests, 0).unwrap();
        let tokens = batch.tokens();
        let shape = [tokens, self.layout.kv_heads, self.layout.head_dim];
        let new_k = common::random(self.layout.dtype, &shape, 1.0, rng);
        let new_v = common::random(self.layout.dtype, &shape, 1.0, rng);
        let row = self.row();
        let mut at = 0;
        for &(id, count) in requests {
            let host = self.host(id);
            host.keys
                .extend_from_slice(&new_k.data[at * row..(at + count) * row]);
            host.values
                .extend_from_slice(&new_v.data[at * row..(at + count) * row]);
            at += count;
        }
        if tokens == 0 {
            return batch;
        }
        let kernel = kv_append::generate(&KvAppendSpec::pool(self.layout)).unwrap();
        let new_k = DeviceTensor::upload(device, &new_k).unwrap();
        let new_v = DeviceTensor::upload(device, &new_v).unwrap();
        let token_seqs = DeviceBuffer::from_host(device, &batch.token_seqs).unwrap();
        let token_positions = DeviceBuffer::from_host(device, &batch.token_positions).unwrap();
        self.cache.upload_tables(device, &batch.tables).unwrap();
        let tables = self.cache.tables.as_ref().unwrap();
        let layer = &self.cache.layers[0];
        let args = Args::new()
            .buffer("new_k", new_k.arg())
            .buffer("new_v", new_v.arg())
            .buffer("token_seqs", &token_seqs)
            .buffer("token_positions", &token_positions)
            .buffer("page_table", &tables.page_table)
            .buffer("k_pages", layer.k_pages.arg())
            .buffer("v_pages", layer.v_pages.arg())
            .buffer("page_max", layer.page_max.arg())
            .buffer("page_min", layer.page_min.arg())
            .u32("tokens", tokens as u32)
            .u32("max_pages", batch.tables.max_pages as u32);
        launch(device, &kernel, &args);
        batch
    }

    /// Every live sequence's keys, values (bitwise) and page metadata (exactly) on the device
    /// against the host model.
    fn check(&self, what: &str) {
        let (kv, d, ps) = (
            self.layout.kv_heads,
            self.layout.head_dim,
            self.layout.page_size,
        );
        let layer = &self.cache.layers[0];
        let k_pages = layer.k_pages.download().unwrap().data;
        let v_pages = layer.v_pages.download().unwrap().data;
        let page_max = layer.page_max.download().unwrap().data;
        let page_min = layer.page_min.download().unwrap().data;
        let row = kv * d;
        for s in &self.seqs {
            let len = s.keys.len() / row;
            let pages = self.pool.pages(s.id).unwrap();
            for j in 0..len {
                let physical = pages[j / ps] as usize;
                for h in 0..kv {
                    let slot = ((physical * kv + h) * ps + j % ps) * d;
                    let source = (j * kv + h) * d;
                    for e in 0..d {
                        let (got_k, want_k) = (k_pages[slot + e], s.keys[source + e]);
                        let (got_v, want_v) = (v_pages[slot + e], s.values[source + e]);
                        assert!(
                            got_k.to_bits() == want_k.to_bits() && got_v.to_bits() == want_v.to_bits(),
                            "{what}: sequence {} token {j} head {h} dim {e}: k {got_k} (want {want_k}), \
                             v {got_v} (want {want_v}) in page {physical}",
                            s.id
                        );
                    }
                }
            }
            let meta = PageMeta::from_keys(&s.keys, len, kv, d, ps).unwrap();
            for (p, &physical) in pages.iter().enumerate() {
                for h in 0..kv {
                    let (want_max, want_min) = meta.bounds(p, h);
                    let base = (physical as usize * kv + h) * d;
                    for e in 0..d {
                        let (got_max, got_min) = (page_max[base + e], page_min[base + e]);
                        assert!(
                            same(got_max, want_max[e]) && same(got_min, want_min[e]),
                            "{what}: sequence {} (length {len}) page {p} (physical {physical}) head {h} \
                             dim {e}: max {got_max} min {got_min}, want {} {}",
                            s.id,
                            want_max[e],
                            want_min[e]
                        );
                    }
                }
            }
        }
        eprintln!("{what}: {} sequences match", self.seqs.len());
    }

    /// Grows `id` by `count` tokens of fresh random keys on the host only (no kernel).
    fn grow_on_host(&mut self, id: SeqId, count: usize, rng: &mut ChaCha8Rng) {
        self.pool.grow(id, count).unwrap();
        let shape = [count, self.layout.kv_heads, self.layout.head_dim];
        let keys = common::random(self.layout.dtype, &shape, 1.0, rng);
        let host = self.host(id);
        host.keys.extend_from_slice(&keys.data);
        host.values
            .extend(std::iter::repeat_n(0.0, keys.data.len()));
    }

    /// Uploads the host model's page metadata (`PageMeta::from_keys`) into the device's
    /// `page_max` / `page_min`; pages no sequence owns keep stale values.
    fn upload_host_metadata(&mut self, device: &CudaDevice) {
        let (kv, d, ps) = (
            self.layout.kv_heads,
            self.layout.head_dim,
            self.layout.page_size,
        );
        let shape = self.cache.layers[0].page_max.shape.clone();
        let mut page_max = Tensor::full(self.layout.dtype, &shape, STALE_MAX);
        let mut page_min = Tensor::full(self.layout.dtype, &shape, STALE_MIN);
        for s in &self.seqs {
            let len = s.keys.len() / (kv * d);
            let meta = PageMeta::from_keys(&s.keys, len, kv, d, ps).unwrap();
            for (p, &physical) in self.pool.pages(s.id).unwrap().iter().enumerate() {
                for h in 0..kv {
                    let (high, low) = meta.bounds(p, h);
                    let base = (physical as usize * kv + h) * d;
                    page_max.data[base..base + d].copy_from_slice(high);
                    page_min.data[base..base + d].copy_from_slice(low);
                }
            }
        }
        let layer = &mut self.cache.layers[0];
        layer.page_max = DeviceTensor::upload(device, &page_max).unwrap();
        layer.page_min = DeviceTensor::upload(device, &page_min).unwrap();
    }

    /// `k [B, C, kv, d]` of the given sequences (zero past each length), their lengths.
    fn keys_tensor(&self, ids: &[SeqId]) -> (Tensor, Vec<usize>) {
        let row = self.row();
        let lengths: Vec<usize> = ids
            .iter()
            .map(|id| self.seqs.iter().find(|s| s.id == *id).unwrap().keys.len() / row)
            .collect();
        let capacity = lengths.iter().copied().max().unwrap_or(1).max(1);
        let mut data = vec![0.0f32; ids.len() * capacity * row];
        for (b, id) in ids.iter().enumerate() {
            let keys = &self.seqs.iter().find(|s| s.id == *id).unwrap().keys;
            data[b * capacity * row..][..keys.len()].copy_from_slice(keys);
        }
        let shape = [
            ids.len(),
            capacity,
            self.layout.kv_heads,
            self.layout.head_dim,
        ];
        (
            Tensor::new(self.layout.dtype, &shape, data).unwrap(),
            lengths,
        )
    }
}

// ----- kernel runners -------------------------------------------------------------------------

/// Runs the estimate kernel on the cache's metadata and `tables`; returns the scores
/// `[batch, kv_heads, max_pages]`.
fn run_estimate(
    device: &CudaDevice,
    cache: &mut DeviceKvCache,
    tables: &BatchTables,
    q: &Tensor,
) -> Vec<f32> {
    let layout = cache.layout;
    let kernel = estimate::generate(&QuestEstimateSpec::new(layout)).unwrap();
    cache.upload_tables(device, tables).unwrap();
    let held = cache.tables.as_ref().unwrap();
    let layer = &cache.layers[0];
    let q_dev = DeviceTensor::upload(device, q).unwrap();
    let scores = DeviceTensor::poisoned(
        device,
        DType::F32,
        &[tables.batch, layout.kv_heads, tables.max_pages],
    )
    .unwrap();
    let args = Args::new()
        .buffer("q", q_dev.arg())
        .buffer("page_max", layer.page_max.arg())
        .buffer("page_min", layer.page_min.arg())
        .buffer("page_table", &held.page_table)
        .buffer("seq_lens", &held.seq_lens)
        .buffer("scores", scores.arg())
        .u32("batch", tables.batch as u32)
        .u32("max_pages", tables.max_pages as u32);
    launch(device, &kernel, &args);
    scores.download().unwrap().data
}

/// Runs the top-K kernel; returns `(selected_pages [batch, kv, max_selected],
/// selected_counts [batch, kv])`.
#[allow(clippy::too_many_arguments)]
fn run_top_k(
    device: &CudaDevice,
    scores: &[f32],
    seq_lens: &[i32],
    kv_heads: usize,
    max_pages: usize,
    budget_pages: usize,
    max_selected: usize,
) -> (Vec<i32>, Vec<i32>) {
    let batch = seq_lens.len();
    let kernel = top_k::generate(&QuestTopKSpec {
        page_size: PAGE_SIZE,
    })
    .unwrap();
    let scores = DeviceBuffer::from_host(device, scores).unwrap();
    let lens = DeviceBuffer::from_host(device, seq_lens).unwrap();
    let selected = DeviceBuffer::<i32>::poisoned(device, batch * kv_heads * max_selected).unwrap();
    let counts = DeviceBuffer::<i32>::poisoned(device, batch * kv_heads).unwrap();
    let args = Args::new()
        .buffer("scores", &scores)
        .buffer("seq_lens", &lens)
        .buffer("selected_pages", &selected)
        .buffer("selected_counts", &counts)
        .u32("batch", batch as u32)
        .u32("kv_heads", kv_heads as u32)
        .u32("max_pages", max_pages as u32)
        .u32("budget_pages", budget_pages as u32)
        .u32("max_selected", max_selected as u32);
    launch(device, &kernel, &args);
    (selected.to_host().unwrap(), counts.to_host().unwrap())
}

/// The expected `selected_pages` row: the selection, then -1 up to `max_selected`.
fn expected_row(selection: &[usize], max_selected: usize) -> Vec<i32> {
    let mut row: Vec<i32> = selection.iter().map(|&p| p as i32).collect();
    row.resize(max_selected, -1);
    row
}

// ----- tests ----------------------------------------------------------------------------------

/// Prefill of three sequences of unequal lengths in one call, decode steps (into partial
/// pages and onto fresh pages), a freed sequence whose stale pages a new one reuses, and a
/// mixed prefill + decode call, for every layout.
#[test]
#[ignore = "needs a CUDA device"]
fn kv_append_matches_host_pages_and_metadata() {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed("kv_append_matches_host_pages"));
    for layout in layouts() {
        let tag = layout.tag();
        let mut f = Fixture::new(&device, layout, 24);
        let a = f.add();
        let b = f.add();
        let c = f.add();
        f.append(&device, &[(a, 37), (b, 16), (c, 5)], &mut rng);
        f.check(&format!("{tag} prefill 37/16/5"));
        for step in 0..3 {
            // a: 37 -> 40 inside page 2; b: 16 opens page 1 (slot 0) then fills it; c: 5 -> 8.
            f.append(&device, &[(c, 1), (a, 1), (b, 1)], &mut rng);
            f.check(&format!("{tag} decode step {step}"));
        }
        f.free(b);
        let d = f.add();
        // d reuses b's pages (stale metadata); a appends into its partial page in the same call.
        f.append(&device, &[(a, 1), (d, 20)], &mut rng);
        f.check(&format!("{tag} mixed prefill and decode"));
        // A chunked prefill starting mid-page and spanning pages.
        f.append(&device, &[(d, 29), (c, 9)], &mut rng);
        f.check(&format!("{tag} chunked prefill"));
        // Single tokens filling pages to the brim and crossing page boundaries.
        for _ in 0..(16 - 49 % 16) + 1 {
            f.append(&device, &[(d, 1)], &mut rng);
        }
        f.check(&format!("{tag} decode across a page boundary"));
    }
}

/// Scores of every page of every sequence, bit-equal to `ir::quest::group_scores` on the
/// metadata the append kernel wrote; `-inf` past each sequence's pages (a padded table).
#[test]
#[ignore = "needs a CUDA device"]
fn estimate_matches_group_scores() {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed("estimate_matches_group_scores"));
    for layout in layouts() {
        let lengths = [1usize, 37, 300, 16];
        check_estimate(&device, layout, &lengths, 3, &mut rng);
    }
    // Batch 1 at 32K context (2048 pages, 8 KV heads, GQA 4), the shape the split targets.
    let long = layout(DType::F16, 32, 8, 128);
    check_estimate(&device, long, &[32768], 0, &mut rng);
    let long = layout(DType::BF16, 64, 8, 64);
    check_estimate(&device, long, &[32768 - 5, 100], 1, &mut rng);
    let long = layout(DType::F16, 8, 2, 32);
    check_estimate(&device, long, &[32768, 7], 2, &mut rng);
}

/// Fills the metadata from host keys (sequences grown in turns, so their pages interleave;
/// unowned pages stale), runs the estimate with a table `extra_pages` wider than needed and
/// compares with `group_scores`. The append kernel plays no part here.
fn check_estimate(
    device: &CudaDevice,
    layout: PagedKv,
    lengths: &[usize],
    extra_pages: usize,
    rng: &mut ChaCha8Rng,
) {
    let pages: usize = lengths.iter().map(|l| l.div_ceil(PAGE_SIZE)).sum();
    let mut f = Fixture::new(device, layout, pages + 4);
    let ids: Vec<SeqId> = lengths.iter().map(|_| f.add()).collect();
    let mut done = vec![0usize; lengths.len()];
    while done.iter().zip(lengths).any(|(d, l)| d < l) {
        for (i, &id) in ids.iter().enumerate() {
            let n = (lengths[i] - done[i]).min(PAGE_SIZE * 3 + 5);
            if n > 0 {
                done[i] += n;
                f.grow_on_host(id, n, rng);
            }
        }
    }
    f.upload_host_metadata(device);
    let widest = lengths.iter().map(|l| l.div_ceil(PAGE_SIZE)).max().unwrap();
    let tables = f
        .pool
        .batch_tables_padded(&ids, widest.max(1) + extra_pages)
        .unwrap();
    let (group, d, kv) = (layout.group_size(), layout.head_dim, layout.kv_heads);
    let q = common::random(layout.dtype, &[ids.len(), layout.q_heads, d], 1.0, rng);
    let scores = run_estimate(device, &mut f.cache, &tables, &q);
    let (keys, lens) = f.keys_tensor(&ids);
    let capacity = keys.shape[1];
    let row = kv * d;
    let mut checked = 0;
    for (b, &len) in lens.iter().enumerate() {
        let meta =
            PageMeta::from_keys(&keys.data[b * capacity * row..], len, kv, d, PAGE_SIZE).unwrap();
        for h in 0..kv {
            let base = (b * layout.q_heads + h * group) * d;
            let want = quest::group_scores(&meta, h, &q.data[base..base + group * d]);
            let got = &scores[(b * kv + h) * tables.max_pages..][..tables.max_pages];
            for (p, &g) in got.iter().enumerate() {
                if p < want.len() {
                    assert!(
                        same(g, want[p]),
                        "{} length {len}: sequence {b} head {h} page {p}: score {g:e}, want {:e} \
                         (difference {:e})",
                        layout.tag(),
                        want[p],
                        g - want[p]
                    );
                    checked += 1;
                } else {
                    assert_eq!(
                        g,
                        f32::NEG_INFINITY,
                        "{} sequence {b} head {h} page {p} past the {} pages",
                        layout.tag(),
                        want.len()
                    );
                }
            }
        }
    }
    eprintln!(
        "{} lengths {lengths:?}: {checked} page scores bit-equal",
        layout.tag()
    );
}

/// Selections bit-identical to `ir::quest::select_pages` on scores full of ties, NaN, signed
/// zeros and infinities, with `+inf` planted past each sequence's pages (never to be read):
/// dense fallback (P <= B), P = B + 1, P = 4096 with B = 256, lengths not a multiple of the
/// page size, an empty sequence, and budgets 0, 1, 2.
#[test]
#[ignore = "needs a CUDA device"]
fn top_k_matches_select_pages() {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed("top_k_matches_select_pages"));
    let cases: [(usize, &[usize]); 6] = [
        (256, &[65536, 65536 - 7, 4097 * 16, 256 * 16, 257 * 16, 0]),
        (16, &[1, 255, 256, 257, 16 * 16, 17 * 16 - 3, 1000]),
        (2, &[1, 17, 33, 48, 500]),
        (1, &[1, 16, 17, 300]),
        (0, &[0, 1, 40]),
        (128, &[32768, 32768 + 1, 2048 * 16 - 16]),
    ];
    for (budget, lengths) in cases {
        for kv_heads in [1usize, 8] {
            for ties in [false, true] {
                check_top_k(&device, budget, lengths, kv_heads, ties, &mut rng);
            }
        }
    }
}

/// A score: normal, or from a few levels (many ties), with NaN, ±0 and ±inf mixed in.
fn score(rng: &mut ChaCha8Rng, ties: bool) -> f32 {
    let special = rng.random_range(0..100);
    match special {
        0 => f32::NAN,
        1 => -f32::NAN,
        2 => 0.0,
        3 => -0.0,
        4 => f32::INFINITY,
        5 => f32::NEG_INFINITY,
        _ if ties => rng.random_range(-3..=3) as f32 * 0.5,
        _ => rng.random_range(-100.0f32..100.0),
    }
}

fn check_top_k(
    device: &CudaDevice,
    budget: usize,
    lengths: &[usize],
    kv_heads: usize,
    ties: bool,
    rng: &mut ChaCha8Rng,
) {
    let batch = lengths.len();
    let page_counts: Vec<usize> = lengths.iter().map(|l| l.div_ceil(PAGE_SIZE)).collect();
    let max_pages = page_counts.iter().copied().max().unwrap().max(1) + 2;
    let max_selected = budget.max(1) + 3;
    let mut scores = vec![f32::INFINITY; batch * kv_heads * max_pages];
    for (b, &pages) in page_counts.iter().enumerate() {
        for h in 0..kv_heads {
            let row = &mut scores[(b * kv_heads + h) * max_pages..][..pages];
            for s in row.iter_mut() {
                *s = score(rng, ties);
            }
        }
    }
    let seq_lens: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
    let (selected, counts) = run_top_k(
        device,
        &scores,
        &seq_lens,
        kv_heads,
        max_pages,
        budget,
        max_selected,
    );
    for (b, &pages) in page_counts.iter().enumerate() {
        for h in 0..kv_heads {
            let r = b * kv_heads + h;
            let row_scores = &scores[r * max_pages..][..pages];
            let want = quest::select_pages(row_scores, budget);
            let got = &selected[r * max_selected..][..max_selected];
            assert_eq!(
                got,
                &expected_row(&want, max_selected)[..],
                "budget {budget}, length {} ({pages} pages), sequence {b} head {h}, ties {ties}",
                lengths[b]
            );
            assert_eq!(
                counts[r],
                want.len() as i32,
                "count: budget {budget}, length {}, sequence {b} head {h}",
                lengths[b]
            );
        }
    }
    eprintln!(
        "top-k budget {budget} kv {kv_heads} ties {ties} lengths {lengths:?}: selections match"
    );
}

/// The whole decode-time path: keys appended by the kernel (prefill, then decode steps),
/// page scores from the kernel's metadata, top-K selection; equal to `ir::quest::select` on
/// the same keys and queries.
#[test]
#[ignore = "needs a CUDA device"]
fn append_estimate_top_k_match_ir_quest_select() {
    let device = common::device();
    let mut rng = common::rng(common::fresh_seed("append_estimate_top_k_pipeline"));
    let options = QuestOptions {
        budget_tokens: 4 * PAGE_SIZE,
        page_size: PAGE_SIZE,
        skip_layers: 0,
    };
    for layout in layouts() {
        let mut f = Fixture::new(&device, layout, 64);
        let ids: Vec<SeqId> = (0..4).map(|_| f.add()).collect();
        // Prefill 199, 37, 63, 64 tokens; then two decode steps: 201, 39, 65 (P = 5 > 4:
        // sparse), 66.
        f.append(
            &device,
            &[(ids[0], 199), (ids[1], 37), (ids[2], 63), (ids[3], 64)],
            &mut rng,
        );
        let mut batch = None;
        for _ in 0..2 {
            let requests: Vec<(SeqId, usize)> = ids.iter().map(|&id| (id, 1)).collect();
            batch = Some(f.append(&device, &requests, &mut rng));
        }
        let tables = batch.unwrap().tables;
        let q = common::random(
            layout.dtype,
            &[ids.len(), layout.q_heads, layout.head_dim],
            1.0,
            &mut rng,
        );
        let scores = run_estimate(&device, &mut f.cache, &tables, &q);
        let budget = options.budget_pages();
        let (selected, counts) = run_top_k(
            &device,
            &scores,
            &tables.seq_lens,
            layout.kv_heads,
            tables.max_pages,
            budget,
            budget,
        );
        let (keys, lengths) = f.keys_tensor(&ids);
        let q4 = Tensor {
            shape: vec![ids.len(), 1, layout.q_heads, layout.head_dim],
            ..q.clone()
        };
        let want = quest::select(&q4, &keys, &lengths, &options).unwrap();
        for (b, per_head) in want.pages.iter().enumerate() {
            for (h, pages) in per_head.iter().enumerate() {
                let r = b * layout.kv_heads + h;
                assert_eq!(
                    &selected[r * budget..(r + 1) * budget],
                    &expected_row(pages, budget)[..],
                    "{} length {}: sequence {b} head {h}",
                    layout.tag(),
                    lengths[b]
                );
                assert_eq!(counts[r], pages.len() as i32);
            }
        }
        eprintln!(
            "{} lengths {lengths:?}: pipeline selections match ir::quest::select",
            layout.tag()
        );
    }
}
