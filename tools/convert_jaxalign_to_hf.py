#!/usr/bin/env python
"""Export a jaxalign model checkpoint as a Hugging Face model directory (safetensors).

    python tools/convert_jaxalign_to_hf.py --ckpt CKPT --out DIR [--dtype bfloat16]
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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
