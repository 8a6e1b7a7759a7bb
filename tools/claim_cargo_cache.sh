#!/bin/sh
# Cargo fingerprints the workspace's own crates by their path relative to the
# workspace root and trusts file times. So two source trees of this package
# that share one build cache (the repository, R CMD build/check's copies,
# another checkout) can take each other's compiled crates for their own when
# their sources differ. Before cargo runs, this compares a checksum of the
# package's Rust sources with the one the cache was last built from; when they
# differ it touches the sources, so cargo recompiles the package's two crates
# (dependencies stay cached). Identical copies rebuild nothing.
#   claim_cargo_cache.sh RUST_DIR TARGET_DIR
rust=$1
target=$2
sum=$(cd "$rust" && find Cargo.toml Cargo.lock core r -type f \( -name '*.rs' -o -name 'Cargo.toml' -o -name 'Cargo.lock' \) \
  | LC_ALL=C sort | xargs cat | cksum)
stamp="$target/.scdistill-sources"
if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  (cd "$rust" && find core r -type f \( -name '*.rs' -o -name 'Cargo.toml' \) -exec touch {} +)
fi
mkdir -p "$target" && printf '%s\n' "$sum" > "$stamp"
