//! Programs: the launches that compute one attention or KV-append kernel of a compiled plan.
//!
//! A plan kernel of family `attention` or `kv_append` (`kiln_ir::schedule::Family`) reads or
//! writes the model graph's *contiguous* KV cache `[batch, capacity, kv_heads, head_dim]`.
//! That cache is a page pool in [`PageOrder::TokenMajor`] whose page table is the identity
//! (`page_table[b, j] = b · max_pages + j`, `max_pages = capacity / page_size`): `capacity`
//! tokens reserved per sequence, pages never shared or reallocated. So plans and the pool of
//! `runtime::kv` share one append kernel (`kv_append`) and one attention kernel family; what
//! plans lack is the pool's allocator (its free list and real page tables). The page size of
//! a cache's view is [`cache_page_size`], the same for the append and the dense decode that
//! reads the cache (with the identity table, any page size dividing the capacity gives the
//! same addresses, so Quest's own page size reads it too).
//!
//! [`program`] turns a family and the call's sizes into an [`AttentionProgram`]: the kernels
//! to launch in order, which buffer each pointer parameter binds to ([`ProgramBuffer`]: an
//! operand of the graph node, its result, a workspace, a derived table, Quest page bounds
//! kept between calls), and the scalars.
//!
//! - **Causal prefill** (`Attention { causal }` over the new tokens): the prefill kernel reads
//!   K and V `[batch, seq, kv_heads, head_dim]` as the cache, `seq_lens = q_lens = seq`.
//! - **Decode** (`AttentionDecode`): one query per sequence → split-KV partial + merge; more
//!   queries (a chunk) → the prefill kernel with `q_lens = queries`, `seq_lens = lengths`.
//! - **Quest** (`QuestAttentionDecode`): page bounds refreshed for the pages holding the new
//!   token (or rebuilt for every page, see [`AttentionProgram::bounds_refresh`]), estimate,
//!   top-K, sparse partial, merge. Every page is selected when a sequence has no more pages
//!   than the budget, which is the dense fallback of the op.
//! - **KV append**: one in-place `kv_append` launch ([`KvAppendSpec::plan`]: token `t` of
//!   sequence `b` at position `start[b] + t`, one cache, no Quest metadata; the result *is*
//!   operand 0). Rows at positions `>= capacity` and sequences with `start[b] < 0` are not
//!   written.
//!
//! Why a family has no program is a [`ProgramError`]. It generates nothing itself beyond
//! calling the generators, and must not launch anything.

use super::decode::{self, DecodeAttentionSpec};
use super::paged::{PageOrder, PagedKv};
use super::prefill::{self, PrefillAttentionSpec};
use crate::kv_append::{self, KvAppendSpec};
use crate::lower::Scalar;
use crate::quest::estimate::{self, QuestEstimateSpec};
use crate::quest::page_bounds::{self, PageBoundsSpec};
use crate::quest::top_k::{self, QuestTopKSpec};
use crate::SpecError;
use kiln_codegen::kernel::GpuKernel;
use kiln_ir::schedule::{AttentionKind, Family};
use kiln_ir::shape::{Bindings, ShapeError};
use std::collections::BTreeMap;

/// Why a plan kernel has no program: a size that cannot be resolved or does not fit a kernel
/// scalar (naming it), a layout no generator accepts, or a family that is not attention.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// A symbolic size without a value.
    #[error("{what}: {source}")]
    Size {
        what: &'static str,
        #[source]
        source: ShapeError,
    },
    /// A size too large for a `u32` kernel scalar.
    #[error("{name} = {value} does not fit in u32")]
    Scalar { name: &'static str, value: usize },
    /// The paged layout is not one the generators build.
    #[error(transparent)]
    Layout(#[from] SpecError),
    #[error("Quest decode takes one query per sequence, got {queries}")]
    QuestQueries { queries: usize },
    #[error(
        "Quest on the GPU needs the cache capacity ({keys}) to be a multiple of the page size \
         ({page_size})"
    )]
    QuestCapacity { keys: usize, page_size: usize },
    #[error("{family} is not an attention family")]
    NotAttention { family: String },
    /// The cache capacity does not fit the page-bounds rebuild scalar.
    #[error(transparent)]
    Capacity(#[from] std::num::TryFromIntError),
}

