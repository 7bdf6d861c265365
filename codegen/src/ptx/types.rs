//! Register types of the PTX builder and the operands built from them.
//!
//! Owns the zero-sized type markers ([`F32`], [`U32`], [`F16x2`], …), the typed register
//! handle [`Reg`], immediate [`Operand`]s, predicate [`Guard`]s, memory addresses [`Mem`] and
//! the capability traits ([`Numeric`], [`Float`], [`Bits32`], …) that make a mistyped
//! instruction a Rust compile error instead of a ptxas error. It must not emit instructions:
//! that is the builder's job.

use std::fmt;
use std::marker::PhantomData;

mod sealed {
    pub trait Sealed {}
}

/// The register classes in declaration order: one `.reg` line per class that a kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegClass {
    Pred,
    B16,
    B32,
    B64,
    U32,
    U64,
    S32,
    F16,
    F16x2,
    BF16,
    BF16x2,
    F32,
    F64,
}

impl RegClass {
    /// Every class, in the order the printer declares them.
    pub const ALL: [RegClass; 13] = [
        RegClass::Pred,
        RegClass::B16,
        RegClass::B32,
        RegClass::B64,
        RegClass::U32,
        RegClass::U64,
        RegClass::S32,
        RegClass::F16,
        RegClass::F16x2,
        RegClass::BF16,
        RegClass::BF16x2,
        RegClass::F32,
        RegClass::F64,
    ];

    /// Position in [`RegClass::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The PTX storage type in the `.reg` declaration. `bf16` and `bf16x2` values live in
    /// `.b16` / `.b32` registers: ptxas does not accept `.reg .bf16`.
    pub fn declared_type(self) -> &'static str {
        match self {
            RegClass::Pred => ".pred",
            RegClass::B16 => ".b16",
            RegClass::B32 => ".b32",
            RegClass::B64 => ".b64",
            RegClass::U32 => ".u32",
            RegClass::U64 => ".u64",
            RegClass::S32 => ".s32",
            RegClass::F16 => ".f16",
            RegClass::F16x2 => ".f16x2",
            RegClass::BF16 => ".b16",
            RegClass::BF16x2 => ".b32",
            RegClass::F32 => ".f32",
            RegClass::F64 => ".f64",
        }
    }

    /// The register name prefix, unique per class (`%f` for `f32`, `%r` for `u32`, …).
    pub fn prefix(self) -> &'static str {
        match self {
            RegClass::Pred => "%p",
            RegClass::B16 => "%rs",
            RegClass::B32 => "%b",
            RegClass::B64 => "%bd",
            RegClass::U32 => "%r",
            RegClass::U64 => "%rd",
            RegClass::S32 => "%ri",
            RegClass::F16 => "%h",
            RegClass::F16x2 => "%hx",
            RegClass::BF16 => "%bh",
            RegClass::BF16x2 => "%bx",
            RegClass::F32 => "%f",
            RegClass::F64 => "%fd",
        }
    }
}

/// A PTX register type. Implemented only by the markers of this module.
pub trait RegType:
    sealed::Sealed + Copy + Eq + std::hash::Hash + fmt::Debug + Default + 'static
{
    /// The register class (declaration line and name prefix).
    const CLASS: RegClass;
    /// The type's name as the PTX ISA spells it, for messages.
    const NAME: &'static str;
    /// Size in bits.
    const BITS: u32;
}

/// A type that can be moved, selected, loaded and stored: the `.type` suffix of `mov`,
/// `selp`, `ld` and `st` (`b16` for `f16`, `b32` for `f16x2`, as `ld` has no `.f16` form).
pub trait Scalar: RegType {
    /// The data-movement suffix, without the dot.
    const DATA: &'static str;
}

/// `add`, `sub`, `mul`, `min`, `max` and `mul_add` apply.
pub trait Numeric: Scalar {
    /// The arithmetic suffix (`f32`, `u32`, `f16x2`).
    const ARITH: &'static str;
    /// The full multiply opcode: `mul.lo.u32` for integers, `mul.f32` for floats.
    const MUL: &'static str;
    /// The full multiply-add opcode: `mad.lo.u32` for integers, `fma.rn.f32` for floats.
    const MUL_ADD: &'static str;
}

