//! Memory access of the CPU generators: element addresses, loads that unpack a stored
//! [`ElementFormat`] to compute lanes in registers, and stores of compute lanes. This is the
//! one place that knows storage formats (bf16 today, packed int4 next) and the one place that
//! widens f32 storage to f64 lanes and narrows back; it must not decide what is loaded when
//! (the kernel builders do).

use super::simd::{bitcast, Lanes};
use super::{ElemType, ElementFormat};
use cranelift_codegen::ir::{types, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

/// Flags of every kernel memory access: the runtime has checked the bounds, so accesses do
/// not trap; nothing is assumed about alignment.
fn flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// The address of element `index` of an array at `base` stored in `format`.
pub fn element_address(
    b: &mut FunctionBuilder,
    format: ElementFormat,
    base: Value,
    index: Value,
) -> Value {
    let size = format.size();
    debug_assert!(size.is_power_of_two());
    let bytes = b.ins().ishl_imm_u(index, i64::from(size.trailing_zeros()));
    b.ins().iadd(base, bytes)
}

/// Loads `lanes.count()` consecutive elements starting `offset` elements after `address`
/// (an element of an array stored in `format`), as one value of `lanes`, unpacked in
/// registers.
pub fn load(
    b: &mut FunctionBuilder,
    format: ElementFormat,
    lanes: Lanes,
    address: Value,
    offset: i64,
) -> Value {
    debug_assert!(format.unpacks_to(lanes.elem));
    let byte_offset = byte_offset(format, offset);
    match format {
        ElementFormat::F32 | ElementFormat::F64 => {
            b.ins().load(lanes.ty(), flags(), address, byte_offset)
        }
        ElementFormat::Bf16 => {
            debug_assert_eq!(lanes.elem, ElemType::F32);
            // bf16 is the high half of an f32: widen each 16-bit lane to 32 bits and shift.
            let wide = if lanes.vector {
                b.ins().uload16x4(flags(), address, byte_offset)
            } else {
                b.ins().uload16(types::I32, flags(), address, byte_offset)
            };
            let bits = b.ins().ishl_imm_u(wide, 16);
            bitcast(b, lanes.ty(), bits)
        }
    }
}

/// Stores `value` (of `lanes`) `offset` elements after `address`, an element of an array of
/// compute-type elements.
pub fn store(b: &mut FunctionBuilder, lanes: Lanes, address: Value, offset: i64, value: Value) {
    let byte_offset = byte_offset(lanes.elem.format(), offset);
    b.ins().store(flags(), value, address, byte_offset);
}

/// `offset` elements in bytes, as a load/store immediate.
pub fn byte_offset(format: ElementFormat, offset: i64) -> i32 {
    i32::try_from(offset * i64::from(format.size())).expect("small constant offset")
}

/// Loads `lanes.count()` consecutive f32 elements starting `offset` elements after `address`,
/// widened exactly to f64 lanes (`f64`, or `f64x2` from one 64-bit load and `cvtps2pd`).
pub fn load_f32_widened(
    b: &mut FunctionBuilder,
    lanes: Lanes,
    address: Value,
    offset: i64,
) -> Value {
    debug_assert_eq!(lanes.elem, ElemType::F64);
    let byte_offset = byte_offset(ElementFormat::F32, offset);
    if lanes.vector {
        // the pair as integer bits (no float move can touch them), into the low half
        let pair = b.ins().load(types::I64, flags(), address, byte_offset);
        let wide = b.ins().scalar_to_vector(types::I64X2, pair);
        let narrow = bitcast(b, types::F32X4, wide);
        b.ins().fvpromote_low(narrow)
    } else {
        let narrow = b.ins().load(types::F32, flags(), address, byte_offset);
        b.ins().fpromote(types::F64, narrow)
    }
}

/// Stores f64 `value` (of `lanes`) rounded to nearest f32, as `lanes.count()` consecutive f32
/// elements `offset` elements after `address` (the inverse of [`load_f32_widened`]).
pub fn store_f64_narrowed(
    b: &mut FunctionBuilder,
    lanes: Lanes,
    address: Value,
    offset: i64,
    value: Value,
) {
    debug_assert_eq!(lanes.elem, ElemType::F64);
    let byte_offset = byte_offset(ElementFormat::F32, offset);
    let narrow = if lanes.vector {
        // `fvdemote` leaves the two f32 in the low 64 bits (upper lanes zero): store those
        let demoted = b.ins().fvdemote(value);
        let pair = bitcast(b, types::F64X2, demoted);
        b.ins().extractlane(pair, 0)
    } else {
        b.ins().fdemote(types::F32, value)
    };
    b.ins().store(flags(), narrow, address, byte_offset);
}
