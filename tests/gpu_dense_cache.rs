//! GPU tests of the kernels over the model graph's contiguous KV cache `[batch, capacity,
//! kv_heads, head_dim]`, a token-major page pool under the identity page table: the plan's
//! KV append (the in-place `Op::KvAppend`, run as the `kv_append` launch of
//! `kiln_kernels::attention::program`, exactly as the executor binds it) against
//! `kiln_ir::interp`, `kiln_kernels::quest::page_bounds` against
//! `kiln_ir::quest::PageMeta::from_keys`, and dense decode / causal prefill attention reading
//! the contiguous cache as token-major pages ([`PageOrder::TokenMajor`]) under the identity
//! page table (`page_table[b, j] = b·max_pages + j`), against the interpreter's
//! `AttentionDecode` / `Attention`.
//!
//! Each test draws fresh random inputs (seed printed; `KILN_TEST_SEED` reproduces it).
//! Outputs are poisoned (NaN) before a launch (the append: the rows it must write) and NaN
//! never passes; cache rows past a
//! sequence's length hold NaN (attention: a garbage row read shows) or ±500 (page bounds:
//! NaN would vanish in max / min, ±500 does not). Batches have unequal lengths that are not
//! multiples of the page size; GQA 4 (8 query heads, 2 KV heads); f16 and bf16; head_dim 32
//! (the tiny presets) in every test, beside 64 and 128 (append, bounds) or 128 (attention).
//!
//! Run on a GPU machine with
//! `cargo test --release --test gpu_dense_cache -- --ignored --nocapture`.

mod common;

use std::collections::HashMap;

use common::{assert_close, device, fresh_seed, random, rng, tolerance};
use kiln::ir::dtype::DType;
use kiln::ir::graph::Graph;
use kiln::ir::interp;
use kiln::ir::op::{InputKind, Op};
use kiln::ir::quest::PageMeta;
use kiln::ir::schedule::{Family, SymExpr};
use kiln::ir::shape::Bindings;
use kiln::ir::shape::Shape;
use kiln::ir::tensor::Tensor;
use kiln_codegen::kernel::GpuKernel;
use kiln_kernels::attention::decode::{self, DecodeAttentionSpec, MergeMode};
use kiln_kernels::attention::paged::PageOrder;
use kiln_kernels::attention::prefill::{self, PrefillAttentionSpec};
use kiln_kernels::attention::program::{self, ProgramBuffer};
use kiln_kernels::attention::PagedKv;
use kiln_kernels::lower::Scalar;
use kiln_kernels::quest::page_bounds::{self, PageBoundsSpec};
use kiln_runtime::cuda::{Args, CudaDevice, DeviceTensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const PAGE_SIZE: usize = 16;

/// A garbage key value: far outside the random keys' range, exact in f16 and bf16.
const GARBAGE: f32 = 500.0;

fn layout(dtype: DType, head_dim: usize) -> PagedKv {
    PagedKv {
        dtype,
        q_heads: 8,
        kv_heads: 2,
        head_dim,
        page_size: PAGE_SIZE,
        order: PageOrder::TokenMajor,
    }
}

fn launch_kernel(device: &CudaDevice, kernel: &GpuKernel, args: &Args<'_>) {
    device
        .load(kernel)
        .and_then(|loaded| loaded.launch(args))
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.entry));
    device
        .synchronize()
        .unwrap_or_else(|e| panic!("{}: {e}", kernel.entry));
}

/// Exact equality of two values that must both be numbers (`-0 == +0`).
fn same(got: f32, want: f32) -> bool {
    !got.is_nan() && !want.is_nan() && got == want
}

fn upload(device: &CudaDevice, t: &Tensor) -> DeviceTensor {
    DeviceTensor::upload(device, t).unwrap()
}

fn i32_tensor(values: &[usize]) -> Tensor {
    let v: Vec<i32> = values.iter().map(|&x| x as i32).collect();
    Tensor::i32(&[v.len()], &v)
}

/// The identity page table `[batch, max_pages]`.
fn identity_table(batch: usize, max_pages: usize) -> Tensor {
    let v: Vec<i32> = (0..(batch * max_pages) as i32).collect();
    Tensor::i32(&[batch, max_pages], &v)
}