/// Integers: `div`, `rem`, `shl`, `shr` apply (`shr` is arithmetic for signed types).
pub trait Integer: Numeric {}

/// Floating-point types, scalar or packed pairs.
pub trait Float: Numeric {}

/// `neg` and `abs` apply.
pub trait Signed: Numeric {}

/// Types with a correctly rounded division `div.rn`.
pub trait IeeeFloat: Float {}

/// `and`, `or`, `xor` and `not` apply (as `.pred`, `.b16`, `.b32` or `.b64`).
pub trait Bitwise: RegType {
    /// The logic suffix (`pred`, `b32`, …).
    const LOGIC: &'static str;
}

/// `setp` applies.
pub trait Comparable: Scalar {
    /// The comparison suffix (`u32` compares unsigned, `s32` signed).
    const COMPARE: &'static str;
}

/// 32-bit values: shuffles, `ldmatrix` / `mma` fragments and 32-bit atomics accept them.
pub trait Bits32: Scalar {}

/// The element type of `cvt`: `cvt.<destination>.<source>`.
pub trait Convertible: RegType {
    /// The `cvt` suffix, without the dot.
    const CVT: &'static str;
}

/// A type made of two halves, packed and unpacked with `mov.b32 d, {lo, hi}` /
/// `mov.b32 {lo, hi}, d` (and `.b64` for `u64`).
pub trait Pair: Scalar {
    /// The type of each half.
    type Half: Scalar;
}

/// `atom.add` / `red.add` apply.
pub trait AtomicAdd: Scalar {
    /// The atomic suffix.
    const ATOMIC: &'static str;
}

/// `atom.min` / `atom.max` apply.
pub trait AtomicMinMax: Scalar {
    /// The atomic suffix.
    const ATOMIC: &'static str;
}

/// `atom.cas` / `atom.exch` apply (as `.b32` or `.b64`).
pub trait AtomicBits: Scalar {}

