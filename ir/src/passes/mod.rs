//! # ir::passes — graph passes that run between rewriting and scheduling
//!
//! A pass here takes the rewritten graph and returns a new graph (the ops it chose to change
//! replaced, everything else untouched) with a [`crate::schedule::PassReport`] of what it did,
//! and a [`crate::schedule::PassRecord`] (name and options) that the caller adds to the
//! plan's `passes_run` after scheduling, so a plan says how it was made. Passes must not
//! schedule, generate code or touch a device.

pub mod atom;
pub mod quest;
