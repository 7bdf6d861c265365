//! `runtime::cuda` tests that need no GPU: opening a device without a driver, binding
//! arguments to declared parameters, and launch geometry. They run in CI.

use kiln_codegen::kernel::{Access, Extent, GpuKernel, LaunchRule, Param, ParamKind};
use kiln_runtime::cuda::{
    bind, driver_present, ArgValue, Args, BufferArg, CudaDevice, CudaError, DeviceId, ElemType,
};

#[test]
fn opening_a_device_without_a_driver_is_an_error_not_a_panic() {
    let opened = CudaDevice::open(0);
    if driver_present() {
        // A machine with a driver (the GPU machine): the device must open.
        let device = opened.expect("a CUDA driver is present, so device 0 should open");
        assert!(CudaDevice::is_available());
        println!("{}", device.info());
    } else {
        assert!(!CudaDevice::is_available());
        let err = opened.expect_err("no driver here, so opening must fail");
        assert!(matches!(err, CudaError::NoDriver { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.starts_with("no CUDA driver found: "), "{message}");
        assert!(
            message.contains("libcuda.so"),
            "names what it looked for: {message}"
        );
        assert!(
            message.contains("LD_LIBRARY_PATH"),
            "says how to fix it: {message}"
        );
        // Asking again is still an error, not a panic from a half-initialised driver.
        assert!(CudaDevice::open(1).is_err());
    }
}

const DEVICE: DeviceId = DeviceId(0);

fn param(name: &str, kind: ParamKind) -> Param {
    Param {
        name: name.to_string(),
        kind,
    }
}

/// A kernel description with no PTX: binding never looks at the text.
fn rmsnorm_like() -> GpuKernel {
    GpuKernel {
        entry: "rmsnorm_f16".to_string(),
        ptx: String::new(),
        params: vec![
            param("x", ParamKind::Pointer(Access::Read)),
            param("weight", ParamKind::Pointer(Access::Read)),
            param("out", ParamKind::Pointer(Access::Write)),
            param("rows", ParamKind::U32),
            param("cols", ParamKind::U32),
            param("eps", ParamKind::F32),
        ],
        launch: LaunchRule {
            grid: [
                Extent::ceil_div("rows", 2),
                Extent::ceil_div("cols", 4096),
                Extent::fixed(1),
            ],
            block: [256, 2, 1],
            shared_bytes: 1024,
        },
        target: "sm_80".to_string(),
    }
}

fn fake_buffer(ptr: u64) -> BufferArg<'static> {
    // SAFETY: never launched; only bound.
    unsafe { BufferArg::from_raw_parts(ptr, 4096, ElemType::F16, DEVICE) }
}

fn args() -> Args<'static> {
    Args::new()
        .buffer("out", fake_buffer(0x3000))
        .buffer("x", fake_buffer(0x1000))
        .buffer("weight", fake_buffer(0x2000))
        .u32("cols", 8192)
        .u32("rows", 5)
        .f32("eps", 1e-6)
}

#[test]
fn arguments_bind_in_declared_order_whatever_order_they_were_given() {
    let bound = bind(&rmsnorm_like(), &args(), DEVICE).unwrap();
    assert_eq!(
        bound.values,
        vec![
            ArgValue::Pointer(0x1000),
            ArgValue::Pointer(0x2000),
            ArgValue::Pointer(0x3000),
            ArgValue::U32(5),
            ArgValue::U32(8192),
            ArgValue::F32(1e-6),
        ]
    );
    assert_eq!(bound.geometry.grid, [3, 2, 1]);
    assert_eq!(bound.geometry.block, [256, 2, 1]);
    assert_eq!(bound.geometry.shared_bytes, 1024);
    assert_eq!(bound.geometry.threads_per_block(), 512);
}

fn bind_error(args: Args<'_>) -> String {
    let err = bind(&rmsnorm_like(), &args, DEVICE).expect_err("binding should fail");
    let message = err.to_string();
    assert!(
        message.contains("`rmsnorm_f16`"),
        "names the kernel: {message}"
    );
    message
}

#[test]
fn a_missing_argument_is_named() {
    let mut partial = Args::new();
    for (name, arg) in args().iter().filter(|(name, _)| *name != "weight") {
        partial = partial.set(name, *arg);
    }
    let message = bind_error(partial);
    assert!(message.contains("parameter `weight`"), "{message}");
    assert!(message.contains("has no argument"), "{message}");
}

#[test]
fn an_undeclared_argument_is_named() {
    let message = bind_error(args().u32("batch", 1));
    assert!(message.contains("no parameter `batch`"), "{message}");
    assert!(
        message.contains("rows: u32"),
        "lists what is declared: {message}"
    );
}

#[test]
fn a_mismatched_kind_is_named() {
    let message = bind_error(args().buffer("rows", fake_buffer(0x4000)));
    assert!(message.contains("`rows` is a u32 scalar"), "{message}");
    assert!(
        message.contains("given a buffer (f16, 4096 bytes)"),
        "{message}"
    );

    let message = bind_error(args().f32("cols", 8192.0));
    assert!(message.contains("`cols` is a u32 scalar"), "{message}");

    let message = bind_error(args().u32("eps", 1));
    assert!(message.contains("`eps` is an f32 scalar"), "{message}");

    let message = bind_error(args().u32("x", 0x1000));
    assert!(message.contains("`x` is a buffer (read)"), "{message}");
}

#[test]
fn a_buffer_of_another_device_is_rejected() {
    // SAFETY: never launched.
    let foreign = unsafe { BufferArg::from_raw_parts(0x1000, 64, ElemType::F16, DeviceId(9)) };
    let message = bind_error(args().buffer("x", foreign));
    assert!(
        message.contains("`x`") && message.contains("another CudaDevice"),
        "{message}"
    );
}

#[test]
fn launch_geometry_is_checked() {
    // rows = 0 makes an empty grid: nothing would run, which is a bug upstream.
    let message = bind_error(args().u32("rows", 0));
    assert!(message.contains("grid is empty"), "{message}");

    let mut kernel = rmsnorm_like();
    kernel.launch.block = [1024, 2, 1];
    let err = bind(&kernel, &args(), DEVICE).unwrap_err().to_string();
    assert!(
        err.contains("2048 threads") && err.contains("1024"),
        "{err}"
    );

    kernel.launch.block = [0, 1, 1];
    assert!(bind(&kernel, &args(), DEVICE).is_err());

    kernel.launch.block = [1024, 1, 1];
    kernel.launch.grid[1] = Extent::ceil_div("cols", 1);
    let err = bind(&kernel, &args().u32("cols", 70_000), DEVICE)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("grid y = 70000") && err.contains("65535"),
        "{err}"
    );

    // A scalar the rule needs must be a declared u32 argument.
    kernel.launch.grid[1] = Extent::fixed(1);
    kernel.launch.grid[2] = Extent::ceil_div("heads", 1);
    let err = bind(&kernel, &args(), DEVICE).unwrap_err().to_string();
    assert!(
        err.contains("`heads`") && err.contains("rmsnorm_f16"),
        "{err}"
    );
}
