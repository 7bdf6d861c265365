//! The CPU JIT's cache: one compilation per spec whatever the problem size, another for a
//! different spec, shared by clones; invalid specs are errors, not panics.

use kiln_codegen::cpu::{CpuKernelSpec, DotSpec, ElemType, ElementFormat, MapSpec};
use kiln_codegen::expr::Expr;
use kiln_runtime::cpu::{CpuError, CpuJit, DotShape, Parallelism};

#[test]
fn same_spec_compiles_once_for_every_size() {
    let jit = CpuJit::new().unwrap();
    assert_eq!(jit.compilations(), 0);
    let spec = MapSpec::new(Expr::input(0).exp() + Expr::input(1), 2, ElemType::F64);
    for len in [0, 1, 7, 1000, 4099, 70_000] {
        let kernel = jit.map(spec.clone()).unwrap();
        let (x, y) = (vec![0.0; len], vec![1.0; len]);
        let mut out = vec![0.0; len];
        kernel.run(&[&x, &y], &mut out, Parallelism::Rayon).unwrap();
        assert!(out.iter().all(|&v| v == 2.0));
    }
    assert_eq!(jit.compilations(), 1);

    // a different constant, precision, unroll or format is a different kernel
    jit.map(MapSpec::new(
        Expr::input(0).exp() + Expr::input(1),
        2,
        ElemType::F32,
    ))
    .unwrap();
    assert_eq!(jit.compilations(), 2);
    jit.map(spec.clone().with_unroll(2)).unwrap();
    assert_eq!(jit.compilations(), 3);
    jit.map(MapSpec::new(
        Expr::input(0).exp() + Expr::constant(-0.0),
        1,
        ElemType::F64,
    ))
    .unwrap();
    jit.map(MapSpec::new(
        Expr::input(0).exp() + Expr::constant(0.0),
        1,
        ElemType::F64,
    ))
    .unwrap();
    assert_eq!(jit.compilations(), 5);
    jit.map(spec).unwrap();
    assert_eq!(jit.compilations(), 5);

    // dot kernels: one per spec, whatever M, N, K; a clone shares the cache
    let clone = jit.clone();
    let dot = DotSpec::new(ElemType::F64);
    for (m, n, k) in [(1, 1, 1), (3, 5, 7), (64, 33, 300)] {
        let kernel = clone.dot(dot).unwrap();
        let (a, b) = (vec![1.0; m * k], vec![2.0; n * k]);
        let mut c = vec![0.0; m * n];
        kernel
            .run(
                &a,
                &b,
                &mut c,
                DotShape::new(m, n, k),
                1.0,
                0.0,
                Parallelism::Rayon,
            )
            .unwrap();
        assert!(c.iter().all(|&v| v == 2.0 * k as f64));
    }
    assert_eq!(jit.compilations(), 6);
    jit.dot(dot.with_accumulate(true)).unwrap();
    jit.dot(dot.with_tile(3, 3)).unwrap();
    jit.dot(DotSpec::new(ElemType::F32).with_formats(ElementFormat::F32, ElementFormat::Bf16))
        .unwrap();
    assert_eq!(clone.compilations(), 9);
    jit.compile(&CpuKernelSpec::Dot(dot)).unwrap();
    assert_eq!(clone.compilations(), 9);
}

#[test]
fn kernels_outlive_their_jit_handle() {
    let kernel = {
        let jit = CpuJit::new().unwrap();
        jit.map(MapSpec::new(
            Expr::input(0) * Expr::constant(3.0),
            1,
            ElemType::F32,
        ))
        .unwrap()
    };
    let mut out = [0.0f32; 3];
    kernel
        .run(&[&[1.0f32, 2.0, 3.0]], &mut out, Parallelism::Sequential)
        .unwrap();
    assert_eq!(out, [3.0, 6.0, 9.0]);
}

