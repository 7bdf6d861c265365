//! Arithmetic, logic, comparison and selection instructions, and the `f32` special
//! functions (`ex2.approx`, `rcp`, `rsqrt`, `sqrt`, …).
//!
//! Each method states the register types it accepts through the traits of `types.rs` and
//! returns a fresh result register. No memory access, conversion or control flow here.

use super::builder::KernelBuilder;
use super::types::{
    Bitwise, Comparable, Float, IeeeFloat, Integer, Numeric, Operand, Pred, Reg, RegType, Scalar,
    Signed, F32, U32, U64,
};

/// A comparison of [`KernelBuilder::setp`]. On floats every comparison is ordered: false
/// when either side is NaN, `Ne` included. Unsigned types compare unsigned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn ptx(self) -> &'static str {
        match self {
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
            Cmp::Lt => "lt",
            Cmp::Le => "le",
            Cmp::Gt => "gt",
            Cmp::Ge => "ge",
        }
    }
}

impl KernelBuilder {
    fn unary_op<T: RegType>(&mut self, opcode: &str, a: Operand<T>) -> Reg<T> {
        let d = self.reg::<T>();
        self.emit(format!("{opcode} {d}, {a}"));
        d
    }

    fn binary_op<T: RegType>(&mut self, opcode: &str, a: Operand<T>, b: Operand<T>) -> Reg<T> {
        let d = self.reg::<T>();
        self.emit(format!("{opcode} {d}, {a}, {b}"));
        d
    }

    /// `mov`: a fresh register holding `value` (a register copy or an immediate).
    pub fn mov<T: Scalar>(&mut self, value: impl Into<Operand<T>>) -> Reg<T> {
        self.unary_op(&format!("mov.{}", T::DATA), value.into())
    }

    /// `N` fresh registers, each holding `value` (accumulators before a loop).
    pub fn splat<T: Scalar, const N: usize>(
        &mut self,
        value: impl Into<Operand<T>>,
    ) -> [Reg<T>; N] {
        let value = value.into();
        std::array::from_fn(|_| self.mov(value))
    }

    /// `mov destination, value`: overwrites an existing register, for values carried
    /// around a loop (`acc = acc + x` is `let s = k.add(acc, x); k.assign(acc, s)`; ptxas
    /// removes the copy).
    pub fn assign<T: Scalar>(&mut self, destination: Reg<T>, value: impl Into<Operand<T>>) {
        let value = value.into();
        self.emit(format!("mov.{} {destination}, {value}", T::DATA));
    }

