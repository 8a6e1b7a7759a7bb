#!/bin/sh
# Makes the source package build without the crate registry (R-universe,
# offline machines): writes src/rust/vendor.tar.xz (every crate of
# Cargo.lock) and src/rust/vendor-config.toml (cargo's source replacement).
# configure and src/Makevars use them when present. Run before R CMD build:
#   sh tools/vendor.sh && R CMD build .
# or on an unpacked source package:  sh tools/vendor.sh path/to/scdistill
# Both files are ignored by git; remove them to go back to crates.io.
set -e
cd "${1:-$(dirname "$0")/..}/src/rust"
rm -rf vendor
cargo vendor --quiet --locked --versioned-dirs vendor > /dev/null
cat > vendor-config.toml <<CFG
# Written by tools/vendor.sh: cargo takes the crates from vendor/.
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "vendor"
CFG
tar cf - vendor | xz -T0 -6 > vendor.tar.xz
rm -rf vendor
echo "vendor: src/rust/vendor.tar.xz ($(du -h vendor.tar.xz | cut -f1))"
