//! Data movement and MoE routing bookkeeping, shared by the reference interpreter and the
//! runtime's host steps.
//!
//! Owns the ops that only move or reorder values — the embedding gather, KV append, slices,
//! concatenation, top-k choice, MoE dispatch (a stable counting sort) and combine (each
//! token's expert rows summed with their weights, in f64) — as plain functions over
//! [`Tensor`]s, with their bounds checks ([`MovementError`]). There is nothing to cross-check
//! in a copy, so both the interpreter and the runtime call these; arithmetic kernels stay
//! separate (the interpreter is their oracle). This module must not evaluate graphs.
//!
//! ```
//! use kiln_ir::movement::top_k;
//! assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.5], 2), vec![1, 3]);
//! ```

use crate::tensor::Tensor;

/// Why a data-movement op could not run: an index outside what it indexes.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum MovementError {
    #[error("token id {id} at position {position} is outside the vocabulary of {vocab}")]
    TokenId {
        id: f32,
        position: usize,
        vocab: usize,
    },
    #[error(
        "sequence {batch}: appending {tokens} tokens at {start} overflows the cache capacity \
         {capacity}"
    )]
    CacheOverflow {
        batch: usize,
        tokens: usize,
        start: f32,
        capacity: usize,
    },
    #[error("slice {start}..{end:?} is out of range for size {size}")]
    Slice {
        start: i64,
        end: Option<i64>,
        size: i64,
    },
    #[error("slot {slot} routes to expert {expert}, outside 0..{num_experts}")]
    Expert {
        slot: usize,
        expert: f32,
        num_experts: usize,
    },
    #[error("order is not a permutation of the slots (position {position})")]
    Order { position: usize },
    #[error("permutation {perm:?} does not reorder the {rank} axes of the operand")]
    Permutation { perm: Vec<usize>, rank: usize },
    #[error("sequence {batch} has length {length}, expected {queries}..={keys}")]
    MaskLength {
        batch: usize,
        length: f32,
        queries: usize,
        keys: usize,
    },
    #[error("a causal mask needs at least as many keys ({keys}) as queries ({queries})")]
    MaskKeys { keys: usize, queries: usize },
    #[error("a causal mask takes scores [batch, heads, queries, keys], got shape {shape:?}")]
    MaskScores { shape: Vec<usize> },
}

/// A result's shape and values.
pub type Values = (Vec<usize>, Vec<f32>);

/// `Embedding`: the rows of `table [vocab, hidden]` named by `ids`, shaped `ids.shape + [hidden]`.
pub fn gather(table: &Tensor, ids: &Tensor) -> Result<Values, MovementError> {
    let (vocab, hidden) = (table.shape[0], table.shape[1]);
    let mut data = Vec::with_capacity(ids.len() * hidden);
    for (position, &id) in ids.data.iter().enumerate() {
        if id < 0.0 || id as usize >= vocab {
            return Err(MovementError::TokenId {
                id,
                position,
                vocab,
            });
        }
        let row = id as usize * hidden;
        data.extend_from_slice(&table.data[row..row + hidden]);
    }
    let mut shape = ids.shape.clone();
    shape.push(hidden);
    Ok((shape, data))
}

/// `KvAppend`: `cache [batch, capacity, heads, dim]` with `new [batch, tokens, heads, dim]`
/// written at rows `start[b]..`.
pub fn append(cache: &Tensor, new: &Tensor, start: &Tensor) -> Result<Vec<f32>, MovementError> {
    let (capacity, tokens) = (cache.shape[1], new.shape[1]);
    let row = cache.shape[2] * cache.shape[3];
    let mut data = cache.data.clone();
    for (batch, &first) in start.data.iter().enumerate() {
        if first < 0.0 || first as usize + tokens > capacity {
            return Err(MovementError::CacheOverflow {
                batch,
                tokens,
                start: first,
                capacity,
            });
        }
        let destination = (batch * capacity + first as usize) * row;
        let source = batch * tokens * row;
        data[destination..destination + tokens * row]
            .copy_from_slice(&new.data[source..source + tokens * row]);
    }
    Ok(data)
}

