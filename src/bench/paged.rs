//! Fixtures and timing shared by the paged-KV suites (`attention`, `quest`): random device
//! data, a page pool filled by the KV-append kernel (K/V pages and Quest page metadata),
//! shuffled page sets rotated past the L2 cache, the split-KV decode pair (dense or sparse)
//! with its workspace, and the rotating CUDA-event timer.
//!
//! **Data.** Every 16-bit value is random with a random sign and a magnitude in
//! `[2^-5, 2)` (f16 or bf16 bit patterns drawn directly: never zero, never NaN, never
//! subnormal). K/V pages are written by `kiln_kernels::kv_append` from two random device
//! sources, one chunk of pages per launch, each chunk reading its source at a different
//! 16-byte offset (below one page), so no two pages of the pool hold the same keys. The same
//! launches write the Quest metadata (`page_max`, `page_min`): every page is a full page
//! appended from slot 0, so its metadata is exactly the max / min of its own keys and stays
//! valid under any page table. The pool is filled once per (dtype, batch, KV heads) and
//! shared by every context and rotation of that configuration.
//!
//! **Page sets.** A page set maps `batch` sequences of `context` tokens to pool pages
//! `r·n .. (r+1)·n` (`n = batch · context / page_size`) in a shuffled order, so consecutive
//! logical pages are never adjacent in memory. A shape gets as many disjoint sets as it
//! takes for the bytes one timed step reads to add up past [`ROTATE_BYTES`] (at most
//! [`MAX_ROTATIONS`], at most what the pool holds); the timer uses set `i mod sets` for
//! launch `i`, so a step never finds its K/V (or metadata) in the 50 MB L2 left by the step
//! before.
//!
//! **Memory.** A pool is sized for the longest context that fits the device (its total
//! memory less [`RESERVE_BYTES`]); longer contexts are skipped with a note.
//!
//! This module measures; it asserts nothing about speed.

use anyhow::{Context, Result};
use kiln_ir::dtype::DType;
use kiln_kernels::attention::decode::{self, DecodeAttentionSpec, MergeMode};
use kiln_kernels::attention::paged::PageOrder;
use kiln_kernels::attention::PagedKv;
use kiln_kernels::kv_append::{self, KvAppendSpec};
use kiln_runtime::cuda::{
    Args, CudaDevice, CudaError, DeviceBuffer, DeviceTensor, LoadedKernel, Timing,
};
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;

/// The columns every attention and Quest benchmark row starts with: suite, implementation,
/// dtype and the head shape. Rows embed it flattened, so their JSON keys are unchanged.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RowShape {
    pub suite: String,
    #[serde(rename = "impl")]
    pub implementation: String,
    pub dtype: String,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl RowShape {
    /// The columns of a `suite` row of `implementation` over `layout` at `batch`.
    pub fn new(suite: &str, implementation: &str, layout: &PagedKv, batch: usize) -> RowShape {
        RowShape {
            suite: suite.into(),
            implementation: implementation.into(),
            dtype: layout.dtype.name().into(),
            batch,
            q_heads: layout.q_heads,
            kv_heads: layout.kv_heads,
            head_dim: layout.head_dim,
        }
    }
}

/// Tokens per page.
pub const PAGE_SIZE: usize = 16;
/// Bytes the rotated page sets of one shape must cover (the H100's L2 is 50 MB).
pub const ROTATE_BYTES: usize = 256 << 20;
/// At most this many rotated page sets (each is only a page table).
pub const MAX_ROTATIONS: usize = 64;
/// Untimed launches before the timed ones.
pub const WARMUP: usize = 10;
/// Timed launches; rows report their median and minimum.
pub const ITERATIONS: usize = 100;
/// Device memory a suite leaves to the context, the workspaces and everything else.
pub const RESERVE_BYTES: usize = 4 << 30;
/// Bytes of one random staging source of the pool fill.
const STAGING_BYTES: usize = 32 << 20;

