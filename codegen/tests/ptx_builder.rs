//! Behaviour of the PTX builder itself: parameter order, register numbering and
//! declarations, labels and structured control flow, guards, hints, misuse panics, and
//! the instruction sequences `lower_expr` chooses. No ptxas here (see `ptx_samples.rs`).

use kiln_codegen::expr::{BinaryOp, Expr, UnaryOp};
use kiln_codegen::kernel::{Access, Extent, LaunchRule, Param, ParamKind};
use kiln_codegen::ptx::{
    f32_immediate, lower_expr, Cmp, F16x2, KernelBuilder, L1Eviction, L2Prefetch, Load, LoadCache,
    Pred, Store, Target, F32, U32,
};

fn launch() -> LaunchRule {
    LaunchRule::linear(Extent::fixed(1), 32)
}

/// The body lines of `ptx` (after the declarations), trimmed, without blank lines.
fn body(ptx: &str) -> Vec<String> {
    let start = ptx.find("\n\n    ").expect("a body after the declarations");
    ptx[start..]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "}")
        .map(str::to_string)
        .collect()
}

#[test]
fn pointers_are_declared_before_scalars_in_both_ptx_and_params() {
    let mut k = KernelBuilder::new("order", Target::Sm80);
    let _n = k.param_u32("n");
    let _x = k.param_pointer("x", Access::Read);
    let _eps = k.param_f32("eps");
    let _y = k.param_pointer("y", Access::Write);
    let kernel = k.finish(launch());
    assert_eq!(
        kernel.params,
        vec![
            Param {
                name: "x".into(),
                kind: ParamKind::Pointer(Access::Read)
            },
            Param {
                name: "y".into(),
                kind: ParamKind::Pointer(Access::Write)
            },
            Param {
                name: "n".into(),
                kind: ParamKind::U32
            },
            Param {
                name: "eps".into(),
                kind: ParamKind::F32
            },
        ]
    );
    assert!(kernel.ptx.contains(
        ".visible .entry order(\n    .param .u64 x,\n    .param .u64 y,\n    .param .u32 n,\n    .param .f32 eps\n)\n.maxntid 32, 1, 1\n{"
    ), "{}", kernel.ptx);
    assert_eq!(kernel.entry, "order");
    assert_eq!(kernel.target, "sm_80");
    assert_eq!(kernel.launch, launch());
}

#[test]
fn header_and_register_declarations() {
    let mut k = KernelBuilder::new("decls", Target::Sm90a);
    let x = k.param_pointer("x", Access::ReadWrite);
    let a = k.ld_global::<F32>(x);
    let b = k.add(a, 1.0);
    let p = k.setp(Cmp::Gt, b, 0.0);
    let h = k.cvt_pack_f16x2(a, b);
    k.guard(p, |k| k.st_global(x, h));
    let kernel = k.finish(launch());
    let ptx = &kernel.ptx;
    assert!(
        ptx.contains(".version 8.0\n.target sm_90a\n.address_size 64\n"),
        "{ptx}"
    );
    assert!(ptx.contains(
        "    .reg .pred %p<1>;\n    .reg .u64 %rd<2>;\n    .reg .f16x2 %hx<1>;\n    .reg .f32 %f<2>;\n"
    ), "{ptx}");
    assert_eq!(
        body(ptx),
        [
            "ld.param.u64 %rd0, [x];",
            "cvta.to.global.u64 %rd1, %rd0;",
            "ld.global.f32 %f0, [%rd1];",
            "add.f32 %f1, %f0, 0f3F800000;",
            "setp.gt.f32 %p0, %f1, 0f00000000;",
            "cvt.rn.f16x2.f32 %hx0, %f1, %f0;",
            "@%p0 st.global.b32 [%rd1], %hx0;",
            "ret;",
        ]
    );
}

