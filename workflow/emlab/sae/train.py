"""Training a TopK SAE on residual activations, after Gao et al. (2024) and EleutherAI sparsify.

The recipe:

- ``b_dec`` starts at the geometric median of a sample of the activations; decoder rows are
  random unit vectors and the encoder is their transpose;
- loss = FVU + ``auxk_coef`` * AuxK, where AuxK asks the top ``k_aux`` *dead* latents (no
  firing for ``dead_tokens_threshold`` tokens) to reconstruct the residual error; both terms
  are normalised by the batch's total variance;
- decoder rows stay unit-norm: the gradient component parallel to each row is removed before
  the Adam step and the rows are renormalised after it;
- each step's gradient is divided by its global norm before the Adam step (``normalize_grad``).
  The raw gradient's norm falls about tenfold early in a run, and Adam's steps on it fall behind
  the set learning rate; on the organism's activations the normalised steps reach 9-17% lower
  FVU at the same token budget (a shorter Adam second-moment memory recovers only part of
  that). SAELens trains on the same unit-norm gradients: it clips at norm 1, and its loss, a sum
  over d_in, keeps every step's norm above 1;
- Adam with lr = ``lr`` / sqrt(n_latents / 2^14), linear warm-up and linear decay to zero;
- optionally the inputs are scaled so that their mean squared norm is d_in; the scale is folded
  into the weights at the end, so the returned SAE takes raw activations.

Gradients are written by hand (:func:`compute_grads`, checked against autograd in the tests)
because only k of d_sae latents are active per token: autograd through a dense
``[tokens, d_sae]`` code would spend as much on the backward pass as on the encoder matmul,
whereas the true gradient touches k encoder and decoder rows per token. The work is done in
row chunks so that the ``[rows, d_sae]`` pre-activations stay in the CPU cache. On a GPU the
whole step (gradients, Adam, renormalisation, the dead-latent count) is captured once as a CUDA
graph and replayed (:class:`GraphedSteps`), the encoder matmul runs in TF32 (``tf32``), and no float
is summed with atomics, so that a seed gives the same SAE on a GPU too.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .config import SAEConfigError, SAETrainConfig
from .cuda_graphs import GraphedSteps
from .grads import compute_grads, normalize_grad_, remove_parallel_decoder_grad
from .init import init_sae
from .shards import Shards
from .topk import TopKSAE

__all__ = ["SAEConfigError", "SAETrainConfig", "train_sae", "lr_factor", "LOG_COLUMNS"]


@contextlib.contextmanager
def _tf32_matmuls(device: torch.device, enabled: bool) -> Iterator[None]:
    """fp32 matmuls on a CUDA device in TensorFloat-32 for the duration; the previous setting is restored.

    The encoder matmul is most of a GPU step for wide models; TF32 runs it on the tensor cores (8-10x the
    fp32 rate on Ampere and Hopper) with a 10-bit mantissa, ample for choosing the top k of the
    pre-activations (sparsify trains in bf16). torch only has a process-wide switch, hence the restore.
    """
    if not (enabled and device.type == "cuda"):
        yield
        return
    cublas = torch.backends.cuda.matmul
    # the fp32_precision API (torch >= 2.9); torch refuses reads that mix it with allow_tf32 once set
    attr, value = ("fp32_precision", "tf32") if hasattr(cublas, "fp32_precision") else ("allow_tf32", True)
    saved = getattr(cublas, attr)
    setattr(cublas, attr, value)
    try:
        yield
    finally:
        setattr(cublas, attr, saved)


def lr_factor(step: int, steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up from lr/warmup to lr, constant, then linear decay to lr/decay at the last step."""
    warm = max(1, round(warmup_frac * steps))
    decay = round(decay_frac * steps)
    if step < warm:
        return (step + 1) / warm
    if decay and step >= steps - decay:
        return (steps - step) / decay
    return 1.0


# --- the training loop --------------------------------------------------------------------

LOG_COLUMNS = ("step", "tokens", "lr", "loss", "fvu", "aux_loss", "l0", "dead_frac")
LOG_EVERY = 50  # steps whose log rows are read back from the device together