/// One kernel of a program, by spec.
#[derive(Clone, Debug, PartialEq)]
pub enum ProgramKernel {
    DecodePartial(DecodeAttentionSpec),
    DecodeMerge(DecodeAttentionSpec),
    Prefill(PrefillAttentionSpec),
    PageBounds(PageBoundsSpec),
    Estimate(QuestEstimateSpec),
    TopK(QuestTopKSpec),
    KvAppend(KvAppendSpec),
}

impl ProgramKernel {
    /// A key that identifies the spec (equal keys generate identical kernels).
    pub fn key(&self) -> String {
        format!("{self:?}")
    }

    /// Runs the generator.
    pub fn generate(&self) -> Result<GpuKernel, SpecError> {
        match self {
            ProgramKernel::DecodePartial(spec) => Ok(decode::generate(spec)?.partial),
            ProgramKernel::DecodeMerge(spec) => decode::generate(spec)?
                .merge
                .ok_or_else(|| SpecError::new("decode_attention", "the spec has no merge kernel")),
            ProgramKernel::Prefill(spec) => prefill::generate(spec),
            ProgramKernel::PageBounds(spec) => page_bounds::generate(spec),
            ProgramKernel::Estimate(spec) => estimate::generate(spec),
            ProgramKernel::TopK(spec) => top_k::generate(spec),
            ProgramKernel::KvAppend(spec) => kv_append::generate(spec),
        }
    }
}

/// What a program's pointer parameter binds to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgramBuffer {
    /// Operand `i` of the graph node (`q, k, v[, lengths]`; `cache, new, start`).
    Operand(usize),
    /// The node's result. For `kv_append` the runtime makes it the same memory as operand 0.
    Output,
    /// Scratch of `bytes` bytes, written before it is read within the call.
    Workspace { bytes: usize },
    /// i32 `[batch, max_pages]`: `b · max_pages + j`.
    IdentityPageTable { batch: usize, max_pages: usize },
    /// i32 `[batch]`, every entry `value`.
    Lengths { batch: usize, value: usize },
    /// Quest page bounds of the node's K cache, `[batch · max_pages, kv_heads, head_dim]` in
    /// the cache dtype, kept by the runtime from call to call (max when `!min`).
    QuestBounds { elements: usize, min: bool },
}

/// One launch: a kernel, its pointer bindings (parameter → program buffer name) and scalars.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgramLaunch {
    pub kernel: ProgramKernel,
    pub buffers: Vec<(&'static str, &'static str)>,
    pub scalars: BTreeMap<&'static str, Scalar>,
}

/// The launches of one plan kernel. See the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionProgram {
    /// Program buffers by name.
    pub buffers: BTreeMap<&'static str, ProgramBuffer>,
    pub launches: Vec<ProgramLaunch>,
    /// Quest: the index of the page-bounds launch and the `new_tokens` value that rebuilds
    /// every page. Its scalar as listed refreshes only the pages of the new tokens, which is
    /// right when the runtime knows that the bounds matched the cache before this call's
    /// append; otherwise the runtime substitutes the rebuild value.
    pub bounds_refresh: Option<(usize, u32)>,
}

fn resolve(
    what: &'static str,
    expr: &kiln_ir::schedule::SymExpr,
    bindings: &Bindings,
) -> Result<usize, ProgramError> {
    expr.resolve(bindings)
        .map(|v| v as usize)
        .map_err(|source| ProgramError::Size { what, source })
}

fn u32_of(name: &'static str, value: usize) -> Result<Scalar, ProgramError> {
    u32::try_from(value)
        .map(Scalar::U32)
        .map_err(|_| ProgramError::Scalar { name, value })
}

/// The largest power of two `<= cap` that divides `n` (1 for `n = 0`).
fn page_size_dividing(n: usize, cap: usize) -> usize {
    let mut page = cap.max(1);
    while page > 1 && !n.is_multiple_of(page) {
        page /= 2;
    }
    page
}

/// Most tokens per page of a contiguous cache's paged view.
const CACHE_PAGE_CAP: usize = 16;

