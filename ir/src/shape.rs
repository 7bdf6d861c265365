//! Shapes with concrete and named symbolic dimensions.
//!
//! Owns [`Dim`], [`Shape`], and [`Bindings`] (the values of symbolic dimensions at run
//! time), and [`ShapeError`], why a shape could not be resolved or unified. A symbolic dimension is a name such as `batch`, `seq` or `ctx`; shapes are compared
//! structurally, and reshapes compare the symbolic product of their dimensions. This module
//! knows nothing about ops or dtypes.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Why a shape could not be resolved or matched against concrete sizes: the unbound symbol,
/// or the dimension that disagreed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// A symbolic dimension with no value in the bindings.
    #[error("symbolic dimension `{name}` has no value")]
    Unbound { name: String },
    /// Concrete sizes of another rank than the shape.
    #[error(
        "expected rank {} (shape {shape}), got rank {} ({sizes:?})",
        shape.rank(),
        sizes.len()
    )]
    Rank { shape: Shape, sizes: Vec<usize> },
    /// A concrete dimension of another size.
    #[error("dimension {axis} is {size}, expected {expected} (shape {shape})")]
    Size {
        axis: usize,
        size: usize,
        expected: usize,
        shape: Shape,
    },
    /// A symbolic dimension whose name is already bound to another size.
    #[error("dimension {axis} (`{name}`) is {size}, but `{name}` is already {bound}")]
    Rebound {
        axis: usize,
        name: String,
        size: usize,
        bound: usize,
    },
}

/// One dimension of a shape: a fixed size or a named size known only at run time.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Const(usize),
    Sym(String),
}

impl Dim {
    /// A named symbolic dimension.
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }

    /// The fixed size, if this dimension is concrete.
    pub fn as_const(&self) -> Option<usize> {
        match self {
            Dim::Const(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }

    /// The size of this dimension under `bindings`.
    pub fn resolve(&self, bindings: &Bindings) -> Result<usize, ShapeError> {
        match self {
            Dim::Const(n) => Ok(*n),
            Dim::Sym(name) => bindings
                .get(name)
                .ok_or_else(|| ShapeError::Unbound { name: name.clone() }),
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Const(n)
    }
}

impl From<&str> for Dim {
    fn from(name: &str) -> Dim {
        Dim::sym(name)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Sym(name) => f.write_str(name),
        }
    }
}

/// The shape of a tensor, outermost dimension first (row-major).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Shape(pub Vec<Dim>);

/// Builds a [`Shape`] from dimensions that are sizes or symbolic names.
///
/// ```
/// use kiln_ir::shape;
/// let s = shape!["batch", "seq", 4096];
/// assert_eq!(s.to_string(), "[batch, seq, 4096]");
/// ```
#[macro_export]
macro_rules! shape {
    ($($dim:expr),* $(,)?) => {
        $crate::shape::Shape(vec![$($crate::shape::Dim::from($dim)),*])
    };
}

impl Shape {
    /// A shape of concrete dimensions.
    pub fn of(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Const(d)).collect())
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// The dimensions.
    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// The last dimension, if any.
    pub fn last(&self) -> Option<&Dim> {
        self.0.last()
    }

    /// Whether every dimension is concrete.
    pub fn is_concrete(&self) -> bool {
        self.0.iter().all(|d| d.as_const().is_some())
    }

    /// The element count as a constant factor times a sorted list of symbolic names.
    /// Two shapes hold the same number of elements for every binding exactly when these agree.
    pub fn symbolic_product(&self) -> (usize, Vec<String>) {
        let mut factor = 1usize;
        let mut names = Vec::new();
        for dim in &self.0 {
            match dim {
                Dim::Const(n) => factor *= n,
                Dim::Sym(name) => names.push(name.clone()),
            }
        }
        names.sort();
        (factor, names)
    }

    /// The concrete sizes under `bindings`.
    pub fn resolve(&self, bindings: &Bindings) -> Result<Vec<usize>, ShapeError> {
        self.0.iter().map(|d| d.resolve(bindings)).collect()
    }

    /// The number of elements under `bindings`.
    pub fn num_elements(&self, bindings: &Bindings) -> Result<usize, ShapeError> {
        Ok(self.resolve(bindings)?.iter().product())
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, dim) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{dim}")?;
        }
        f.write_str("]")
    }
}

/// Values of symbolic dimensions, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bindings(BTreeMap<String, usize>);

impl Bindings {
    /// No bindings.
    pub fn new() -> Bindings {
        Bindings::default()
    }

    /// Bindings from `(name, value)` pairs.
    pub fn from_pairs(pairs: &[(&str, usize)]) -> Bindings {
        Bindings(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    /// The value of `name`, if bound.
    pub fn get(&self, name: &str) -> Option<usize> {
        self.0.get(name).copied()
    }

    /// Binds `name` to `value`.
    pub fn set(&mut self, name: &str, value: usize) {
        self.0.insert(name.to_string(), value);
    }

    /// Unifies `shape` with concrete `sizes`, binding unbound names and checking bound ones.
    /// The error says which dimension disagreed.
    pub fn unify(&mut self, shape: &Shape, sizes: &[usize]) -> Result<(), ShapeError> {
        if shape.rank() != sizes.len() {
            return Err(ShapeError::Rank {
                shape: shape.clone(),
                sizes: sizes.to_vec(),
            });
        }
        for (axis, (dim, &size)) in shape.0.iter().zip(sizes).enumerate() {
            match dim {
                Dim::Const(n) if *n != size => {
                    return Err(ShapeError::Size {
                        axis,
                        size,
                        expected: *n,
                        shape: shape.clone(),
                    })
                }
                Dim::Const(_) => {}
                Dim::Sym(name) => match self.get(name) {
                    Some(bound) if bound != size => {
                        return Err(ShapeError::Rebound {
                            axis,
                            name: name.clone(),
                            size,
                            bound,
                        })
                    }
                    Some(_) => {}
                    None => self.set(name, size),
                },
            }
        }
        Ok(())
    }

    /// The bound names and values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, usize)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbolic_product_ignores_order() {
        let a = crate::shape!["batch", "seq", 32, 128];
        let b = crate::shape![4096, "seq", "batch"];
        assert_eq!(a.symbolic_product(), b.symbolic_product());
        let c = crate::shape!["batch", 4096];
        assert_ne!(a.symbolic_product(), c.symbolic_product());
    }

    #[test]
    fn unify_binds_and_checks() {
        let mut bindings = Bindings::new();
        let shape = crate::shape!["batch", "seq", 8];
        bindings.unify(&shape, &[2, 5, 8]).unwrap();
        assert_eq!(bindings.get("seq"), Some(5));
        let err = bindings.unify(&crate::shape!["seq"], &[6]).unwrap_err();
        assert!(err.to_string().contains("`seq` is already 5"), "{err}");
        let err = bindings.unify(&shape, &[2, 5, 9]).unwrap_err();
        assert!(
            err.to_string().contains("dimension 2 is 9, expected 8"),
            "{err}"
        );
        assert_eq!(shape.num_elements(&bindings).unwrap(), 80);
    }
}