macro_rules! reg_type {
    ($(#[$doc:meta])* $name:ident, $class:ident, $ptx:literal, $bits:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name;
        impl sealed::Sealed for $name {}
        impl RegType for $name {
            const CLASS: RegClass = RegClass::$class;
            const NAME: &'static str = $ptx;
            const BITS: u32 = $bits;
        }
    };
}

reg_type!(
    /// A predicate (`.pred`): the result of `setp`, the guard of an instruction.
    Pred, Pred, "pred", 1
);
reg_type!(
    /// 16 untyped bits.
    B16, B16, "b16", 16
);
reg_type!(
    /// 32 untyped bits: `ldmatrix` fragments, packed bytes.
    B32, B32, "b32", 32
);
reg_type!(
    /// 64 untyped bits.
    B64, B64, "b64", 64
);
reg_type!(
    /// Unsigned 32-bit integer: indices, sizes, shared-memory addresses.
    U32, U32, "u32", 32
);
reg_type!(
    /// Unsigned 64-bit integer: global addresses.
    U64, U64, "u64", 64
);
reg_type!(
    /// Signed 32-bit integer.
    S32, S32, "s32", 32
);
reg_type!(
    /// IEEE half precision.
    F16, F16, "f16", 16
);
reg_type!(
    /// Two halves packed in 32 bits, low element first.
    F16x2, F16x2, "f16x2", 32
);
reg_type!(
    /// bfloat16 (held in a `.b16` register).
    BF16, BF16, "bf16", 16
);
reg_type!(
    /// Two bfloat16 packed in 32 bits, low element first (held in a `.b32` register).
    BF16x2, BF16x2, "bf16x2", 32
);
reg_type!(
    /// IEEE single precision: the compute type of every kernel.
    F32, F32, "f32", 32
);
reg_type!(
    /// IEEE double precision.
    F64, F64, "f64", 64
);

macro_rules! impl_scalar {
    ($($t:ident => $data:literal),* $(,)?) => {
        $(impl Scalar for $t { const DATA: &'static str = $data; })*
    };
}
impl_scalar!(
    B16 => "b16", B32 => "b32", B64 => "b64", U32 => "u32", U64 => "u64", S32 => "s32",
    F16 => "b16", F16x2 => "b32", BF16 => "b16", BF16x2 => "b32", F32 => "f32", F64 => "f64",
);

macro_rules! impl_numeric {
    ($($t:ident => $arith:literal, $mul:literal, $mul_add:literal);* $(;)?) => {
        $(impl Numeric for $t {
            const ARITH: &'static str = $arith;
            const MUL: &'static str = $mul;
            const MUL_ADD: &'static str = $mul_add;
        })*
    };
}
impl_numeric!(
    U32 => "u32", "mul.lo.u32", "mad.lo.u32";
    S32 => "s32", "mul.lo.s32", "mad.lo.s32";
    U64 => "u64", "mul.lo.u64", "mad.lo.u64";
    F16 => "f16", "mul.f16", "fma.rn.f16";
    F16x2 => "f16x2", "mul.f16x2", "fma.rn.f16x2";
    F32 => "f32", "mul.f32", "fma.rn.f32";
    F64 => "f64", "mul.f64", "fma.rn.f64";
);

impl Integer for U32 {}
impl Integer for S32 {}
impl Integer for U64 {}
impl Float for F16 {}
impl Float for F16x2 {}
impl Float for F32 {}
impl Float for F64 {}
impl IeeeFloat for F32 {}
impl IeeeFloat for F64 {}
impl Signed for S32 {}
impl Signed for F16 {}
impl Signed for F16x2 {}
impl Signed for F32 {}
impl Signed for F64 {}

macro_rules! impl_bitwise {
    ($($t:ident => $logic:literal),* $(,)?) => {
        $(impl Bitwise for $t { const LOGIC: &'static str = $logic; })*
    };
}
impl_bitwise!(
    Pred => "pred", B16 => "b16", B32 => "b32", B64 => "b64", U32 => "b32", S32 => "b32",
    U64 => "b64",
);

macro_rules! impl_comparable {
    ($($t:ident => $cmp:literal),* $(,)?) => {
        $(impl Comparable for $t { const COMPARE: &'static str = $cmp; })*
    };
}
impl_comparable!(
    B16 => "b16", B32 => "b32", B64 => "b64", U32 => "u32", U64 => "u64", S32 => "s32",
    F16 => "f16", F32 => "f32", F64 => "f64",
);

impl Bits32 for B32 {}
impl Bits32 for U32 {}
impl Bits32 for S32 {}
impl Bits32 for F32 {}
impl Bits32 for F16x2 {}
impl Bits32 for BF16x2 {}

macro_rules! impl_convertible {
    ($($t:ident => $cvt:literal),* $(,)?) => {
        $(impl Convertible for $t { const CVT: &'static str = $cvt; })*
    };
}
impl_convertible!(
    U32 => "u32", U64 => "u64", S32 => "s32", F16 => "f16", BF16 => "bf16", F32 => "f32",
    F64 => "f64",
);

impl Pair for F16x2 {
    type Half = F16;
}
impl Pair for BF16x2 {
    type Half = BF16;
}
impl Pair for B32 {
    type Half = B16;
}
impl Pair for U64 {
    type Half = U32;
}
impl Pair for B64 {
    type Half = B32;
}

impl AtomicAdd for U32 {
    const ATOMIC: &'static str = "u32";
}
impl AtomicAdd for S32 {
    const ATOMIC: &'static str = "s32";
}
impl AtomicAdd for U64 {
    const ATOMIC: &'static str = "u64";
}
impl AtomicAdd for F32 {
    const ATOMIC: &'static str = "f32";
}
impl AtomicAdd for F64 {
    const ATOMIC: &'static str = "f64";
}
impl AtomicMinMax for U32 {
    const ATOMIC: &'static str = "u32";
}
impl AtomicMinMax for S32 {
    const ATOMIC: &'static str = "s32";
}
impl AtomicMinMax for U64 {
    const ATOMIC: &'static str = "u64";
}
impl AtomicBits for B32 {}
impl AtomicBits for U32 {}
impl AtomicBits for S32 {}
impl AtomicBits for F32 {}
impl AtomicBits for B64 {}
impl AtomicBits for U64 {}

/// Conversions that need no rounding mode: widening floats (`cvt.f32.f16`,
/// `cvt.f32.bf16`, `cvt.f64.f32`) and integer width changes (`cvt.u64.u32`,
/// `cvt.u32.u64` truncates).
pub trait ExactFrom<S: Convertible>: Convertible {}
impl ExactFrom<F16> for F32 {}
impl ExactFrom<BF16> for F32 {}
impl ExactFrom<F32> for F64 {}
impl ExactFrom<U32> for U64 {}
impl ExactFrom<U64> for U32 {}

/// Conversions that round: narrowing floats, integer to float (a float rounding such as
/// `.rn`) and float to integer (an integer rounding such as `.rzi`, saturating at the
/// destination's range).
pub trait RoundFrom<S: Convertible>: Convertible {
    /// Whether the destination is an integer (the rounding is printed `.rni`, `.rzi`, …).
    const TO_INTEGER: bool;
}
macro_rules! impl_round_from {
    ($($d:ident <- $s:ident : $to_int:literal),* $(,)?) => {
        $(impl RoundFrom<$s> for $d { const TO_INTEGER: bool = $to_int; })*
    };
}
impl_round_from!(
    F16 <- F32: false, BF16 <- F32: false, F32 <- F64: false,
    F32 <- U32: false, F32 <- S32: false, F64 <- U32: false, F64 <- S32: false,
    U32 <- F32: true, S32 <- F32: true, S32 <- F64: true, U32 <- F64: true,
);

/// A typed virtual register. Created by the builder; printed as its PTX name (`%f3`).
///
/// Registers are numbered per class in creation order, so the same sequence of builder
/// calls always prints the same names.
pub struct Reg<T> {
    index: u32,
    _type: PhantomData<T>,
}

impl<T> Clone for Reg<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Reg<T> {}
impl<T> PartialEq for Reg<T> {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
    }
}
impl<T> Eq for Reg<T> {}
impl<T> std::hash::Hash for Reg<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.index.hash(state);
    }
}

impl<T: RegType> Reg<T> {
    pub(crate) fn new(index: u32) -> Reg<T> {
        Reg {
            index,
            _type: PhantomData,
        }
    }

    /// The register's number within its class.
    pub fn index(self) -> u32 {
        self.index
    }
}

impl<T: RegType> fmt::Display for Reg<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", T::CLASS.prefix(), self.index)
    }
}

impl<T: RegType> fmt::Debug for Reg<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}:{}", T::NAME)
    }
}

impl Reg<U64> {
    /// The address `[self + bytes]`, for a global (or generic) 64-bit address register.
    pub fn at(self, bytes: i64) -> Mem {
        Mem::new(self.to_string(), bytes)
    }
}

impl Reg<U32> {
    /// The address `[self + bytes]`, for a 32-bit shared-memory address register.
    pub fn at(self, bytes: i64) -> Mem {
        Mem::new(self.to_string(), bytes)
    }
}

/// An instruction source: a register or an immediate of the same type.
///
/// Immediates convert from Rust literals: `u32` for [`U32`], `i32` for [`S32`], `u64` for
/// [`U64`], `f32` for [`F32`] (printed exactly as `0f3F800000`) and `f64` for [`F64`]
/// (`0d3FF0000000000000`). Each literal type maps to one register type, so an instruction
/// whose operands are all literals still infers its type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Operand<T: RegType> {
    Reg(Reg<T>),
    Imm(Immediate),
}

