//! Host bookkeeping of the paged KV cache: a pool of `num_pages` pages of `page_size` tokens
//! with a free list, one page list per sequence, and the `page_table` / `seq_lens` (and, for
//! an append, `token_seqs` / `token_positions`) host arrays the paged kernels read.
//!
//! Pure Rust: it never touches a device (`device.rs` holds the device buffers) and never
//! panics on a bad request; every refusal is a [`KvError`]. The layout the arrays describe is
//! `kiln_kernels::attention::paged`'s.

use super::error::KvError;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

/// Tokens per page unless the caller asks otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 16;

/// The largest page size the paged kernels accept.
pub const MAX_PAGE_SIZE: usize = 256;

/// The value of `page_table` entries past a sequence's last page. Kernels never read them.
pub const PAD_PAGE: i32 = -1;

/// Identifies one sequence of a [`PagedKvCache`]; ids are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One sequence: its length in tokens and its physical pages, logical page order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Sequence {
    len: usize,
    pages: Vec<u32>,
}

/// The page pool and the page lists of every live sequence.
///
/// ```
/// use kiln_runtime::kv::PagedKvCache;
/// let mut cache = PagedKvCache::new(8, 16).unwrap();
/// let a = cache.add_sequence();
/// assert_eq!(cache.grow(a, 20).unwrap(), 0..20); // two pages
/// let tables = cache.batch_tables(&[a]).unwrap();
/// assert_eq!((tables.max_pages, tables.seq_lens.clone()), (2, vec![20]));
/// cache.free(a).unwrap();
/// assert_eq!(cache.free_pages(), 8);
/// ```
#[derive(Clone, Debug)]
pub struct PagedKvCache {
    page_size: usize,
    num_pages: usize,
    /// Free physical pages; the next one handed out is the last.
    free: Vec<u32>,
    sequences: BTreeMap<SeqId, Sequence>,
    next_id: u64,
}

/// `page_table [batch, max_pages]` and `seq_lens [batch]` of a list of sequences, row `b`
/// for the `b`-th sequence given; entries past a sequence's pages are [`PAD_PAGE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchTables {
    pub batch: usize,
    /// The row width of `page_table` (at least 1).
    pub max_pages: usize,
    pub page_table: Vec<i32>,
    pub seq_lens: Vec<i32>,
}

/// What one call of the KV-append kernel needs: the tables of the batch after growth, and
/// for each new token its row in the batch and its position in its sequence. The tokens of
/// one sequence are contiguous and their positions consecutive and ascending (the kernel's
/// contract), in the order the requests were given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendBatch {
    pub tables: BatchTables,
    /// `token_seqs [tokens]`: the batch row of each new token.
    pub token_seqs: Vec<i32>,
    /// `token_positions [tokens]`: the position of each new token in its sequence.
    pub token_positions: Vec<i32>,
}

impl AppendBatch {
    /// The number of new tokens.
    pub fn tokens(&self) -> usize {
        self.token_seqs.len()
    }
}

