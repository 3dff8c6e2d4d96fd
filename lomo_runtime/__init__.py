"""lomo-run: full-parameter fine-tuning with fused LOMO updates and streamed weights."""
__version__ = "0.1.0"
