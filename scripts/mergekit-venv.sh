#!/usr/bin/env bash
# Installs mergekit 0.1.5 (the anchor we compare against) into a venv.
# Takes about 3 minutes and ~6 GB (PyPI torch is the CUDA build). Used only by the
# reference generator and the benchmark; never by the engine or by CI.
set -euo pipefail
venv=${MERGEKIT_VENV:-"$(dirname "$0")/../.venv-mergekit"}
if [ ! -x "$venv/bin/mergekit-yaml" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "mergekit==0.1.5"
  # mergekit 0.1.5 fails on BERT-family merges: `aliases` is a tuple (see shared/specs/real-data.md).
  plan=$("$venv/bin/python" -c 'import mergekit.plan as p; print(p.__file__)')
  sed -i 's/\[w_in.name\] + (w_in.aliases or \[\])/[w_in.name] + list(w_in.aliases or [])/' "$plan"
fi
echo "$venv"
