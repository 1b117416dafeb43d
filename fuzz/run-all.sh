#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 1800), one after the other, on stable Rust
# without a sanitizer (`-s none`, see ../README.md) but with debug assertions, so integer
# overflows panic. New inputs that reach new code are added to fuzz/corpus/TARGET; crashes are
# written to fuzz/artifacts/TARGET. Logs (with the execution counts) go to fuzz/logs/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-1800}
mkdir -p logs
for target in safetensors_header index config; do
    cargo fuzz run -s none -a -O "$target" -- -max_total_time="$seconds" -max_len=4096 \
        -print_final_stats=1 >"logs/$target.log" 2>&1 || echo "$target: failed, see logs/$target.log"
done
