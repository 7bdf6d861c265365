//! Model weights on the host: the container.
//!
//! Owns [`Weights`], a name-ordered set of host [`Tensor`]s, which the interpreter, the
//! runtime and the compiler read. It must not make weights: random initialisation, loading
//! and saving safetensors checkpoints (and the name, shape and dtype checks against what a
//! graph expects) are `kiln-models` (`kiln_models::weights`), which fills this container.

use crate::tensor::Tensor;
use std::collections::{BTreeMap, HashMap};

/// Named host tensors, kept in name order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// No weights.
    pub fn new() -> Weights {
        Weights::default()
    }

    /// Adds or replaces the tensor called `name`.
    pub fn insert(&mut self, name: &str, tensor: Tensor) {
        self.tensors.insert(name.to_string(), tensor);
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(name, t)| (name.as_str(), t))
    }

    /// The tensors by name.
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.tensors.into_iter().collect()
    }

    /// Total bytes of all tensors in their dtype (4-bit values packed two per byte).
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.dtype.storage_bytes(t.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    #[test]
    fn accessors_and_into_map() {
        let mut w = Weights::new();
        assert!(w.is_empty());
        w.insert("b", Tensor::f32(&[1], vec![2.0]));
        w.insert("a", Tensor::f32(&[1], vec![1.0]));
        assert_eq!(w.len(), 2);
        let names: Vec<_> = w.iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(w.get("a").unwrap().data, vec![1.0]);
        assert!(w.get("c").is_none());
        let map = w.into_map();
        assert_eq!(map["b"].data, vec![2.0]);
    }

    #[test]
    fn bytes_count_storage() {
        let mut w = Weights::new();
        w.insert("ids", Tensor::i32(&[3], &[-5, 0, 1 << 20]));
        w.insert(
            "q",
            Tensor::new(DType::I8, &[2, 2], vec![-128.0, 127.0, 0.0, -1.0]).unwrap(),
        );
        w.insert("h", Tensor::f32(&[3], vec![0.5, 1.5, 2.5]).cast(DType::F16));
        w.insert("p", Tensor::zeros(DType::I4, &[4]));
        assert_eq!(w.bytes(), 12 + 4 + 6 + 2);
    }
}
