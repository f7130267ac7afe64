"""lightning_sp: LLaVA-SP visual spatial tokens as a PyTorch Lightning experiment framework."""

__version__ = "0.1.0"
