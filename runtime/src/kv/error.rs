//! The one error type of `runtime::kv`: what the KV cache was asked to do, why it cannot, and
//! what to do about it. It owns no state and never panics.

use super::pool::SeqId;
use crate::cuda::CudaError;

/// Everything the paged KV cache can refuse.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A constructor argument is out of range; `field` names it.
    #[error("KV cache: `{field}` = {value}: expected {expected}")]
    Config {
        field: &'static str,
        value: usize,
        expected: String,
    },

    /// The page pool has too few free pages for a request.
    #[error(
        "KV page pool exhausted: {what} needs {needed} more page(s) but only {free} of {total} \
         are free; free finished sequences or allocate a larger pool"
    )]
    PoolExhausted {
        /// The request, such as `sequence 3 growing by 40 tokens`.
        what: String,
        needed: usize,
        free: usize,
        total: usize,
    },

    /// A sequence id that was never added or was already freed.
    #[error("unknown KV sequence {0}: it was never added or has been freed")]
    UnknownSequence(SeqId),

    /// The same sequence appears twice in one batch request.
    #[error(
        "KV sequence {0} appears twice in one batch; give each sequence one entry (its tokens \
         must be contiguous for the append kernel)"
    )]
    DuplicateInBatch(SeqId),

    /// A page table narrower than a sequence of the batch.
    #[error(
        "page table of width max_pages = {max_pages} cannot hold sequence {seq}, which has \
         {pages} pages; pass max_pages >= {pages}"
    )]
    TableTooNarrow {
        seq: SeqId,
        pages: usize,
        max_pages: usize,
    },

    /// A value that does not fit the kernels' i32 / u32 parameters.
    #[error("KV cache: {what} = {value} does not fit in {limit}")]
    TooLarge {
        what: &'static str,
        value: usize,
        limit: &'static str,
    },

    /// The layout the device buffers were asked for is not one the kernels accept.
    #[error("KV cache layout: {0}")]
    Layout(String),

    /// A device allocation or copy failed.
    #[error(transparent)]
    Device(#[from] CudaError),
}