impl PagedKvCache {
    /// A pool of `num_pages` free pages of `page_size` tokens (a power of two up to 256).
    pub fn new(num_pages: usize, page_size: usize) -> Result<PagedKvCache, KvError> {
        if page_size == 0 || !page_size.is_power_of_two() || page_size > MAX_PAGE_SIZE {
            return Err(KvError::Config {
                field: "page_size",
                value: page_size,
                expected: format!("a power of two in 1..={MAX_PAGE_SIZE}"),
            });
        }
        if num_pages == 0 || num_pages > i32::MAX as usize {
            return Err(KvError::Config {
                field: "num_pages",
                value: num_pages,
                expected: format!("1..={} (page ids are i32 on the device)", i32::MAX),
            });
        }
        Ok(PagedKvCache {
            page_size,
            num_pages,
            free: (0..num_pages as u32).rev().collect(),
            sequences: BTreeMap::new(),
            next_id: 0,
        })
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Pages in the pool, free or not.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Pages not owned by any sequence.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// The live sequences, in id order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    /// The length of `seq` in tokens.
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self.sequence(seq)?.len)
    }

    /// The physical pages of `seq`, in logical order.
    pub fn pages(&self, seq: SeqId) -> Result<&[u32], KvError> {
        Ok(&self.sequence(seq)?.pages)
    }

    /// Pages needed to hold `tokens` tokens.
    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_size)
    }

    /// Adds an empty sequence and returns its id.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, Sequence::default());
        id
    }

    /// Pages `seq` must allocate to grow by `tokens`.
    pub fn pages_needed(&self, seq: SeqId, tokens: usize) -> Result<usize, KvError> {
        let s = self.sequence(seq)?;
        let new_len = s.len.checked_add(tokens).ok_or(KvError::TooLarge {
            what: "sequence length",
            value: usize::MAX,
            limit: "usize",
        })?;
        Ok(self.pages_for(new_len) - s.pages.len())
    }

    /// Grows `seq` by `tokens`, allocating pages as needed, and returns the positions of the
    /// new tokens. All or nothing: on an error the cache is unchanged.
    pub fn grow(&mut self, seq: SeqId, tokens: usize) -> Result<Range<usize>, KvError> {
        let needed = self.pages_needed(seq, tokens)?;
        let old_len = self.sequence(seq)?.len;
        check_i32("sequence length", old_len + tokens)?;
        if needed > self.free.len() {
            return Err(
                self.exhausted(format!("sequence {seq} growing by {tokens} tokens"), needed)
            );
        }
        let at = self.free.len() - needed;
        let taken: Vec<u32> = self.free.drain(at..).rev().collect();
        let s = self.sequences.get_mut(&seq).expect("checked above");
        s.pages.extend(taken);
        s.len = old_len + tokens;
        Ok(old_len..old_len + tokens)
    }

    /// Removes `seq`; its pages return to the pool. Returns how many pages it held.
    pub fn free(&mut self, seq: SeqId) -> Result<usize, KvError> {
        let s = self
            .sequences
            .remove(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let count = s.pages.len();
        // Most recently used first out next time: LIFO reuse keeps hot pages hot.
        self.free.extend(s.pages.into_iter().rev());
        Ok(count)
    }

    /// The tables of `seqs` (row `b` for `seqs[b]`), as wide as the longest of them.
    pub fn batch_tables(&self, seqs: &[SeqId]) -> Result<BatchTables, KvError> {
        self.batch_tables_padded(seqs, 1)
    }

    /// The tables of `seqs` with rows at least `min_max_pages` wide (a fixed width lets one
    /// device buffer and one launch geometry serve many steps).
    pub fn batch_tables_padded(
        &self,
        seqs: &[SeqId],
        min_max_pages: usize,
    ) -> Result<BatchTables, KvError> {
        let mut rows = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            rows.push((seq, self.sequence(seq)?));
        }
        let widest = rows.iter().map(|(_, s)| s.pages.len()).max().unwrap_or(0);
        let max_pages = widest.max(min_max_pages).max(1);
        check_i32("max_pages", max_pages)?;
        check_i32("batch", seqs.len())?;
        let mut page_table = vec![PAD_PAGE; seqs.len() * max_pages];
        let mut seq_lens = Vec::with_capacity(seqs.len());
        for (row, (_, s)) in page_table.chunks_exact_mut(max_pages).zip(&rows) {
            for (slot, &page) in row.iter_mut().zip(&s.pages) {
                *slot = page as i32;
            }
            seq_lens.push(s.len as i32);
        }
        Ok(BatchTables {
            batch: seqs.len(),
            max_pages,
            page_table,
            seq_lens,
        })
    }

    /// Grows every `(seq, tokens)` of `requests` and returns what the append kernel needs:
    /// batch row `b` is `requests[b].0`; its new tokens are contiguous, in position order.
    /// All or nothing: a duplicate or unknown sequence, or too few free pages for the whole
    /// batch, leaves the cache unchanged.
    pub fn append(
        &mut self,
        requests: &[(SeqId, usize)],
        min_max_pages: usize,
    ) -> Result<AppendBatch, KvError> {
        let mut seen = BTreeSet::new();
        let mut needed = 0usize;
        let mut tokens = 0usize;
        for &(seq, count) in requests {
            if !seen.insert(seq) {
                return Err(KvError::DuplicateInBatch(seq));
            }
            needed += self.pages_needed(seq, count)?;
            check_i32("sequence length", self.sequence(seq)?.len + count)?;
            tokens += count;
        }
        check_i32("tokens", tokens)?;
        if needed > self.free.len() {
            let what = format!(
                "a batch of {} sequences appending {tokens} tokens",
                requests.len()
            );
            return Err(self.exhausted(what, needed));
        }
        let mut token_seqs = Vec::with_capacity(tokens);
        let mut token_positions = Vec::with_capacity(tokens);
        for (row, &(seq, count)) in requests.iter().enumerate() {
            let positions = self.grow(seq, count)?;
            token_seqs.extend(std::iter::repeat_n(row as i32, count));
            token_positions.extend(positions.map(|p| p as i32));
        }
        let seqs: Vec<SeqId> = requests.iter().map(|&(seq, _)| seq).collect();
        Ok(AppendBatch {
            tables: self.batch_tables_padded(&seqs, min_max_pages)?,
            token_seqs,
            token_positions,
        })
    }

    fn sequence(&self, seq: SeqId) -> Result<&Sequence, KvError> {
        self.sequences
            .get(&seq)
            .ok_or(KvError::UnknownSequence(seq))
    }

    fn exhausted(&self, what: String, needed: usize) -> KvError {
        KvError::PoolExhausted {
            what,
            needed,
            free: self.free.len(),
            total: self.num_pages,
        }
    }
}

