#!/usr/bin/env python
"""Export a jaxalign model checkpoint as a Hugging Face model directory (safetensors).

    python tools/convert_jaxalign_to_hf.py --ckpt CKPT --out DIR [--dtype bfloat16]
    python tools/convert_jaxalign_to_hf.py --ckpt LORA_RUN --out DIR --peft [--base-model HF_DIR]

A LoRA run exports merged (the base with its adapters folded in) unless --peft, which writes its
adapters as a PEFT directory (adapter_config.json + adapter_model.safetensors) for
`peft.PeftModel.from_pretrained` on the base in HF format.
"""

from __future__ import annotations

import argparse
import sys

from jaxalign.errors import JaxalignError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="jaxalign model checkpoint (or HF directory)")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the HF model")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="tensor dtype to write (default: the dtype the model was converted from)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (default 5)")
    parser.add_argument("--peft", action="store_true", help="a LoRA run: write its adapters as a PEFT directory")
    parser.add_argument("--base-model", default="", help="with --peft: the adapter config's base_model_name_or_path "
                        "(default: the base the run trained on; PEFT needs it in HF format)")
    args = parser.parse_args(argv)
    if args.peft:
        return _export_peft(args)
    try:
        from jaxalign.checkpoint import model_io
        from jaxalign.export.hf import save_hf
        from jaxalign.runtime.sharding import make_mesh

        mesh = make_mesh({"fsdp": -1})
        model = model_io.load_model(args.ckpt, mesh)
        dtype = args.dtype or model_io.source_dtype(args.ckpt) or "float32"
        written = save_hf(model, model.cfg, args.out, tokenizer=model_io.model_tokenizer(args.ckpt),
                                  dtype=dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except JaxalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({dtype}): {', '.join(p.name for p in written)}")
    return 0


def _export_peft(args) -> int:
    try:
        import jax

        from jaxalign.checkpoint import lora_io, model_io
        from jaxalign.models import peft
        from jaxalign.runtime import paths
        from jaxalign.runtime.sharding import make_mesh

        out = paths.as_path(args.out)
        if out.exists() and any(out.iterdir()):
            raise JaxalignError(f"output directory {out} is not empty; choose a new or empty directory")
        spec, adapters, base = lora_io.load_adapters(args.ckpt, make_mesh({"fsdp": -1}))
        base = args.base_model or base
        peft.write_peft_dir(out, jax.device_get(adapters), model_io.load_model_config(args.ckpt), spec, str(base))
        tokenizer = model_io.model_tokenizer(args.ckpt)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    except JaxalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    note = "" if model_io.detect_model_format(base) == "hf" else (
        f" (the base {base} is not an HF directory: export it with this tool and pass --base-model)")
    print(f"wrote {args.out}: rank-{spec.rank} adapters on {', '.join(spec.peft_modules())} of {base}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
