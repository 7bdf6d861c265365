//! # kiln-ir — the tensor IR of kiln
//!
//! Everything the compiler knows about a model before code generation: element types
//! ([`dtype`]), symbolic shapes ([`shape`]), the op set ([`op`]), typed graphs ([`graph`]) and
//! their verifier ([`verify`]), host tensors ([`tensor`]), group quantization math
//! ([`quant`]), the reference interpreter ([`interp`]) that is the oracle for every generated
//! kernel, the weights container ([`weights`]), analytic costs ([`cost`]),
//! equality-saturation rewriting ([`rewrite`]), graph passes ([`passes`]) and plans of
//! kernels ([`schedule`]).
//!
//! It must not define models or make weights (reading `config.json`, building model graphs,
//! loading checkpoints: that is `kiln-models`), generate code or touch a device (`kiln-codegen`,
//! `kiln-kernels` and `kiln-runtime`). Those crates depend on this one, never the other way
//! round.
//!
//! ```
//! use kiln_ir::{dtype::DType, graph::Graph, op::{InputKind, Op}, shape};
//! let mut g = Graph::new("example");
//! let x = g.input("x", InputKind::Activation, DType::F32, shape!["tokens", 64]).unwrap();
//! let w = g.input("w", InputKind::Weight, DType::F32, shape![128, 64]).unwrap();
//! let y = g.add1("proj", Op::Linear, &[x, w]).unwrap();
//! assert_eq!(g.value_type(y).unwrap().to_string(), "f32[tokens, 128]");
//! ```

pub mod atom;
pub mod cost;
pub mod dtype;
pub mod graph;
pub mod interp;
pub mod movement;
pub mod op;
pub mod passes;
pub mod quant;
pub mod quest;
pub mod rewrite;
pub mod schedule;
pub mod shape;
pub mod tensor;
pub mod verify;
pub mod weights;