fn check_i32(what: &'static str, value: usize) -> Result<(), KvError> {
    if value <= i32::MAX as usize {
        Ok(())
    } else {
        Err(KvError::TooLarge {
            what,
            value,
            limit: "i32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every page is free or owned by exactly one sequence, each sequence owns exactly the
    /// pages its length needs, and the free count plus the owned count is the pool size.
    fn check_invariants(cache: &PagedKvCache) {
        let mut owner = vec![None; cache.num_pages];
        for &page in &cache.free {
            assert!(owner[page as usize].is_none(), "page {page} free twice");
            owner[page as usize] = Some(None);
        }
        let mut owned = 0;
        for (&id, s) in &cache.sequences {
            assert_eq!(s.pages.len(), s.len.div_ceil(cache.page_size), "{id}");
            for &page in &s.pages {
                assert!(
                    owner[page as usize].is_none(),
                    "page {page} owned twice ({id} and {:?})",
                    owner[page as usize]
                );
                owner[page as usize] = Some(Some(id));
            }
            owned += s.pages.len();
        }
        assert_eq!(cache.free.len() + owned, cache.num_pages);
        assert!(owner.iter().all(Option::is_some), "a page was lost");
    }

    #[test]
    fn grow_allocates_pages_only_at_page_boundaries() {
        let mut cache = PagedKvCache::new(4, 16).unwrap();
        let a = cache.add_sequence();
        assert_eq!(cache.grow(a, 0).unwrap(), 0..0);
        assert_eq!(cache.pages(a).unwrap(), &[] as &[u32]);
        assert_eq!(cache.grow(a, 16).unwrap(), 0..16);
        assert_eq!(cache.pages(a).unwrap(), &[0]);
        assert_eq!(cache.grow(a, 1).unwrap(), 16..17);
        assert_eq!(cache.pages(a).unwrap(), &[0, 1]);
        assert_eq!(cache.grow(a, 15).unwrap(), 17..32);
        assert_eq!((cache.pages(a).unwrap().len(), cache.free_pages()), (2, 2));
        check_invariants(&cache);
    }

    #[test]
    fn exhaustion_and_unknown_ids_are_errors_and_change_nothing() {
        let mut cache = PagedKvCache::new(3, 16).unwrap();
        let a = cache.add_sequence();
        cache.grow(a, 40).unwrap();
        let before = cache.clone();
        let err = cache.grow(a, 17).unwrap_err();
        assert!(
            matches!(
                err,
                KvError::PoolExhausted {
                    needed: 1,
                    free: 0,
                    total: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("sequence #0 growing by 17 tokens"),
            "{err}"
        );
        assert_eq!(cache.len(a).unwrap(), 40);
        assert_eq!(cache.free, before.free);

        let gone = SeqId(99);
        for err in [
            cache.grow(gone, 1).unwrap_err(),
            cache.free(gone).unwrap_err(),
            cache.batch_tables(&[a, gone]).unwrap_err(),
            cache.len(gone).unwrap_err(),
        ] {
            assert!(matches!(err, KvError::UnknownSequence(SeqId(99))), "{err}");
            assert!(err.to_string().contains("#99"), "{err}");
        }
        cache.free(a).unwrap();
        assert!(matches!(
            cache.free(a).unwrap_err(),
            KvError::UnknownSequence(_)
        ));
        check_invariants(&cache);
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (pages, size, field) in [
            (0, 16, "num_pages"),
            (4, 0, "page_size"),
            (4, 12, "page_size"),
            (4, 512, "page_size"),
        ] {
            let err = PagedKvCache::new(pages, size).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn batch_tables_pad_rows_and_report_lengths() {
        let mut cache = PagedKvCache::new(16, 4).unwrap();
        let a = cache.add_sequence();
        let b = cache.add_sequence();
        let c = cache.add_sequence();
        cache.grow(a, 9).unwrap(); // pages 0, 1, 2
        cache.grow(b, 1).unwrap(); // page 3
        cache.grow(a, 3).unwrap(); // still 3 pages
        let t = cache.batch_tables(&[b, a, c]).unwrap();
        assert_eq!((t.batch, t.max_pages), (3, 3));
        assert_eq!(t.seq_lens, vec![1, 12, 0]);
        assert_eq!(t.page_table, vec![3, -1, -1, 0, 1, 2, -1, -1, -1]);
        let wide = cache.batch_tables_padded(&[a], 5).unwrap();
        assert_eq!(wide.page_table, vec![0, 1, 2, -1, -1]);
        let empty = cache.batch_tables(&[]).unwrap();
        assert_eq!((empty.batch, empty.max_pages), (0, 1));
    }

    #[test]
    fn append_lists_tokens_contiguously_per_sequence() {
        let mut cache = PagedKvCache::new(8, 4).unwrap();
        let a = cache.add_sequence();
        let b = cache.add_sequence();
        cache.grow(a, 3).unwrap();
        let batch = cache.append(&[(b, 2), (a, 3)], 0).unwrap();
        assert_eq!(batch.tokens(), 5);
        assert_eq!(batch.token_seqs, vec![0, 0, 1, 1, 1]);
        assert_eq!(batch.token_positions, vec![0, 1, 3, 4, 5]);
        assert_eq!(batch.tables.seq_lens, vec![2, 6]);
        assert_eq!(batch.tables.page_table, vec![1, -1, 0, 2]);

        assert!(matches!(
            cache.append(&[(a, 1), (a, 1)], 0).unwrap_err(),
            KvError::DuplicateInBatch(_)
        ));
        let before = cache.clone();
        let err = cache.append(&[(a, 2), (b, 100)], 0).unwrap_err();
        assert!(matches!(err, KvError::PoolExhausted { .. }), "{err}");
        assert_eq!(cache.len(a).unwrap(), before.len(a).unwrap());
        assert_eq!(cache.free, before.free);
        check_invariants(&cache);
    }

    #[test]
    fn freed_pages_are_reused() {
        let mut cache = PagedKvCache::new(2, 16).unwrap();
        let a = cache.add_sequence();
        cache.grow(a, 32).unwrap();
        assert_eq!(cache.free(a).unwrap(), 2);
        let b = cache.add_sequence();
        cache.grow(b, 32).unwrap();
        assert_eq!(cache.pages(b).unwrap(), &[0, 1]);
        check_invariants(&cache);
    }

    #[derive(Clone, Debug)]
    enum Action {
        Add,
        Grow(usize, usize),
        Free(usize),
        Append(Vec<(usize, usize)>),
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            1 => Just(Action::Add),
            4 => (0..8usize, 0..40usize).prop_map(|(s, n)| Action::Grow(s, n)),
            1 => (0..8usize).prop_map(Action::Free),
            2 => proptest::collection::vec((0..8usize, 0..20usize), 0..4).prop_map(Action::Append),
        ]
    }

    proptest! {
        #[test]
        fn alloc_free_keep_ownership_and_count(
            pages in 1..24usize,
            log_page_size in 0..5u32,
            actions in proptest::collection::vec(action(), 1..60),
        ) {
            let mut cache = PagedKvCache::new(pages, 1 << log_page_size).unwrap();
            let mut ids: Vec<SeqId> = Vec::new();
            // An id index past the live ones names a sequence that does not exist.
            let pick = |ids: &Vec<SeqId>, i: usize| ids.get(i).copied().unwrap_or(SeqId(1000 + i as u64));
            for action in actions {
                let before = cache.clone();
                match action {
                    Action::Add => ids.push(cache.add_sequence()),
                    Action::Grow(i, n) => {
                        let seq = pick(&ids, i);
                        match cache.grow(seq, n) {
                            Ok(range) => {
                                let old = before.len(seq).unwrap();
                                prop_assert_eq!(range, old..old + n);
                            }
                            Err(_) => {
                                prop_assert_eq!(&cache.free, &before.free);
                                prop_assert_eq!(&cache.sequences, &before.sequences);
                            }
                        }
                    }
                    Action::Free(i) => {
                        let seq = pick(&ids, i);
                        if let Ok(count) = cache.free(seq) {
                            prop_assert_eq!(cache.free_pages(), before.free_pages() + count);
                            ids.retain(|&s| s != seq);
                        }
                    }
                    Action::Append(requests) => {
                        let requests: Vec<(SeqId, usize)> =
                            requests.into_iter().map(|(i, n)| (pick(&ids, i), n)).collect();
                        match cache.append(&requests, 0) {
                            Ok(batch) => {
                                let total: usize = requests.iter().map(|r| r.1).sum();
                                prop_assert_eq!(batch.tokens(), total);
                                for (row, &(seq, _)) in requests.iter().enumerate() {
                                    let pages = cache.pages(seq).unwrap();
                                    let table = &batch.tables.page_table
                                        [row * batch.tables.max_pages..][..pages.len()];
                                    let table: Vec<u32> = table.iter().map(|&p| p as u32).collect();
                                    prop_assert_eq!(&table[..], pages);
                                }
                            }
                            Err(_) => {
                                prop_assert_eq!(&cache.free, &before.free);
                                prop_assert_eq!(&cache.sequences, &before.sequences);
                            }
                        }
                    }
                }
                check_invariants(&cache);
            }
        }
    }
}
