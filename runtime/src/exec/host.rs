//! Host steps on Cranelift kernels: the executor's side of `kiln_kernels::cpu_step`.
//!
//! Owns [`HostKernels`] (a plan's CPU step specs compiled once, at load, through the
//! process's [`CpuJit`]) and the running of one step: the linear's product on the dot kernel,
//! rounded to the step's dtype as the interpreter rounds it, then its epilogue map row by
//! row; a plain map over whole operands. Results are cast to the result dtype by the caller,
//! as for every host step. It must not build kernel IR (that is `kiln_codegen::cpu`) or
//! decide which steps have kernels (that is `kiln_kernels::cpu_step`).

use super::ExecError;
use crate::cpu::{CpuJit, DotKernel, DotShape, MapKernel, Parallelism};
use kiln_ir::dtype::DType;
use kiln_ir::schedule::LinearEpilogue;
use kiln_ir::tensor::Tensor;
use kiln_kernels::cpu_step::CpuStep;

/// One step's compiled kernels.
pub(super) enum HostKernel {
    Linear {
        dot: DotKernel,
        epilogue: Option<MapKernel>,
        kind: LinearEpilogue,
        width: usize,
        n: usize,
        k: usize,
        dtype: DType,
    },
    Map {
        map: MapKernel,
    },
}

/// The compiled kernels of a plan's host steps, by kernel index.
#[derive(Default)]
pub(super) struct HostKernels {
    pub(super) steps: Vec<Option<HostKernel>>,
}

fn cpu_error(kernel: &str) -> impl FnOnce(crate::cpu::CpuError) -> ExecError + '_ {
    move |e| ExecError::Kernel {
        kernel: kernel.to_string(),
        message: format!("Cranelift kernel: {e}"),
    }
}

impl HostKernels {
    /// Compiles `steps` (one per plan kernel; `names` for errors).
    pub(super) fn compile(
        steps: &[Option<CpuStep>],
        names: &[&str],
    ) -> Result<HostKernels, ExecError> {
        let jit = CpuJit::global().map_err(cpu_error("the CPU JIT"))?;
        let mut compiled = Vec::with_capacity(steps.len());
        for (step, name) in steps.iter().zip(names) {
            let error = cpu_error(name);
            compiled.push(match step {
                None => None,
                Some(
                    step @ CpuStep::Linear {
                        dot,
                        epilogue_kind,
                        epilogue,
                        n,
                        k,
                        dtype,
                    },
                ) => {
                    let width = step.product_width().unwrap_or(*n);
                    let epilogue = match epilogue {
                        Some(spec) => Some(jit.map(spec.clone()).map_err(cpu_error(name))?),
                        None => None,
                    };
                    Some(HostKernel::Linear {
                        dot: jit.dot(*dot).map_err(error)?,
                        epilogue,
                        kind: *epilogue_kind,
                        width,
                        n: *n,
                        k: *k,
                        dtype: *dtype,
                    })
                }
                Some(CpuStep::Map { map, .. }) => Some(HostKernel::Map {
                    map: jit.map(map.clone()).map_err(error)?,
                }),
            });
        }
        Ok(HostKernels { steps: compiled })
    }
}

impl HostKernel {
    /// Runs the step on `operands` (in the shapes the op reads them), writing `elements`
    /// values (the result's element count), in f32.
    pub(super) fn run(
        &self,
        kernel: &str,
        operands: &[&Tensor],
        elements: usize,
    ) -> Result<Vec<f32>, ExecError> {
        let bad = |message: String| ExecError::Kernel {
            kernel: kernel.to_string(),
            message,
        };
        let parallel = Parallelism::Rayon;
        match self {
            HostKernel::Map { map } => {
                let inputs: Vec<&[f32]> = operands.iter().map(|t| t.data.as_slice()).collect();
                let mut out = vec![0.0f32; elements];
                map.run(&inputs, &mut out, parallel)
                    .map_err(cpu_error(kernel))?;
                Ok(out)
            }
            HostKernel::Linear {
                dot,
                epilogue,
                kind,
                width,
                n,
                k,
                dtype,
            } => {
                let (x, weight) = match operands {
                    [x, weight, ..] => (x, weight),
                    _ => {
                        return Err(bad(format!(
                            "{} operands, a linear takes 2 or 3",
                            operands.len()
                        )))
                    }
                };
                if x.data.len() % k.max(&1) != 0 {
                    return Err(bad(format!(
                        "input of {} values is not rows of {k}",
                        x.data.len()
                    )));
                }
                let rows = x.data.len() / k.max(&1);
                if rows * n != elements {
                    return Err(bad(format!(
                        "{rows} rows of {n} make {} values, the result has {elements}",
                        rows * n
                    )));
                }
                let mut product = vec![0.0f32; rows * width];
                dot.run(
                    &x.data,
                    &weight.data,
                    &mut product,
                    DotShape::new(rows, *width, *k),
                    1.0,
                    0.0,
                    parallel,
                )
                .map_err(cpu_error(kernel))?;
                if *dtype != DType::F32 {
                    for value in &mut product {
                        *value = dtype.round(*value);
                    }
                }
                let Some(map) = epilogue else {
                    return Ok(product);
                };
                let mut out = vec![0.0f32; elements];
                match kind {
                    LinearEpilogue::None => return Ok(product),
                    LinearEpilogue::Residual => {
                        let residual = operands.get(2).ok_or_else(|| bad("no residual".into()))?;
                        map.run(&[&product, &residual.data], &mut out, parallel)
                            .map_err(cpu_error(kernel))?;
                    }
                    LinearEpilogue::Bias => {
                        let bias = operands.get(2).ok_or_else(|| bad("no bias".into()))?;
                        for (row, out) in product.chunks(*n).zip(out.chunks_mut(*n)) {
                            map.run(&[row, &bias.data], out, Parallelism::Sequential)
                                .map_err(cpu_error(kernel))?;
                        }
                    }
                    LinearEpilogue::SwiGlu => {
                        for (row, out) in product.chunks(*width).zip(out.chunks_mut(*n)) {
                            let (gate, up) = row.split_at(*n);
                            map.run(&[gate, up], out, Parallelism::Sequential)
                                .map_err(cpu_error(kernel))?;
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}
