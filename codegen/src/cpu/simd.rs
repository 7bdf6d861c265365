//! Scalar and 128-bit vector value helpers shared by the CPU generators: the Cranelift type of
//! a compute shape, constants, multiply-add, lane bit casts and horizontal sums. Owns no loop
//! or memory access and no kernel logic.
//!
//! Cranelift lowers only 128-bit vectors on x86-64, so a vector is f32x4 or f64x2.

use super::{CpuTarget, ElemType};
use cranelift_codegen::ir::{types, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::FunctionBuilder;

/// The shape of the values a piece of code computes on: one element or one 128-bit vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lanes {
    pub elem: ElemType,
    pub vector: bool,
}

impl Lanes {
    pub fn scalar(elem: ElemType) -> Lanes {
        Lanes {
            elem,
            vector: false,
        }
    }

    pub fn vector(elem: ElemType) -> Lanes {
        Lanes { elem, vector: true }
    }

    /// Number of elements in one value.
    pub fn count(self) -> u32 {
        if self.vector {
            self.elem.lanes()
        } else {
            1
        }
    }

    /// The float type: `f32`, `f64`, `f32x4` or `f64x2`.
    pub fn ty(self) -> Type {
        match (self.elem, self.vector) {
            (ElemType::F32, false) => types::F32,
            (ElemType::F64, false) => types::F64,
            (ElemType::F32, true) => types::F32X4,
            (ElemType::F64, true) => types::F64X2,
        }
    }

    /// The integer type of the same shape: `i32`, `i64`, `i32x4` or `i64x2`.
    pub fn int_ty(self) -> Type {
        match (self.elem, self.vector) {
            (ElemType::F32, false) => types::I32,
            (ElemType::F64, false) => types::I64,
            (ElemType::F32, true) => types::I32X4,
            (ElemType::F64, true) => types::I64X2,
        }
    }

    /// The scalar float type of one lane.
    pub fn scalar_ty(self) -> Type {
        Lanes::scalar(self.elem).ty()
    }
}

/// `value` in every lane (rounded to f32 for f32 lanes).
pub fn fconst(b: &mut FunctionBuilder, lanes: Lanes, value: f64) -> Value {
    let scalar = match lanes.elem {
        ElemType::F32 => b.ins().f32const(value as f32),
        ElemType::F64 => b.ins().f64const(value),
    };
    if lanes.vector {
        b.ins().splat(lanes.ty(), scalar)
    } else {
        scalar
    }
}

/// The integer `value` in every lane of `lanes.int_ty()`.
pub fn iconst(b: &mut FunctionBuilder, lanes: Lanes, value: i64) -> Value {
    let scalar_ty = Lanes::scalar(lanes.elem).int_ty();
    let scalar = b.ins().iconst(scalar_ty, value);
    if lanes.vector {
        b.ins().splat(lanes.int_ty(), scalar)
    } else {
        scalar
    }
}

/// `x · y + z`: one fused `fma` where the target has it, else `fmul` then `fadd`.
pub fn mul_add(b: &mut FunctionBuilder, target: &CpuTarget, x: Value, y: Value, z: Value) -> Value {
    if target.fma {
        b.ins().fma(x, y, z)
    } else {
        let p = b.ins().fmul(x, y);
        b.ins().fadd(p, z)
    }
}

/// Reinterprets the bits of `x` as `ty` (same total width; lanes in little-endian order).
pub fn bitcast(b: &mut FunctionBuilder, ty: Type, x: Value) -> Value {
    let flags = MemFlagsData::new().with_endianness(Endianness::Little);
    b.ins().bitcast(ty, flags, x)
}

/// The sum of the lanes of `x` (a scalar of `lanes.scalar_ty()`), summed pairwise.
pub fn hsum(b: &mut FunctionBuilder, lanes: Lanes, x: Value) -> Value {
    if !lanes.vector {
        return x;
    }
    let terms = (0..lanes.count())
        .map(|l| b.ins().extractlane(x, l as u8))
        .collect();
    sum_tree(b, terms)
}

/// Sums `values` pairwise (a balanced tree keeps rounding and dependency chains short).
pub fn sum_tree(b: &mut FunctionBuilder, mut values: Vec<Value>) -> Value {
    assert!(!values.is_empty(), "sum_tree of nothing");
    while values.len() > 1 {
        values = values
            .chunks(2)
            .map(|pair| match pair {
                [p, q] => b.ins().fadd(*p, *q),
                [p] => *p,
                _ => unreachable!(),
            })
            .collect();
    }
    values[0]
}