/// Runs one op on the interpreter.
fn interpret(op: Op, operands: &[(&str, Tensor)]) -> Tensor {
    let mut g = Graph::new("reference");
    let mut inputs: HashMap<String, Tensor> = HashMap::new();
    let mut ids = Vec::new();
    for (name, t) in operands {
        let id = g
            .input(name, InputKind::Activation, t.dtype, Shape::of(&t.shape))
            .unwrap();
        ids.push(id);
        inputs.insert(name.to_string(), t.clone());
    }
    let out = g.add1("op", op, &ids).unwrap();
    g.output("out", out);
    interp::run(&g, &inputs).unwrap().remove("out").unwrap()
}

// ----- KV append (the plan's kv_append launch) ---------------------------------------------

/// Appends `new` at `start` into `cache` through the plan's KV-append program (the launch
/// and bindings the executor uses for a `KvAppend` node); returns the downloaded cache and
/// the launched kernel's entry name.
fn append_on_device(
    device: &CudaDevice,
    cache: &Tensor,
    new: &Tensor,
    start: &[i32],
) -> (Tensor, String) {
    let (batch, capacity, kv_heads, head_dim) = (
        cache.shape[0],
        cache.shape[1],
        cache.shape[2],
        cache.shape[3],
    );
    let family = Family::KvAppend {
        batch: SymExpr::constant(batch as u64),
        new_tokens: SymExpr::constant(new.shape[1] as u64),
        capacity: SymExpr::constant(capacity as u64),
        kv_heads,
        head_dim,
        dtype: cache.dtype,
    };
    let program = program::program(&family, &Bindings::new(), decode::H100_SM_COUNT).unwrap();
    assert_eq!(program.launches.len(), 1, "one launch");
    let launch = &program.launches[0];
    let kernel = launch.kernel.generate().unwrap();
    let operands = [
        upload(device, cache),
        upload(device, new),
        upload(device, &Tensor::i32(&[start.len()], start)),
    ];
    let table = match program.buffers.get("page_table") {
        Some(&ProgramBuffer::IdentityPageTable {
            batch: rows,
            max_pages,
        }) => {
            assert_eq!(rows, batch);
            assert_eq!(
                capacity % max_pages.max(1),
                0,
                "{max_pages} pages must tile {capacity}"
            );
            upload(device, &identity_table(rows, max_pages))
        }
        other => panic!("page_table: {other:?}"),
    };
    let mut args = Args::new();
    for &(param, name) in &launch.buffers {
        let tensor = match &program.buffers[name] {
            ProgramBuffer::Operand(i) => &operands[*i],
            ProgramBuffer::IdentityPageTable { .. } => &table,
            other => panic!("{param}: unexpected program buffer {other:?}"),
        };
        args = args.buffer(param, tensor.arg());
    }
    for (&name, &value) in &launch.scalars {
        args = match value {
            Scalar::U32(v) => args.u32(name, v),
            Scalar::F32(v) => args.f32(name, v),
        };
    }
    launch_kernel(device, &kernel, &args);
    let [cache_device, _, _] = operands;
    (cache_device.download().unwrap(), kernel.entry)
}

fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(same(g, w), "{what}: element {i} is {g}, want {w}");
    }
}

/// `cache` with the rows `start[b] + s` (`s < new_tokens`) that lie inside the cache set to
/// NaN: what the append must overwrite.
fn poison_new_rows(cache: &Tensor, start: &[i32], new_tokens: usize) -> Tensor {
    let (capacity, row) = (cache.shape[1], cache.shape[2] * cache.shape[3]);
    let mut poisoned = cache.clone();
    for (b, &first) in start.iter().enumerate() {
        for s in 0..new_tokens {
            let position = first as i64 + s as i64;
            if first >= 0 && position < capacity as i64 {
                let at = (b * capacity + position as usize) * row;
                poisoned.data[at..at + row].fill(f32::NAN);
            }
        }
    }
    poisoned
}

