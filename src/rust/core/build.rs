//! Records the libtorch version the crate is built against, for `torch_config()`,
//! makes this crate's own binaries find libtorch, finds libhdf5, and compiles
//! the distributed backend's C++ shim (`csrc/c10d.cpp`) against libtorch's headers.
use std::{env, fs, path::Path};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let version = env::var("LIBTORCH")
        .ok()
        .and_then(|dir| {
            let dir = Path::new(&dir);
            // A PyTorch wheel has torch/version.py; a libtorch zip has build-version.
            fs::read_to_string(dir.join("version.py"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("__version__ = "))
                        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
                })
                .or_else(|| fs::read_to_string(dir.join("build-version")).ok().map(|s| s.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=SCDISTILL_LIBTORCH_VERSION={version}");
    // Test and CLI binaries of this crate find libtorch without LD_LIBRARY_PATH.
    // (The R package's shared object gets its own rpath from src/Makevars.)
    if let Ok(dir) = env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
    }
    // libhdf5 (on-disk data): Debian's serial build lies outside the linker's
    // default path; pkg-config names its folder (`configure` does the same
    // for the R package's link line).
    println!("cargo:rerun-if-env-changed=HDF5_LIB_DIR");
    let dirs = env::var("HDF5_LIB_DIR").map(|d| vec![d]).unwrap_or_else(|_| {
        std::process::Command::new("pkg-config")
            .args(["--libs-only-L", "hdf5"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|f| f.strip_prefix("-L").map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    });
    for d in dirs {
        println!("cargo:rustc-link-search=native={d}");
    }
    // The c10d shim, compiled with libtorch's own headers and ABI (torch-sys'
    // rule: LIBTORCH_CXX11_ABI, 1 unless set). USE_C10D_GLOO opens the Gloo
    // process group's header; csrc/gloo declares the Gloo types it names.
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let torch = env::var("LIBTORCH").expect("LIBTORCH must name the libtorch folder (tools/find_libtorch.sh)");
    let abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .file("csrc/c10d.cpp")
        .include("csrc")
        .include(format!("{torch}/include"))
        .include(format!("{torch}/include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .opt_level(2)
        .compile("scdistill_c10d");
}