#[test]
fn nested_structured_blocks_get_deterministic_labels_and_indentation() {
    let mut k = KernelBuilder::new("loops", Target::Sm80);
    let n = k.param_u32("n");
    k.for_range(0u32, n, 1u32, |k, i| {
        let odd_bits = k.and(i, 1u32);
        let odd = k.setp(Cmp::Eq, odd_bits, 1u32);
        k.if_then(odd, |k| {
            k.comment("odd iterations");
            k.for_range(i, n, 4u32, |k, j| {
                let _ = k.add(j, i);
            });
        });
    });
    let kernel = k.finish(launch());
    let expected = "\
    ld.param.u32 %r0, [n];
    mov.u32 %r1, 0;
$L_for_0:
    setp.ge.u32 %p0, %r1, %r0;
    @%p0 bra $L_for_0_end;
        and.b32 %r2, %r1, 1;
        setp.eq.u32 %p1, %r2, 1;
        @!%p1 bra $L_endif_1;

            // odd iterations
            mov.u32 %r3, %r1;
$L_for_2:
            setp.ge.u32 %p2, %r3, %r0;
            @%p2 bra $L_for_2_end;
                add.u32 %r4, %r3, %r1;
            add.u32 %r3, %r3, 4;
            bra $L_for_2;
$L_for_2_end:
$L_endif_1:
    add.u32 %r1, %r1, 1;
    bra $L_for_0;
$L_for_0_end:
    ret;
}
";
    assert!(kernel.ptx.ends_with(expected), "{}", kernel.ptx);
}

#[test]
fn if_else_branches_around_both_arms() {
    let mut k = KernelBuilder::new("choice", Target::Sm80);
    let n = k.param_u32("n");
    let small = k.setp(Cmp::Lt, n, 8u32);
    let out = k.reg::<U32>();
    k.if_else(small, |k| k.assign(out, 1u32), |k| k.assign(out, n));
    let kernel = k.finish(launch());
    assert_eq!(
        body(&kernel.ptx),
        [
            "ld.param.u32 %r0, [n];",
            "setp.lt.u32 %p0, %r0, 8;",
            "@!%p0 bra $L_else_0;",
            "mov.u32 %r1, 1;",
            "bra $L_endif_1;",
            "$L_else_0:",
            "mov.u32 %r1, %r0;",
            "$L_endif_1:",
            "ret;",
        ]
    );
}

#[test]
fn load_and_store_hints_print_in_ptx_order() {
    let mut k = KernelBuilder::new("hints", Target::Sm80);
    let x = k.param_pointer("x", Access::ReadWrite);
    let a = k.ld::<F32>(Load::GLOBAL.cache(LoadCache::Global).non_coherent(), x);
    let b = k.ld_vector::<U32, 4>(
        Load::GLOBAL
            .l1(L1Eviction::NoAllocate)
            .l2_prefetch(L2Prefetch::Bytes256),
        x.at(16),
    );
    let h = k.ld_vector::<F16x2, 2>(Load::GLOBAL.non_coherent(), x.at(-8));
    k.st(Store::GLOBAL.l1(L1Eviction::First), x, a);
    k.st_vector(Store::GLOBAL, x.at(32), b);
    k.st_vector(Store::GLOBAL, x.at(64), h);
    let lines = body(&k.finish(launch()).ptx);
    assert_eq!(
        lines[2..8],
        [
            "ld.global.cg.nc.f32 %f0, [%rd1];",
            "ld.global.L1::no_allocate.L2::256B.v4.u32 {%r0, %r1, %r2, %r3}, [%rd1+16];",
            "ld.global.nc.v2.b32 {%hx0, %hx1}, [%rd1+-8];",
            "st.global.L1::evict_first.f32 [%rd1], %f0;",
            "st.global.v4.u32 [%rd1+32], {%r0, %r1, %r2, %r3};",
            "st.global.v2.b32 [%rd1+64], {%hx0, %hx1};",
        ]
    );
}

#[test]
fn comments_name_stages_on_their_own_lines() {
    let mut k = KernelBuilder::new("comments", Target::Sm80);
    k.comment("stage 1: load\nthen convert");
    let _ = k.tid_x();
    k.comment("stage 2: reduce across the warp");
    let ptx = k.finish(launch()).ptx;
    assert!(ptx.contains(
        "    // stage 1: load\n    // then convert\n    mov.u32 %r0, %tid.x;\n\n    // stage 2: reduce across the warp\n    ret;\n"
    ), "{ptx}");
}

