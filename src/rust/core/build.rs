//! Records the libtorch version the crate is built against, for `torch_config()`,
//! and makes this crate's own binaries find libtorch.
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
}