/// The plan's append against the interpreter: f16 and bf16, head_dim 32, 64 and 128, three
/// sequences with different starts (one ending exactly at capacity), capacities whose paged
/// views have 8-, 16- and 1-token pages; the rows to be written are poisoned first and
/// every other row must come back bit-identical. Then starts out of range: a negative start
/// writes nothing, rows at or past capacity are dropped, nothing else moves.
#[test]
#[ignore = "needs a CUDA device"]
fn plan_kv_append_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("plan_kv_append_matches_the_interpreter"));
    let (batch, new_tokens, kv_heads) = (3, 5, 2);
    for capacity in [40, 64, 37] {
        for dtype in [DType::F16, DType::BF16] {
            for head_dim in [32, 64, 128] {
                let cache = random(dtype, &[batch, capacity, kv_heads, head_dim], 1.0, &mut rng);
                let new = random(
                    dtype,
                    &[batch, new_tokens, kv_heads, head_dim],
                    1.0,
                    &mut rng,
                );
                let row = kv_heads * head_dim;

                // Unequal starts; the last sequence's rows end exactly at capacity.
                let start = [
                    0,
                    rng.random_range(1..(capacity - new_tokens) as i32),
                    (capacity - new_tokens) as i32,
                ];
                let (got, entry) = append_on_device(
                    &device,
                    &poison_new_rows(&cache, &start, new_tokens),
                    &new,
                    &start,
                );
                let what = format!("{entry} capacity {capacity} starts {start:?}");
                let want = interpret(
                    Op::KvAppend,
                    &[
                        ("cache", cache.clone()),
                        ("new", new.clone()),
                        ("start", Tensor::i32(&[batch], &start)),
                    ],
                );
                assert_same(&what, &got, &want);
                // The same, said of the rows: new rows where they belong, the rest as before.
                for (b, &first) in start.iter().enumerate() {
                    for position in 0..capacity {
                        let at = (b * capacity + position) * row;
                        let offset = position as i32 - first;
                        let expected = if (0..new_tokens as i32).contains(&offset) {
                            let from = (b * new_tokens + offset as usize) * row;
                            &new.data[from..from + row]
                        } else {
                            &cache.data[at..at + row]
                        };
                        assert!(
                            got.data[at..at + row]
                                .iter()
                                .zip(expected)
                                .all(|(&g, &w)| same(g, w)),
                            "{what}: sequence {b} row {position}"
                        );
                    }
                }

                // Rows past capacity and a negative start are dropped, nothing else moves.
                let start = [-3, (capacity - 2) as i32, 7];
                let (got, entry) = append_on_device(
                    &device,
                    &poison_new_rows(&cache, &start, new_tokens),
                    &new,
                    &start,
                );
                let mut want = cache.clone();
                for (b, &first) in start.iter().enumerate() {
                    for s in 0..new_tokens {
                        let position = first + s as i32;
                        if first < 0 || position >= capacity as i32 {
                            continue;
                        }
                        let to = (b * capacity + position as usize) * row;
                        let from = (b * new_tokens + s) * row;
                        want.data[to..to + row].copy_from_slice(&new.data[from..from + row]);
                    }
                }
                assert_same(
                    &format!("{entry} capacity {capacity} starts {start:?}"),
                    &got,
                    &want,
                );
            }
        }
        eprintln!("plan KV append, capacity {capacity}: ok");
    }
}

// ----- page_bounds ---------------------------------------------------------------------------

/// A contiguous K cache `[batch, capacity, kv, d]`: random keys below each length, ±500
/// garbage past it.
fn key_cache(layout: PagedKv, lens: &[usize], capacity: usize, rng: &mut ChaCha8Rng) -> Tensor {
    let (kv, d) = (layout.kv_heads, layout.head_dim);
    let mut cache = random(layout.dtype, &[lens.len(), capacity, kv, d], 1.0, rng);
    let row = kv * d;
    for (b, &len) in lens.iter().enumerate() {
        let tail = &mut cache.data[(b * capacity + len) * row..(b + 1) * capacity * row];
        for (i, v) in tail.iter_mut().enumerate() {
            *v = if i % 2 == 0 { GARBAGE } else { -GARBAGE };
        }
    }
    cache
}

