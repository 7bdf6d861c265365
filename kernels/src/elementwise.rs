//! The fused elementwise map: `out[i] = expr(in_0[i], …, in_{n−1}[i])` over any expression
//! of `kiln_codegen::expr`, for f16, bf16 and i32 tensors of the same length, where some
//! inputs may instead hold a single element used for every `i` (a scalar broadcast,
//! [`ElementwiseSpec::scalar_inputs`]) or one element per row of
//! [`ElementwiseSpec::row_width`] output elements, element `i / row_width` for output element
//! `i` (a row broadcast, [`ElementwiseSpec::row_inputs`]: Qwen2-MoE's per-token `[.., 1]`
//! shared-expert gate); general broadcasting is not generated.
//!
//! Each thread handles 16-byte chunks (eight halves or four i32 per input) in a grid-stride
//! loop, so every global access to a full-length input or the output is a 16-byte vector; the
//! last `n mod 8` (`n mod 4`) elements are handled one by one by the first threads. A scalar
//! input is loaded once per thread, before the loop. A row input is one element load per
//! chunk (row `chunk / (row_width / lanes)`) when `row_width` is a multiple of the chunk's
//! lanes, so that a chunk lies in one row; otherwise a chunk may straddle rows and each lane
//! loads its own row's element (`(chunk · lanes + lane) / row_width`); the tail loads
//! `element / row_width`. The loop is written once over the lane registers ([`Lane`]):
//! halves compute in f32, lowered by `lower_expr`, and round once to the dtype. i32 maps
//! compute in 32-bit integers (two's complement, wrapping): add, sub, mul, max, min, neg, abs
//! and integral constants; a float-only operation (exp, silu, sigmoid, division, square
//! roots, reciprocals) or a fractional constant is a [`SpecError`] naming it. (The
//! interpreter and the CPU step compute i32 maps in f32 and round; the two agree while values
//! stay below 2²⁴, which sequence lengths do.) Parameters: `in0`, `in1`, … (read; a row
//! input holds `n / row_width` elements), `out` (write), scalar `n` (elements, a multiple of
//! `row_width` when there are row inputs). This file generates PTX; it must not launch
//! anything.

use crate::vector::{load_chunk, load_scalar, store_chunk, store_scalar, HALVES_PER_CHUNK};
use crate::SpecError;
use kiln_codegen::expr::{BinaryOp, Expr, UnaryOp};
use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule};
use kiln_codegen::ptx::{
    lower_expr, Axis, Cmp, KernelBuilder, Load, Reg, Special, Store, Target, F32, S32, U32, U64,
};
use kiln_ir::dtype::DType;
use serde::{Deserialize, Serialize};

const FAMILY: &str = "elementwise";
/// Threads per block.
pub const THREADS: u32 = 256;
/// Chunks per thread per grid-stride step, sizing the grid: enough blocks to fill the GPU
/// without one thread per chunk.
const CHUNKS_PER_THREAD: u32 = 4;

