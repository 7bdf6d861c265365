//! GPU tests of split-KV decode attention over the paged KV cache
//! (`kiln_kernels::attention::decode`: partial kernel + merge, in both merge modes: the
//! separate merge kernel and the merge fused into the partial kernel's last block), dense
//! against
//! `kiln_ir::interp`'s `Op::AttentionDecode` on the pages gathered into a contiguous cache,
//! sparse against `kiln_ir::quest::sparse_decode` with a given selection; and a bandwidth
//! report.
//!
//! Every problem draws fresh random inputs (seed printed; `KILN_TEST_SEED` reproduces) and
//! scatters its pages over a shuffled physical order with spare pages between them. Slots
//! past a sequence's length, spare pages and the page-table entries past a sequence's pages
//! (which point at a spare page) hold NaN, so reading any of them as a key or value shows;
//! padding of `selected_pages` past `selected_counts` is logical page 0, so reading it
//! double-counts page 0. Outputs and the f32 workspace are poisoned (NaN) and every
//! workspace entry of the launched splits must be written. Planted structure: per sequence
//! and KV head a few keys aligned with one query head of the group (score about 12: a
//! peaked softmax, so a key read from the wrong page, slot or head shows in that row).
//! Batches mix unequal lengths that are not multiples of the page size (length 1
//! included); GQA groups 1, 4, 8 and 16; f16 and bf16; head_dim 32, 64 and 128; page sizes
//! 1 to 256; split counts 1, the rule's and many (with empty splits); entry batches of more
//! than one block's worth of pages; tuning off the defaults. Relative error ≤ 1e-2 per
//! problem and ≤ 2e-2 per (sequence, head) row. The fused mode runs every problem twice in
//! a row on the same (initially zeroed) merge counters, with a freshly poisoned output each
//! time: both outputs must be bit-identical and the counters must come back all zero; with
//! one split the workspace must stay untouched (poisoned).
//!
//! Run on a GPU machine with
//! `cargo test --release --test gpu_attention_decode -- --ignored --nocapture`
//! (the references are plain f64 loops: use `--release`).

mod common;

use std::collections::HashMap;

use common::{assert_close, device, fresh_seed, random, rng, tolerance};
use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::interp;
use kiln::ir::op::{InputKind, Op};
use kiln::ir::quest::{self, QuestOptions, Selection};
use kiln::ir::shape::Shape;
use kiln::ir::tensor::Tensor;
use kiln_kernels::attention::decode::{self, DecodeAttentionSpec, MergeMode};
use kiln_kernels::attention::paged::PageOrder;
use kiln_kernels::attention::PagedKv;
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor, LoadedKernel};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Score (natural-log units) of a planted key against the query head it is aligned with.
const PLANTED_SCORE: f32 = 12.0;

/// Planted keys per (sequence, KV head): the first token, the last token, one at random.
const PLANTS: usize = 3;

/// One batch of sequences in the paged layout, on the host, with its contiguous twin.
struct Problem {
    layout: PagedKv,
    lens: Vec<usize>,
    max_pages: usize,
    /// `[batch, q_heads, head_dim]`.
    q: Tensor,
    /// `[num_pages, kv_heads, page_size, head_dim]`; slots no sequence owns are NaN.
    k_pages: Tensor,
    v_pages: Tensor,
    /// `[batch, max_pages]`; entries past a sequence's pages name a spare (NaN) page.
    page_table: Vec<i32>,
    /// `[batch, capacity, kv_heads, head_dim]`, rows past a sequence's length zero.
    k_cache: Tensor,
    v_cache: Tensor,
    scale: f32,
}