/// Runs page_bounds on the K pages `cache` of `lens.len()` sequences, in either page order
/// (metadata poisoned NaN first); returns (max, min).
fn bounds_on_device(
    device: &CudaDevice,
    layout: PagedKv,
    cache: &Tensor,
    lens: &[usize],
    new_tokens: usize,
) -> (Tensor, Tensor) {
    let batch = lens.len();
    let capacity = cache.len() / (batch * layout.kv_heads * layout.head_dim);
    let max_pages = capacity / layout.page_size;
    let meta_shape = [batch * max_pages, layout.kv_heads, layout.head_dim];
    let page_max = DeviceTensor::poisoned(device, layout.dtype, &meta_shape).unwrap();
    let page_min = DeviceTensor::poisoned(device, layout.dtype, &meta_shape).unwrap();
    let k_pages = upload(device, cache);
    let table = upload(device, &identity_table(batch, max_pages));
    let seq_lens = upload(device, &i32_tensor(lens));
    let kernel = page_bounds::generate(&PageBoundsSpec { layout }).unwrap();
    let args = Args::new()
        .buffer("k_pages", k_pages.arg())
        .buffer("page_table", table.arg())
        .buffer("seq_lens", seq_lens.arg())
        .buffer("page_max", page_max.arg())
        .buffer("page_min", page_min.arg())
        .u32("batch", batch as u32)
        .u32("max_pages", max_pages as u32)
        .u32("new_tokens", new_tokens as u32);
    launch_kernel(device, &kernel, &args);
    (page_max.download().unwrap(), page_min.download().unwrap())
}

/// Checks the touched pages against `PageMeta::from_keys` and that every other page is
/// still poisoned.
fn check_bounds(
    what: &str,
    layout: PagedKv,
    cache: &Tensor,
    lens: &[usize],
    new_tokens: usize,
    got: &(Tensor, Tensor),
) {
    let (capacity, kv, d) = (cache.shape[1], layout.kv_heads, layout.head_dim);
    let max_pages = capacity / layout.page_size;
    let row = kv * d;
    for (b, &len) in lens.iter().enumerate() {
        let keys = &cache.data[b * capacity * row..(b * capacity + len) * row];
        let meta = PageMeta::from_keys(keys, len, kv, d, layout.page_size).unwrap();
        let first = (len - new_tokens.min(len)) / layout.page_size;
        let last = len.div_ceil(layout.page_size);
        for j in 0..max_pages {
            let touched = j >= first && j < last;
            for h in 0..kv {
                let at = ((b * max_pages + j) * kv + h) * d;
                let (got_max, got_min) = (&got.0.data[at..at + d], &got.1.data[at..at + d]);
                if !touched {
                    assert!(
                        got_max.iter().chain(got_min).all(|v| v.is_nan()),
                        "{what}: sequence {b} page {j} head {h} is outside the touched \
                         pages {first}..{last} but was written"
                    );
                    continue;
                }
                let (want_max, want_min) = meta.bounds(j, h);
                for i in 0..d {
                    assert!(
                        same(got_max[i], want_max[i]) && same(got_min[i], want_min[i]),
                        "{what}: sequence {b} page {j} head {h} dim {i}: max {} min {}, \
                         want {} {}",
                        got_max[i],
                        got_min[i],
                        want_max[i],
                        want_min[i]
                    );
                }
            }
        }
    }
    eprintln!("{what}: ok");
}

