//! Element types a device buffer may hold, and their poison values.
//!
//! Owns [`ElemType`] (the runtime tag carried by buffer arguments) and the sealed
//! [`Element`] trait implemented for `f32`, `f16`, `bf16`, `i32`, `i8` and `u8`. It must not
//! allocate or copy anything: buffers live in `buffer.rs`.

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use std::fmt;

/// The element type of a device buffer, as a runtime value.
///
/// This is a storage type: packed 4-bit data (two nibbles a byte) lives in `U8` buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// `f32`.
    F32,
    /// IEEE half precision, `half::f16`.
    F16,
    /// bfloat16, `half::bf16`.
    BF16,
    /// `i32`.
    I32,
    /// `i8`.
    I8,
    /// `u8`, also packed 4-bit data.
    U8,
}

impl ElemType {
    /// Size of one element in bytes.
    pub fn size_bytes(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 => 4,
            ElemType::F16 | ElemType::BF16 => 2,
            ElemType::I8 | ElemType::U8 => 1,
        }
    }

    /// The lower-case name, such as `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::F16 => "f16",
            ElemType::BF16 => "bf16",
            ElemType::I32 => "i32",
            ElemType::I8 => "i8",
            ElemType::U8 => "u8",
        }
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A type that can live in a [`DeviceBuffer`](super::DeviceBuffer).
///
/// `POISON` is the value tests fill outputs with before a launch so that an element the
/// kernel never wrote stands out: an all-ones-mantissa NaN (`0x7fff_ffff`, `0x7fff`) for
/// floats, and `0x7f` in every byte for integers.
pub trait Element:
    DeviceRepr + ValidAsZeroBits + Copy + Default + fmt::Debug + Send + Sync + 'static + sealed::Sealed
{
    /// The runtime tag of this type.
    const ELEM: ElemType;
    /// The poison value.
    const POISON: Self;
    /// Whether `self` has exactly the poison bit pattern (a NaN compares unequal to itself,
    /// so this compares bits).
    fn is_poison(&self) -> bool;
}

macro_rules! element {
    ($ty:ty, $elem:ident, $poison:expr, |$v:ident| $bits:expr, $poison_bits:expr) => {
        impl sealed::Sealed for $ty {}
        impl Element for $ty {
            const ELEM: ElemType = ElemType::$elem;
            const POISON: Self = $poison;
            fn is_poison(&self) -> bool {
                let $v = *self;
                $bits == $poison_bits
            }
        }
    };
}

element!(
    f32,
    F32,
    f32::from_bits(0x7fff_ffff),
    |v| v.to_bits(),
    0x7fff_ffff
);
element!(f16, F16, f16::from_bits(0x7fff), |v| v.to_bits(), 0x7fff);
element!(bf16, BF16, bf16::from_bits(0x7fff), |v| v.to_bits(), 0x7fff);
element!(i32, I32, 0x7f7f_7f7f, |v| v, 0x7f7f_7f7f);
element!(i8, I8, 0x7f, |v| v, 0x7f);
element!(u8, U8, 0x7f, |v| v, 0x7f);

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Element>() {
        assert!(T::POISON.is_poison(), "{}", T::ELEM);
        assert!(!T::default().is_poison(), "{}", T::ELEM);
        assert_eq!(std::mem::size_of::<T>(), T::ELEM.size_bytes());
    }

    #[test]
    fn poison_is_recognised_and_sizes_match() {
        check::<f32>();
        check::<f16>();
        check::<bf16>();
        check::<i32>();
        check::<i8>();
        check::<u8>();
        assert!(f32::POISON.is_nan() && f16::POISON.is_nan() && bf16::POISON.is_nan());
        assert!(!f32::NAN.is_poison(), "a kernel's own NaN is not poison");
    }
}