impl Problem {
    fn random(layout: PagedKv, lens: &[usize], rng: &mut ChaCha8Rng) -> Problem {
        let PagedKv {
            dtype,
            q_heads,
            kv_heads,
            head_dim: d,
            page_size,
            ..
        } = layout;
        assert!(lens.iter().all(|&l| l >= 1), "decode needs length >= 1");
        let batch = lens.len();
        let capacity = *lens.iter().max().unwrap();
        let pages_of = |len: usize| len.div_ceil(page_size);
        let max_pages = pages_of(capacity) + 2;
        let used: usize = lens.iter().map(|&l| pages_of(l)).sum();
        let num_pages = used + 3;

        // Shuffled physical pages; the last three stay spare (NaN).
        let mut physical: Vec<usize> = (0..num_pages).collect();
        for i in (1..num_pages).rev() {
            let j = rng.random_range(0..=i);
            physical.swap(i, j);
        }
        let spare = physical[num_pages - 1] as i32;
        let mut page_table = vec![spare; batch * max_pages];
        let mut next = 0;
        for (b, &len) in lens.iter().enumerate() {
            for j in 0..pages_of(len) {
                page_table[b * max_pages + j] = physical[next] as i32;
                next += 1;
            }
        }

        let q = random(dtype, &[batch, q_heads, d], 1.0, rng);
        let row = kv_heads * d;
        let mut k_cache = Tensor::zeros(dtype, &[batch, capacity, kv_heads, d]);
        let mut v_cache = k_cache.clone();
        for (b, &len) in lens.iter().enumerate() {
            let keys = random(dtype, &[len, kv_heads, d], 1.0, rng);
            let values = random(dtype, &[len, kv_heads, d], 1.0, rng);
            let start = b * capacity * row;
            k_cache.data[start..start + len * row].copy_from_slice(&keys.data);
            v_cache.data[start..start + len * row].copy_from_slice(&values.data);
        }
        let page_shape = [num_pages, kv_heads, page_size, d];
        let nan_pages = Tensor {
            dtype,
            shape: page_shape.to_vec(),
            data: vec![f32::NAN; page_shape.iter().product()],
        };
        let mut problem = Problem {
            layout,
            lens: lens.to_vec(),
            max_pages,
            q,
            k_pages: nan_pages.clone(),
            v_pages: nan_pages,
            page_table,
            k_cache,
            v_cache,
            scale: 1.0 / (d as f32).sqrt(),
        };
        problem.plant_aligned_keys(rng);
        problem.scatter_pages();
        problem
    }

    fn capacity(&self) -> usize {
        self.k_cache.shape[1]
    }

    /// Offset of token `t`, KV head `g` of sequence `b` in the contiguous cache.
    fn cache_offset(&self, b: usize, t: usize, g: usize) -> usize {
        let l = &self.layout;
        ((b * self.capacity() + t) * l.kv_heads + g) * l.head_dim
    }

    /// Per sequence and KV head, overwrites [`PLANTS`] keys with a query head of the group
    /// scaled so that its score is [`PLANTED_SCORE`].
    fn plant_aligned_keys(&mut self, rng: &mut ChaCha8Rng) {
        let l = self.layout;
        let d = l.head_dim;
        for b in 0..self.lens.len() {
            let len = self.lens[b];
            for g in 0..l.kv_heads {
                for plant in 0..PLANTS {
                    let t = match plant {
                        0 => 0,
                        1 => len - 1,
                        _ => rng.random_range(0..len),
                    };
                    let h = g * l.group_size() + rng.random_range(0..l.group_size());
                    let q_at = (b * l.q_heads + h) * d;
                    let query = self.q.data[q_at..q_at + d].to_vec();
                    let norm2: f32 = query.iter().map(|v| v * v).sum();
                    let factor = PLANTED_SCORE / (self.scale * norm2.max(1e-3));
                    let k_at = self.cache_offset(b, t, g);
                    for (e, v) in query.iter().enumerate() {
                        self.k_cache.data[k_at + e] = l.dtype.round(v * factor);
                    }
                }
            }
        }
    }

    /// Copies every valid token of the contiguous cache into its physical page.
    fn scatter_pages(&mut self) {
        let l = self.layout;
        let d = l.head_dim;
        for (b, &len) in self.lens.iter().enumerate() {
            for t in 0..len {
                let page = self.page_table[b * self.max_pages + t / l.page_size] as usize;
                for g in 0..l.kv_heads {
                    let at = ((page * l.kv_heads + g) * l.page_size + t % l.page_size) * d;
                    let from = self.cache_offset(b, t, g);
                    self.k_pages.data[at..at + d]
                        .copy_from_slice(&self.k_cache.data[from..from + d]);
                    self.v_pages.data[at..at + d]
                        .copy_from_slice(&self.v_cache.data[from..from + d]);
                }
            }
        }
    }

    /// `q` as the interpreter wants it: `[batch, 1, q_heads, head_dim]`, f32.
    fn q_tokens(&self) -> Tensor {
        let l = &self.layout;
        Tensor::f32(
            &[self.lens.len(), 1, l.q_heads, l.head_dim],
            self.q.data.clone(),
        )
    }

    fn f32_cache(&self) -> (Tensor, Tensor) {
        let as_f32 = |t: &Tensor| Tensor::f32(&t.shape, t.data.clone());
        (as_f32(&self.k_cache), as_f32(&self.v_cache))
    }