/// The page size of the paged view of a contiguous cache of `capacity` rows per sequence:
/// the largest power of two up to 16 that divides `capacity`, so that the identity page table
/// of `capacity / page_size` pages per sequence covers every row. The KV append and the dense
/// decode of the same cache use it, so both see the same pages.
pub fn cache_page_size(capacity: usize) -> usize {
    page_size_dividing(capacity, CACHE_PAGE_CAP)
}

/// The program of a plan kernel of `family` under `bindings`, for a device with `sm_count`
/// SMs (it sizes the decode splits), or why there is none.
pub fn program(
    family: &Family,
    bindings: &Bindings,
    sm_count: usize,
) -> Result<AttentionProgram, ProgramError> {
    match family {
        Family::KvAppend {
            batch,
            new_tokens,
            capacity,
            kv_heads,
            head_dim,
            dtype,
        } => {
            let batch = resolve("batch", batch, bindings)?;
            let capacity = resolve("capacity", capacity, bindings)?;
            let page_size = cache_page_size(capacity);
            // The append reads no query heads; the layout's group is 1.
            let layout = PagedKv {
                dtype: *dtype,
                q_heads: *kv_heads,
                kv_heads: *kv_heads,
                head_dim: *head_dim,
                page_size,
                order: PageOrder::TokenMajor,
            };
            let spec = KvAppendSpec::plan(layout);
            spec.validate()?;
            let max_pages = capacity / page_size;
            let scalars = BTreeMap::from([
                ("batch", u32_of("batch", batch)?),
                (
                    "new_tokens",
                    u32_of("new_tokens", resolve("new tokens", new_tokens, bindings)?)?,
                ),
                ("max_pages", u32_of("pages", max_pages)?),
            ]);
            Ok(AttentionProgram {
                buffers: BTreeMap::from([
                    ("cache", ProgramBuffer::Operand(0)),
                    ("new", ProgramBuffer::Operand(1)),
                    ("start", ProgramBuffer::Operand(2)),
                    (
                        "page_table",
                        ProgramBuffer::IdentityPageTable { batch, max_pages },
                    ),
                ]),
                launches: vec![ProgramLaunch {
                    kernel: ProgramKernel::KvAppend(spec),
                    buffers: vec![
                        ("new", "new"),
                        ("start", "start"),
                        ("page_table", "page_table"),
                        ("pages", "cache"),
                    ],
                    scalars,
                }],
                bounds_refresh: None,
            })
        }
        Family::Attention {
            kind,
            batch,
            queries,
            keys,
            q_heads,
            kv_heads,
            head_dim,
            scale,
            dtype,
        } => {
            let batch = resolve("batch", batch, bindings)?;
            let queries = resolve("queries", queries, bindings)?;
            let keys = resolve("keys", keys, bindings)?;
            let layout = |page_size: usize| PagedKv {
                dtype: *dtype,
                q_heads: *q_heads,
                kv_heads: *kv_heads,
                head_dim: *head_dim,
                page_size,
                order: PageOrder::TokenMajor,
            };
            let shape = Shape {
                batch,
                queries,
                keys,
                scale: *scale,
                sm_count,
            };
            match kind {
                AttentionKind::CausalPrefill => {
                    // One sequence may end in a partial page; several must tile `keys` exactly.
                    let page = if batch == 1 {
                        64
                    } else {
                        page_size_dividing(keys, 64)
                    };
                    let layout = layout(page);
                    layout.validate("attention")?;
                    prefill_program(
                        layout,
                        &shape,
                        ProgramBuffer::Lengths { batch, value: keys },
                    )
                }
                AttentionKind::Decode => {
                    let layout = layout(cache_page_size(keys));
                    layout.validate("attention")?;
                    if queries == 1 {
                        decode_program(layout, &shape, None)
                    } else {
                        prefill_program(layout, &shape, ProgramBuffer::Operand(3))
                    }
                }
                AttentionKind::Quest {
                    budget_tokens,
                    page_size,
                } => {
                    let layout = layout(*page_size);
                    layout.validate("attention")?;
                    if queries != 1 {
                        return Err(ProgramError::QuestQueries { queries });
                    }
                    if !keys.is_multiple_of(*page_size) {
                        return Err(ProgramError::QuestCapacity {
                            keys,
                            page_size: *page_size,
                        });
                    }
                    decode_program(layout, &shape, Some(budget_tokens / page_size))
                }
            }
        }
        other => Err(ProgramError::NotAttention {
            family: other.describe(),
        }),
    }
}

