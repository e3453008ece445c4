#!/usr/bin/env python
"""Convert a Hugging Face model directory (safetensors) into a jaxalign model checkpoint.

    python tools/convert_hf_to_jaxalign.py --hf-dir DIR --out CKPT [--param-dtype float32]
"""

from __future__ import annotations

import argparse
import sys

from jaxalign.errors import JaxalignError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory: config.json + *.safetensors")
    parser.add_argument("--out", required=True, help="new (or empty) directory for the jaxalign checkpoint")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the parameters are stored in (default: float32)")
    args = parser.parse_args(argv)
    try:
        # Imported here so --help and argument errors answer without starting JAX.
        from jaxalign.checkpoint import model_io
        from jaxalign.runtime.sharding import make_mesh

        mesh = make_mesh({"fsdp": -1})
        model = model_io.load_model(args.hf_dir, mesh, param_dtype=args.param_dtype)
        tokenizer = model_io.model_tokenizer(args.hf_dir)
        src_dtype = model_io.source_dtype(args.hf_dir)
        out = model_io.save_model_checkpoint(model, args.out, tokenizer=tokenizer, source_dtype=src_dtype)
    except JaxalignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = model.cfg
    print(f"wrote {out}: {cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.num_params:,} params "
          f"({args.param_dtype}; source dtype {src_dtype}), tokenizer: {'yes' if tokenizer else 'none found'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
