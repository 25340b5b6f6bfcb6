"""The acceptance check on saved MTP heads, without training: e.g. K heads drafting more than K tokens
by reusing the modules cyclically (the looped extension with no further training).

    python -m recipes.mtp_d.accept <run>/mtp_heads --drafts 4 [--model <folder or zoo name>] [--prompts 100]

The model defaults to the one recorded in the heads' mtp_heads.json. Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from recipes.mtp_d import AcceptConfig, accept_check
from recipes.mtp_d.heads import MTPModel, load_heads, read_heads_config
from runner.errors import ConfigError
from runner.models import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.mtp_d.accept", description=__doc__.splitlines()[0])
    parser.add_argument("heads", help="an mtp_heads folder (mtp_heads.safetensors, mtp_heads.json)")
    parser.add_argument("--model", help="the model the heads belong to (default: the one their json records)")
    parser.add_argument("--drafts", type=int, default=None, help="drafts per main forward (default: one per head)")
    parser.add_argument("--prompts", type=int, default=AcceptConfig.prompts)
    parser.add_argument("--max-new-tokens", type=int, default=AcceptConfig.max_new_tokens)
    parser.add_argument("--no-greedy-check", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.drafts is not None and args.drafts < 1 or args.prompts < 1:
            raise ConfigError("--drafts and --prompts must be >= 1")
        model = args.model or read_heads_config(args.heads, key="heads")["trained"].get("model")
        if not model:
            raise ConfigError("--model: the heads' json records no model; give the model they belong to")
        lm, tokenizer = load_model({"path": model, "dtype": "float32"})
        mtp = MTPModel(lm, load_heads(args.heads, lm, key="heads")).eval()
        report = accept_check(mtp, tokenizer, AcceptConfig(prompts=args.prompts, drafts=args.drafts,
                                                           max_new_tokens=args.max_new_tokens,
                                                           check_greedy=not args.no_greedy_check))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"heads": args.heads, "model": model, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
