//! # kiln-compiler — the driver from a model definition to a compiled artifact
//!
//! Usable without the CLI: [`compile`] runs one phase through build → egg rewrites → passes
//! (Quest) → schedule → kernel generation; [`Artifact`] gathers both phases of a model with
//! every kernel they can launch and writes, loads and checks the artifact directory that
//! `kiln run --compiled` executes; [`Target`] is the machine it is compiled for. It must not
//! touch a device or run anything: that is `kiln-runtime`.

pub mod artifact;
pub mod driver;
pub mod error;
pub mod target;

pub use artifact::{Artifact, ArtifactOptions, Manifest, SCHEMA_VERSION};
pub use driver::{compile, CompileOptions, CompiledModel};
pub use error::{ArtifactError, CompileError, TargetError};
pub use target::Target;
