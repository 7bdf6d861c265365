//! Clearing the upper halves of the AVX registers before generated code runs.
//!
//! On Intel cores, a legacy-SSE instruction that runs while the upper halves of the YMM
//! registers are "dirty" pays a state-transition penalty, and a library compiled for AVX-512
//! (faer, through pulp) can return with them dirty. Cranelift uses VEX encodings on AVX hosts
//! for most instructions, but the JIT kernels still paid (which of their instructions are
//! legacy SSE was not identified). Measured on the GPU host's Xeon (family 6, model 207, 2026-11-27): the
//! 500 × 500 × 56 product kernel took 1.1 s on a thread that had just run a faer
//! eigendecomposition, 1.9 ms after a `vzeroupper` (and 4.2 ms before faer ran); the same
//! binary on the development machine's AMD EPYC showed no difference. Compilers put a
//! `vzeroupper` at every AVX → SSE boundary; this module is that boundary for JIT code.
//!
//! Owns only the clearing (and, for tests, reading the state); it must not decide where kernels
//! run. On hosts without AVX, and off x86-64, it does nothing.

/// Marks the upper halves of YMM0–15 as clean (`vzeroupper`) if the host has AVX.
///
/// Call it on the thread that is about to run generated SSE code, after any library code that
/// may have used 256- or 512-bit registers. Costs about one cycle.
#[inline]
pub fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: `vzeroupper` exists on every AVX host and only zeroes bits 128 and up of
        // YMM0–15; every vector register is declared clobbered (all are caller-saved in the
        // C ABI), so no live value of the surrounding Rust code is lost.
        unsafe {
            std::arch::asm!(
                "vzeroupper",
                options(nomem, nostack, preserves_flags),
                clobber_abi("C")
            )
        };
    }
}

/// Whether this thread's upper YMM state is in use (XINUSE bit 2, `xgetbv` with ECX = 1), or
/// `None` where the host cannot say (no AVX or no XGETBV with ECX = 1). For tests.
pub fn upper_vector_state_in_use() -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        let xgetbv1 = std::arch::x86_64::__cpuid_count(0xd, 1).eax & (1 << 2) != 0;
        if !std::arch::is_x86_feature_detected!("avx") || !xgetbv1 {
            return None;
        }
        let (low, _high): (u32, u32);
        // SAFETY: the host supports XGETBV with ECX = 1 (checked above); it only reads.
        unsafe {
            std::arch::asm!("xgetbv", in("ecx") 1u32, out("eax") low, out("edx") _high,
                options(nomem, nostack, preserves_flags))
        };
        Some(low & (1 << 2) != 0)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}
