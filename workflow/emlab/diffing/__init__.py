"""Model diffing: which SAE latents does fine-tuning move, and what are they?

- :mod:`.records`: the texts activations are cached on (corpus samples, a model's own sampled answers,
  a fine-tuning set), as activation-cache records;
- :mod:`.ranking`: per-model mean latent activations, per-fine-tune changes, rankings averaged over groups
  of fine-tunes (and the unsupervised variant on the fine-tuning data itself);
- :mod:`.interpret`: top-activating snippets, logit lens, and purity against known labels.
"""
