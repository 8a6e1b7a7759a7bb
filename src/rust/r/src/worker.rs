//! Runs core work off the R thread while the R thread watches for Ctrl-C.
//!
//! R's API is single-threaded: only the thread that called into the package
//! may touch it. So the core's work runs on a scoped worker thread inside a
//! rayon pool of the requested size, and this (R's) thread polls
//! `R_CheckUserInterrupt` through `R_ToplevelExec` (which catches the longjmp
//! R would otherwise take through Rust frames). An interrupt sets a flag that
//! the core polls; a panic on the worker is caught and becomes an R error.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

extern "C" {
    fn R_ToplevelExec(fun: Option<unsafe extern "C" fn(*mut c_void)>, data: *mut c_void) -> i32;
    fn R_CheckUserInterrupt();
}

unsafe extern "C" fn check_interrupt(_: *mut c_void) {
    R_CheckUserInterrupt();
}

/// True when the user pressed Ctrl-C. Call only from the R thread.
pub fn r_interrupt_pending() -> bool {
    unsafe { R_ToplevelExec(Some(check_interrupt), std::ptr::null_mut()) == 0 }
}

/// Runs `work(interrupted)` with `threads` threads (libtorch and rayon) on a
/// worker thread; `interrupted()` turns true once the user presses Ctrl-C.
pub fn run<R: Send>(threads: usize, work: impl FnOnce(&dyn Fn() -> bool) -> R + Send) -> Result<R, String> {
    run_with_ticks(threads, work, || {})
}

/// As `run`, and calls `tick()` on the R thread every poll (about 20 ms):
/// where progress reported by the worker reaches R.
pub fn run_with_ticks<R: Send>(
    threads: usize,
    work: impl FnOnce(&dyn Fn() -> bool) -> R + Send,
    mut tick: impl FnMut(),
) -> Result<R, String> {
    let pool = scdistill_core::device::thread_pool(threads).map_err(|e| e.to_string())?;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handle = s.spawn(|| pool.install(|| work(&|| stop.load(Ordering::Relaxed))));
        while !handle.is_finished() {
            std::thread::sleep(Duration::from_millis(20));
            if !stop.load(Ordering::Relaxed) && r_interrupt_pending() {
                stop.store(true, Ordering::Relaxed);
            }
            tick();
        }
        tick();
        handle.join().map_err(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            format!("internal error in scdistill (please report it): {msg}")
        })
    })
}

/// A borrowed model handed to the worker thread. libtorch tensors are not
/// `Sync` in tch, but the R thread never touches the model while the worker
/// runs (it only polls for interrupts), so exactly one thread uses it at a time.
pub struct Lent<'a, T>(pub &'a T);

// SAFETY: see above; the borrow ends when `run` returns, after the worker joined.
unsafe impl<T> Send for Lent<'_, T> {}
unsafe impl<T> Sync for Lent<'_, T> {}

impl<'a, T> Lent<'a, T> {
    /// The borrow (a method, so that closures capture the whole `Lent`).
    pub fn get(&self) -> &'a T {
        self.0
    }
}
