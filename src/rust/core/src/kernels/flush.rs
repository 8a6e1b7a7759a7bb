//! Subnormal floats flushed to zero while a kernel runs.
//!
//! Adam's second moment of a weight whose gradient has all but vanished (a
//! latent dimension the decoder has stopped reading) drifts into subnormal
//! floats (below 1.2e-38), where x86 arithmetic takes a microcode assist on
//! every operation: an epoch then ran 6 to 15 times slower (measured on the
//! cross-species model's collapsed latent dimensions). Flushing them to zero
//! (MXCSR's FTZ and DAZ bits, what PyTorch's `set_flush_denormal(True)`
//! does) costs nothing and changes only values that small.

/// While alive, the calling thread flushes subnormal inputs and results to
/// zero; the previous mode comes back on drop.
pub struct Subnormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl Subnormals {
    #[allow(deprecated)]
    pub fn flushed() -> Subnormals {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: reading and writing MXCSR only changes this thread's
            // floating-point mode (bit 15 FTZ, bit 6 DAZ), restored on drop.
            unsafe {
                let saved = std::arch::x86_64::_mm_getcsr();
                std::arch::x86_64::_mm_setcsr(saved | 0x8040);
                Subnormals { saved }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Subnormals {}
    }
}

impl Drop for Subnormals {
    #[allow(deprecated)]
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: restores the mode read in `flushed`.
        unsafe {
            std::arch::x86_64::_mm_setcsr(self.saved)
        }
    }
}