#[test]
#[ignore = "needs a CUDA device"]
fn page_bounds_match_the_host_metadata() {
    let device = device();
    let mut rng = rng(fresh_seed("page_bounds_match_the_host_metadata"));
    let capacity = 5 * PAGE_SIZE;
    for dtype in [DType::F16, DType::BF16] {
        for head_dim in [32, 64, 128] {
            for order in [PageOrder::TokenMajor, PageOrder::HeadMajor] {
                let layout = PagedKv {
                    order,
                    ..layout(dtype, head_dim)
                };
                let name = page_bounds::generate(&PageBoundsSpec { layout })
                    .unwrap()
                    .entry;
                let mut lens = vec![37, 70];
                let mut cache = key_cache(layout, &lens, capacity, &mut rng);
                // Head-major pages under the identity table: the same keys, permuted.
                let as_pages = |cache: &Tensor| match order {
                    PageOrder::TokenMajor => cache.clone(),
                    PageOrder::HeadMajor => token_to_head_major(cache, PAGE_SIZE),
                };

                // Full rebuild.
                let got = bounds_on_device(&device, layout, &as_pages(&cache), &lens, capacity);
                check_bounds(
                    &format!("{name} rebuild"),
                    layout,
                    &cache,
                    &lens,
                    capacity,
                    &got,
                );

                // A decode append (one token per sequence), then the incremental refresh;
                // then a 20-token refresh that starts mid-page.
                let row = layout.kv_heads * head_dim;
                for (b, len) in lens.iter_mut().enumerate() {
                    let key = random(dtype, &[row], 1.0, &mut rng);
                    let at = (b * capacity + *len) * row;
                    cache.data[at..at + row].copy_from_slice(&key.data);
                    *len += 1;
                }
                for new_tokens in [1, 20] {
                    let got =
                        bounds_on_device(&device, layout, &as_pages(&cache), &lens, new_tokens);
                    let what = format!("{name} lens {lens:?} new_tokens {new_tokens}");
                    check_bounds(&what, layout, &cache, &lens, new_tokens, &got);
                }
            }
        }
    }
}

/// `[batch, capacity, kv, d]` → head-major pages `[batch·capacity/page, kv, page, d]`.
fn token_to_head_major(cache: &Tensor, page_size: usize) -> Tensor {
    let (batch, capacity, kv, d) = (
        cache.shape[0],
        cache.shape[1],
        cache.shape[2],
        cache.shape[3],
    );
    let pages = batch * capacity / page_size;
    let mut out = cache.clone();
    out.shape = vec![pages, kv, page_size, d];
    for t in 0..batch * capacity {
        let (page, slot) = (t / page_size, t % page_size);
        for h in 0..kv {
            let from = (t * kv + h) * d;
            let to = ((page * kv + h) * page_size + slot) * d;
            out.data[to..to + d].copy_from_slice(&cache.data[from..from + d]);
        }
    }
    out
}

// ----- token-major attention -----------------------------------------------------------------

/// A contiguous K and V cache `[batch, capacity, kv, d]`: random rows below each length, NaN
/// past it; and the same with zeros past the length for the interpreter.
fn kv_cache(
    layout: PagedKv,
    lens: &[usize],
    capacity: usize,
    rng: &mut ChaCha8Rng,
) -> [(Tensor, Tensor); 2] {
    let (kv, d) = (layout.kv_heads, layout.head_dim);
    let row = kv * d;
    std::array::from_fn(|_| {
        let mut device_side = random(layout.dtype, &[lens.len(), capacity, kv, d], 1.0, rng);
        let mut reference = device_side.clone();
        for (b, &len) in lens.iter().enumerate() {
            let tail = (b * capacity + len) * row..(b + 1) * capacity * row;
            device_side.data[tail.clone()].fill(f32::NAN);
            reference.data[tail].fill(0.0);
        }
        reference = reference.cast(DType::F32);
        (device_side, reference)
    })
}

/// Rows `0..keys` of sequence `b` of a reference cache, `[1, keys, kv, d]`.
fn sequence_rows(cache: &Tensor, b: usize, keys: usize) -> Tensor {
    let (capacity, kv, d) = (cache.shape[1], cache.shape[2], cache.shape[3]);
    let row = kv * d;
    let start = b * capacity * row;
    Tensor::f32(
        &[1, keys, kv, d],
        cache.data[start..start + keys * row].to_vec(),
    )
}