/// A fused elementwise map.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ElementwiseSpec {
    /// Storage dtype of every input and of the output.
    pub dtype: DType,
    /// The number of inputs the kernel takes; `expr` may read fewer.
    pub inputs: usize,
    pub expr: Expr,
    /// Inputs that hold a single element, used for every element of the output (sorted,
    /// each `< inputs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scalar_inputs: Vec<usize>,
    /// Inputs that hold one element per row of `row_width` output elements: output element
    /// `i` reads element `i / row_width` (sorted, each `< inputs`, none a scalar input).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub row_inputs: Vec<usize>,
    /// Output elements per row of the row inputs; 0 when there are none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub row_width: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl ElementwiseSpec {
    /// A map of `inputs` full-length inputs.
    pub fn new(dtype: DType, inputs: usize, expr: Expr) -> ElementwiseSpec {
        ElementwiseSpec {
            dtype,
            inputs,
            expr,
            scalar_inputs: Vec::new(),
            row_inputs: Vec::new(),
            row_width: 0,
        }
    }

    /// Elements in one 16-byte chunk of the dtype (eight halves, four i32).
    pub fn lanes(&self) -> usize {
        match self.dtype {
            DType::I32 => 4,
            _ => HALVES_PER_CHUNK,
        }
    }

    /// The kernel entry name: family, dtype, arity, the scalar inputs (`_s1`), the row inputs
    /// and their width (`_r2_w64`) and a short hash of the expression, so two different maps
    /// never share a name.
    pub fn entry(&self) -> String {
        let text = serde_json::to_string(&self.expr).expect("expressions serialise");
        // FNV-1a: stable across runs and platforms.
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let scalars: String = self
            .scalar_inputs
            .iter()
            .map(|i| format!("_s{i}"))
            .collect();
        let mut rows: String = self.row_inputs.iter().map(|i| format!("_r{i}")).collect();
        if !self.row_inputs.is_empty() {
            rows += &format!("_w{}", self.row_width);
        }
        format!(
            "elementwise_{}_{}in{scalars}{rows}_{:08x}",
            self.dtype, self.inputs, hash as u32
        )
    }

    /// Why the generator cannot build this spec, naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !matches!(self.dtype, DType::F16 | DType::BF16 | DType::I32) {
            return Err(SpecError::new(
                FAMILY,
                format!("dtype must be f16, bf16 or i32, got {}", self.dtype),
            ));
        }
        if self.inputs == 0 || self.inputs > 8 {
            return Err(SpecError::new(
                FAMILY,
                format!("inputs must be 1..=8, got {}", self.inputs),
            ));
        }
        if self.expr.arity() > self.inputs {
            return Err(SpecError::new(
                FAMILY,
                format!(
                    "the expression reads input {} but the map has {} inputs",
                    self.expr.arity() - 1,
                    self.inputs
                ),
            ));
        }
        if self.scalar_inputs.windows(2).any(|w| w[0] >= w[1])
            || self.scalar_inputs.iter().any(|&i| i >= self.inputs)
        {
            return Err(SpecError::new(
                FAMILY,
                format!(
                    "scalar_inputs must be increasing input indices below {}, got {:?}",
                    self.inputs, self.scalar_inputs
                ),
            ));
        }
        if self.row_inputs.windows(2).any(|w| w[0] >= w[1])
            || self.row_inputs.iter().any(|&i| i >= self.inputs)
            || self
                .row_inputs
                .iter()
                .any(|i| self.scalar_inputs.contains(i))
        {
            return Err(SpecError::new(
                FAMILY,
                format!(
                    "row_inputs must be increasing input indices below {}, none a scalar input, \
                     got {:?}",
                    self.inputs, self.row_inputs
                ),
            ));
        }
        if self.row_inputs.is_empty() != (self.row_width == 0) || self.row_width > u32::MAX as usize
        {
            return Err(SpecError::new(
                FAMILY,
                format!(
                    "row_width must be a positive u32 exactly when there are row inputs, got {} \
                     with row_inputs {:?}",
                    self.row_width, self.row_inputs
                ),
            ));
        }
        if self.dtype == DType::I32 {
            check_integer(&self.expr)?;
        }
        Ok(())
    }
}

/// Whether an i32 map can compute `expr`; the error names the first float-only operation.
fn check_integer(expr: &Expr) -> Result<(), SpecError> {
    let refuse = |what: String| {
        Err(SpecError::new(
            FAMILY,
            format!(
                "an i32 map takes add, sub, mul, max, min, neg, abs and integral constants; \
                 {what} is float-only"
            ),
        ))
    };
    match expr {
        Expr::Input(_) => Ok(()),
        Expr::Const(value) => {
            if value.fract() == 0.0 && *value >= i32::MIN as f64 && *value <= i32::MAX as f64 {
                Ok(())
            } else {
                refuse(format!("the constant {value}"))
            }
        }
        Expr::Unary(op, x) => match op {
            UnaryOp::Neg | UnaryOp::Abs => check_integer(x),
            other => refuse(format!("{other:?}").to_lowercase()),
        },
        Expr::Binary(op, a, b) => match op {
            BinaryOp::Div => refuse("div".into()),
            _ => {
                check_integer(a)?;
                check_integer(b)
            }
        },
    }
}

/// `expr` in 32-bit integer arithmetic (checked by [`check_integer`] first).
fn lower_integer(k: &mut KernelBuilder, expr: &Expr, inputs: &[Reg<S32>]) -> Reg<S32> {
    match expr {
        Expr::Input(i) => inputs[*i],
        Expr::Const(value) => k.mov::<S32>(*value as i32),
        Expr::Unary(op, x) => {
            let x = lower_integer(k, x, inputs);
            match op {
                UnaryOp::Abs => k.abs(x),
                _ => k.neg(x),
            }
        }
        Expr::Binary(op, a, b) => {
            let a = lower_integer(k, a, inputs);
            let b = lower_integer(k, b, inputs);
            match op {
                BinaryOp::Sub => k.sub(a, b),
                BinaryOp::Mul => k.mul(a, b),
                BinaryOp::Max => k.max(a, b),
                BinaryOp::Min => k.min(a, b),
                _ => k.add(a, b),
            }
        }
    }
}

