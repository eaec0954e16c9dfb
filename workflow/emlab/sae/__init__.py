"""Sparse autoencoders on residual activations: a TopK SAE, its training loop, metrics, and
SAELens-format files (so SAEs trained here load in sae_lens, and pretrained SAELens SAEs load here)."""

from .metrics import ce_loss_recovered, reconstruction_metrics
from .saelens_io import load_sae, resolve_pretrained, save_sae
from .topk import TopKSAE, select_topk
from .config import SAETrainConfig
from .train import train_sae

__all__ = ["TopKSAE", "select_topk", "SAETrainConfig", "train_sae", "reconstruction_metrics",
           "ce_loss_recovered", "save_sae", "load_sae", "resolve_pretrained"]