    /// Dense decode attention by the interpreter, `[batch, q_heads, head_dim]` in the dtype.
    fn dense_reference(&self) -> Tensor {
        let (k_cache, v_cache) = self.f32_cache();
        let lengths: Vec<i32> = self.lens.iter().map(|&l| l as i32).collect();
        let mut g = Graph::new("decode_reference");
        let mut inputs: HashMap<String, Tensor> = HashMap::new();
        let mut ids = Vec::new();
        for (name, t) in [
            ("q", self.q_tokens()),
            ("k_cache", k_cache),
            ("v_cache", v_cache),
            ("lengths", Tensor::i32(&[lengths.len()], &lengths)),
        ] {
            let id = g
                .input(name, InputKind::Activation, t.dtype, Shape::of(&t.shape))
                .unwrap();
            ids.push(id);
            inputs.insert(name.to_string(), t);
        }
        let out = g
            .add1("attention", Op::AttentionDecode { scale: self.scale }, &ids)
            .unwrap();
        g.output("out", out);
        let exact = interp::run(&g, &inputs).unwrap().remove("out").unwrap();
        self.as_output(exact)
    }

    /// Quest-sparse decode attention over `selection` by `quest::sparse_decode`.
    fn sparse_reference(&self, selection: &Selection) -> Tensor {
        let (k_cache, v_cache) = self.f32_cache();
        let exact = quest::sparse_decode(
            &self.q_tokens(),
            &k_cache,
            &v_cache,
            &self.lens,
            self.scale,
            selection,
        )
        .unwrap();
        self.as_output(exact)
    }

    /// A reference `[batch, 1, q_heads, d]` reshaped to the kernel's `[batch, q_heads, d]`
    /// and rounded to the dtype.
    fn as_output(&self, exact: Tensor) -> Tensor {
        let l = &self.layout;
        Tensor::new(
            l.dtype,
            &[self.lens.len(), l.q_heads, l.head_dim],
            exact.data,
        )
        .unwrap()
    }

    /// Quest's own selection for this problem's queries and keys.
    fn quest_selection(&self, budget_pages: usize) -> Selection {
        let options = QuestOptions {
            budget_tokens: budget_pages * self.layout.page_size,
            page_size: self.layout.page_size,
            skip_layers: 0,
        };
        let (k_cache, _) = self.f32_cache();
        quest::select(&self.q_tokens(), &k_cache, &self.lens, &options).unwrap()
    }

    /// A random selection per (sequence, KV head): up to `most` pages, ascending, always
    /// including the last page, counts differing between KV heads.
    fn random_selection(&self, most: usize, rng: &mut ChaCha8Rng) -> Selection {
        let l = &self.layout;
        let pages = self
            .lens
            .iter()
            .map(|&len| {
                let count = len.div_ceil(l.page_size);
                (0..l.kv_heads)
                    .map(|_| {
                        let take = rng.random_range(1..=most.min(count));
                        let mut chosen: Vec<usize> = vec![count - 1];
                        while chosen.len() < take {
                            let p = rng.random_range(0..count);
                            if !chosen.contains(&p) {
                                chosen.push(p);
                            }
                        }
                        chosen.sort_unstable();
                        chosen
                    })
                    .collect()
            })
            .collect();
        Selection {
            page_size: l.page_size,
            pages,
        }
    }
}

/// The device-side operands of one problem.
struct DeviceInputs {
    q: DeviceTensor,
    k_pages: DeviceTensor,
    v_pages: DeviceTensor,
    page_table: DeviceTensor,
    seq_lens: DeviceTensor,
    /// Sparse only: `selected_pages`, `selected_counts` and `max_selected`.
    selection: Option<(DeviceTensor, DeviceTensor, usize)>,
}

impl DeviceInputs {
    fn upload(device: &CudaDevice, p: &Problem, selection: Option<&Selection>) -> DeviceInputs {
        let up = |t: &Tensor| DeviceTensor::upload(device, t).unwrap();
        let lens: Vec<i32> = p.lens.iter().map(|&l| l as i32).collect();
        let selection = selection.map(|s| {
            let kv_heads = p.layout.kv_heads;
            let most = s.pages.iter().flatten().map(Vec::len).max().unwrap_or(1);
            // Padding is logical page 0: reading it double-counts page 0.
            let mut pages = vec![0i32; p.lens.len() * kv_heads * most];
            let mut counts = vec![0i32; p.lens.len() * kv_heads];
            for (b, per_kv) in s.pages.iter().enumerate() {
                for (g, chosen) in per_kv.iter().enumerate() {
                    let row = b * kv_heads + g;
                    counts[row] = chosen.len() as i32;
                    for (e, &page) in chosen.iter().enumerate() {
                        pages[row * most + e] = page as i32;
                    }
                }
            }
            let batch = p.lens.len();
            (
                up(&Tensor::i32(&[batch, kv_heads, most], &pages)),
                up(&Tensor::i32(&[batch, kv_heads], &counts)),
                most,
            )
        });
        DeviceInputs {
            q: up(&p.q),
            k_pages: up(&p.k_pages),
            v_pages: up(&p.v_pages),
            page_table: up(&Tensor::i32(&[p.lens.len(), p.max_pages], &p.page_table)),
            seq_lens: up(&Tensor::i32(&[lens.len()], &lens)),
            selection,
        }
    }
}