def train_sae(data: Tensor | Sequence[Tensor] | Iterable[Tensor], cfg: SAETrainConfig, *,
              n_tokens: int | None = None, log_path: str | os.PathLike | None = None,
              progress: bool = True, meta: Mapping[str, Any] | None = None,
              checkpoint_dir: str | os.PathLike | None = None, checkpoint_steps: int = 0) -> TopKSAE:
    """Train a TopK SAE on activations ``[tokens, d_in]`` (a tensor or shards of them).

    ``n_tokens`` is the size of a streamed source (only needed for iterables without a length,
    when ``cfg.train_tokens`` is not set). ``log_path`` gets one CSV row per step
    (:data:`LOG_COLUMNS`). The returned SAE is on the CPU, takes raw activations, and carries
    ``meta`` plus the training settings in ``sae.meta``. With ``checkpoint_dir`` and ``checkpoint_steps``
    the training state is saved every that many steps and a rerun resumes from it to the same SAE
    (:mod:`emlab.checkpoints`; the caller removes the folder once the SAE is saved).
    """
    from tqdm.auto import tqdm

    from emlab import checkpoints
    from emlab.models import pick_device

    cfg.validate()
    shards = Shards(data, n_tokens)
    device = torch.device(pick_device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)

    first = shards.first()
    d_in = first.shape[1]
    n_latents = cfg.latents_for(d_in)
    sample = first.index_select(0, torch.randperm(first.shape[0], generator=generator)[:cfg.init_sample_tokens]).float()
    scale = 1.0
    if cfg.normalize_activations:
        mean_sq = sample.pow(2).sum(1).mean().item()
        if not mean_sq > 0:
            raise ValueError("activations are all zero (or not finite): cannot normalise them")
        scale = math.sqrt(d_in / mean_sq)
    sae = init_sae((sample * scale).to(device), n_latents, cfg.k, generator)

    if cfg.train_tokens is not None:
        total = cfg.train_tokens
    elif shards.n_tokens is not None:
        total = int(cfg.epochs * shards.n_tokens)
    else:
        raise SAEConfigError("sae.train.train_tokens must be set (or n_tokens passed) for activation shards "
                             "streamed from an iterator of unknown length")
    steps = total // cfg.batch_tokens
    if steps < 1:
        raise SAEConfigError(f"sae.train: {total} training tokens make no batch of batch_tokens={cfg.batch_tokens}")

    lr = cfg.lr_for(n_latents)
    k_aux = cfg.k_aux_for(d_in)
    on_gpu = device.type == "cuda"
    graphs = cfg.cuda_graphs and on_gpu
    # Adam fused on every device: one pass over each parameter (on CPU 0.4 ms a step instead of 1 ms at 512
    # latents). On a GPU a replayed graph reads the lr and Adam's step count from device tensors (capturable);
    # eager GPU steps take the same update, so that both do the same arithmetic.
    lr_now: float | Tensor = torch.tensor(lr, device=device) if on_gpu else lr
    opt = torch.optim.Adam(sae.parameters(), lr=lr_now, fused=True, capturable=on_gpu)
    state = _TrainState(sae, opt, k_aux=k_aux, auxk_coef=cfg.auxk_coef, threshold=cfg.dead_tokens_threshold,
                        scale=scale, normalize_grad=cfg.normalize_grad)
    graphed = GraphedSteps(state.step, device) if graphs else None
    # Eager steps: which latents are dead is re-read every step on CPU, where it is free; on a GPU the set's
    # size goes to the host (it shapes the AuxK tensors), so it is re-read every LOG_EVERY steps instead: AuxK
    # then works on a dead set up to LOG_EVERY batches old, small next to dead_tokens_threshold (10M by default).
    # Graphed steps read the current dead mask on the device; only the choice between the graphs with and
    # without an AuxK term waits for the log read-back.
    dead_refresh = 1 if device.type == "cpu" else LOG_EVERY
    ckpt_path = Path(checkpoint_dir) / "sae.pt" if checkpoint_dir and checkpoint_steps else None
    batches_rng = generator.get_state()  # where the batch order starts: a resumed run replays it to its step
    resume = checkpoints.load(ckpt_path) if ckpt_path else None
    first_step = 0
    written: list[list[Any]] = []  # the log's rows so far (a checkpoint carries them: the log sits in the output)
    if resume is not None:
        sae.load_state_dict(resume["sae"])
        opt.load_state_dict(resume["optimizer"])
        state.since_fired.copy_(resume["since_fired"].to(device))
        state.dead.copy_(resume["dead"].to(device))
        batches_rng, written, first_step = resume["batches_rng"], resume["log"], resume["step"] + 1
        print(f"emlab sae: resuming after step {resume['step']} from {ckpt_path}", file=sys.stderr)
    log_file = writer = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w", newline="")
        writer = csv.writer(log_file)
        writer.writerow(LOG_COLUMNS)
        writer.writerows(written)
    bar = tqdm(total=steps, initial=first_step, desc="sae", unit="step", disable=not progress, mininterval=1.0)
    generator.set_state(batches_rng)
    batches = shards.batches(cfg.batch_tokens, generator, device)
    for _ in range(first_step):  # the batches the checkpoint's steps took, in the same order
        next(batches, None)
    any_dead = bool(state.dead.any()) if resume is not None else False
    # Per-step numbers stay on the device and reach the host LOG_EVERY steps at a time: a GPU step
    # is a few milliseconds of kernels, and reading a value back each step would stall it each time.
    log_rows = torch.empty(LOG_EVERY, len(LOG_COLUMNS) - 3, device=device)
    pending: list[tuple[int, float]] = []

    def flush() -> None:
        nonlocal any_dead
        if not pending:
            return
        values = log_rows[:len(pending)].tolist()
        for (step, step_lr), (loss, fvu, aux, l0, dead_frac) in zip(pending, values):
            row = [step, (step + 1) * cfg.batch_tokens] + [f"{v:.6g}" for v in (step_lr, loss, fvu, aux, l0, dead_frac)]
            written.append(row)
            if writer is not None:
                writer.writerow(row)
        any_dead = values[-1][4] > 0
        bar.set_postfix(fvu=f"{values[-1][1]:.4f}", l0=f"{values[-1][3]:.1f}", dead=f"{values[-1][4]:.3f}",
                        refresh=False)
        pending.clear()

    def save_checkpoint(step: int) -> None:
        checkpoints.save(ckpt_path, {
            "sae": sae.state_dict(), "optimizer": opt.state_dict(), "since_fired": state.since_fired,
            "dead": state.dead, "batches_rng": batches_rng, "log": written, "step": step})

    stop = checkpoints.StopRequest.install(enabled=ckpt_path is not None)
    try:
        dead_idx = state.dead.nonzero().squeeze(1)
        with _tf32_matmuls(device, cfg.tf32):
            for step in range(first_step, steps):
                batch = next(batches, None)
                if batch is None:
                    raise ValueError(f"activation shards ran out after {step * cfg.batch_tokens} tokens; "
                                     f"sae.train asked for {total}")
                step_lr = lr * lr_factor(step, steps, cfg.lr_warmup_frac, cfg.lr_decay_frac)
                if isinstance(lr_now, Tensor):
                    lr_now.fill_(step_lr)
                else:
                    for group in opt.param_groups:
                        group["lr"] = step_lr
                if graphed is not None:
                    row = graphed(batch, any_dead)
                else:
                    if step % dead_refresh == 0:
                        dead_idx = state.dead.nonzero().squeeze(1)
                    row = state.step(batch, dead_idx=dead_idx)
                    opt.zero_grad(set_to_none=True)
                log_rows[len(pending)].copy_(row)
                pending.append((step, step_lr))
                due = ckpt_path is not None and (step + 1) % checkpoint_steps == 0 and step < steps - 1
                if len(pending) == LOG_EVERY or step == steps - 1 or due:
                    flush()
                if due:
                    save_checkpoint(step)
                checkpoints.kill_point("sae", step)
                # SIGTERM (a scheduler's preemption): keep this step in a checkpoint and leave without the SAE;
                # at the last step the SAE itself is moments away
                if stop.requested and step < steps - 1:
                    if not due:
                        flush()
                        save_checkpoint(step)
                    stop.exit("sae", step, ckpt_path)
                bar.update(1)
    finally:
        stop.restore()
        flush()
        bar.close()
        if log_file is not None:
            log_file.close()

    sae = sae.cpu()
    sae.fold_input_scale_(scale)
    sae.meta = {**(meta or {}), "emlab_train": {**asdict(cfg), "n_latents": n_latents, "k_aux": k_aux,
                                                "steps": steps, "input_scale": scale,
                                                "cuda_graph_steps": graphed.replays if graphed else 0}}
    return sae


