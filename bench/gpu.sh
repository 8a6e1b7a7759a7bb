#!/usr/bin/env bash
# The GPU checks of issues 27 and 28 as one prepared script that runs in a
# few minutes on a lent GPU machine (which has PyTorch 2.11.0+cu130 but no R
# and no Rust; see DESIGN.md, "Running on the GPU machine").
#
#   bash bench/gpu.sh build              here: builds the core's benchmark CLI
#                                        (release) into .carry/gpu/bench
#   bash bench/gpu.sh run [DEVICE] [--quick]
#                                        there (DEVICE cuda, the default), or
#                                        here with `cpu --quick` to try the
#                                        script itself
#
# Carry `.carry` to the GPU machine and run `bash bench/gpu.sh run` there.
# The CLI links to libtorch_cpu; libtorch_cuda, which registers CUDA when it
# is loaded, is preloaded from that machine's PyTorch. Each step prints
# training cells per second with the held-out -ELBO beside it (issue 27:
# never one without the other) and is cut off after STEP_TIMEOUT seconds
# (default 150). With $OUT set, the log is also written to $OUT/gpu.log.
#
# Steps (cells x 2,000 genes; --quick divides the cells by 20 and the epochs
# to 2):
#   1. fit_vae()'s model, 10^5 cells, 3 epochs, default minibatch (128);
#   2. the same with 1,024 and 4,096 cells per minibatch, learning rate
#      scaled linearly (scaled_lr()): cells/s against the ELBO's cost;
#   3. the VAE at 10^6 cells, 2 epochs, minibatch 1,024;
#   4. fit_multimodal()'s model, 10^5 cells x (2,000 genes + 10,000 peaks),
#      2 epochs;
#   5. distill()'s student, both phases, 10^5 cells, 3 epochs each (50 PCs
#      as the teacher, not timed);
#   6. step 1 as one rank of a data-parallel group of world size 1
#      (WORLD_SIZE=1, env:// rendezvous): the gradient exchange on device
#      tensors (issue 28's single-GPU path).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/.carry/gpu/bench"
what="${1:-}"

if [ "$what" = build ]; then
  set -e
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.local/share/scdistill/cargo-target}"
  export LIBTORCH="${LIBTORCH:-$(sh "$root/tools/find_libtorch.sh")}"
  (cd "$root/src/rust" && cargo build --release -p scdistill-core --example bench)
  mkdir -p "$(dirname "$bin")"
  cp "$CARGO_TARGET_DIR/release/examples/bench" "$bin"
  echo "gpu.sh: $bin ($(du -h "$bin" | cut -f1)); carry .carry and run 'bash bench/gpu.sh run' on the GPU machine"
  exit 0
fi
if [ "$what" != run ]; then
  echo "usage: bash bench/gpu.sh build | run [cuda|cpu] [--quick]" >&2
  exit 2
fi
device="${2:-cuda}"
quick=0
for a in "$@"; do [ "$a" = --quick ] && quick=1; done
[ -x "$bin" ] || { echo "gpu.sh: no $bin; run 'bash bench/gpu.sh build' where Rust is, and carry .carry" >&2; exit 1; }

# That machine's PyTorch libraries (the same version the CLI was built against).
py="${PYTHON:-python3}"
lib="$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)" || lib=""
if [ -n "$lib" ] && [ -d "$lib" ]; then
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if [ "$device" != cpu ]; then
    [ -f "$lib/libtorch_cuda.so" ] || { echo "gpu.sh: $lib has no libtorch_cuda.so (a CPU-only PyTorch)" >&2; exit 1; }
    export LD_PRELOAD="$lib/libtorch_cuda.so${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
elif [ "$device" != cpu ]; then
  echo "gpu.sh: '$py' has no PyTorch to take libtorch from" >&2
  exit 1
fi
log="${OUT:+$OUT/gpu.log}"
say() { if [ -n "$log" ]; then echo "$@" | tee -a "$log"; else echo "$@"; fi; }
threads="$(nproc)"
cells=100000
epochs=3
[ "$quick" = 1 ] && { cells=5000; epochs=2; }
step_timeout="${STEP_TIMEOUT:-150}"
failed=0
# One step: its command line, then what the CLI printed last (its summary).
step() {
  local name="$1"
  shift
  say ""
  say "== $name: bench $*"
  local t0=$SECONDS out
  out="$(timeout "$step_timeout" "$bin" "$@" 2>&1)"
  local rc=$?
  if [ -n "$log" ]; then printf '%s\n' "$out" >> "$log"; fi
  if [ $rc -ne 0 ]; then
    failed=$((failed + 1))
    say "FAILED (exit $rc after $((SECONDS - t0)) s):"
    say "$(printf '%s\n' "$out" | tail -n 5)"
  else
    say "$(printf '%s\n' "$out" | grep -v -E '^(Encoder |Decoder )?epoch ' | tail -n 3)"
  fi
}

say "gpu.sh $(date -u '+%Y-%m-%d %H:%M') on $(hostname), $threads cores, device $device, libtorch from ${lib:-the path it was built with}"
if command -v nvidia-smi > /dev/null; then say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"; fi
step "1. VAE, default minibatch" vae "$cells" 2000 "$epochs" "$threads" "$device" f32 128
for bs in 1024 4096; do
  step "2. VAE, minibatch $bs, lr scaled" vae "$cells" 2000 "$epochs" "$threads" "$device" f32 "$bs"
done
step "3. VAE, 10x the cells, minibatch 1024" vae "$((cells * 10))" 2000 2 "$threads" "$device" f32 1024
step "4. multimodal" multimodal "$cells" 2000 10000 2 "$threads" "$device"
step "5. distiller, both phases" distill "$cells" 2000 "$epochs" "$threads" "$device"
port=$((29500 + RANDOM % 1000))
WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
  step "6. VAE as rank 0 of a data-parallel group of 1" vae "$cells" 2000 "$epochs" "$threads" "$device" f32 128
say ""
say "gpu.sh: $failed step(s) failed"
exit $((failed > 0))
