"""Convert a THUDM ChatGLM folder into a native checkpoint that plain transformers loads.

    python jobs/convert.py --base_model THUDM/chatglm2-6b --output_dir models/chatglm2-6b-native

ChatGLM2/3 become transformers' own GlmForCausalLM; ChatGLM-6B becomes our ChatGLM1ForCausalLM
(load it after `import common.models`). No remote code runs at any point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.errors import UserError, run_cli
from common.models.convert import convert_to_native
from common.models.loader import open_model_folder

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__.splitlines()[0])
    ap.add_argument("--base_model", required=True, help="THUDM folder or hub id (THUDM/chatglm2-6b, ...)")
    ap.add_argument("--output_dir", required=True, help="where the native checkpoint goes")
    ap.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights dtype (auto: keep the source's)")
    ap.add_argument("--local_files_only", default="false", help="never download (true/false)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    args = ap.parse_args(argv)

    import torch

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"--output_dir {out} exists and is not empty; pass --overwrite to replace it.")
    info = open_model_folder(args.base_model, local_files_only=args.local_files_only.lower() in ("1", "true", "yes"))
    if info.layout == "native":
        raise UserError(f"{args.base_model} is already in a native layout ({info.family}); load it as it is.")
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    convert_to_native(info, out, dtype=dtype)
    print(f"wrote {out} ({info.family}, template {info.template}); load it with AutoModelForCausalLM"
          + (" after `import common.models`" if info.family == "chatglm" else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
