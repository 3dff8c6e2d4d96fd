"""Build the tiny offline demo: a random 2-layer Llama with a character tokenizer and word data.

    python tools/make_tiny_demo.py            # writes .cache/tiny-demo/{model,data.jsonl}
    lomo-run train --config configs/tiny-demo.yaml
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lomo_runtime.synthetic import llama_config, save_random_model, write_word_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/tiny-demo")
    args = parser.parse_args()
    out = Path(args.out)
    if not (out / "model" / "config.json").exists():
        # 4 layers x 64 wide, vocab 128: about 0.1M parameters, trains in seconds on 2 cores.
        save_random_model(out / "model", llama_config(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128,
                                                      vocab=128, tied=True, max_positions=256), max_shard_size="100KB")
    write_word_data(out / "data.jsonl", lines=400)
    print(f"tiny demo ready in {out}")


if __name__ == "__main__":
    main()