/// The f32 split states between the two kernels, poisoned, and (fused mode) the merge
/// counters, zeroed.
struct Workspace {
    acc: DeviceTensor,
    max: DeviceTensor,
    sum: DeviceTensor,
    counters: Option<DeviceTensor>,
}

impl Workspace {
    fn poisoned(
        device: &CudaDevice,
        spec: &DecodeAttentionSpec,
        batch: usize,
        splits: usize,
    ) -> Self {
        let sizes = spec.workspace(batch, splits);
        let poisoned = |n: usize| DeviceTensor::poisoned(device, DType::F32, &[n]).unwrap();
        let counters = spec.fused().then(|| {
            let n = sizes.counter_elements;
            DeviceTensor::upload(device, &Tensor::i32(&[n], &vec![0; n])).unwrap()
        });
        Workspace {
            acc: poisoned(sizes.acc_elements),
            max: poisoned(sizes.stat_elements),
            sum: poisoned(sizes.stat_elements),
            counters,
        }
    }

    /// Fails unless every merge counter is back to zero.
    fn assert_counters_zero(&self, what: &str) {
        if let Some(counters) = &self.counters {
            let host = counters.download().unwrap();
            if let Some(i) = host.data.iter().position(|&v| v != 0.0) {
                panic!(
                    "{what}: merge_counters[{i}] is {} after the launch",
                    host.data[i]
                );
            }
        }
    }
}

/// The spec in both merge modes: separate merge kernel, then fused.
fn both_modes(spec: &DecodeAttentionSpec) -> [DecodeAttentionSpec; 2] {
    [
        spec.with_merge(MergeMode::Separate),
        spec.with_merge(MergeMode::LastBlock),
    ]
}

/// The kernels of a spec, loaded (no merge kernel in the fused mode).
struct Loaded {
    partial: LoadedKernel,
    merge: Option<LoadedKernel>,
}

impl Loaded {
    fn new(device: &CudaDevice, spec: &DecodeAttentionSpec) -> Loaded {
        let kernels = decode::generate(spec).unwrap_or_else(|e| panic!("{e}"));
        Loaded {
            partial: device.load(&kernels.partial).unwrap(),
            merge: kernels.merge.map(|m| device.load(&m).unwrap()),
        }
    }

    /// Queues the partial kernel and the merge (fused: the partial kernel alone).
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        inputs: &DeviceInputs,
        workspace: &Workspace,
        out: &DeviceTensor,
        batch: usize,
        max_pages: usize,
        splits: usize,
        scale: f32,
    ) {
        let mut args = Args::new()
            .buffer("q", inputs.q.arg())
            .buffer("k_pages", inputs.k_pages.arg())
            .buffer("v_pages", inputs.v_pages.arg())
            .buffer("page_table", inputs.page_table.arg())
            .buffer("seq_lens", inputs.seq_lens.arg())
            .buffer("partial_acc", workspace.acc.arg())
            .buffer("partial_max", workspace.max.arg())
            .buffer("partial_sum", workspace.sum.arg())
            .u32("batch", batch as u32)
            .u32("max_pages", max_pages as u32)
            .u32("splits", splits as u32)
            .f32("scale", scale);
        if let Some((pages, counts, most)) = &inputs.selection {
            args = args
                .buffer("selected_pages", pages.arg())
                .buffer("selected_counts", counts.arg())
                .u32("max_selected", *most as u32);
        }
        if let Some(counters) = &workspace.counters {
            args = args
                .buffer("out", out.arg())
                .buffer("merge_counters", counters.arg());
        }
        self.partial
            .launch(&args)
            .unwrap_or_else(|e| panic!("partial: {e}"));
        let Some(merge) = &self.merge else {
            return;
        };
        let merge_args = Args::new()
            .buffer("partial_acc", workspace.acc.arg())
            .buffer("partial_max", workspace.max.arg())
            .buffer("partial_sum", workspace.sum.arg())
            .buffer("out", out.arg())
            .u32("batch", batch as u32)
            .u32("splits", splits as u32);
        merge
            .launch(&merge_args)
            .unwrap_or_else(|e| panic!("merge: {e}"));
    }
}