    /// `add`.
    pub fn add<T: Numeric>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("add.{}", T::ARITH), a.into(), b.into())
    }

    /// `sub`: `a - b`.
    pub fn sub<T: Numeric>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("sub.{}", T::ARITH), a.into(), b.into())
    }

    /// `mul` (`mul.lo` for integers: the low half of the product).
    pub fn mul<T: Numeric>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(T::MUL, a.into(), b.into())
    }

    /// `a * b + c`: `fma.rn` for floats (one rounding), `mad.lo` for integers.
    pub fn mul_add<T: Numeric>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
        c: impl Into<Operand<T>>,
    ) -> Reg<T> {
        let (a, b, c) = (a.into(), b.into(), c.into());
        let d = self.reg::<T>();
        self.emit(format!("{} {d}, {a}, {b}, {c}", T::MUL_ADD));
        d
    }

    /// `mul.wide.u32`: the full 64-bit product of two `u32`, for byte offsets.
    pub fn mul_wide(&mut self, a: impl Into<Operand<U32>>, b: impl Into<Operand<U32>>) -> Reg<U64> {
        let (a, b) = (a.into(), b.into());
        let d = self.reg::<U64>();
        self.emit(format!("mul.wide.u32 {d}, {a}, {b}"));
        d
    }

    /// `mad.wide.u32`: `a * b + c` with a 64-bit product and addend, for addresses
    /// (`base + index * element_bytes`).
    pub fn mad_wide(
        &mut self,
        a: impl Into<Operand<U32>>,
        b: impl Into<Operand<U32>>,
        c: impl Into<Operand<U64>>,
    ) -> Reg<U64> {
        let (a, b, c) = (a.into(), b.into(), c.into());
        let d = self.reg::<U64>();
        self.emit(format!("mad.wide.u32 {d}, {a}, {b}, {c}"));
        d
    }

    /// `min` (for floats, the non-NaN operand when one is NaN).
    pub fn min<T: Numeric>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("min.{}", T::ARITH), a.into(), b.into())
    }

    /// `max` (for floats, the non-NaN operand when one is NaN).
    pub fn max<T: Numeric>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("max.{}", T::ARITH), a.into(), b.into())
    }

    /// `neg`.
    pub fn neg<T: Signed>(&mut self, a: impl Into<Operand<T>>) -> Reg<T> {
        self.unary_op(&format!("neg.{}", T::ARITH), a.into())
    }

    /// `abs`.
    pub fn abs<T: Signed>(&mut self, a: impl Into<Operand<T>>) -> Reg<T> {
        self.unary_op(&format!("abs.{}", T::ARITH), a.into())
    }

    /// Integer `div` (rounds toward zero).
    pub fn div<T: Integer>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("div.{}", T::ARITH), a.into(), b.into())
    }

    /// Integer `rem`.
    pub fn rem<T: Integer>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("rem.{}", T::ARITH), a.into(), b.into())
    }

    /// Correctly rounded float division `div.rn` (a slow sequence; multiply by
    /// [`rcp_approx`](KernelBuilder::rcp_approx) where an approximation will do).
    pub fn div_rn<T: IeeeFloat>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("div.rn.{}", T::ARITH), a.into(), b.into())
    }

    /// `fma.rn`: `a * b + c` rounded once (the same as [`mul_add`](KernelBuilder::mul_add)
    /// on floats, named for readability).
    pub fn fma<T: Float>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
        c: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.mul_add(a, b, c)
    }

    /// `and`.
    pub fn and<T: Bitwise>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("and.{}", T::LOGIC), a.into(), b.into())
    }

    /// `or`.
    pub fn or<T: Bitwise>(&mut self, a: impl Into<Operand<T>>, b: impl Into<Operand<T>>) -> Reg<T> {
        self.binary_op(&format!("or.{}", T::LOGIC), a.into(), b.into())
    }

    /// `xor`.
    pub fn xor<T: Bitwise>(
        &mut self,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<T> {
        self.binary_op(&format!("xor.{}", T::LOGIC), a.into(), b.into())
    }

    /// `not`.
    pub fn not<T: Bitwise>(&mut self, a: Reg<T>) -> Reg<T> {
        let d = self.reg::<T>();
        self.emit(format!("not.{} {d}, {a}", T::LOGIC));
        d
    }

    /// `shl`: `a << bits`.
    pub fn shl<T: Integer + Bitwise>(
        &mut self,
        a: impl Into<Operand<T>>,
        bits: impl Into<Operand<U32>>,
    ) -> Reg<T> {
        let (a, bits) = (a.into(), bits.into());
        let d = self.reg::<T>();
        self.emit(format!("shl.{} {d}, {a}, {bits}", T::LOGIC));
        d
    }

    /// `shr`: `a >> bits`, arithmetic (sign-filling) for signed types.
    pub fn shr<T: Integer>(
        &mut self,
        a: impl Into<Operand<T>>,
        bits: impl Into<Operand<U32>>,
    ) -> Reg<T> {
        let (a, bits) = (a.into(), bits.into());
        let d = self.reg::<T>();
        self.emit(format!("shr.{} {d}, {a}, {bits}", T::ARITH));
        d
    }

    /// `setp.<cmp>`: a predicate `a <cmp> b`.
    pub fn setp<T: Comparable>(
        &mut self,
        cmp: Cmp,
        a: impl Into<Operand<T>>,
        b: impl Into<Operand<T>>,
    ) -> Reg<Pred> {
        let (a, b) = (a.into(), b.into());
        let p = self.reg::<Pred>();
        self.emit(format!("setp.{}.{} {p}, {a}, {b}", cmp.ptx(), T::COMPARE));
        p
    }

    /// `selp`: `if_true` where `condition` holds, else `if_false`.
    pub fn select<T: Scalar>(
        &mut self,
        condition: Reg<Pred>,
        if_true: impl Into<Operand<T>>,
        if_false: impl Into<Operand<T>>,
    ) -> Reg<T> {
        let (a, b) = (if_true.into(), if_false.into());
        let d = self.reg::<T>();
        self.emit(format!("selp.{} {d}, {a}, {b}, {condition}", T::DATA));
        d
    }

    /// `ex2.approx.f32`: `2^x` (about 2 ulp; `e^x` is `2^(x·log2 e)`).
    pub fn ex2_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("ex2.approx.f32", x.into())
    }

    /// `ex2.approx.ftz.f32`: `2^x` with subnormal inputs and results flushed to zero (one
    /// `MUFU.EX2`; the non-`ftz` form adds range fix-ups). For softmax weights, where a
    /// result below 2^-126 is as good as zero.
    pub fn ex2_approx_ftz(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("ex2.approx.ftz.f32", x.into())
    }

    /// `lg2.approx.f32`: `log2(x)`.
    pub fn lg2_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("lg2.approx.f32", x.into())
    }

    /// `rcp.approx.f32`: `1/x` (about 1 ulp).
    pub fn rcp_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("rcp.approx.f32", x.into())
    }

    /// `rcp.rn.f32`: `1/x` correctly rounded.
    pub fn rcp_rn(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("rcp.rn.f32", x.into())
    }

    /// `rsqrt.approx.f32`: `1/sqrt(x)`.
    pub fn rsqrt_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("rsqrt.approx.f32", x.into())
    }

    /// `sqrt.rn.f32`: correctly rounded square root.
    pub fn sqrt_rn(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("sqrt.rn.f32", x.into())
    }

    /// `sqrt.approx.f32`.
    pub fn sqrt_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("sqrt.approx.f32", x.into())
    }

    /// `sin.approx.f32` (accurate for small arguments; reduce large angles first).
    pub fn sin_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("sin.approx.f32", x.into())
    }

    /// `cos.approx.f32` (accurate for small arguments; reduce large angles first).
    pub fn cos_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("cos.approx.f32", x.into())
    }

    /// `tanh.approx.f32`.
    pub fn tanh_approx(&mut self, x: impl Into<Operand<F32>>) -> Reg<F32> {
        self.unary_op("tanh.approx.f32", x.into())
    }
}