class _TrainState:
    """One SAE's optimisation state: the SAE, its optimizer and the latents' firing record."""

    def __init__(self, sae: TopKSAE, opt: torch.optim.Optimizer, *, k_aux: int, auxk_coef: float,
                 threshold: int, scale: float, normalize_grad: bool = True):
        self.sae, self.opt, self.normalize_grad = sae, opt, normalize_grad
        self.k_aux, self.auxk_coef, self.threshold, self.scale = k_aux, auxk_coef, threshold, scale
        device = sae.W_enc.device
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=device)
        self.dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)  # updated in place (graphs read it)

    @torch.no_grad()
    def step(self, batch: Tensor, *, dead_idx: Tensor | None = None, with_aux: bool | None = None) -> Tensor:
        """One Adam step on a raw batch; returns [loss, fvu, aux_loss, l0, dead_frac] on the device.

        ``dead_idx``: the dead latents, read by an eager step. ``with_aux`` instead asks for the fixed-shape
        step a CUDA graph captures: AuxK over the current dead mask (True) or no AuxK term (False)."""
        sae = self.sae
        x = batch.to(dtype=torch.float32) * self.scale
        # (with_aux False: no dead mask and no dead_idx, so no AuxK term)
        stats = compute_grads(sae, x, self.dead if with_aux else None, k_aux=self.k_aux, auxk_coef=self.auxk_coef,
                              dead_idx=dead_idx, static_aux=bool(with_aux))
        remove_parallel_decoder_grad(sae)
        if self.normalize_grad:
            normalize_grad_(sae.parameters())
        self.opt.step()
        sae.normalize_decoder_()
        self.since_fired.add_(x.shape[0]).masked_fill_(stats.fired, 0)
        torch.ge(self.since_fired, self.threshold, out=self.dead)  # the next step's AuxK reads it
        return torch.stack([stats.loss, stats.fvu, stats.aux_loss, stats.l0, self.dead.float().mean()])
