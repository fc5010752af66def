"""billa: the BiLLa recipe (bilingual Chinese-English LLaMA) as a Hydra + PyTorch Lightning framework."""

__version__ = "0.1.0"