#[test]
fn float_constants_are_exact_hex_immediates() {
    assert_eq!(f32_immediate(1.0), "0f3F800000");
    assert_eq!(f32_immediate(std::f32::consts::LOG2_E), "0f3FB8AA3B");
    assert_eq!(f32_immediate(-0.0), "0f80000000");
    assert_eq!(f32_immediate(f32::INFINITY), "0f7F800000");
}

fn lowered(expr: &Expr, arity: usize) -> Vec<String> {
    let mut k = KernelBuilder::new("lowered", Target::Sm80);
    let inputs: Vec<_> = (0..arity).map(|i| k.param_f32(&format!("x{i}"))).collect();
    let result = lower_expr(&mut k, expr, &inputs);
    let x = k.param_pointer("out", Access::Write);
    k.st_global(x, result);
    let lines = body(&k.finish(launch()).ptx);
    // Drop the parameter loads, the store and `ret`.
    lines[arity..lines.len() - 4].to_vec()
}

#[test]
fn lower_expr_exp_uses_ex2_of_x_times_log2e() {
    assert_eq!(
        lowered(&Expr::input(0).exp(), 1),
        ["mul.f32 %f1, %f0, 0f3FB8AA3B;", "ex2.approx.f32 %f2, %f1;"]
    );
}

#[test]
fn lower_expr_silu_is_x_times_reciprocal_of_one_plus_exp_negative() {
    assert_eq!(
        lowered(&(Expr::input(0).silu() * Expr::input(1)), 2),
        [
            "mul.f32 %f2, %f0, 0fBFB8AA3B;",
            "ex2.approx.f32 %f3, %f2;",
            "add.f32 %f4, %f3, 0f3F800000;",
            "rcp.approx.f32 %f5, %f4;",
            "mul.f32 %f6, %f0, %f5;",
            "mul.f32 %f7, %f6, %f1;",
        ]
    );
}

#[test]
fn lower_expr_covers_every_operation() {
    let unary = [
        (UnaryOp::Neg, "neg.f32"),
        (UnaryOp::Abs, "abs.f32"),
        (UnaryOp::Exp, "ex2.approx.f32"),
        (UnaryOp::Sqrt, "sqrt.rn.f32"),
        (UnaryOp::Rsqrt, "rsqrt.approx.f32"),
        (UnaryOp::Recip, "rcp.approx.f32"),
        (UnaryOp::Sigmoid, "rcp.approx.f32"),
        (UnaryOp::Silu, "rcp.approx.f32"),
    ];
    for (op, instruction) in unary {
        let lines = lowered(&Expr::input(0).unary(op), 1);
        assert!(
            lines.iter().any(|l| l.starts_with(instruction)),
            "{op:?}: {lines:?}"
        );
    }
    let binary = [
        (BinaryOp::Add, "add.f32 %f2, %f0, %f1;"),
        (BinaryOp::Sub, "sub.f32 %f2, %f0, %f1;"),
        (BinaryOp::Mul, "mul.f32 %f2, %f0, %f1;"),
        (BinaryOp::Div, "div.rn.f32 %f2, %f0, %f1;"),
        (BinaryOp::Max, "max.f32 %f2, %f0, %f1;"),
        (BinaryOp::Min, "min.f32 %f2, %f0, %f1;"),
    ];
    for (op, instruction) in binary {
        let lines = lowered(&Expr::input(0).binary(op, Expr::input(1)), 2);
        assert_eq!(lines, [instruction], "{op:?}");
    }
}

#[test]
fn lower_expr_folds_constants_into_immediates() {
    assert_eq!(
        lowered(&Expr::input(0).clamp(-1.0, 0.5), 1),
        [
            "max.f32 %f1, %f0, 0fBF800000;",
            "min.f32 %f2, %f1, 0f3F000000;"
        ]
    );
    // A constant alone, or two constants together, go through a register.
    assert_eq!(
        lowered(&Expr::constant(2.0), 0),
        ["mov.f32 %f0, 0f40000000;"]
    );
    assert_eq!(
        lowered(&(Expr::constant(2.0) + Expr::constant(3.0)), 0),
        ["mov.f32 %f0, 0f40000000;", "add.f32 %f1, %f0, 0f40400000;"]
    );
    assert_eq!(
        lowered(&Expr::constant(4.0).unary(UnaryOp::Rsqrt), 0),
        ["mov.f32 %f0, 0f40800000;", "rsqrt.approx.f32 %f1, %f0;"]
    );
}