/// `Slice`: `x[.., start..end, ..]` along `axis`; negative bounds count from the end.
pub fn slice(
    x: &Tensor,
    axis: usize,
    start: i64,
    end: Option<i64>,
) -> Result<Values, MovementError> {
    let size = x.shape[axis] as i64;
    let fix = |v: i64| if v < 0 { v + size } else { v };
    let (first, last) = (fix(start), fix(end.unwrap_or(size)));
    if first < 0 || last > size || first > last {
        return Err(MovementError::Slice { start, end, size });
    }
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut data = Vec::new();
    for o in 0..outer {
        let base = o * x.shape[axis] * inner;
        data.extend_from_slice(
            &x.data[base + first as usize * inner..base + last as usize * inner],
        );
    }
    let mut shape = x.shape.clone();
    shape[axis] = (last - first) as usize;
    Ok((shape, data))
}

/// `Concat`: the operands joined along `axis` (they agree on every other dimension).
pub fn concat(operands: &[&Tensor], axis: usize) -> Values {
    let outer: usize = operands[0].shape[..axis].iter().product();
    let mut data = Vec::new();
    for o in 0..outer {
        for x in operands {
            let chunk: usize = x.shape[axis..].iter().product();
            data.extend_from_slice(&x.data[o * chunk..(o + 1) * chunk]);
        }
    }
    let mut shape = operands[0].shape.clone();
    shape[axis] = operands.iter().map(|x| x.shape[axis]).sum();
    (shape, data)
}

/// `Transpose { perm }`: axis `i` of the result is axis `perm[i]` of `x`, copied in the
/// result's row-major order.
pub fn transpose(x: &Tensor, perm: &[usize]) -> Result<Values, MovementError> {
    let rank = x.shape.len();
    let mut seen = vec![false; rank];
    let permutes = perm.len() == rank
        && perm
            .iter()
            .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
    if !permutes {
        return Err(MovementError::Permutation {
            perm: perm.to_vec(),
            rank,
        });
    }
    let in_strides = x.strides();
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    // The source strides in the result's axis order, walked with an odometer.
    let strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let mut data = Vec::with_capacity(x.len());
    let mut index = vec![0usize; rank];
    let mut source = 0usize;
    for _ in 0..x.len() {
        data.push(x.data[source]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            source += strides[axis];
            if index[axis] < shape[axis] {
                break;
            }
            source -= strides[axis] * shape[axis];
            index[axis] = 0;
        }
    }
    Ok((shape, data))
}

/// `CausalMask` of `scores [batch, heads, queries, keys]`: `[batch, 1, queries, keys]`, `0`
/// where query `i` of sequence `b` sees key `j` and `−∞` elsewhere. Query `i` sees
/// `length − (queries − 1 − i)` keys, where `length` is `lengths[b]` (in
/// `queries..=keys`) or, without lengths, `keys`.
pub fn causal_mask(scores: &[usize], lengths: Option<&Tensor>) -> Result<Values, MovementError> {
    let [batch, _, s, t] = *scores else {
        return Err(MovementError::MaskScores {
            shape: scores.to_vec(),
        });
    };
    let mut data = Vec::with_capacity(batch * s * t);
    for b in 0..batch {
        let length = match lengths {
            Some(lengths) => {
                let length = lengths.data.get(b).copied().unwrap_or(f32::NAN);
                if !(length >= s as f32 && length <= t as f32) {
                    return Err(MovementError::MaskLength {
                        batch: b,
                        length,
                        queries: s,
                        keys: t,
                    });
                }
                length as usize
            }
            None if t < s => {
                return Err(MovementError::MaskKeys {
                    keys: t,
                    queries: s,
                })
            }
            None => t,
        };
        for i in 0..s {
            let seen = length - (s - 1 - i);
            data.extend((0..t).map(|j| if j < seen { 0.0 } else { f32::NEG_INFINITY }));
        }
    }
    Ok((vec![batch, 1, s, t], data))
}

