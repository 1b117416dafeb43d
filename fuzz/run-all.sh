#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 1800), one after the other, on stable Rust
# without a sanitizer (`-s none`, see ../README.md) but with debug assertions, so integer
# overflows panic. The run starts from fuzz/seeds/TARGET (kept in git) and adds what reaches new
# code to fuzz/corpus/TARGET (not kept); crashes are written to fuzz/artifacts/TARGET. Logs, with
# the execution counts, go to fuzz/logs/. Afterwards `./keep-corpus.sh` minimizes the corpus into
# fuzz/seeds; a crash reproducer goes to fuzz/regressions/TARGET once fixed.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-1800}
mkdir -p logs
for target in safetensors_header index config; do
    mkdir -p "corpus/$target"
    cargo fuzz run -s none -a -O "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -max_len=4096 \
        -print_final_stats=1 >"logs/$target.log" 2>&1 || echo "$target: failed, see logs/$target.log"
done