/// Runs `spec` on `problem` with `splits` splits (and `selection` when sparse); checks
/// that every workspace entry was written (fused with one split: that none was) and returns
/// `out`. Fused: runs twice on the same counters, a fresh poisoned `out` each time, and
/// checks that the outputs are bit-identical and the counters zero after each run.
fn run(
    device: &CudaDevice,
    loaded: &Loaded,
    spec: &DecodeAttentionSpec,
    problem: &Problem,
    selection: Option<&Selection>,
    splits: usize,
) -> Tensor {
    let l = &spec.layout;
    let batch = problem.lens.len();
    let inputs = DeviceInputs::upload(device, problem, selection);
    let workspace = Workspace::poisoned(device, spec, batch, splits);
    let what = format!("{} splits {splits}", spec.entry_name());
    let launch_once = || {
        let out = DeviceTensor::poisoned(device, l.dtype, &[batch, l.q_heads, l.head_dim]).unwrap();
        loaded.launch(
            &inputs,
            &workspace,
            &out,
            batch,
            problem.max_pages,
            splits,
            problem.scale,
        );
        device.synchronize().unwrap();
        workspace.assert_counters_zero(&what);
        out.download().unwrap()
    };
    let out = launch_once();
    let untouched = spec.fused() && splits == 1;
    for (name, t) in [
        ("partial_acc", &workspace.acc),
        ("partial_max", &workspace.max),
        ("partial_sum", &workspace.sum),
    ] {
        let host = t.download().unwrap();
        if untouched {
            if let Some(i) = host.data.iter().position(|v| !v.is_nan()) {
                panic!("{what}: one split, yet {name}[{i}] was written");
            }
        } else if let Some(i) = host.data.iter().position(|v| !v.is_finite()) {
            panic!(
                "{what}: {name}[{i}] is {} (unwritten or overflowed)",
                host.data[i]
            );
        }
    }
    if spec.fused() {
        let again = launch_once();
        let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&out),
            bits(&again),
            "{what}: the second launch on the same counters differs"
        );
    }
    out
}

/// The whole-problem check, then every (sequence, head) row on its own at twice the
/// tolerance: a row computed from the wrong keys stands out even where the norm hides it.
fn assert_rows_close(what: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    let tol = tolerance(dtype);
    assert_close(what, got, want, tol);
    let heads = want.shape[1];
    let d = want.shape[2];
    for (row, (g, w)) in got.data.chunks(d).zip(want.data.chunks(d)).enumerate() {
        let (mut error, mut norm) = (0f64, 0f64);
        for (&a, &b) in g.iter().zip(w) {
            error += (a as f64 - b as f64).powi(2);
            norm += (b as f64).powi(2);
        }
        let e = (error / norm.max(1e-30)).sqrt();
        assert!(
            e <= 2.0 * tol,
            "{what}: sequence {} head {}: relative error {e:.3e}",
            row / heads,
            row % heads
        );
    }
}

/// Split counts to try: 1, the rule's for this batch, and many (empty splits for the short
/// sequences).
fn split_counts(spec: &DecodeAttentionSpec, lens: &[usize]) -> Vec<usize> {
    let longest = *lens.iter().max().unwrap();
    let rule = spec.splits(lens.len(), longest, decode::H100_SM_COUNT) as usize;
    let mut counts = vec![1, rule, 37];
    counts.sort_unstable();
    counts.dedup();
    counts
}

/// Dense decode of `spec` on fresh inputs with `lens`, at every split count of
/// [`split_counts`], against the interpreter.
fn check_dense(
    device: &CudaDevice,
    spec: &DecodeAttentionSpec,
    lens: &[usize],
    rng: &mut ChaCha8Rng,
) {
    assert!(!spec.sparse);
    let problem = Problem::random(spec.layout, lens, rng);
    let want = problem.dense_reference();
    for spec in &both_modes(spec) {
        let loaded = Loaded::new(device, spec);
        for splits in split_counts(spec, lens) {
            let got = run(device, &loaded, spec, &problem, None, splits);
            let what = format!("{} lens {lens:?} splits {splits}", spec.entry_name());
            assert_rows_close(&what, &got, &want, spec.layout.dtype);
        }
    }
}

/// Sparse decode of `spec` with `selection` (or Quest's own with `budget_pages`), against
/// `quest::sparse_decode`.
fn check_sparse(
    device: &CudaDevice,
    spec: &DecodeAttentionSpec,
    problem: &Problem,
    selection: &Selection,
    label: &str,
) {
    assert!(spec.sparse);
    let want = problem.sparse_reference(selection);
    let most = selection
        .pages
        .iter()
        .flatten()
        .map(Vec::len)
        .max()
        .unwrap();
    let longest = most * spec.layout.page_size;
    let rule = spec.splits(problem.lens.len(), longest, decode::H100_SM_COUNT) as usize;
    let mut counts = vec![1, rule, 9];
    counts.sort_unstable();
    counts.dedup();
    for spec in &both_modes(spec) {
        let loaded = Loaded::new(device, spec);
        for &splits in &counts {
            let got = run(device, &loaded, spec, problem, Some(selection), splits);
            let what = format!(
                "{} {label} lens {:?} splits {splits}",
                spec.entry_name(),
                problem.lens
            );
            assert_rows_close(&what, &got, &want, spec.layout.dtype);
        }
    }
}

