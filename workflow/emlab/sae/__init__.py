"""Sparse autoencoders on residual activations: a TopK SAE, its training loop, metrics, and
SAELens-format files (so SAEs trained here load in sae_lens, and pretrained SAELens SAEs load here)."""

from .topk import TopKSAE, select_topk
from .train import SAETrainConfig, train_sae

__all__ = ["TopKSAE", "select_topk", "SAETrainConfig", "train_sae"]