/// Indices of the `k` largest values, descending; ties go to the lower index.
pub fn top_k(row: &[f32], k: usize) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..row.len()).collect();
    // −0 and +0 are equal (a tie), which `total_cmp` alone would order.
    let key = |v: f32| if v == 0.0 { 0.0 } else { v };
    indices.sort_by(|&a, &b| key(row[b]).total_cmp(&key(row[a]))); // stable: ties keep index order
    indices.truncate(k);
    indices
}

/// The MoE router's choice from each row of `probabilities` (`experts` per row): the `k`
/// largest (ties to the lower index) and their weights, renormalised to sum to 1 (in f64)
/// when `normalize`. Returns `(weights, experts)`, `k` per row, experts as f32 indices.
pub fn route(
    probabilities: &[f32],
    experts: usize,
    k: usize,
    normalize: bool,
) -> (Vec<f32>, Vec<f32>) {
    let rows = probabilities.len() / experts.max(1);
    let mut weights = Vec::with_capacity(rows * k);
    let mut chosen = Vec::with_capacity(rows * k);
    for row in probabilities.chunks(experts.max(1)) {
        let picked = top_k(row, k);
        let total: f64 = picked.iter().map(|&e| row[e] as f64).sum();
        for e in picked {
            let p = row[e] as f64;
            weights.push(if normalize {
                (p / total) as f32
            } else {
                p as f32
            });
            chosen.push(e as f32);
        }
    }
    (weights, chosen)
}

/// `MoeDispatch`: the slots sorted by their expert (stable) and the `num_experts + 1`
/// offsets of each expert's run.
pub fn dispatch(
    experts: &Tensor,
    num_experts: usize,
) -> Result<(Vec<f32>, Vec<f32>), MovementError> {
    let mut counts = vec![0usize; num_experts];
    for (slot, &e) in experts.data.iter().enumerate() {
        if e < 0.0 || e as usize >= num_experts {
            return Err(MovementError::Expert {
                slot,
                expert: e,
                num_experts,
            });
        }
        counts[e as usize] += 1;
    }
    let mut order: Vec<usize> = (0..experts.len()).collect();
    order.sort_by_key(|&slot| experts.data[slot] as usize); // stable
    let mut offsets = vec![0f32];
    let mut running = 0usize;
    for count in counts {
        running += count;
        offsets.push(running as f32);
    }
    Ok((order.iter().map(|&s| s as f32).collect(), offsets))
}

