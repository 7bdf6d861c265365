//! The error every generator returns for a spec it cannot build.

/// A kernel spec that a generator cannot build: which family, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{family} kernel spec: {message}")]
pub struct SpecError {
    pub family: &'static str,
    pub message: String,
}

impl SpecError {
    pub fn new(family: &'static str, message: impl Into<String>) -> SpecError {
        SpecError {
            family,
            message: message.into(),
        }
    }
}
