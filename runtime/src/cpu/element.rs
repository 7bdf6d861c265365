//! Host element types the safe kernel wrappers accept, and how each maps to a kernel spec's
//! storage format and compute type. Owns only that correspondence; runs nothing.

use kiln_codegen::cpu::{ElemType, ElementFormat};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for half::bf16 {}
}

/// A type whose slices a kernel may read: its storage [`ElementFormat`].
pub trait Element: sealed::Sealed + Copy + Send + Sync + 'static {
    const FORMAT: ElementFormat;
}

/// A type a kernel computes in and writes: its [`ElemType`].
pub trait Float: Element {
    const TYPE: ElemType;
}

impl Element for f32 {
    const FORMAT: ElementFormat = ElementFormat::F32;
}

impl Element for f64 {
    const FORMAT: ElementFormat = ElementFormat::F64;
}

impl Element for half::bf16 {
    const FORMAT: ElementFormat = ElementFormat::Bf16;
}

impl Float for f32 {
    const TYPE: ElemType = ElemType::F32;
}

impl Float for f64 {
    const TYPE: ElemType = ElemType::F64;
}