/// `MoeCombine`: `out[t] = Σⱼ weights[t, j] · y[p]` where `order[p] = t·k + j`, summed in
/// f64; `order` must be a permutation of the slots.
pub fn combine(y: &Tensor, order: &Tensor, weights: &Tensor) -> Result<Values, MovementError> {
    let hidden = *y.shape.last().expect("rank ≥ 2");
    let k = *order.shape.last().expect("rank ≥ 1");
    let tokens = order.len() / k.max(1);
    let mut seen = vec![false; order.len()];
    let mut sums = vec![0.0f64; tokens * hidden];
    for (p, &slot) in order.data.iter().enumerate() {
        let slot = slot as usize;
        if slot >= order.len() || std::mem::replace(&mut seen[slot], true) {
            return Err(MovementError::Order { position: p });
        }
        let token = slot / k;
        let weight = weights.data[slot] as f64;
        for h in 0..hidden {
            sums[token * hidden + h] += weight * y.data[p * hidden + h] as f64;
        }
    }
    let mut shape = order.shape[..order.shape.len() - 1].to_vec();
    shape.push(hidden);
    Ok((shape, sums.into_iter().map(|v| v as f32).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_breaks_ties_to_the_lower_index_and_treats_zeros_as_equal() {
        assert_eq!(top_k(&[-0.0, 0.0, -1.0], 2), vec![0, 1]);
        assert_eq!(top_k(&[3.0, 1.0, 2.0], 3), vec![0, 2, 1]);
    }

    #[test]
    fn dispatch_sorts_slots_by_expert_stably_and_combine_undoes_it() {
        let experts = Tensor::f32(&[2, 2], vec![1.0, 0.0, 1.0, 2.0]);
        let (order, offsets) = dispatch(&experts, 3).unwrap();
        assert_eq!(order, vec![1.0, 0.0, 2.0, 3.0]);
        assert_eq!(offsets, vec![0.0, 1.0, 3.0, 4.0]);
        let order = Tensor::f32(&[2, 2], order);
        let y = Tensor::f32(&[4, 1], vec![10.0, 20.0, 30.0, 40.0]);
        let weights = Tensor::f32(&[2, 2], vec![0.5, 0.25, 1.0, 2.0]);
        let (shape, out) = combine(&y, &order, &weights).unwrap();
        assert_eq!(shape, vec![2, 1]);
        // token 0: slot 0 (row 1, ×0.5) + slot 1 (row 0, ×0.25); token 1: 30 + 2·40
        assert_eq!(out, vec![20.0 * 0.5 + 10.0 * 0.25, 30.0 + 80.0]);
        let bad = Tensor::f32(&[1, 2], vec![0.0, 0.0]);
        assert_eq!(
            combine(&y, &bad, &weights).unwrap_err(),
            MovementError::Order { position: 1 }
        );
        assert!(dispatch(&Tensor::f32(&[1], vec![3.0]), 3).is_err());
    }

    #[test]
    fn transpose_moves_each_element_to_its_permuted_index() {
        // x[i, j, k] = 100i + 10j + k, shape [2, 3, 4]
        let data = (0..24)
            .map(|f| (100 * (f / 12) + 10 * (f / 4 % 3) + f % 4) as f32)
            .collect();
        let x = Tensor::f32(&[2, 3, 4], data);
        let (shape, out) = transpose(&x, &[2, 0, 1]).unwrap();
        assert_eq!(shape, vec![4, 2, 3]);
        for (flat, &value) in out.iter().enumerate() {
            let (k, i, j) = (flat / 6, flat / 3 % 2, flat % 3);
            assert_eq!(value, (100 * i + 10 * j + k) as f32, "result index {flat}");
        }
        assert!(matches!(
            transpose(&x, &[0, 0, 1]),
            Err(MovementError::Permutation { .. })
        ));
    }

    #[test]
    fn causal_mask_hides_keys_beyond_each_querys_position() {
        let lengths = Tensor::f32(&[2], vec![3.0, 4.0]);
        let (shape, mask) = causal_mask(&[2, 8, 2, 4], Some(&lengths)).unwrap();
        assert_eq!(shape, vec![2, 1, 2, 4]);
        let seen: Vec<usize> = mask
            .chunks(4)
            .map(|row| row.iter().filter(|&&m| m == 0.0).count())
            .collect();
        // sequence 0 (length 3): queries see 2 and 3 keys; sequence 1 (length 4): 3 and 4.
        assert_eq!(seen, vec![2, 3, 3, 4]);
        assert!(mask.iter().all(|&m| m == 0.0 || m == f32::NEG_INFINITY));
        let short = Tensor::f32(&[2], vec![1.0, 4.0]);
        assert!(matches!(
            causal_mask(&[2, 8, 2, 4], Some(&short)),
            Err(MovementError::MaskLength { batch: 0, .. })
        ));
        assert!(matches!(
            causal_mask(&[1, 1, 3, 2], None),
            Err(MovementError::MaskKeys { .. })
        ));
    }
}
