"""Memory of the PPO reference: LoRA with the adapter disabled vs a separate frozen copy.

Each variant runs in a fresh subprocess that loads the bundled model, builds policy + reference,
runs one reference forward, and reports its peak resident memory. Prints both and their ratio.

    .venv/bin/python bench/reference_memory.py
"""

import json
import subprocess
import sys

CHILD = r"""
import copy, json, resource, sys, torch
from hhh.models import LoraSettings, attach_lora, load_causal_lm
variant = sys.argv[1]
base = load_causal_lm("bundled:smollm2-135m-instruct")
ids = torch.randint(10, 1000, (4, 64))
if variant == "copy":
    reference = copy.deepcopy(base)  # the usual way: a second, frozen model
    policy = attach_lora(base, LoraSettings())
    with torch.no_grad():
        reference(input_ids=ids, logits_to_keep=1)
else:
    policy = attach_lora(base, LoraSettings())
    with torch.no_grad(), policy.disable_adapter():  # hhh: reference = same weights, adapter off
        policy(input_ids=ids, logits_to_keep=1)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(variant: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


if __name__ == "__main__":
    shared, copied = peak("shared"), peak("copy")
    print(f"reference = adapter disabled : {shared:8.0f} MB peak")
    print(f"reference = separate copy    : {copied:8.0f} MB peak")
    print(f"saving                       : {copied - shared:8.0f} MB ({shared / copied:.2f}x the memory)")