/// `words` 32-bit words, each two random 16-bit values of `dtype` (f16 or bf16): random
/// sign, magnitude in `[2^-5, 2)`.
pub fn random_words(dtype: DType, words: usize, rng: &mut ChaCha8Rng) -> Vec<i32> {
    // (exponent of 2^0 in the format, mantissa bits)
    let (bias, mantissa_bits) = match dtype {
        DType::BF16 => (127u64, 7u32),
        _ => (15u64, 10u32),
    };
    let half = |bits: u64| -> u32 {
        let sign = (bits & 1) << 15;
        let exponent = bias - 5 + (bits >> 1) % 6;
        let mantissa = (bits >> 4) & ((1 << mantissa_bits) - 1);
        (sign | (exponent << mantissa_bits) | mantissa) as u32
    };
    (0..words)
        .map(|_| {
            let bits = rng.next_u64();
            (half(bits) | (half(bits >> 32) << 16)) as i32
        })
        .collect()
}

/// A device buffer of `elements` random 16-bit values of `dtype`, held as `i32` words.
pub fn random_buffer(
    device: &CudaDevice,
    dtype: DType,
    elements: usize,
    rng: &mut ChaCha8Rng,
) -> Result<DeviceBuffer<i32>> {
    let words = random_words(dtype, elements.div_ceil(2), rng);
    Ok(DeviceBuffer::from_host(device, &words)?)
}

/// A host `i32` slice on the device.
pub fn upload_i32(device: &CudaDevice, values: &[i32]) -> Result<DeviceBuffer<i32>> {
    Ok(DeviceBuffer::from_host(device, values)?)
}

/// A paged KV cache of `pages` pages: K/V pages and Quest metadata, filled (see the module
/// doc).
pub struct PagePool {
    pub layout: PagedKv,
    pub pages: usize,
    pub k_pages: DeviceBuffer<i32>,
    pub v_pages: DeviceBuffer<i32>,
    pub page_max: DeviceBuffer<i32>,
    pub page_min: DeviceBuffer<i32>,
}

impl PagePool {
    /// Device bytes of one page: K, V and the two metadata rows of every KV head.
    pub fn page_bytes(layout: &PagedKv) -> usize {
        2 * (2 * layout.page_elements() + 2 * layout.kv_heads * layout.head_dim)
    }

    /// Bytes of K and V one page holds.
    pub fn kv_page_bytes(layout: &PagedKv) -> usize {
        2 * 2 * layout.page_elements()
    }

