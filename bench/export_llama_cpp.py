"""An expert exported as a GGUF LoRA changes llama.cpp's log-probs as it changes lorashelf's.

    python bench/export_llama_cpp.py LIB --method expert:NAME [--json out.json]

Exports ``--method`` from library LIB (on the embedded SmolLM2) with
``lorashelf.export.export_adapter``, loads the base GGUF with and without the LoRA in
llama.cpp (llama-cpp-python), and prints the agreement of the per-token log-prob shifts
with lorashelf's float32 forward of the dequantised model, plus both runtimes' greedy
answer to a held-out prompt. Two bases: the embedded Q4_1 GGUF as shipped, and the same
file dequantised to float32 (no activation quantisation: the exact check; see
lorashelf/export/verify.py). Needs ``pip install llama-cpp-python``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import home

from lorashelf.export import export_adapter
from lorashelf.export.verify import dequantised_gguf, verify_gguf
from lorashelf.library import Library
from lorashelf.models import load_base
from lorashelf.models.known import KNOWN
from lorashelf.models.load import _locate_gguf

PROMPTS = [
    "Q: What is 27 plus 59?\nA:",
    "Q: What is 14 plus 83?\nA:",
    'Q: Is the following sentence plausible? "Joao Moutinho caught the screen pass."\nA:',
    "The capital of France is",
]
HELD_OUT = "Q: What is 46 plus 38?\nA:"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library", type=Path)
    p.add_argument("--method", required=True)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    lib = Library.open(args.library)
    base = load_base("smollm2-135m", home=home(), dtype=torch.float32)
    q4 = str(_locate_gguf(KNOWN["smollm2-135m"]))
    result = {"method": args.method}
    with tempfile.TemporaryDirectory() as tmp:
        done = export_adapter(lib, args.method, "gguf", Path(tmp) / "lora.gguf")
        result |= {"rank": done.rank, "modules": done.modules}
        for label, gguf in (("q4_1", q4), ("f32", dequantised_gguf(q4, Path(tmp) / "f32.gguf"))):
            agreement = verify_gguf(
                gguf, str(done.path), base.model, base.tokenizer, done.resolved.factors,
                PROMPTS, HELD_OUT,
            )  # fmt: skip
            result[label] = agreement.to_dict()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