/// An immediate value, printed exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Immediate {
    Unsigned(u64),
    Signed(i64),
    /// The bits of an `f32`.
    F32Bits(u32),
    /// The bits of an `f64`.
    F64Bits(u64),
}

impl fmt::Display for Immediate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Immediate::Unsigned(v) => write!(f, "{v}"),
            Immediate::Signed(v) => write!(f, "{v}"),
            Immediate::F32Bits(bits) => write!(f, "0f{bits:08X}"),
            Immediate::F64Bits(bits) => write!(f, "0d{bits:016X}"),
        }
    }
}

impl<T: RegType> fmt::Display for Operand<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Reg(r) => r.fmt(f),
            Operand::Imm(i) => i.fmt(f),
        }
    }
}

impl<T: RegType> From<Reg<T>> for Operand<T> {
    fn from(r: Reg<T>) -> Self {
        Operand::Reg(r)
    }
}

macro_rules! immediate_from {
    ($($rust:ty => $t:ident, $v:ident => $imm:expr);* $(;)?) => {
        $(impl From<$rust> for Operand<$t> {
            fn from($v: $rust) -> Self {
                Operand::Imm($imm)
            }
        })*
    };
}
immediate_from!(
    u32 => U32, v => Immediate::Unsigned(v as u64);
    i32 => S32, v => Immediate::Signed(v as i64);
    u64 => U64, v => Immediate::Unsigned(v);
    f32 => F32, v => Immediate::F32Bits(v.to_bits());
    f64 => F64, v => Immediate::F64Bits(v.to_bits());
);