fn layout(
    dtype: DType,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    page_size: usize,
) -> PagedKv {
    PagedKv {
        dtype,
        q_heads,
        kv_heads,
        head_dim,
        page_size,
        order: PageOrder::HeadMajor,
    }
}

/// (q_heads, kv_heads): GQA groups 1, 4, 8 and 16.
const HEADS: [(usize, usize); 4] = [(4, 4), (8, 2), (16, 2), (32, 2)];

/// Unequal lengths, not multiples of the page size, length 1 included.
const LENS: [usize; 4] = [1, 17, 300, 1029];

fn dense_sweep(dtype: DType, test: &str) {
    let device = device();
    let mut rng = rng(fresh_seed(test));
    for head_dim in [32, 64, 128] {
        for (q_heads, kv_heads) in HEADS {
            let spec =
                DecodeAttentionSpec::new(layout(dtype, q_heads, kv_heads, head_dim, 16), false);
            check_dense(&device, &spec, &LENS, &mut rng);
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_dense_f16_matches_interp() {
    dense_sweep(DType::F16, "decode_dense_f16");
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_dense_bf16_matches_interp() {
    dense_sweep(DType::BF16, "decode_dense_bf16");
}

/// Page sizes 1, 4 and 64; more pages per split than one entry batch holds (2100 tokens at
/// one split: 132 pages of 16; 600 tokens of page size 4: 150 pages); batch 1 with length 1.
#[test]
#[ignore = "needs a CUDA device"]
fn decode_dense_page_sizes_and_long_splits_match_interp() {
    let device = device();
    let mut rng = rng(fresh_seed("decode_dense_page_sizes"));
    let cases: [(PagedKv, &[usize]); 6] = [
        (layout(DType::BF16, 8, 2, 64, 1), &[1, 63, 250]),
        (layout(DType::F16, 8, 2, 128, 4), &[600, 3, 77]),
        (layout(DType::BF16, 16, 2, 128, 64), &[1, 65, 129, 700]),
        (layout(DType::F16, 32, 8, 128, 16), &[2100, 5]),
        (layout(DType::F16, 32, 8, 128, 16), &[1]),
        (layout(DType::BF16, 32, 8, 64, 256), &[255, 257, 1]),
    ];
    for (l, lens) in cases {
        check_dense(&device, &DecodeAttentionSpec::new(l, false), lens, &mut rng);
    }
}

/// Tuning knobs off the defaults: heads of a group split over blocks, 1, 2 and 8 warps, 1
/// to 8 steps, 2 to 8 stages.
#[test]
#[ignore = "needs a CUDA device"]
fn decode_tuning_variants_match_interp() {
    let device = device();
    let mut rng = rng(fresh_seed("decode_tuning_variants"));
    let base = layout(DType::F16, 16, 2, 128, 16);
    let tunings = [
        (2, 8, 2, 3),
        (1, 1, 1, 2),
        (4, 2, 8, 2),
        (8, 4, 4, 8),
        (4, 16, 1, 4),
    ];
    for (heads, warps, steps, stages) in tunings {
        let spec = DecodeAttentionSpec::new(base, false).with_tuning(heads, warps, steps, stages);
        check_dense(&device, &spec, &LENS, &mut rng);
    }
    let d64 = layout(DType::BF16, 24, 4, 64, 16);
    let spec = DecodeAttentionSpec::new(d64, true).with_tuning(3, 4, 2, 4);
    let problem = Problem::random(d64, &LENS, &mut rng);
    let selection = problem.random_selection(12, &mut rng);
    check_sparse(&device, &spec, &problem, &selection, "random selection");
}

/// Head dim 32 on its own (the tiny presets: 4 lanes per K/V row, 128-token stages, merge
/// groups of 8 threads): the tiny-llama and tiny-mixtral head counts dense and sparse in
/// both dtypes, page sizes 1 (one 128-token stage takes a whole 128-entry batch) and 256,
/// more pages per split than one entry batch holds (2100 tokens), and
/// tuning off the defaults (one warp: a merge of 4 groups; 16 warps; 8 steps; 8 heads per
/// block).
#[test]
#[ignore = "needs a CUDA device"]
fn decode_d32_matches_interp() {
    let device = device();
    let mut rng = rng(fresh_seed("decode_d32"));
    for dtype in [DType::F16, DType::BF16] {
        for (q_heads, kv_heads) in [(8, 2), (4, 2), (4, 4)] {
            let l = layout(dtype, q_heads, kv_heads, 32, 16);
            check_dense(
                &device,
                &DecodeAttentionSpec::new(l, false),
                &LENS,
                &mut rng,
            );
            let problem = Problem::random(l, &LENS, &mut rng);
            let quest = problem.quest_selection(8);
            let spec = DecodeAttentionSpec::new(l, true);
            check_sparse(&device, &spec, &problem, &quest, "quest budget 8 pages");
            let random = problem.random_selection(20, &mut rng);
            check_sparse(&device, &spec, &problem, &random, "random selection");
        }
    }
    let cases: [(PagedKv, &[usize]); 4] = [
        (layout(DType::BF16, 8, 2, 32, 1), &[1, 63, 250]),
        (layout(DType::F16, 8, 2, 32, 256), &[255, 257, 1]),
        (layout(DType::F16, 8, 2, 32, 16), &[2100, 5]),
        (layout(DType::BF16, 16, 2, 32, 4), &[600, 3, 77]),
    ];
    for (l, lens) in cases {
        check_dense(&device, &DecodeAttentionSpec::new(l, false), lens, &mut rng);
    }
    let base = layout(DType::F16, 16, 2, 32, 16);
    for (heads, warps, steps, stages) in [
        (1, 1, 1, 2),
        (4, 1, 8, 8),
        (8, 4, 4, 4),
        (2, 16, 1, 4),
        (4, 4, 8, 3),
    ] {
        let spec = DecodeAttentionSpec::new(base, false).with_tuning(heads, warps, steps, stages);
        check_dense(&device, &spec, &LENS, &mut rng);
    }
    let spec = DecodeAttentionSpec::new(base, true).with_tuning(2, 1, 4, 3);
    let problem = Problem::random(base, &LENS, &mut rng);
    let selection = problem.random_selection(12, &mut rng);
    check_sparse(
        &device,
        &spec,
        &problem,
        &selection,
        "random selection, one warp",
    );
}

fn sparse_sweep(dtype: DType, test: &str) {
    let device = device();
    let mut rng = rng(fresh_seed(test));
    let lens = [1, 40, 700, 1500];
    for head_dim in [32, 64, 128] {
        for (q_heads, kv_heads) in HEADS {
            let l = layout(dtype, q_heads, kv_heads, head_dim, 16);
            let spec = DecodeAttentionSpec::new(l, true);
            let problem = Problem::random(l, &lens, &mut rng);
            let quest = problem.quest_selection(8);
            check_sparse(&device, &spec, &problem, &quest, "quest budget 8 pages");
            let random = problem.random_selection(20, &mut rng);
            check_sparse(&device, &spec, &problem, &random, "random selection");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_sparse_f16_matches_quest_reference() {
    sparse_sweep(DType::F16, "decode_sparse_f16");
}

#[test]
#[ignore = "needs a CUDA device"]
fn decode_sparse_bf16_matches_quest_reference() {
    sparse_sweep(DType::BF16, "decode_sparse_bf16");
}

/// Selecting every page reproduces dense attention (the interpreter's), and a selection
/// spanning more than one entry batch (150 of 160 pages at one split) works.
#[test]
#[ignore = "needs a CUDA device"]
fn decode_sparse_with_every_page_matches_dense_interp() {
    let device = device();
    let mut rng = rng(fresh_seed("decode_sparse_every_page"));
    let l = layout(DType::F16, 32, 8, 128, 16);
    let lens = [2560, 1, 333];
    let problem = Problem::random(l, &lens, &mut rng);
    let all = Selection::all(&lens, l.kv_heads, l.page_size);
    let spec = DecodeAttentionSpec::new(l, true);
    let want = problem.dense_reference();
    for mode in both_modes(&spec) {
        let loaded = Loaded::new(&device, &mode);
        for splits in [1, 5] {
            let got = run(&device, &loaded, &mode, &problem, Some(&all), splits);
            let what = format!("{} every page splits {splits}", mode.entry_name());
            assert_rows_close(&what, &got, &want, l.dtype);
        }
    }
    let wide = problem.random_selection(150, &mut rng);
    check_sparse(&device, &spec, &problem, &wide, "150-page selection");
}

/// The same inputs and split count give bit-identical outputs (the fused mode's atomic
/// only picks which block merges, not the order of the merge), and both modes agree to
/// the bit: the fused tail runs the merge kernel's code.
#[test]
#[ignore = "needs a CUDA device"]
fn decode_is_deterministic() {
    let device = device();
    let mut rng = rng(fresh_seed("decode_is_deterministic"));
    let l = layout(DType::BF16, 32, 8, 128, 16);
    let problem = Problem::random(l, &[900, 31], &mut rng);
    let bits = |t: &Tensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let mut outputs = Vec::new();
    for spec in both_modes(&DecodeAttentionSpec::new(l, false)) {
        let loaded = Loaded::new(&device, &spec);
        let first = run(&device, &loaded, &spec, &problem, None, 7);
        let second = run(&device, &loaded, &spec, &problem, None, 7);
        assert_eq!(bits(&first), bits(&second), "{}", spec.entry_name());
        outputs.push(bits(&first));
    }
    assert_eq!(outputs[0], outputs[1], "separate and fused merges differ");
}

/// K/V bandwidth of dense decode (reported, not asserted): batch 1, 32 query heads, head_dim
/// 128, f16, 8 and 32 KV heads, 8K and 32K tokens, the fused merge then the separate one;
/// median of 50 launches (fused: the partial kernel alone; separate: partial + merge, and
/// the partial kernel alone) after 10 warm-ups, rotating among caches that together exceed the L2, pages in a
/// shuffled physical order. GB/s counts the K and V bytes of the sequence once.
#[test]
#[ignore = "needs a CUDA device"]
fn decode_bandwidth_report() {
    let device = device();
    let mut rng = rng(fresh_seed("decode_bandwidth_report"));
    eprintln!("{}", device.info());
    let sm_count = device.info().sm_count as usize;
    eprintln!(
        "{:<56} {:>6} {:>4} {:>6} {:>10} {:>10} {:>10}",
        "kernel", "len", "kv", "splits", "total us", "GB/s", "partial us"
    );
    for (kv_heads, len) in [(8, 8192), (8, 32768), (32, 8192), (32, 32768)] {
        let l = layout(DType::F16, 32, kv_heads, 128, 16);
        let spec = DecodeAttentionSpec::new(l, false);
        let pages = len / l.page_size;
        let kv_bytes = 2 * len * kv_heads * l.head_dim * 2;
        let copies = (300_000_000 / kv_bytes).clamp(1, 8);
        let splits = spec.splits(1, len, sm_count) as usize;
        let caches: Vec<DeviceInputs> = (0..copies)
            .map(|_| {
                let mut order: Vec<i32> = (0..pages as i32).collect();
                for i in (1..pages).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                let shape = [pages, kv_heads, l.page_size, l.head_dim];
                let up = |t: &Tensor| DeviceTensor::upload(&device, t).unwrap();
                DeviceInputs {
                    q: up(&Tensor::uniform(
                        l.dtype,
                        &[1, l.q_heads, l.head_dim],
                        1.0,
                        &mut rng,
                    )),
                    k_pages: up(&Tensor::uniform(l.dtype, &shape, 1.0, &mut rng)),
                    v_pages: up(&Tensor::uniform(l.dtype, &shape, 1.0, &mut rng)),
                    page_table: up(&Tensor::i32(&[1, pages], &order)),
                    seq_lens: up(&Tensor::i32(&[1], &[len as i32])),
                    selection: None,
                }
            })
            .collect();
        for spec in [
            spec.with_merge(MergeMode::LastBlock),
            spec.with_merge(MergeMode::Separate),
        ] {
            let loaded = Loaded::new(&device, &spec);
            let workspace = Workspace::poisoned(&device, &spec, 1, splits);
            let out =
                DeviceTensor::poisoned(&device, l.dtype, &[1, l.q_heads, l.head_dim]).unwrap();
            let scale = 1.0 / (l.head_dim as f32).sqrt();
            let mut turn = 0usize;
            let total = device
                .time(
                    || {
                        let inputs = &caches[turn % copies];
                        turn += 1;
                        loaded.launch(inputs, &workspace, &out, 1, pages, splits, scale);
                        Ok(())
                    },
                    10,
                    50,
                )
                .unwrap();
            let partial = if spec.fused() {
                total.clone()
            } else {
                device
                    .time(
                        || {
                            let inputs = &caches[turn % copies];
                            turn += 1;
                            let args = Args::new()
                                .buffer("q", inputs.q.arg())
                                .buffer("k_pages", inputs.k_pages.arg())
                                .buffer("v_pages", inputs.v_pages.arg())
                                .buffer("page_table", inputs.page_table.arg())
                                .buffer("seq_lens", inputs.seq_lens.arg())
                                .buffer("partial_acc", workspace.acc.arg())
                                .buffer("partial_max", workspace.max.arg())
                                .buffer("partial_sum", workspace.sum.arg())
                                .u32("batch", 1)
                                .u32("max_pages", pages as u32)
                                .u32("splits", splits as u32)
                                .f32("scale", scale);
                            loaded.partial.launch(&args).map(drop)
                        },
                        10,
                        50,
                    )
                    .unwrap()
            };
            let seconds = total.median_ms * 1e-3;
            eprintln!(
                "{:<56} {:>6} {:>4} {:>6} {:>10.1} {:>10.0} {:>10.1}",
                spec.entry_name(),
                len,
                kv_heads,
                splits,
                seconds * 1e6,
                kv_bytes as f64 / seconds / 1e9,
                partial.median_ms * 1e3
            );
            let host = out.download().unwrap();
            assert!(host.data.iter().all(|v| v.is_finite()), "output has NaN");
            workspace.assert_counters_zero(&spec.entry_name());
        }
    }
}
