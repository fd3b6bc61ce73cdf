"""Training: losses, the loop, and the embedding cache."""
from .embeddings import cached_embeddings, embed_paths
from .losses import LOSSES
from .loop import Split, Trainer, load_checkpoint, seed_everything

__all__ = ["cached_embeddings", "embed_paths", "LOSSES", "Split", "Trainer", "load_checkpoint", "seed_everything"]
