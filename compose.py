"""Compose adapters in rank space, or export one as a PEFT LoRA for transformers.

    python compose.py a.safetensors b.safetensors -o ab.safetensors
    python compose.py a.safetensors b.safetensors --weights 1,0.5 --bias-weight 1 -o ab.safetensors
    python compose.py seg*.safetensors --weights "1/sqrt(n)" -o all.safetensors   # many segments, each scaled
    python compose.py ab.safetensors --to-peft ab-peft/        # adapter_config.json + adapter_model.safetensors
    python compose.py ab.safetensors --to-peft ab-peft/ --model my-base/   # an adapter of a local base model

Spec: ../shared/design/method.md §7 (the authors' combine_lora). Stacking along the rank axis,
A = [w_1 A_1; ...; w_n A_n; b A_bias] and B = [B_1; ...; B_n; B_bias], gives
dW = alpha (sum_c w_c B_c^T A_c + b B_bias^T A_bias): the segments' updates add and the static part counts once.
Only adapters of the same base model and hypernetwork compose (the static part must be the same one). This is
zero-shot: training only ever saw one chunk.

The PEFT export loads onto transformers' SmolVLMForConditionalGeneration with `PeftModel.from_pretrained`
(the scale convention is explained in adapter.export_peft; docs/peft.md shows it in use, and vLLM serving). Its
`base_model_name_or_path` is the HF id of a released size, checkpoints/tiny/base for the shipped toy base, or the
folder given with --model (checked to hold the adapter's base model).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from adapter import (SPREAD, AdapterError, ArgumentParser, check_output, concat_adapters, export_peft, finite,
                     folder_facts, load_adapter, peft_base, run_cli, save_adapter, spread_weights)


def parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:   # not numbers: a rule, 1/n or 1/sqrt(n), gives every adapter the same multiplier
        if text in SPREAD:
            return spread_weights(text, n)
        raise SystemExit(f"error: --weights wants comma-separated numbers, 1/n or 1/sqrt(n), got {text!r}") from None
    if len(weights) != n:
        raise SystemExit(f"error: --weights has {len(weights)} values for {n} adapters")
    if not all(map(math.isfinite, weights)):
        raise SystemExit(f"error: --weights must be finite numbers, got {text!r}")
    return weights


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", help="adapter files made by internalize.py (or compose.py)")
    p.add_argument("-o", "--out", default=None, help="composed adapter file")
    p.add_argument("--force", action="store_true", help="overwrite existing files that are not adapters")
    p.add_argument("--weights", default=None, help="one multiplier per adapter, e.g. 1,0.5, or a rule for all: 1/n or 1/sqrt(n) "
                   "(default all 1; the toy world composes 4+ segments best with 1/sqrt(n))")
    p.add_argument("--bias-weight", type=finite, default=1.0,
                   help="multiplier of the static (video-independent) part")
    p.add_argument("--to-peft", default=None, metavar="DIR", help="also write the result as a PEFT LoRA folder")
    p.add_argument("--model", default=None, metavar="BASE_DIR",
                   help="with --to-peft: the base model's folder, written as PEFT's base_model_name_or_path")
    args = p.parse_args(argv)
    if args.out is None and args.to_peft is None:
        p.error("nothing to write: give -o FILE and/or --to-peft DIR")
    return args


def main(argv=None):
    args = parse_args(argv)
    weights = parse_weights(args.weights, len(args.adapters))
    peft_files = []
    if args.to_peft:   # before any work: a folder (or a name for one), never a file, no input overwritten
        folder = Path(args.to_peft)
        if folder.exists() and not folder.is_dir():
            raise SystemExit(f"error: --to-peft {folder} is a file; give a folder")
        peft_files = [folder / "adapter_model.safetensors", folder / "adapter_config.json"]
    for out in ([args.out] if args.out else []) + peft_files:
        check_output(out, args.adapters, args.force)
    adapters = [load_adapter(p) for p in args.adapters]
    out = adapters[0]
    if len(adapters) > 1 or weights or args.bias_weight != 1.0:
        out = concat_adapters(adapters, weights, args.bias_weight, meta={"created_by": "compose.py"})
    m = out.meta
    if args.to_peft:
        peft_base(m, args.model)   # a local base's adapter needs its folder named: say so before writing anything
    if args.to_peft and args.model:   # the folder PEFT will name must hold the model the adapter was made on
        facts = folder_facts(args.model)
        if any(facts[k] != m[k] for k in facts):
            raise AdapterError(f"--model {args.model} is not the base model the adapter was made on "
                               f"({m['base_model']})")
    if args.out:
        path = save_adapter(args.out, out, out.ab[next(iter(out.ab))][0].dtype)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {len(m['segments'])} segment(s), "
              f"rank {m['generated_rank']} generated + {m['rank']} static")
    if args.to_peft:
        folder = export_peft(out, args.to_peft, args.model)
        print(f"wrote PEFT LoRA {folder} (r = {m['generated_rank'] + m['rank']}, alpha folded into lora_B)")


if __name__ == "__main__":
    run_cli(main)
