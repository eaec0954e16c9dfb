"""Activation monitors (after "Investigating task-specific prompts and sparse autoencoders for activation
monitoring", arXiv 2504.20271): detect a property of a text (a toxic persona, a sarcastic persona, incorrect
advice) from a model's answers to a question about it or from its residual-stream activations.

- :mod:`.prompts`: the one layout in which a monitor shows a text and asks a Yes/No question about it
- :mod:`.data`: labelled monitoring datasets, generated from the persona world or read from a user's JSONL
- :mod:`.features`: per-text features computed once per dataset and cached (activations, SAE latents, zero-shot)
- :mod:`.methods`: the monitors (zero-shot, raw and prompted probes, SAE probes, stacking, a persona latent)
- :mod:`.protocol`: splits, training sizes, AUROC with bootstrap CIs, the results table and its figures
- :mod:`.run`: one task end to end (what the workflow calls)

This package imports nothing heavy at import time: the world generator uses :mod:`.prompts`.
"""