/// The sizes of one attention call.
struct Shape {
    batch: usize,
    queries: usize,
    /// Cache capacity (decode) or new tokens (causal prefill).
    keys: usize,
    scale: f32,
    sm_count: usize,
}

fn prefill_program(
    layout: PagedKv,
    shape: &Shape,
    seq_lens: ProgramBuffer,
) -> Result<AttentionProgram, ProgramError> {
    let max_pages = shape.keys.div_ceil(layout.page_size);
    let spec = PrefillAttentionSpec::new(layout);
    let scalars = BTreeMap::from([
        ("batch", u32_of("batch", shape.batch)?),
        ("max_q", u32_of("queries", shape.queries)?),
        ("max_pages", u32_of("pages", max_pages)?),
        ("scale", Scalar::F32(shape.scale)),
    ]);
    Ok(AttentionProgram {
        buffers: BTreeMap::from([
            ("q", ProgramBuffer::Operand(0)),
            ("k", ProgramBuffer::Operand(1)),
            ("v", ProgramBuffer::Operand(2)),
            ("seq_lens", seq_lens),
            (
                "q_lens",
                ProgramBuffer::Lengths {
                    batch: shape.batch,
                    value: shape.queries,
                },
            ),
            (
                "page_table",
                ProgramBuffer::IdentityPageTable {
                    batch: shape.batch,
                    max_pages,
                },
            ),
            ("out", ProgramBuffer::Output),
        ]),
        launches: vec![ProgramLaunch {
            kernel: ProgramKernel::Prefill(spec),
            buffers: vec![
                ("q", "q"),
                ("k_pages", "k"),
                ("v_pages", "v"),
                ("page_table", "page_table"),
                ("seq_lens", "seq_lens"),
                ("q_lens", "q_lens"),
                ("out", "out"),
            ],
            scalars,
        }],
        bounds_refresh: None,
    })
}