/// One input of the kernel: a full-length pointer, a single element loaded up front, or one
/// element per row of `row_width` output elements.
#[derive(Clone, Copy)]
enum Operand<T> {
    Full(Reg<U64>),
    Scalar(T),
    Row(Reg<U64>),
}

/// The registers a map computes in and how its dtype's values move, so that the chunk loop
/// is written once: i32 maps in 32-bit integers (non-coherent loads throughout), halves
/// widened to f32 ([`crate::vector`]).
trait Lane: Copy {
    /// One element at `address`.
    fn load_one(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>) -> Self;
    /// The 16-byte chunk at `address` (four i32, eight halves).
    fn load_chunk(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>) -> Vec<Self>;
    fn store_one(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>, value: Self);
    fn store_chunk(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>, values: Vec<Self>);
    /// `expr` of one element's operands.
    fn compute(k: &mut KernelBuilder, expr: &Expr, operands: &[Self]) -> Self;
}

impl Lane for Reg<S32> {
    fn load_one(k: &mut KernelBuilder, _: DType, address: Reg<U64>) -> Self {
        k.ld::<S32>(Load::GLOBAL.non_coherent(), address)
    }
    fn load_chunk(k: &mut KernelBuilder, _: DType, address: Reg<U64>) -> Vec<Self> {
        k.ld_vector::<S32, 4>(Load::GLOBAL.non_coherent(), address)
            .to_vec()
    }
    fn store_one(k: &mut KernelBuilder, _: DType, address: Reg<U64>, value: Self) {
        k.st(Store::GLOBAL, address, value);
    }
    fn store_chunk(k: &mut KernelBuilder, _: DType, address: Reg<U64>, values: Vec<Self>) {
        let values: [Reg<S32>; 4] = values.try_into().expect("four lanes");
        k.st_vector(Store::GLOBAL, address, values);
    }
    fn compute(k: &mut KernelBuilder, expr: &Expr, operands: &[Self]) -> Self {
        lower_integer(k, expr, operands)
    }
}

impl Lane for Reg<F32> {
    fn load_one(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>) -> Self {
        load_scalar(k, dtype, address)
    }
    fn load_chunk(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>) -> Vec<Self> {
        load_chunk(k, Load::GLOBAL.non_coherent(), dtype, address).to_vec()
    }
    fn store_one(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>, value: Self) {
        store_scalar(k, dtype, address, value);
    }
    fn store_chunk(k: &mut KernelBuilder, dtype: DType, address: Reg<U64>, values: Vec<Self>) {
        let values: [Reg<F32>; 8] = values.try_into().expect("eight lanes");
        store_chunk(k, Store::GLOBAL, dtype, address, &values);
    }
    fn compute(k: &mut KernelBuilder, expr: &Expr, operands: &[Self]) -> Self {
        lower_expr(k, expr, operands)
    }
}

/// The loop structure every dtype shares: 16-byte chunks of `lanes` elements in a
/// grid-stride loop (`vector(k, chunk index, byte offset)`), then the last `n mod lanes`
/// elements one per thread of the grid's first threads (`scalar(k, element index, byte
/// offset)`).
fn chunks_then_tail(
    k: &mut KernelBuilder,
    n: Reg<U32>,
    lanes: usize,
    vector: impl FnOnce(&mut KernelBuilder, Reg<U32>, Reg<U64>),
    scalar: impl FnOnce(&mut KernelBuilder, Reg<U32>, Reg<U64>),
) {
    let shift = lanes.trailing_zeros();
    let element_bytes = (16 / lanes) as u32;
    let words = if lanes == 8 { "eight" } else { "four" };
    k.comment(&format!(
        "vector part: 16-byte chunks of {words} elements, grid-stride"
    ));
    let chunks = k.shr(n, shift);
    let first = k.global_index_x();
    let blocks = k.special(Special::Nctaid(Axis::X));
    let stride = k.mul(blocks, THREADS);
    k.for_range(first, chunks, stride, |k, chunk| {
        let offset = k.mul_wide(chunk, 16u32);
        vector(k, chunk, offset);
    });
    k.comment(&format!(
        "scalar tail: the last n mod {lanes} elements, one per thread of the first block"
    ));
    let vector_elements = k.shl(chunks, shift);
    let element = k.add(vector_elements, first);
    let in_tail = k.setp(Cmp::Lt, element, n);
    k.if_then(in_tail, |k| {
        let offset = k.mul_wide(element, element_bytes);
        scalar(k, element, offset);
    });
}