/// The hex immediate of an `f32`, as PTX prints it: `0f3F800000` for 1.0.
pub fn f32_immediate(value: f32) -> String {
    Immediate::F32Bits(value.to_bits()).to_string()
}

/// A predicate guard for an instruction: `@%p1` or, negated, `@!%p1`.
///
/// Built from a predicate register (`Guard::from(p)` or just `p` where `impl Into<Guard>`
/// is taken) or its negation `!p`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Guard {
    pub predicate: Reg<Pred>,
    pub negated: bool,
}

impl From<Reg<Pred>> for Guard {
    fn from(predicate: Reg<Pred>) -> Guard {
        Guard {
            predicate,
            negated: false,
        }
    }
}

impl std::ops::Not for Reg<Pred> {
    type Output = Guard;
    fn not(self) -> Guard {
        Guard {
            predicate: self,
            negated: true,
        }
    }
}

impl std::ops::Not for Guard {
    type Output = Guard;
    fn not(self) -> Guard {
        Guard {
            predicate: self.predicate,
            negated: !self.negated,
        }
    }
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.negated {
            write!(f, "@!{}", self.predicate)
        } else {
            write!(f, "@{}", self.predicate)
        }
    }
}

/// A memory address operand: a base (register or shared array name) plus a constant byte
/// offset, printed `[%rd4+16]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mem {
    base: String,
    offset: i64,
}

impl Mem {
    pub(crate) fn new(base: String, offset: i64) -> Mem {
        Mem { base, offset }
    }

    /// This address moved by `bytes`.
    pub fn offset(mut self, bytes: i64) -> Mem {
        self.offset += bytes;
        self
    }
}

impl fmt::Display for Mem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.offset == 0 {
            write!(f, "[{}]", self.base)
        } else {
            // PTX spells a negative offset `[%rd1+-8]`.
            write!(f, "[{}+{}]", self.base, self.offset)
        }
    }
}

impl From<Reg<U64>> for Mem {
    fn from(r: Reg<U64>) -> Mem {
        r.at(0)
    }
}

impl From<Reg<U32>> for Mem {
    fn from(r: Reg<U32>) -> Mem {
        r.at(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediates_print_exactly() {
        assert_eq!(Operand::<F32>::from(1.0f32).to_string(), "0f3F800000");
        assert_eq!(Operand::<F32>::from(-0.5f32).to_string(), "0fBF000000");
        assert_eq!(
            Operand::<F64>::from(1.0f64).to_string(),
            "0d3FF0000000000000"
        );
        assert_eq!(Operand::<S32>::from(-3).to_string(), "-3");
        assert_eq!(Operand::<U32>::from(7u32).to_string(), "7");
    }

    #[test]
    fn registers_and_addresses_print_their_names() {
        let r = Reg::<F16x2>::new(3);
        assert_eq!(r.to_string(), "%hx3");
        assert_eq!(Reg::<U64>::new(2).at(-8).to_string(), "[%rd2+-8]");
        assert_eq!(Reg::<U32>::new(0).at(0).offset(16).to_string(), "[%r0+16]");
        let p = Reg::<Pred>::new(1);
        assert_eq!((!p).to_string(), "@!%p1");
        assert_eq!((!!p).to_string(), "@%p1");
    }

    #[test]
    fn register_prefixes_are_unique() {
        let mut prefixes: Vec<_> = RegClass::ALL.iter().map(|c| c.prefix()).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), RegClass::ALL.len());
        for (i, class) in RegClass::ALL.iter().enumerate() {
            assert_eq!(class.index(), i);
        }
    }
}
