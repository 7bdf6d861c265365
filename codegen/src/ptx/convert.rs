//! Conversions between register types: `cvt` with explicit rounding, packing and
//! unpacking of pairs (`f16x2`, `bf16x2`), and same-size bit casts.
//!
//! Which conversions need a rounding mode is decided by the type traits ([`ExactFrom`],
//! [`RoundFrom`]), so a missing or meaningless rounding mode does not compile. No
//! arithmetic or memory access here.

use super::builder::KernelBuilder;
use super::types::{
    BF16x2, Convertible, ExactFrom, F16x2, Operand, Pair, Reg, RegType, RoundFrom, Scalar, F32,
};

/// The rounding of a conversion. Printed `.rn`/`.rz`/`.rm`/`.rp` when the destination is a
/// float and `.rni`/`.rzi`/`.rmi`/`.rpi` when it is an integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Round {
    /// To nearest, ties to even.
    Nearest,
    /// Toward zero (truncation).
    TowardZero,
    /// Toward negative infinity.
    Down,
    /// Toward positive infinity.
    Up,
}

impl Round {
    fn ptx(self, to_integer: bool) -> &'static str {
        match (self, to_integer) {
            (Round::Nearest, false) => "rn",
            (Round::TowardZero, false) => "rz",
            (Round::Down, false) => "rm",
            (Round::Up, false) => "rp",
            (Round::Nearest, true) => "rni",
            (Round::TowardZero, true) => "rzi",
            (Round::Down, true) => "rmi",
            (Round::Up, true) => "rpi",
        }
    }
}

/// A register that converts exactly to `D` (see [`ExactFrom`]); lets
/// [`KernelBuilder::cvt`] be called as `k.cvt::<F32>(half)`.
pub trait ExactInto<D: Convertible> {
    #[doc(hidden)]
    fn cvt_source(&self) -> (String, &'static str);
}

impl<S: Convertible, D: ExactFrom<S>> ExactInto<D> for Reg<S> {
    fn cvt_source(&self) -> (String, &'static str) {
        (self.to_string(), S::CVT)
    }
}

/// A register that converts to `D` with a rounding mode (see [`RoundFrom`]); lets
/// [`KernelBuilder::cvt_round`] be called as `k.cvt_round::<F16>(x, Round::Nearest)`.
pub trait RoundInto<D: Convertible> {
    #[doc(hidden)]
    fn cvt_source(&self) -> (String, &'static str, bool);
}

impl<S: Convertible, D: RoundFrom<S>> RoundInto<D> for Reg<S> {
    fn cvt_source(&self) -> (String, &'static str, bool) {
        (self.to_string(), S::CVT, D::TO_INTEGER)
    }
}

/// A register with as many bits as `D`; lets [`KernelBuilder::bitcast`] be called as
/// `k.bitcast::<B32>(pair)`.
pub trait BitcastInto<D: RegType> {
    #[doc(hidden)]
    fn bitcast_source(&self) -> String;
}

impl<S: RegType, D: RegType> BitcastInto<D> for Reg<S> {
    fn bitcast_source(&self) -> String {
        const {
            assert!(
                S::BITS == D::BITS,
                "bitcast between register types of different sizes"
            )
        };
        self.to_string()
    }
}

impl KernelBuilder {
    /// `cvt.D.S` for conversions that need no rounding: `f16`/`bf16` → `f32`,
    /// `f32` → `f64`, `u32` ↔ `u64` (`u64` → `u32` keeps the low bits).
    pub fn cvt<D: Convertible>(&mut self, x: impl ExactInto<D>) -> Reg<D> {
        let (source, source_type) = x.cvt_source();
        let d = self.reg::<D>();
        self.emit(format!("cvt.{}.{source_type} {d}, {source}", D::CVT));
        d
    }

    /// `cvt.<rounding>.D.S` for conversions that round: `f32` → `f16`/`bf16`,
    /// `f64` → `f32`, integer → float, and float → integer (which saturates at the
    /// integer's range; NaN gives 0).
    pub fn cvt_round<D: Convertible>(&mut self, x: impl RoundInto<D>, rounding: Round) -> Reg<D> {
        let (source, source_type, to_integer) = x.cvt_source();
        let d = self.reg::<D>();
        self.emit(format!(
            "cvt.{}.{}.{source_type} {d}, {source}",
            rounding.ptx(to_integer),
            D::CVT
        ));
        d
    }

    /// [`cvt_round`](KernelBuilder::cvt_round) to nearest (`cvt.rn` / `cvt.rni`).
    pub fn cvt_rn<D: Convertible>(&mut self, x: impl RoundInto<D>) -> Reg<D> {
        self.cvt_round(x, Round::Nearest)
    }

    /// `cvt.rn.f16x2.f32`: two `f32` rounded to a packed pair, `lo` in the low half.
    pub fn cvt_pack_f16x2(
        &mut self,
        lo: impl Into<Operand<F32>>,
        hi: impl Into<Operand<F32>>,
    ) -> Reg<F16x2> {
        let (lo, hi) = (lo.into(), hi.into());
        let d = self.reg::<F16x2>();
        // The first source lands in the upper half.
        self.emit(format!("cvt.rn.f16x2.f32 {d}, {hi}, {lo}"));
        d
    }

    /// `cvt.rn.bf16x2.f32`: two `f32` rounded to a packed pair, `lo` in the low half.
    pub fn cvt_pack_bf16x2(
        &mut self,
        lo: impl Into<Operand<F32>>,
        hi: impl Into<Operand<F32>>,
    ) -> Reg<BF16x2> {
        let (lo, hi) = (lo.into(), hi.into());
        let d = self.reg::<BF16x2>();
        // The first source lands in the upper half.
        self.emit(format!("cvt.rn.bf16x2.f32 {d}, {hi}, {lo}"));
        d
    }

    /// `mov.bN d, {lo, hi}`: packs two halves, `lo` in the low bits
    /// (`k.pack::<F16x2>(a, b)`).
    pub fn pack<P: Pair>(&mut self, lo: Reg<P::Half>, hi: Reg<P::Half>) -> Reg<P> {
        let d = self.reg::<P>();
        self.emit(format!("mov.b{} {d}, {{{lo}, {hi}}}", P::BITS));
        d
    }

    /// `mov.bN {lo, hi}, x`: splits a pair into its halves, low half first.
    pub fn unpack<P: Pair>(&mut self, x: Reg<P>) -> (Reg<P::Half>, Reg<P::Half>) {
        let lo = self.reg::<P::Half>();
        let hi = self.reg::<P::Half>();
        self.emit(format!("mov.b{} {{{lo}, {hi}}}, {x}", P::BITS));
        (lo, hi)
    }

    /// `mov.bN`: the same bits as another type of the same size
    /// (`k.bitcast::<B32>(pair)`). A size mismatch fails to compile.
    pub fn bitcast<D: Scalar>(&mut self, x: impl BitcastInto<D>) -> Reg<D> {
        let source = x.bitcast_source();
        let d = self.reg::<D>();
        self.emit(format!("mov.b{} {d}, {source}", D::BITS));
        d
    }
}
