"""Checkpoint format: read and validate HF safetensors checkpoints, map tensors to units, export.

Knows nothing of devices or steps. Everything read from a user's checkpoint
is validated before use, and the checkpoint is never written to.
"""
from __future__ import annotations

from .architectures import ARCHITECTURES, Architecture, ModelDims, architecture_for, supported_model_types
from .checkpoint import Checkpoint, TensorLocation, UnitSpec, load_config
from .export import export_hf
from .safetensors_file import DTYPES, TensorEntry, read_header, read_tensor_data

__all__ = [
    "ARCHITECTURES", "Architecture", "ModelDims", "architecture_for", "supported_model_types",
    "Checkpoint", "TensorLocation", "UnitSpec", "load_config",
    "export_hf",
    "DTYPES", "TensorEntry", "read_header", "read_tensor_data",
]
