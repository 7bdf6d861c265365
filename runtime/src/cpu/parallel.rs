//! How the safe wrappers spread a kernel call over threads: the [`Parallelism`] choice, and a
//! `Send` wrapper for the raw pointers handed to disjoint ranges. Owns no kernel and no
//! decomposition rule (each wrapper decides its ranges, identically for every parallelism, so
//! results do not depend on it).

/// Where a kernel call runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Parallelism {
    /// On the calling thread.
    Sequential,
    /// On the current rayon pool (the global one unless the caller installed another).
    #[default]
    Rayon,
}

impl Parallelism {
    /// How many threads a call may use: 1, or the size of the current rayon pool (which
    /// `RAYON_NUM_THREADS` sets).
    pub fn threads(self) -> usize {
        match self {
            Parallelism::Sequential => 1,
            Parallelism::Rayon => rayon::current_num_threads(),
        }
    }

    /// Calls `task(t)` for every `t` in `0..tasks`, in parallel for [`Parallelism::Rayon`].
    pub fn for_each(self, tasks: usize, task: impl Fn(usize) + Send + Sync) {
        match self {
            Parallelism::Sequential => (0..tasks).for_each(task),
            Parallelism::Rayon if tasks <= 1 => (0..tasks).for_each(task),
            Parallelism::Rayon => {
                use rayon::prelude::*;
                (0..tasks).into_par_iter().for_each(task)
            }
        }
    }
}

/// A raw pointer that may cross threads: the wrappers guarantee that concurrent kernel calls
/// only read through shared pointers and write disjoint ranges through mutable ones.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendPtr<T>(pub *mut T);

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper, not the field).
    pub fn get(self) -> *mut T {
        self.0
    }
}

// SAFETY: see the type's documentation; the pointee outlives every task (tasks are joined
// before the wrapper returns).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