/// The map's body over registers of `T`: operands resolved (scalars loaded once), then the
/// chunk loop and the tail.
fn map_body<T: Lane>(
    k: &mut KernelBuilder,
    spec: &ElementwiseSpec,
    pointers: &[Reg<U64>],
    out: Reg<U64>,
    n: Reg<U32>,
) {
    let dtype = spec.dtype;
    let lanes = spec.lanes();
    let element_bytes = (16 / lanes) as u32;
    let row_width = spec.row_width as u32;
    let inputs: Vec<Operand<T>> = pointers
        .iter()
        .enumerate()
        .map(|(i, &base)| {
            if spec.scalar_inputs.contains(&i) {
                Operand::Scalar(T::load_one(k, dtype, base))
            } else if spec.row_inputs.contains(&i) {
                Operand::Row(base)
            } else {
                Operand::Full(base)
            }
        })
        .collect();
    // The element of a row input that output element `element` reads.
    let row_element = |k: &mut KernelBuilder, base: Reg<U64>, element: Reg<U32>| {
        let row = k.div(element, row_width);
        let offset = k.mul_wide(row, element_bytes);
        let address = k.add(base, offset);
        T::load_one(k, dtype, address)
    };
    chunks_then_tail(
        k,
        n,
        lanes,
        |k, chunk, offset| {
            let values: Vec<Vec<T>> = inputs
                .iter()
                .map(|input| match *input {
                    Operand::Full(base) => {
                        let address = k.add(base, offset);
                        T::load_chunk(k, dtype, address)
                    }
                    Operand::Scalar(value) => vec![value; lanes],
                    Operand::Row(base) if spec.row_width.is_multiple_of(lanes) => {
                        // The chunk lies in one row: one element for all its lanes.
                        let chunks_per_row = row_width / lanes as u32;
                        let row = if chunks_per_row == 1 {
                            chunk
                        } else {
                            k.div(chunk, chunks_per_row)
                        };
                        let offset = k.mul_wide(row, element_bytes);
                        let address = k.add(base, offset);
                        vec![T::load_one(k, dtype, address); lanes]
                    }
                    Operand::Row(base) => {
                        // The chunk may straddle rows: each lane's row.
                        let first = k.shl(chunk, lanes.trailing_zeros());
                        (0..lanes as u32)
                            .map(|lane| {
                                let element = if lane == 0 { first } else { k.add(first, lane) };
                                row_element(k, base, element)
                            })
                            .collect()
                    }
                })
                .collect();
            let results: Vec<T> = (0..lanes)
                .map(|lane| {
                    let operands: Vec<T> = values.iter().map(|v| v[lane]).collect();
                    T::compute(k, &spec.expr, &operands)
                })
                .collect();
            let destination = k.add(out, offset);
            T::store_chunk(k, dtype, destination, results);
        },
        |k, element, offset| {
            let operands: Vec<T> = inputs
                .iter()
                .map(|input| match *input {
                    Operand::Full(base) => {
                        let address = k.add(base, offset);
                        T::load_one(k, dtype, address)
                    }
                    Operand::Scalar(value) => value,
                    Operand::Row(base) => row_element(k, base, element),
                })
                .collect();
            let result = T::compute(k, &spec.expr, &operands);
            let destination = k.add(out, offset);
            T::store_one(k, dtype, destination, result);
        },
    );
}

/// Generates the map kernel for `spec`.
pub fn generate(spec: &ElementwiseSpec) -> Result<GpuKernel, SpecError> {
    spec.validate()?;
    let mut k = KernelBuilder::new(&spec.entry(), Target::Sm80);
    let pointers: Vec<Reg<U64>> = (0..spec.inputs)
        .map(|i| k.param_pointer(&format!("in{i}"), Access::Read))
        .collect();
    let out = k.param_pointer("out", Access::Write);
    let n = k.param_u32("n");
    if !spec.scalar_inputs.is_empty() {
        k.comment("scalar inputs: one element each, used for every output element");
    }
    if !spec.row_inputs.is_empty() {
        k.comment(&format!(
            "row inputs: element i / {} for output element i",
            spec.row_width
        ));
    }
    if spec.dtype == DType::I32 {
        map_body::<Reg<S32>>(&mut k, spec, &pointers, out, n);
    } else {
        map_body::<Reg<F32>>(&mut k, spec, &pointers, out, n);
    }
    let per_block = THREADS * CHUNKS_PER_THREAD * spec.lanes() as u32;
    Ok(k.finish(LaunchRule::linear(
        Extent::ceil_div("n", per_block),
        THREADS,
    )))
}
