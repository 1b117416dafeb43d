#!/usr/bin/env python3
"""Regenerates tests/mergekit/reference/: what mergekit 0.1.5 outputs for every case in
tests/mergekit/cases.json, on checkpoints built by `fusekit make-model` (deterministic, so the
Rust test rebuilds the very same inputs). Run from the repo root:

    scripts/mergekit-venv.sh            # once, ~3 minutes
    cargo build --release -p fusekit-cli
    .venv-mergekit/bin/python scripts/mergekit-reference.py [CASE ...]

Each case stores the merged tensors (one safetensors file, shards joined) and the output
config.json. CI compares against these files without installing mergekit.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUSEKIT = os.path.join(ROOT, "target", "release", "fusekit")
CASES = os.path.join(ROOT, "tests", "mergekit", "cases.json")
OUT = os.path.join(ROOT, "tests", "mergekit", "reference")
VENV_BIN = os.path.dirname(sys.executable)


def make_models(case, workdir):
    for name, spec in case["models"].items():
        if "lora_of" in spec:
            make_lora(spec, os.path.join(workdir, spec["lora_of"]), os.path.join(workdir, name))
            continue
        if "extract_of" in spec:
            # An adapter fusekit extracts, for PEFT (inside mergekit) to load.
            subprocess.run([FUSEKIT, "extract-lora", "--model", os.path.join(workdir, spec["extract_of"]),
                            "--base", os.path.join(workdir, spec["from"]), os.path.join(workdir, name),
                            "--rank", str(spec["rank"])], check=True)
            continue
        cmd = [FUSEKIT, "make-model", os.path.join(workdir, name), "--family", case["family"],
               "--dtype", case["dtype"], "--seed", str(spec["seed"])]
        if "finetune" in spec:
            seed, scale = spec["finetune"]
            cmd += ["--finetune-seed", str(seed), "--finetune-scale", str(scale)]
        if "tokenizer" in spec:
            cmd += ["--tokenizer-variant", str(spec["tokenizer"])]
        subprocess.run(cmd, check=True)


def make_lora(spec, model, out):
    """A PEFT adapter by `fusekit make-lora` (the Rust test calls the same fixture code)."""
    pairs = lambda m: ",".join(f"{k}={v}" for k, v in m.items())
    subprocess.run([FUSEKIT, "make-lora", "--model", model, out, "--rank", str(spec["rank"]),
                    "--alpha", str(spec["alpha"]), "--seed", str(spec["seed"]),
                    "--targets", ",".join(spec["targets"]),
                    "--rank-pattern", pairs(spec.get("rank_pattern", {})),
                    "--alpha-pattern", pairs(spec.get("alpha_pattern", {}))], check=True)


def run_case(case):
    with tempfile.TemporaryDirectory() as workdir:
        make_models(case, workdir)
        with open(os.path.join(workdir, "config.yml"), "w") as f:
            f.write(case["config"])
        out = os.path.join(workdir, "out")
        env = dict(os.environ, PYTHONHASHSEED="0")
        subprocess.run([os.path.join(VENV_BIN, "mergekit-yaml"), "config.yml", out, "--random-seed", "0",
                        "--lora-merge-cache", os.path.join(workdir, "lora-cache")],
                       check=True, cwd=workdir, env=env)
        tensors = {}
        for file in sorted(os.listdir(out)):
            if file.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(out, file)))
        os.makedirs(OUT, exist_ok=True)
        save_file(tensors, os.path.join(OUT, case["name"] + ".safetensors"), metadata={"mergekit": "0.1.5"})
        shutil.copy(os.path.join(out, "config.json"), os.path.join(OUT, case["name"] + ".config.json"))
        if "tokenizer" in case["config"]:
            # New token ids follow a hash map's order in mergekit: the test maps rows by token.
            with open(os.path.join(out, "tokenizer.json")) as f:
                tok = json.load(f)
            vocab = dict(tok["model"]["vocab"])
            vocab.update({t["content"]: t["id"] for t in tok["added_tokens"]})
            with open(os.path.join(OUT, case["name"] + ".vocab.json"), "w") as f:
                json.dump(vocab, f, sort_keys=True)
        print(f"{case['name']}: {len(tensors)} tensors")


def main():
    with open(CASES) as f:
        cases = json.load(f)["cases"]
    wanted = set(sys.argv[1:])
    for case in cases:
        if not wanted or case["name"] in wanted:
            run_case(case)


if __name__ == "__main__":
    main()
