//! Where computations run: CPU or CUDA, how many threads, and seeding.

use crate::error::{Error, Result};
use tch::Cuda;
pub use tch::Device;

/// The libtorch version this crate was built against (e.g. "2.11.0+cu130").
pub const LIBTORCH_VERSION: &str = env!("SCDISTILL_LIBTORCH_VERSION");

/// Resolves a device name: "auto" (CUDA when libtorch sees a GPU), "cpu",
/// "cuda" or "cuda:N".
pub fn parse_device(name: &str) -> Result<Device> {
    let bad = |reason: String| Error::InvalidParameter { name: "device", reason };
    match name {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        _ => {
            let index = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|i| i.parse::<usize>().ok())
                    .ok_or_else(|| bad(format!("must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", not \"{name}\"")))?,
                None => return Err(bad(format!("must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", not \"{name}\""))),
            };
            let available = if Cuda::is_available() { Cuda::device_count() as usize } else { 0 };
            if index >= available {
                return Err(bad(format!("asks for {name} but libtorch sees {available} CUDA device(s)")));
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// Human-readable device name.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// What libtorch offers on this machine.
#[derive(Debug, Clone)]
pub struct TorchInfo {
    pub libtorch_version: &'static str,
    pub cuda_available: bool,
    pub cuda_device_count: usize,
    pub cudnn_available: bool,
    pub device: String,
    pub threads: usize,
}

/// Sets the thread count (libtorch intra-op and the rayon pool used by the
/// core) and reports the configuration for `device`.
pub fn torch_info(device: &str, threads: usize) -> Result<TorchInfo> {
    let d = parse_device(device)?;
    set_threads(threads)?;
    let cuda = Cuda::is_available();
    Ok(TorchInfo {
        libtorch_version: LIBTORCH_VERSION,
        cuda_available: cuda,
        cuda_device_count: if cuda { Cuda::device_count() as usize } else { 0 },
        cudnn_available: cuda && Cuda::cudnn_is_available(),
        device: device_name(d),
        threads: tch::get_num_threads() as usize,
    })
}

/// Sets libtorch's intra-op thread count.
pub fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Err(Error::InvalidParameter { name: "threads", reason: "must be at least 1".into() });
    }
    if tch::get_num_threads() as usize != threads {
        tch::set_num_threads(threads as i32);
    }
    Ok(())
}

/// Sets libtorch's thread count and returns a rayon pool of the same size,
/// in which the core's parallel loops run.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    set_threads(threads)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::InvalidParameter { name: "threads", reason: e.to_string() })
}

/// Runs `f` with libtorch and rayon both limited to `threads` threads.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(thread_pool(threads)?.install(f))
}

/// Seeds libtorch (CPU and CUDA generators).
pub fn seed_torch(seed: u64) {
    tch::manual_seed(seed as i64);
    if Cuda::is_available() {
        Cuda::manual_seed_all(seed);
    }
}

/// Hands the allocator's free pages back to the system (glibc's
/// `malloc_trim`). Threads that read and train leave freed memory in their
/// malloc arenas, and the process keeps it: after `distill()` of 10^6 cells
/// from disk, 0.9 GB of its 2.4 GB were free pages. Called at the end of
/// each epoch's stream from disk, after `distill()`'s Z pass and after
/// every fit; a no-op where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only returns free pages to the system; any
        // thread may call it at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert!(parse_device("gpu").unwrap_err().to_string().contains("\"gpu\""));
        assert!(parse_device("cuda:x").is_err());
        if !Cuda::is_available() {
            assert_eq!(parse_device("auto").unwrap(), Device::Cpu);
            assert!(parse_device("cuda").unwrap_err().to_string().contains("0 CUDA device"));
        }
    }

    #[test]
    fn threads_are_applied_and_version_is_known() {
        // The thread count is global: tests that compare trained models take turns with this one.
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        let info = torch_info("cpu", 1).unwrap();
        assert_eq!(info.threads, 1);
        assert!(info.libtorch_version.starts_with("2.11.0"), "{}", info.libtorch_version);
        assert_eq!(with_threads(2, rayon::current_num_threads).unwrap(), 2);
        assert!(set_threads(0).is_err());
    }
}
