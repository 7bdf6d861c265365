//! Symbolic sizes: `ceil(factor · Π symbols / divisor)`, the one form every buffer size and
//! launch extent of a schedule takes.
//!
//! Owns [`SymExpr`]: built from a [`Shape`] (its element count) and resolved under
//! [`Bindings`]. It knows nothing about ops, kernels or devices.

use crate::shape::{Bindings, Dim, Shape, ShapeError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// `ceil(factor · Π symbols / divisor)`; `symbols` are sorted, so equal sizes compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SymExpr {
    pub factor: u64,
    pub symbols: Vec<String>,
    pub divisor: u64,
}

impl SymExpr {
    /// A constant.
    pub fn constant(n: u64) -> SymExpr {
        SymExpr {
            factor: n,
            symbols: Vec::new(),
            divisor: 1,
        }
    }

    /// The product of `dims`.
    pub fn product(dims: &[Dim]) -> SymExpr {
        let (factor, symbols) = Shape(dims.to_vec()).symbolic_product();
        SymExpr {
            factor: factor as u64,
            symbols,
            divisor: 1,
        }
    }

    /// The element count of `shape`.
    pub fn elements(shape: &Shape) -> SymExpr {
        SymExpr::product(shape.dims())
    }

    /// `self · n`.
    pub fn times(mut self, n: u64) -> SymExpr {
        self.factor *= n;
        self.reduce()
    }

    /// `ceil(self / n)`.
    pub fn ceil_div(mut self, n: u64) -> SymExpr {
        self.divisor *= n.max(1);
        self.reduce()
    }

    fn reduce(mut self) -> SymExpr {
        let g = gcd(self.factor, self.divisor).max(1);
        self.factor /= g;
        self.divisor /= g;
        self
    }

    /// Whether the value does not depend on any symbol.
    pub fn as_const(&self) -> Option<u64> {
        self.symbols
            .is_empty()
            .then(|| self.factor.div_ceil(self.divisor))
    }

    /// The value under `bindings`; an unbound symbol is a [`ShapeError::Unbound`].
    pub fn resolve(&self, bindings: &Bindings) -> Result<u64, ShapeError> {
        let mut value = self.factor;
        for name in &self.symbols {
            let n = bindings
                .get(name)
                .ok_or_else(|| ShapeError::Unbound { name: name.clone() })?;
            value *= n as u64;
        }
        Ok(value.div_ceil(self.divisor))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl fmt::Display for SymExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut terms = Vec::new();
        if self.factor != 1 || self.symbols.is_empty() {
            terms.push(self.factor.to_string());
        }
        terms.extend(self.symbols.iter().cloned());
        let product = terms.join("·");
        if self.divisor == 1 {
            f.write_str(&product)
        } else {
            write!(f, "ceil({product}/{})", self.divisor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shape;

    #[test]
    fn sizes_resolve_and_print() {
        let s = SymExpr::elements(&shape!["batch", 1, 4096]).times(2);
        assert_eq!(s.to_string(), "8192·batch");
        let b = Bindings::from_pairs(&[("batch", 3)]);
        assert_eq!(s.resolve(&b).unwrap(), 3 * 8192);
        let g = s.ceil_div(3 * 8192);
        assert_eq!(g.to_string(), "ceil(batch/3)");
        assert_eq!(g.resolve(&b).unwrap(), 1);
        assert_eq!(SymExpr::constant(7).as_const(), Some(7));
    }
}
