"""Adapters that put lomo-run inside other trainers (`integrations.transformers.LomoRunTrainer`).

Each imports its framework on first use; `import lomo_runtime` never does."""
