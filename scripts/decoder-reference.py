#!/usr/bin/env python3
"""Reference logits of the fixture decoders (llama, mistral, qwen2; `fusekit make-model`, tiny,
float32, seed 1) from Hugging Face `transformers`, for crates/fusekit-nn/tests/decoders.rs.

Run after `cargo build --release`, with a Python that has torch and transformers
(scripts/mergekit-venv.sh makes one):

    .venv-mergekit/bin/python scripts/decoder-reference.py
"""
import pathlib
import subprocess
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

root = pathlib.Path(__file__).parent.parent
fusekit = root / "target/release/fusekit"
# The second sequence is right-padded: its padding must not change the other positions.
ids = torch.tensor([[1, 5, 9, 20, 33, 2, 7, 60], [1, 4, 4, 8, 0, 0, 0, 0]])
mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])
out = {"input_ids": ids, "attention_mask": mask}
with tempfile.TemporaryDirectory() as tmp:
    for family in ["llama", "mistral", "qwen2"]:
        model_dir = pathlib.Path(tmp) / family
        subprocess.run(
            [fusekit, "make-model", "--family", family, "--dtype", "float32", "--seed", "1", model_dir],
            check=True,
            capture_output=True,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
        with torch.no_grad():
            out[f"{family}.logits"] = model(input_ids=ids, attention_mask=mask).logits.contiguous()
target = root / "crates/fusekit-nn/tests/data/decoder_reference.safetensors"
save_file({k: v.contiguous() for k, v in out.items()}, str(target))
print(f"wrote {target}")