    /// Allocates `pages` pages and fills them with the KV-append kernel.
    pub fn new(
        device: &CudaDevice,
        layout: PagedKv,
        pages: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<PagePool> {
        let what = |name: &str| format!("allocating {name} of {pages} pages ({})", layout.tag());
        let words = pages * layout.page_elements() / 2;
        let meta_words = pages * layout.kv_heads * layout.head_dim / 2;
        let pool = PagePool {
            layout,
            pages,
            k_pages: DeviceBuffer::zeros(device, words).with_context(|| what("k_pages"))?,
            v_pages: DeviceBuffer::zeros(device, words).with_context(|| what("v_pages"))?,
            page_max: DeviceBuffer::zeros(device, meta_words).with_context(|| what("page_max"))?,
            page_min: DeviceBuffer::zeros(device, meta_words).with_context(|| what("page_min"))?,
        };
        pool.fill(device, rng)
            .with_context(|| format!("filling the page pool ({})", layout.tag()))?;
        Ok(pool)
    }

    /// Writes every page (keys, values, metadata) with the KV-append kernel: chunk `c` of
    /// pages appends tokens `0..` of one sequence whose page table is the chunk's pool pages
    /// in order, reading the random sources at word offset `4·c` (K) and `4·c + page/2` (V),
    /// modulo one page.
    fn fill(&self, device: &CudaDevice, rng: &mut ChaCha8Rng) -> Result<()> {
        let layout = self.layout;
        let append = device.load(&kv_append::generate(&KvAppendSpec::pool(layout))?)?;
        let token_words = layout.kv_heads * layout.head_dim / 2;
        let page_words = layout.page_size * token_words;
        let chunk_pages = (STAGING_BYTES / (4 * page_words)).clamp(1, self.pages);
        let chunk_tokens = chunk_pages * layout.page_size;
        // Offsets are multiples of 4 words (16 bytes, the kernel's vector width) below one page.
        let offsets = page_words / 4;
        let source_words = chunk_tokens * token_words + page_words;
        let k_source =
            DeviceBuffer::from_host(device, &random_words(layout.dtype, source_words, rng))?;
        let v_source =
            DeviceBuffer::from_host(device, &random_words(layout.dtype, source_words, rng))?;
        let identity: Vec<i32> = (0..self.pages as i32).collect();
        let table = upload_i32(device, &identity)?;
        let token_seqs = upload_i32(device, &vec![0; chunk_tokens])?;
        let positions: Vec<i32> = (0..chunk_tokens as i32).collect();
        let positions = upload_i32(device, &positions)?;
        for (chunk, first) in (0..self.pages).step_by(chunk_pages).enumerate() {
            let n = chunk_pages.min(self.pages - first);
            let tokens = n * layout.page_size;
            let k_at = 4 * (chunk % offsets);
            let v_at = 4 * ((chunk + offsets / 2) % offsets);
            let span = tokens * token_words;
            let args = Args::new()
                .buffer("new_k", k_source.arg_range(k_at..k_at + span)?)
                .buffer("new_v", v_source.arg_range(v_at..v_at + span)?)
                .buffer("token_seqs", &token_seqs)
                .buffer("token_positions", &positions)
                .buffer("page_table", table.arg_range(first..first + n)?)
                .buffer("k_pages", &self.k_pages)
                .buffer("v_pages", &self.v_pages)
                .buffer("page_max", &self.page_max)
                .buffer("page_min", &self.page_min)
                .u32("tokens", tokens as u32)
                .u32("max_pages", n as u32);
            append.launch(&args)?;
        }
        device.synchronize()?;
        Ok(())
    }
}

/// The pool size for `batch` sequences at the longest of `contexts` that fits the device,
/// never less than `min_kv_bytes` of K/V (room for the rotated page sets of the short
/// contexts); the contexts that fit; a note per context that does not.
pub fn plan_pool(
    device: &CudaDevice,
    layout: &PagedKv,
    batch: usize,
    contexts: &[usize],
    min_kv_bytes: usize,
    notes: &mut Vec<String>,
) -> (usize, Vec<usize>) {
    let available = device
        .info()
        .total_memory_bytes
        .saturating_sub(RESERVE_BYTES);
    let rotation_pages = min_kv_bytes.div_ceil(PagePool::kv_page_bytes(layout));
    let pages_for = |context: usize| (batch * context / layout.page_size).max(rotation_pages);
    let mut fit = Vec::new();
    for &context in contexts {
        let bytes = pages_for(context) * PagePool::page_bytes(layout);
        if bytes <= available {
            fit.push(context);
        } else {
            notes.push(format!(
                "skipped {} batch {batch} context {context}: its page pool needs {:.1} GiB, \
                 the device has {:.1} GiB less a {} GiB reserve",
                layout.tag(),
                bytes as f64 / (1u64 << 30) as f64,
                device.info().total_memory_bytes as f64 / (1u64 << 30) as f64,
                RESERVE_BYTES >> 30
            ));
        }
    }
    let pages = fit.iter().map(|&c| pages_for(c)).max().unwrap_or(0);
    (pages, fit)
}

/// Disjoint, shuffled page sets of one shape over a pool, and the sequence lengths.
pub struct PageSets {
    pub batch: usize,
    pub context: usize,
    pub pages_per_sequence: usize,
    tables: Vec<DeviceBuffer<i32>>,
    pub seq_lens: DeviceBuffer<i32>,
}

impl PageSets {
    /// Enough sets of `batch` sequences of `context` tokens that `step_bytes` (the bytes one
    /// timed step reads from one set) times their number passes [`ROTATE_BYTES`], within
    /// [`MAX_ROTATIONS`] and the pool.
    pub fn new(
        device: &CudaDevice,
        pool: &PagePool,
        batch: usize,
        context: usize,
        step_bytes: usize,
        rng: &mut ChaCha8Rng,
    ) -> Result<PageSets> {
        let pages_per_sequence = context.div_ceil(pool.layout.page_size);
        let pages = batch * pages_per_sequence;
        anyhow::ensure!(
            pages <= pool.pages,
            "{batch} sequences of {context} tokens need {pages} pages, the pool has {}",
            pool.pages
        );
        let wanted = ROTATE_BYTES.div_ceil(step_bytes.max(1));
        let sets = wanted.min(pool.pages / pages).clamp(1, MAX_ROTATIONS);
        let tables = (0..sets)
            .map(|r| {
                let mut order: Vec<i32> = ((r * pages) as i32..((r + 1) * pages) as i32).collect();
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                upload_i32(device, &order)
            })
            .collect::<Result<_>>()?;
        let seq_lens = upload_i32(device, &vec![context as i32; batch])?;
        Ok(PageSets {
            batch,
            context,
            pages_per_sequence,
            tables,
            seq_lens,
        })
    }