#[test]
fn invalid_specs_are_errors() {
    let jit = CpuJit::new().unwrap();
    let expect_invalid = |result: Result<(), CpuError>, needle: &str| match result {
        Err(CpuError::Codegen(e)) => assert!(e.to_string().contains(needle), "{e}"),
        other => panic!("expected an invalid-spec error mentioning {needle:?}, got {other:?}"),
    };
    expect_invalid(
        jit.map(MapSpec::new(Expr::input(2), 2, ElemType::F32))
            .map(drop),
        "reads 3 inputs",
    );
    expect_invalid(
        jit.map(MapSpec::new(
            Expr::input(0) + Expr::constant(f64::INFINITY),
            1,
            ElemType::F32,
        ))
        .map(drop),
        "not finite",
    );
    expect_invalid(
        jit.map(
            MapSpec::new(Expr::input(0), 1, ElemType::F64)
                .with_input_formats(vec![ElementFormat::Bf16]),
        )
        .map(drop),
        "input 0",
    );
    expect_invalid(
        jit.map(MapSpec::new(Expr::input(0), 1, ElemType::F64).with_unroll(0))
            .map(drop),
        "unroll",
    );
    expect_invalid(
        jit.dot(DotSpec::new(ElemType::F64).with_tile(4, 4))
            .map(drop),
        "tile",
    );
    expect_invalid(
        jit.dot(DotSpec::new(ElemType::F32).with_formats(ElementFormat::F64, ElementFormat::F32))
            .map(drop),
        "operand a",
    );
    assert_eq!(jit.compilations(), 0);
}

#[test]
fn the_global_jit_is_shared() {
    let a = CpuJit::global().unwrap();
    let b = CpuJit::global().unwrap();
    assert!(std::ptr::eq(a, b));
    assert!(format!("{a:?}").contains("CpuJit"));
}

#[test]
fn the_path_without_fma_is_as_accurate() {
    let jit = CpuJit::with_fma(false).unwrap();
    assert!(!jit.target().fma);
    let n = 20_001;
    let xs: Vec<f64> = (0..n)
        .map(|i| -80.0 + 160.0 * i as f64 / (n - 1) as f64)
        .collect();
    let mut out = vec![0.0; n];
    let exp = jit
        .map(MapSpec::new(Expr::input(0).silu(), 1, ElemType::F64))
        .unwrap();
    exp.run(&[&xs], &mut out, Parallelism::Rayon).unwrap();
    for (&x, &y) in xs.iter().zip(&out) {
        let want = x / (1.0 + (-x).exp());
        assert!(
            (y - want).abs() <= 1e-12 * want.abs(),
            "silu({x}) = {y}, want {want}"
        );
    }
    let xs32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    let mut out32 = vec![0.0f32; n];
    let exp32 = jit
        .map(MapSpec::new(Expr::input(0).exp(), 1, ElemType::F32))
        .unwrap();
    exp32.run(&[&xs32], &mut out32, Parallelism::Rayon).unwrap();
    for (&x, &y) in xs32.iter().zip(&out32) {
        let want = f64::from(x).exp();
        assert!(
            (f64::from(y) - want).abs() <= 1e-6 * want,
            "exp({x}) = {y}, want {want}"
        );
    }

    let (m, n, k) = (7, 9, 37);
    let a: Vec<f64> = (0..m * k).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
    let b: Vec<f64> = (0..n * k)
        .map(|i| ((i * 104_729) % 11) as f64 - 5.0)
        .collect();
    let mut c = vec![1.0; m * n];
    let dot = jit
        .dot(
            DotSpec::new(ElemType::F64)
                .with_scale(true)
                .with_accumulate(true),
        )
        .unwrap();
    dot.run(
        &a,
        &b,
        &mut c,
        DotShape::new(m, n, k),
        0.5,
        2.0,
        Parallelism::Rayon,
    )
    .unwrap();
    for i in 0..m {
        for j in 0..n {
            let sum: f64 = (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum();
            assert_eq!(c[i * n + j], 0.5 * sum + 2.0, "integers are exact");
        }
    }
}