#[test]
#[ignore = "needs a CUDA device"]
fn token_major_decode_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("token_major_decode_matches_the_interpreter"));
    let lens = [37usize, 70];
    let capacity = 5 * PAGE_SIZE;
    let max_pages = capacity / PAGE_SIZE;
    let batch = lens.len();
    for (dtype, head_dim) in [
        (DType::F16, 128),
        (DType::BF16, 128),
        (DType::F16, 32),
        (DType::BF16, 32),
    ] {
        let layout = layout(dtype, head_dim);
        let (q_heads, d) = (layout.q_heads, layout.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let [(k_cache, k_reference), (v_cache, v_reference)] =
            kv_cache(layout, &lens, capacity, &mut rng);
        let q = random(dtype, &[batch, q_heads, d], 1.0, &mut rng);
        let exact = interpret(
            Op::AttentionDecode { scale },
            &[
                ("q", Tensor::f32(&[batch, 1, q_heads, d], q.data.clone())),
                ("k_cache", k_reference),
                ("v_cache", v_reference),
                ("lengths", i32_tensor(&lens)),
            ],
        );
        let want = Tensor::new(dtype, &[batch, q_heads, d], exact.data).unwrap();

        let q_device = upload(&device, &q);
        let k_pages = upload(&device, &k_cache);
        let v_pages = upload(&device, &v_cache);
        let table = upload(&device, &identity_table(batch, max_pages));
        let seq_lens = upload(&device, &i32_tensor(&lens));
        for merge in [MergeMode::Separate, MergeMode::LastBlock] {
            let spec = DecodeAttentionSpec::new(layout, false).with_merge(merge);
            let kernels = decode::generate(&spec).unwrap();
            let rule = spec.splits(batch, capacity, decode::H100_SM_COUNT) as usize;
            for splits in [1, rule, 3] {
                let sizes = spec.workspace(batch, splits);
                let poisoned =
                    |n: usize| DeviceTensor::poisoned(&device, DType::F32, &[n]).unwrap();
                let (acc, max, sum) = (
                    poisoned(sizes.acc_elements),
                    poisoned(sizes.stat_elements),
                    poisoned(sizes.stat_elements),
                );
                let counters = {
                    let n = sizes.counter_elements.max(1);
                    upload(&device, &Tensor::i32(&[n], &vec![0; n]))
                };
                let out = DeviceTensor::poisoned(&device, dtype, &[batch, q_heads, d]).unwrap();
                let mut args = Args::new()
                    .buffer("q", q_device.arg())
                    .buffer("k_pages", k_pages.arg())
                    .buffer("v_pages", v_pages.arg())
                    .buffer("page_table", table.arg())
                    .buffer("seq_lens", seq_lens.arg())
                    .buffer("partial_acc", acc.arg())
                    .buffer("partial_max", max.arg())
                    .buffer("partial_sum", sum.arg())
                    .u32("batch", batch as u32)
                    .u32("max_pages", max_pages as u32)
                    .u32("splits", splits as u32)
                    .f32("scale", scale);
                if spec.fused() {
                    args = args
                        .buffer("out", out.arg())
                        .buffer("merge_counters", counters.arg());
                }
                launch_kernel(&device, &kernels.partial, &args);
                if let Some(merge) = &kernels.merge {
                    let args = Args::new()
                        .buffer("partial_acc", acc.arg())
                        .buffer("partial_max", max.arg())
                        .buffer("partial_sum", sum.arg())
                        .buffer("out", out.arg())
                        .u32("batch", batch as u32)
                        .u32("splits", splits as u32);
                    launch_kernel(&device, merge, &args);
                }
                let got = out.download().unwrap();
                let what = format!("{} lens {lens:?} splits {splits}", spec.entry_name());
                assert_close(&what, &got, &want, tolerance(dtype));
                assert_rows_close(&what, &got, &want, d, dtype);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn token_major_prefill_matches_the_interpreter() {
    let device = device();
    let mut rng = rng(fresh_seed("token_major_prefill_matches_the_interpreter"));
    let capacity = 5 * PAGE_SIZE;
    let max_pages = capacity / PAGE_SIZE;
    // (q_len, seq_len): a full prefill and a chunk at the end of a longer sequence.
    let lens = [(37usize, 37usize), (20, 70)];
    let batch = lens.len();
    let max_q = 40;
    for (dtype, head_dim) in [
        (DType::F16, 128),
        (DType::BF16, 128),
        (DType::F16, 32),
        (DType::BF16, 32),
    ] {
        let layout = layout(dtype, head_dim);
        let (q_heads, d) = (layout.q_heads, layout.head_dim);
        let scale = 1.0 / (d as f32).sqrt();
        let seq_lens: Vec<usize> = lens.iter().map(|l| l.1).collect();
        let [(k_cache, k_reference), (v_cache, v_reference)] =
            kv_cache(layout, &seq_lens, capacity, &mut rng);
        let mut q = random(dtype, &[batch, max_q, q_heads, d], 1.0, &mut rng);
        let width = q_heads * d;
        for (b, &(q_len, _)) in lens.iter().enumerate() {
            q.data[(b * max_q + q_len) * width..(b + 1) * max_q * width].fill(f32::NAN);
        }

        let spec = PrefillAttentionSpec::new(layout);
        let kernel = prefill::generate(&spec).unwrap();
        let q_device = upload(&device, &q);
        let k_pages = upload(&device, &k_cache);
        let v_pages = upload(&device, &v_cache);
        let table = upload(&device, &identity_table(batch, max_pages));
        let seq_lens_device = upload(&device, &i32_tensor(&seq_lens));
        let q_lens: Vec<usize> = lens.iter().map(|l| l.0).collect();
        let q_lens_device = upload(&device, &i32_tensor(&q_lens));
        let out = DeviceTensor::poisoned(&device, dtype, &q.shape).unwrap();
        let args = Args::new()
            .buffer("q", q_device.arg())
            .buffer("k_pages", k_pages.arg())
            .buffer("v_pages", v_pages.arg())
            .buffer("page_table", table.arg())
            .buffer("seq_lens", seq_lens_device.arg())
            .buffer("q_lens", q_lens_device.arg())
            .buffer("out", out.arg())
            .u32("batch", batch as u32)
            .u32("max_q", max_q as u32)
            .u32("max_pages", max_pages as u32)
            .f32("scale", scale);
        launch_kernel(&device, &kernel, &args);
        let got = out.download().unwrap();

        for (b, &(q_len, seq_len)) in lens.iter().enumerate() {
            let rows = |t: &Tensor, range: std::ops::Range<usize>| {
                let start = (b * max_q + range.start) * width;
                let end = (b * max_q + range.end) * width;
                Tensor {
                    dtype: t.dtype,
                    shape: vec![1, range.len(), q_heads, d],
                    data: t.data[start..end].to_vec(),
                }
            };
            let queries = rows(&q, 0..q_len).cast(DType::F32);
            let exact = interpret(
                Op::Attention {
                    causal: true,
                    scale,
                },
                &[
                    ("q", queries),
                    ("k", sequence_rows(&k_reference, b, seq_len)),
                    ("v", sequence_rows(&v_reference, b, seq_len)),
                ],
            );
            let want = exact.cast(dtype);
            let what = format!("{} seq {b} ({q_len} of {seq_len})", spec.entry_name());
            let got_rows = rows(&got, 0..q_len);
            assert_close(&what, &got_rows, &want, tolerance(dtype));
            assert_rows_close(&what, &got_rows, &want, d, dtype);
            let past = rows(&got, q_len..max_q);
            assert!(
                past.data.iter().all(|v| v.is_nan()),
                "{what}: a row past q_len was written"
            );
        }
    }
}

/// Every row of `d` values on its own at twice the tolerance.
fn assert_rows_close(what: &str, got: &Tensor, want: &Tensor, d: usize, dtype: DType) {
    let tol = tolerance(dtype);
    for (row, (g, w)) in got.data.chunks(d).zip(want.data.chunks(d)).enumerate() {
        let (mut error, mut norm) = (0f64, 0f64);
        for (&a, &b) in g.iter().zip(w) {
            assert!(!a.is_nan(), "{what}: row {row} holds NaN");
            error += (a as f64 - b as f64).powi(2);
            norm += (b as f64).powi(2);
        }
        let e = (error / norm.max(1e-30)).sqrt();
        assert!(e <= 2.0 * tol, "{what}: row {row}: relative error {e:.3e}");
    }
}