    /// How many sets there are.
    pub fn rotations(&self) -> usize {
        self.tables.len()
    }

    /// The page table `[batch, pages_per_sequence]` of set `rotation`.
    pub fn table(&self, rotation: usize) -> &DeviceBuffer<i32> {
        &self.tables[rotation % self.tables.len()]
    }
}

/// Times `launch(set)` with CUDA events ([`WARMUP`] untimed, then [`ITERATIONS`]), launch
/// `i` using page set `i mod rotations`.
pub fn time_rotating(
    device: &CudaDevice,
    rotations: usize,
    what: &str,
    mut launch: impl FnMut(usize) -> Result<(), CudaError>,
) -> Result<Timing> {
    let mut turn = 0usize;
    device
        .time(
            || {
                let set = turn % rotations.max(1);
                turn += 1;
                launch(set)
            },
            WARMUP,
            ITERATIONS,
        )
        .with_context(|| format!("timing {what}"))
}

/// A Quest selection: `selected_pages [batch, kv_heads, max_selected]` and
/// `selected_counts [batch, kv_heads]` (i32, logical pages).
pub struct Selection {
    pub pages: DeviceBuffer<i32>,
    pub counts: DeviceBuffer<i32>,
    pub max_selected: usize,
}

impl Selection {
    /// Poisoned buffers for `batch` sequences of `layout`.
    pub fn poisoned(
        device: &CudaDevice,
        layout: &PagedKv,
        batch: usize,
        max_selected: usize,
    ) -> Result<Selection> {
        let rows = batch * layout.kv_heads;
        Ok(Selection {
            pages: DeviceBuffer::poisoned(device, rows * max_selected)?,
            counts: DeviceBuffer::poisoned(device, rows)?,
            max_selected,
        })
    }
}

/// Split-KV decode attention of one shape, dense or Quest-sparse, with its f32 workspace,
/// its zeroed merge counters (fused mode) and a poisoned output `[batch, q_heads,
/// head_dim]`. The default ([`Decode::new`]) is the spec's default,
/// [`MergeMode::Separate`] (`partial` then `merge`), measured faster on the H100 at batch 1 with
/// 8 KV heads (57.1 vs 58.8 µs at 32K); [`Decode::with_merge`] picks the mode
/// ([`MergeMode::LastBlock`]: the merge fused into the partial kernel, one launch).
pub struct Decode {
    pub spec: DecodeAttentionSpec,
    pub batch: usize,
    /// [`DecodeAttentionSpec::splits`] for the device's SMs and the tokens one KV head attends.
    pub splits: usize,
    partial: LoadedKernel,
    /// [`MergeMode::Separate`] only.
    merge: Option<LoadedKernel>,
    acc: DeviceBuffer<f32>,
    max: DeviceBuffer<f32>,
    sum: DeviceBuffer<f32>,
    /// [`MergeMode::LastBlock`] only: allocated zeroed, left zero by every launch.
    counters: Option<DeviceBuffer<i32>>,
    pub out: DeviceTensor,
}

impl Decode {
    /// The default-tuned decode (separate merge) of `layout` for `batch` sequences in which a KV
    /// head attends at most `attended` tokens (dense: the context; sparse: the Quest budget).
    pub fn new(
        device: &CudaDevice,
        layout: PagedKv,
        sparse: bool,
        batch: usize,
        attended: usize,
    ) -> Result<Decode> {
        Decode::with_merge(device, layout, sparse, batch, attended, MergeMode::Separate)
    }

