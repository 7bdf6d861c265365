//! Counted loops for the CPU generators: a strided loop over an unsigned index variable, with
//! loop-carried state kept in frontend `Variable`s by the caller. Owns control flow only; it
//! must not load, store or compute.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

/// Emits `while end - i >= step { body(i); i += step }` where `i` is the variable `index`, an
/// unsigned pointer-sized integer with `i <= end` on entry (so `end - i` never wraps, and
/// `i + step` never passes `end`).
///
/// `body` is called once, to emit the loop body, with the builder in the body block and the
/// current value of `i`; it may create blocks of its own (inner loops) but must leave the
/// builder in a block that falls through to the back edge. Afterwards the builder is in the
/// exit block and `index` holds the first index not processed.
pub fn strided_loop(
    b: &mut FunctionBuilder,
    index: Variable,
    end: Value,
    step: u32,
    body: impl FnOnce(&mut FunctionBuilder, Value),
) {
    let header = b.create_block();
    let body_block = b.create_block();
    let exit = b.create_block();
    b.ins().jump(header, &[]);

    b.switch_to_block(header);
    let i = b.use_var(index);
    let remaining = b.ins().isub(end, i);
    let more = b.ins().icmp_imm_u(
        IntCC::UnsignedGreaterThanOrEqual,
        remaining,
        i64::from(step),
    );
    b.ins().brif(more, body_block, &[], exit, &[]);
    b.seal_block(body_block);
    b.seal_block(exit);

    b.switch_to_block(body_block);
    let i = b.use_var(index);
    body(b, i);
    let i = b.use_var(index);
    let next = b.ins().iadd_imm_s(i, i64::from(step));
    b.def_var(index, next);
    b.ins().jump(header, &[]);
    b.seal_block(header);

    b.switch_to_block(exit);
}
