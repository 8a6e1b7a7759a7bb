//! extendr glue of torch_config(), the thread policy, and the checks that
//! panics and interrupts reach R safely (mirrors R/torch_config.R).

use crate::{available_threads, fail, run, threads_from_r};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::device;

/// libtorch version, CUDA availability, device and thread count.
/// @noRd
#[extendr]
fn rs_torch_config(device: &str, threads: i32) -> Result<List> {
    let info = device::torch_info(device, threads_from_r(threads)?).map_err(fail)?;
    Ok(list!(
        libtorch_version = info.libtorch_version,
        cuda_available = info.cuda_available,
        cuda_device_count = info.cuda_device_count as i32,
        cudnn_available = info.cudnn_available,
        device = info.device,
        threads = info.threads as i32
    ))
}

#[repr(C)]
struct DlInfo {
    fname: *const std::ffi::c_char,
    fbase: *mut std::ffi::c_void,
    sname: *const std::ffi::c_char,
    saddr: *mut std::ffi::c_void,
}

extern "C" {
    fn dladdr(addr: *const std::ffi::c_void, info: *mut DlInfo) -> i32;
    // Single-precision matrix product of the Fortran BLAS interface, as
    // libtorch calls it.
    fn sgemm_();
}

/// The shared object whose `sgemm_` the core (and so libtorch) calls: it
/// must be libtorch's own, not R's BLAS (see src/entrypoint.c).
/// @noRd
#[extendr]
fn rs_blas_library() -> String {
    let mut info = DlInfo {
        fname: std::ptr::null(),
        fbase: std::ptr::null_mut(),
        sname: std::ptr::null(),
        saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads the address; the name it returns is owned by the loader.
    unsafe {
        if dladdr(sgemm_ as *const std::ffi::c_void, &mut info) == 0 || info.fname.is_null() {
            return String::new();
        }
        std::ffi::CStr::from_ptr(info.fname).to_string_lossy().into_owned()
    }
}

/// Threads this process may use (respects CPU affinity and cgroup limits).
/// @noRd
#[extendr]
fn rs_available_threads() -> i32 {
    available_threads() as i32
}

/// Panics on purpose, on the R thread or on a worker: proves panics become R errors.
/// @noRd
#[extendr]
fn rs_panic_for_test(on_worker: bool) -> Result<()> {
    if on_worker {
        run(1, |_| -> scdistill_core::Result<()> { panic!("deliberate panic on a worker thread") })
    } else {
        panic!("deliberate panic on the R thread")
    }
}

/// Spins until interrupted (for manual Ctrl-C checks) or `seconds` pass.
/// @noRd
#[extendr]
fn rs_wait_for_interrupt(seconds: f64) -> Result<bool> {
    run(1, |interrupted| {
        let start = std::time::Instant::now();
        while start.elapsed().as_secs_f64() < seconds {
            if interrupted() {
                return Err(scdistill_core::Error::Interrupted);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(true)
    })
}

extendr_module! {
    mod torch;
    fn rs_torch_config;
    fn rs_available_threads;
    fn rs_blas_library;
    fn rs_panic_for_test;
    fn rs_wait_for_interrupt;
}