    /// [`Decode::new`] with merge mode `merge`.
    pub fn with_merge(
        device: &CudaDevice,
        layout: PagedKv,
        sparse: bool,
        batch: usize,
        attended: usize,
        merge: MergeMode,
    ) -> Result<Decode> {
        let spec = DecodeAttentionSpec::new(layout, sparse).with_merge(merge);
        let kernels = decode::generate(&spec)?;
        let splits = spec.splits(batch, attended, device.info().sm_count as usize) as usize;
        let sizes = spec.workspace(batch, splits);
        let counters = if spec.fused() {
            Some(DeviceBuffer::zeros(device, sizes.counter_elements)?)
        } else {
            None
        };
        Ok(Decode {
            spec,
            batch,
            splits,
            partial: device.load(&kernels.partial)?,
            merge: kernels.merge.map(|m| device.load(&m)).transpose()?,
            acc: DeviceBuffer::poisoned(device, sizes.acc_elements)?,
            max: DeviceBuffer::poisoned(device, sizes.stat_elements)?,
            sum: DeviceBuffer::poisoned(device, sizes.stat_elements)?,
            counters,
            out: DeviceTensor::poisoned(
                device,
                layout.dtype,
                &[batch, layout.q_heads, layout.head_dim],
            )?,
        })
    }

    /// Queues the partial kernel over page set `set` (and `selection` when sparse); in the
    /// fused mode it writes `out` itself.
    pub fn launch_partial(
        &self,
        q: &DeviceBuffer<i32>,
        pool: &PagePool,
        sets: &PageSets,
        set: usize,
        selection: Option<&Selection>,
    ) -> Result<(), CudaError> {
        let scale = 1.0 / (self.spec.layout.head_dim as f32).sqrt();
        let mut args = Args::new()
            .buffer("q", q)
            .buffer("k_pages", &pool.k_pages)
            .buffer("v_pages", &pool.v_pages)
            .buffer("page_table", sets.table(set))
            .buffer("seq_lens", &sets.seq_lens)
            .buffer("partial_acc", &self.acc)
            .buffer("partial_max", &self.max)
            .buffer("partial_sum", &self.sum)
            .u32("batch", self.batch as u32)
            .u32("max_pages", sets.pages_per_sequence as u32)
            .u32("splits", self.splits as u32)
            .f32("scale", scale);
        if let Some(selection) = selection {
            args = args
                .buffer("selected_pages", &selection.pages)
                .buffer("selected_counts", &selection.counts)
                .u32("max_selected", selection.max_selected as u32);
        }
        if let Some(counters) = &self.counters {
            args = args
                .buffer("out", self.out.arg())
                .buffer("merge_counters", counters);
        }
        self.partial.launch(&args).map(drop)
    }

    /// Queues the merge kernel (nothing in the fused mode).
    pub fn launch_merge(&self) -> Result<(), CudaError> {
        let Some(merge) = &self.merge else {
            return Ok(());
        };
        let args = Args::new()
            .buffer("partial_acc", &self.acc)
            .buffer("partial_max", &self.max)
            .buffer("partial_sum", &self.sum)
            .buffer("out", self.out.arg())
            .u32("batch", self.batch as u32)
            .u32("splits", self.splits as u32);
        merge.launch(&args).map(drop)
    }

    /// Queues partial then merge (fused: the partial kernel alone).
    pub fn launch(
        &self,
        q: &DeviceBuffer<i32>,
        pool: &PagePool,
        sets: &PageSets,
        set: usize,
        selection: Option<&Selection>,
    ) -> Result<(), CudaError> {
        self.launch_partial(q, pool, sets, set, selection)?;
        self.launch_merge()
    }

    /// Fails unless every output element is a finite number (the poison is NaN) and the
    /// merge counters are back to zero.
    pub fn check_output(&self, what: &str) -> Result<()> {
        let written = self.out.download()?;
        anyhow::ensure!(
            written.data.iter().all(|v| v.is_finite()),
            "{what}: the output has unwritten or non-finite elements"
        );
        if let Some(counters) = &self.counters {
            anyhow::ensure!(
                counters.to_host()?.iter().all(|&c| c == 0),
                "{what}: a merge counter was left non-zero"
            );
        }
        Ok(())
    }
}

/// The per-shape constants of a paged layout with the suites' page size.
pub fn layout(dtype: DType, q_heads: usize, kv_heads: usize, head_dim: usize) -> PagedKv {
    PagedKv {
        dtype,
        q_heads,
        kv_heads,
        head_dim,
        page_size: PAGE_SIZE,
        order: PageOrder::HeadMajor,
    }
}

/// Bytes of K and V that `batch` sequences of `tokens` tokens hold (each read once).
pub fn kv_bytes(layout: &PagedKv, batch: usize, tokens: usize) -> usize {
    2 * batch * tokens * layout.kv_heads * layout.head_dim * 2
}