/// Split-KV decode over every page (`budget_pages = None`) or over the Quest selection.
fn decode_program(
    layout: PagedKv,
    shape: &Shape,
    budget_pages: Option<usize>,
) -> Result<AttentionProgram, ProgramError> {
    let batch = shape.batch;
    let max_pages = shape.keys / layout.page_size;
    let spec = DecodeAttentionSpec::new(layout, budget_pages.is_some());
    // The longest a sequence can be: the capacity, or the budget's tokens.
    let longest = match budget_pages {
        Some(pages) => (pages.min(max_pages)) * layout.page_size,
        None => shape.keys,
    };
    let splits = spec.splits(batch, longest.max(1), shape.sm_count) as usize;
    let workspace = spec.workspace(batch, splits);
    let mut buffers = BTreeMap::from([
        ("q", ProgramBuffer::Operand(0)),
        ("k", ProgramBuffer::Operand(1)),
        ("v", ProgramBuffer::Operand(2)),
        ("lengths", ProgramBuffer::Operand(3)),
        ("out", ProgramBuffer::Output),
        (
            "page_table",
            ProgramBuffer::IdentityPageTable { batch, max_pages },
        ),
        (
            "partial_acc",
            ProgramBuffer::Workspace {
                bytes: workspace.acc_elements * 4,
            },
        ),
        (
            "partial_max",
            ProgramBuffer::Workspace {
                bytes: workspace.stat_elements * 4,
            },
        ),
        (
            "partial_sum",
            ProgramBuffer::Workspace {
                bytes: workspace.stat_elements * 4,
            },
        ),
    ]);
    let mut launches = Vec::new();
    let mut bounds_refresh = None;
    let mut partial_scalars = BTreeMap::from([
        ("batch", u32_of("batch", batch)?),
        ("max_pages", u32_of("pages", max_pages)?),
        ("splits", u32_of("splits", splits)?),
        ("scale", Scalar::F32(shape.scale)),
    ]);
    let mut partial_buffers = vec![
        ("q", "q"),
        ("k_pages", "k"),
        ("v_pages", "v"),
        ("page_table", "page_table"),
        ("seq_lens", "lengths"),
    ];
    if let Some(budget_pages) = budget_pages {
        let max_selected = budget_pages.min(max_pages).max(1);
        let bounds = batch * max_pages * layout.kv_heads * layout.head_dim;
        let rows = batch * layout.kv_heads;
        buffers.insert(
            "page_max",
            ProgramBuffer::QuestBounds {
                elements: bounds,
                min: false,
            },
        );
        buffers.insert(
            "page_min",
            ProgramBuffer::QuestBounds {
                elements: bounds,
                min: true,
            },
        );
        buffers.insert(
            "scores",
            ProgramBuffer::Workspace {
                bytes: rows * max_pages * 4,
            },
        );
        buffers.insert(
            "selected_pages",
            ProgramBuffer::Workspace {
                bytes: rows * max_selected * 4,
            },
        );
        buffers.insert(
            "selected_counts",
            ProgramBuffer::Workspace { bytes: rows * 4 },
        );
        bounds_refresh = Some((0, u32::try_from(shape.keys)?));
        launches.push(ProgramLaunch {
            kernel: ProgramKernel::PageBounds(PageBoundsSpec { layout }),
            buffers: vec![
                ("k_pages", "k"),
                ("page_table", "page_table"),
                ("seq_lens", "lengths"),
                ("page_max", "page_max"),
                ("page_min", "page_min"),
            ],
            scalars: BTreeMap::from([
                ("batch", u32_of("batch", batch)?),
                ("max_pages", u32_of("pages", max_pages)?),
                ("new_tokens", u32_of("queries", shape.queries)?),
            ]),
        });
        launches.push(ProgramLaunch {
            kernel: ProgramKernel::Estimate(QuestEstimateSpec::new(PagedKv {
                order: PageOrder::HeadMajor,
                ..layout
            })),
            buffers: vec![
                ("q", "q"),
                ("page_max", "page_max"),
                ("page_min", "page_min"),
                ("page_table", "page_table"),
                ("seq_lens", "lengths"),
                ("scores", "scores"),
            ],
            scalars: BTreeMap::from([
                ("batch", u32_of("batch", batch)?),
                ("max_pages", u32_of("pages", max_pages)?),
            ]),
        });
        launches.push(ProgramLaunch {
            kernel: ProgramKernel::TopK(QuestTopKSpec::for_layout(&layout)),
            buffers: vec![
                ("scores", "scores"),
                ("seq_lens", "lengths"),
                ("selected_pages", "selected_pages"),
                ("selected_counts", "selected_counts"),
            ],
            scalars: BTreeMap::from([
                ("batch", u32_of("batch", batch)?),
                ("kv_heads", u32_of("kv_heads", layout.kv_heads)?),
                ("max_pages", u32_of("pages", max_pages)?),
                ("budget_pages", u32_of("budget pages", budget_pages)?),
                ("max_selected", u32_of("selected pages", max_selected)?),
            ]),
        });
        partial_buffers.push(("selected_pages", "selected_pages"));
        partial_buffers.push(("selected_counts", "selected_counts"));
        partial_scalars.insert("max_selected", u32_of("selected pages", max_selected)?);
    }
    partial_buffers.extend([
        ("partial_acc", "partial_acc"),
        ("partial_max", "partial_max"),
        ("partial_sum", "partial_sum"),
    ]);
    launches.push(ProgramLaunch {
        kernel: ProgramKernel::DecodePartial(spec),
        buffers: partial_buffers,
        scalars: partial_scalars,
    });
    launches.push(ProgramLaunch {
        kernel: ProgramKernel::DecodeMerge(spec),
        buffers: vec![
            ("partial_acc", "partial_acc"),
            ("partial_max", "partial_max"),
            ("partial_sum", "partial_sum"),
            ("out", "out"),
        ],
        scalars: BTreeMap::from([
            ("batch", u32_of("batch", batch)?),
            ("splits", u32_of("splits", splits)?),
        ]),
    });
    Ok(AttentionProgram {
        buffers,
        launches,
        bounds_refresh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::dtype::DType;
    use kiln_ir::schedule::SymExpr;

    fn attention(kind: AttentionKind) -> Family {
        attention_over(kind, 4096)
    }

    fn attention_over(kind: AttentionKind, keys: u64) -> Family {
        Family::Attention {
            kind,
            batch: SymExpr::constant(1),
            queries: SymExpr::constant(1),
            keys: SymExpr::constant(keys),
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            scale: 0.088,
            dtype: DType::F16,
        }
    }

    /// The tiny presets' attention: 8 query heads, 2 KV heads, head_dim 32, bf16.
    fn tiny(kind: AttentionKind, queries: u64, keys: u64) -> Family {
        tiny_with(kind, queries, keys, 32)
    }

    fn tiny_with(kind: AttentionKind, queries: u64, keys: u64, head_dim: usize) -> Family {
        Family::Attention {
            kind,
            batch: SymExpr::constant(1),
            queries: SymExpr::constant(queries),
            keys: SymExpr::constant(keys),
            q_heads: 8,
            kv_heads: 2,
            head_dim,
            scale: 0.177,
            dtype: DType::BF16,
        }
    }

    /// Every launch binds every pointer parameter of its kernel to a program buffer, and
    /// every scalar the kernel takes is given; at head_dim 128 and at the tiny presets'
    /// head_dim 32 (prefill of 100 tokens, a decode chunk, decode, Quest).
    #[test]
    fn every_parameter_of_every_launch_is_bound() {
        let quest = AttentionKind::Quest {
            budget_tokens: 2048,
            page_size: 16,
        };
        let families = [
            attention(AttentionKind::CausalPrefill),
            attention(AttentionKind::Decode),
            attention(quest),
            Family::KvAppend {
                batch: SymExpr::constant(2),
                new_tokens: SymExpr::constant(3),
                capacity: SymExpr::constant(64),
                kv_heads: 8,
                head_dim: 128,
                dtype: DType::BF16,
            },
            tiny(AttentionKind::CausalPrefill, 100, 100),
            tiny(AttentionKind::Decode, 5, 256),
            tiny(AttentionKind::Decode, 1, 256),
            tiny(quest, 1, 256),
            Family::KvAppend {
                batch: SymExpr::constant(1),
                new_tokens: SymExpr::constant(1),
                capacity: SymExpr::constant(256),
                kv_heads: 2,
                head_dim: 32,
                dtype: DType::BF16,
            },
        ];
        for family in &families {
            let program = program(family, &Bindings::new(), 132).unwrap();
            for launch in &program.launches {
                let kernel = launch.kernel.generate().unwrap();
                for param in &kernel.params {
                    let bound = launch
                        .buffers
                        .iter()
                        .any(|(p, b)| *p == param.name && program.buffers.contains_key(b))
                        || launch.scalars.contains_key(param.name.as_str());
                    assert!(bound, "{}: `{}` is unbound", kernel.entry, param.name);
                }
                assert_eq!(
                    launch.buffers.len() + launch.scalars.len(),
                    kernel.params.len(),
                    "{}: extra bindings",
                    kernel.entry
                );
            }
        }
    }

    #[test]
    fn quest_lists_bounds_estimate_top_k_then_sparse_decode() {
        let family = attention(AttentionKind::Quest {
            budget_tokens: 2048,
            page_size: 16,
        });
        let program = program(&family, &Bindings::new(), 132).unwrap();
        let kinds: Vec<&str> = program
            .launches
            .iter()
            .map(|l| match l.kernel {
                ProgramKernel::PageBounds(_) => "bounds",
                ProgramKernel::Estimate(_) => "estimate",
                ProgramKernel::TopK(_) => "top_k",
                ProgramKernel::DecodePartial(s) if s.sparse => "sparse",
                ProgramKernel::DecodeMerge(_) => "merge",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["bounds", "estimate", "top_k", "sparse", "merge"]);
        assert_eq!(program.bounds_refresh, Some((0, 4096)));
    }

    #[test]
    fn a_capacity_off_the_page_size_is_refused_for_quest() {
        let family = attention_over(
            AttentionKind::Quest {
                budget_tokens: 2048,
                page_size: 16,
            },
            4100,
        );
        let err = program(&family, &Bindings::new(), 132).unwrap_err();
        assert!(
            err.to_string().contains("multiple of the page size"),
            "{err}"
        );
    }

    /// A head_dim no generator takes has no program, and the error names it.
    #[test]
    fn an_unsupported_head_dim_is_refused_by_name() {
        for kind in [AttentionKind::CausalPrefill, AttentionKind::Decode] {
            let family = tiny_with(kind, 1, 256, 16);
            let err = program(&family, &Bindings::new(), 132).unwrap_err();
            assert!(matches!(err, ProgramError::Layout(_)), "{err}");
            assert!(
                err.to_string()
                    .contains("head_dim must be 32, 64 or 128, got 16"),
                "{err}"
            );
        }
    }

    fn kv_append(capacity: u64, head_dim: usize) -> Family {
        Family::KvAppend {
            batch: SymExpr::constant(2),
            new_tokens: SymExpr::constant(3),
            capacity: SymExpr::constant(capacity),
            kv_heads: 2,
            head_dim,
            dtype: DType::BF16,
        }
    }

    /// The plan's append is one in-place `kv_append` launch over the identity page table of
    /// the same pages as the dense decode of a cache of that capacity.
    #[test]
    fn kv_append_writes_the_pages_the_decode_reads() {
        for capacity in [4096u64, 4100, 7, 256] {
            let append = program(&kv_append(capacity, 32), &Bindings::new(), 132).unwrap();
            let [launch] = append.launches.as_slice() else {
                panic!("one launch, got {}", append.launches.len());
            };
            let ProgramKernel::KvAppend(spec) = &launch.kernel else {
                panic!("{:?}", launch.kernel);
            };
            assert_eq!(*spec, KvAppendSpec::plan(spec.layout));
            assert_eq!(spec.layout.order, PageOrder::TokenMajor);
            assert_eq!(
                launch.buffers,
                [
                    ("new", "new"),
                    ("start", "start"),
                    ("page_table", "page_table"),
                    ("pages", "cache")
                ]
            );
            assert_eq!(append.buffers["cache"], ProgramBuffer::Operand(0));
            assert_eq!(append.buffers["new"], ProgramBuffer::Operand(1));
            assert_eq!(append.buffers["start"], ProgramBuffer::Operand(2));

            let decode = program(
                &tiny(AttentionKind::Decode, 1, capacity),
                &Bindings::new(),
                132,
            )
            .unwrap();
            let ProgramKernel::DecodePartial(read) = &decode.launches[0].kernel else {
                panic!("{:?}", decode.launches[0].kernel);
            };
            assert_eq!(spec.layout.page_size, read.layout.page_size, "{capacity}");
            let page_size = spec.layout.page_size;
            assert_eq!(capacity as usize % page_size, 0, "{capacity}");
            let table = ProgramBuffer::IdentityPageTable {
                batch: 2,
                max_pages: capacity as usize / page_size,
            };
            assert_eq!(append.buffers["page_table"], table);
            assert_eq!(
                launch.scalars["max_pages"],
                Scalar::U32((capacity as usize / page_size) as u32)
            );
        }
    }

    #[test]
    fn kv_append_at_an_unsupported_head_dim_is_refused_by_name() {
        let err = program(&kv_append(256, 96), &Bindings::new(), 132).unwrap_err();
        assert!(matches!(err, ProgramError::Layout(_)), "{err}");
        assert!(
            err.to_string()
                .contains("kv_append kernel spec: head_dim must be 32, 64 or 128, got 96"),
            "{err}"
        );
    }

    #[test]
    fn page_sizes_divide_the_keys() {
        assert_eq!(cache_page_size(4096), 16);
        assert_eq!(cache_page_size(4100), 4);
        assert_eq!(cache_page_size(7), 1);
        assert_eq!(page_size_dividing(4096, 16), 16);
        assert_eq!(page_size_dividing(4100, 16), 4);
        assert_eq!(page_size_dividing(7, 64), 1);
    }
}
