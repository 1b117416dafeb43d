#!/usr/bin/env bash
# Minimizes each target's corpus (fuzz/corpus plus fuzz/seeds) to the inputs that keep its
# coverage, and stores the result in fuzz/seeds, which the test suite replays.
set -euo pipefail
cd "$(dirname "$0")"
for target in safetensors_header index config; do
    mkdir -p "corpus/$target" "seeds/$target"
    cp -n "seeds/$target"/* "corpus/$target"/ 2>/dev/null || true
    cargo fuzz cmin -s none -a -O "$target" "corpus/$target"
    rm -f "seeds/$target"/*
    cp "corpus/$target"/* "seeds/$target"/
done
du -sh seeds
