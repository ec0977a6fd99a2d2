"""``smim-export``: a pre-training checkpoint (any ZeRO stage) -> a plain timm ViT in safetensors, plus its kwargs.

    smim-export runs/beit_proxy/checkpoints/step_00150000 vit_b_smim.safetensors
    smim-export runs/beit_proxy vit_b_smim.safetensors          # the run's latest checkpoint

The result loads with ``timm.create_model(name, pretrained=False, **kwargs)`` and ``load_state_dict(strict=True)``;
fine-tuning and every downstream use start from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from smim_dist.config import ConfigError
from smim_dist.engine.checkpoint import consolidated_state_dict, resolve_checkpoint
from smim_dist.models.timm_export import create_timm_encoder, encoder_state_dict, timm_kwargs, timm_model_name

def export(checkpoint: Path, out: Path) -> dict:
    checkpoint, cfg = resolve_checkpoint(checkpoint)
    encoder = encoder_state_dict(consolidated_state_dict(checkpoint))
    create_timm_encoder(cfg.model, encoder)
    meta = {"timm_model": timm_model_name(cfg.model), "timm_kwargs": timm_kwargs(cfg.model),
            "source_checkpoint": str(checkpoint.resolve()), "config_hash": cfg.hash(), "mode": cfg.model.mode,
            "target": cfg.target.kind}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in encoder.items()}, str(out),
              metadata={"timm_model": meta["timm_model"], "timm_kwargs": json.dumps(meta["timm_kwargs"])})
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smim-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a run directory or a run's checkpoints/<tag> directory")
    parser.add_argument("out", type=Path, help="output .safetensors file (kwargs go to the same name with .json)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".safetensors":
        parser.error(f"output {args.out} must end in .safetensors")
    try:
        meta = export(args.checkpoint, args.out)
    except (FileNotFoundError, ConfigError) as err:
        print(f"smim-export: {err}", file=sys.stderr)
        return 2
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["timm_kwargs"].items())
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}\n"
          f"load it with:\n  model = timm.create_model({meta['timm_model']!r}, pretrained=False, {kwargs})\n"
          f"  model.load_state_dict(safetensors.torch.load_file({str(args.out)!r}), strict=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