#[test]
#[should_panic(expected = "reads 2 inputs but 1 registers were given")]
fn lower_expr_rejects_missing_inputs() {
    let mut k = KernelBuilder::new("short", Target::Sm80);
    let x = k.param_f32("x");
    lower_expr(&mut k, &(Expr::input(0) + Expr::input(1)), &[x]);
}

#[test]
#[should_panic(expected = "name `x` is already used in kernel `dup`")]
fn duplicate_names_panic() {
    let mut k = KernelBuilder::new("dup", Target::Sm80);
    k.param_u32("x");
    k.shared_array("x", 16, 16);
}

#[test]
#[should_panic(expected = "is not a PTX identifier")]
fn invalid_names_panic() {
    KernelBuilder::new("bad-name", Target::Sm80);
}

#[test]
#[should_panic(expected = "guarded regions cannot be nested")]
fn nested_guards_panic() {
    let mut k = KernelBuilder::new("nested", Target::Sm80);
    let p = k.reg::<Pred>();
    k.guard(p, |k| k.guard(!p, |k| k.ret()));
}

#[test]
#[should_panic(expected = "for_range inside a guarded region")]
fn structured_blocks_inside_guards_panic() {
    let mut k = KernelBuilder::new("guarded_loop", Target::Sm80);
    let p = k.reg::<Pred>();
    k.guard(p, |k| k.for_range(0u32, 4u32, 1u32, |_, _| {}));
}

#[test]
#[should_panic(expected = "which is never placed")]
fn branches_to_unplaced_labels_panic() {
    let mut k = KernelBuilder::new("dangling", Target::Sm80);
    let label = k.new_label("nowhere");
    k.branch(&label);
    k.finish(launch());
}

#[test]
#[should_panic(expected = "ld.global.nc takes only the .ca, .cg or .cs cache operator")]
fn invalid_load_hints_panic() {
    let mut k = KernelBuilder::new("hint", Target::Sm80);
    let x = k.param_pointer("x", Access::Read);
    k.ld::<F32>(Load::GLOBAL.non_coherent().cache(LoadCache::LastUse), x);
}

#[test]
#[should_panic(expected = "ld.shared takes no cache hints")]
fn shared_loads_take_no_hints() {
    let mut k = KernelBuilder::new("hint", Target::Sm80);
    let s = k.shared_array("s", 64, 16);
    k.ld::<F32>(Load::SHARED.non_coherent(), &s);
}

#[test]
#[should_panic(expected = "cp.async.ca copies 4, 8 or 16 bytes, not 12")]
fn cp_async_sizes_are_checked() {
    let mut k = KernelBuilder::new("copy", Target::Sm80);
    let x = k.param_pointer("x", Access::Read);
    let s = k.shared_array("s", 64, 16);
    k.cp_async_ca(&s, x, 12);
}

#[test]
#[should_panic(expected = "a second dynamic shared array")]
fn one_dynamic_shared_array_per_kernel() {
    let mut k = KernelBuilder::new("dynamic", Target::Sm80);
    k.dynamic_shared("a", 16);
    k.dynamic_shared("b", 16);
}

#[test]
fn targets_parse_and_print() {
    for target in [
        Target::Sm80,
        Target::Sm86,
        Target::Sm89,
        Target::Sm90,
        Target::Sm90a,
    ] {
        assert_eq!(target.as_str().parse::<Target>(), Ok(target));
    }
    assert!("sm_70".parse::<Target>().is_err());
    assert_eq!(Target::Sm90a.sm(), 90);
}

#[test]
fn ptx_version_can_only_rise() {
    let mut k = KernelBuilder::new("versions", Target::Sm90a);
    k.require_ptx_version(8, 3);
    k.require_ptx_version(7, 8);
    k.min_blocks_per_sm(2);
    let ptx = k.finish(launch()).ptx;
    assert!(ptx.contains(".version 8.3\n"), "{ptx}");
    assert!(
        ptx.contains(".maxntid 32, 1, 1\n.minnctapersm 2\n{"),
        "{ptx}"
    );
}
