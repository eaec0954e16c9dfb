"""TopK SAE training: emlab vs EleutherAI sparsify vs SAELens on the same activations.

All three train an SAE with the same n_latents, k, batch size, token budget, Adam learning rate,
schedule (linear warm-up, constant, linear decay to 0), AuxK coefficient and dead-latent
threshold; the printout gives training tokens/s, the held-out FVU reached, and emlab's ratios
against each. Implementations run one after another, round by round (--rounds, the order rotating
each round), and each one's best round counts, so that a busy machine penalises none in particular.

    python benchmarks/bench_sae.py                        # synthetic activations (d=128)
    python benchmarks/bench_sae.py --acts acts.safetensors --key layer_2
    python benchmarks/bench_sae.py --acts results/activations/corpus/train/shard-*.safetensors --key layer_2 \
        --n-latents 512 --k 8 --batch 2048 --epochs 3 --base-lr 1e-3   # the default organism's SAE fit
    python benchmarks/bench_sae.py --threads 1 --only emlab,sparsify
    python benchmarks/bench_sae.py --device cuda --n-latents 4096 --k 32 --rounds 3   # on a GPU
    python benchmarks/bench_sae.py --device cuda --only emlab,emlab-ungrouped,emlab-eager,sparsify

Variants of emlab measure its design choices: "emlab-ungrouped" selects the top k with a plain top-k
instead of the grouped search; "emlab-torch" runs a CPU step as torch ops only, without the compiled
kernels (emlab/sae/cpu_kernels.py) that handle each token's k active latents in one pass;
"emlab-eager" launches a GPU step's kernels one by one instead of replaying a CUDA graph of the step;
"emlab-fp32" runs a GPU step's matmuls in full fp32 instead of TF32; "emlab-rawgrad" takes Adam steps
on the raw gradient instead of the gradient divided by its norm.

The competitors are benchmark-only dependencies (pip install eai-sparsify sae-lens); one that
is not installed is skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")   # no Triton on CPU builds of torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

import torch  # noqa: E402

from emlab.sae.config import SAETrainConfig  # noqa: E402
from emlab.sae.train import lr_factor, train_sae  # noqa: E402
from rows import add_json_arg, emit, row  # noqa: E402  (benchmarks/, the script's folder)


# --- activations --------------------------------------------------------------------------

def synthetic_activations(n: int, d: int, n_features: int, active: float, seed: int) -> torch.Tensor:
    """Sparse non-negative mixtures of random unit directions with a shared offset and noise:
    the structure an SAE is meant to find, at the organism's width."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    freq = torch.rand(n_features, generator=g) ** 2          # some features much more frequent than others
    freq *= active / freq.sum()
    out = torch.empty(n, d)
    for s in range(0, n, 8192):                               # build in blocks to bound memory
        m = min(8192, n - s)
        on = torch.rand(m, n_features, generator=g) < freq
        out[s:s + m] = (on * (torch.rand(m, n_features, generator=g) + 0.5)) @ features
    out += 0.05 * torch.randn(n, d, generator=g) + 2.0 * torch.randn(d, generator=g)
    return out


def load_activations(path: str, key: str | None) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(path)
    if key is None:
        if len(tensors) != 1:
            sys.exit(f"{path}: holds tensors {sorted(tensors)}; pick one with --key")
        key = next(iter(tensors))
    if key not in tensors:
        sys.exit(f"{path}: no tensor {key!r} (has {sorted(tensors)})")
    acts = tensors[key]
    if acts.ndim != 2:
        acts = acts.reshape(-1, acts.shape[-1])
    return acts.float()


def batch_order(n: int, steps: int, batch: int) -> torch.Tensor:
    """Row indices for ``steps`` batches: a fresh shuffle of all n rows for each pass over them."""
    g = torch.Generator().manual_seed(0)
    passes = -(-steps * batch // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])[:steps * batch]


def fvu(reconstruct, x: torch.Tensor, device: str, batch: int = 8192) -> float:
    sse = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            xb = x[s:s + batch].to(device)
            sse += (reconstruct(xb) - xb).double().pow(2).sum().item()
    return sse / (x.double() - x.double().mean(0)).pow(2).sum().item()


# --- the three trainers -------------------------------------------------------------------

def run_emlab(train, args, lr, steps, **variant):
    cfg = SAETrainConfig(**variant, k=args.k, n_latents=args.n_latents, batch_tokens=args.batch, lr=args.base_lr,
                         train_tokens=steps * args.batch, lr_warmup_frac=args.warmup, lr_decay_frac=args.decay,
                         k_aux=args.k_aux, auxk_coef=args.auxk_coef, dead_tokens_threshold=args.dead_tokens,
                         normalize_activations=not args.no_normalize, seed=0, device=args.device)
    start = time.perf_counter()
    sae = train_sae(train, cfg, progress=False)
    _sync(args.device)
    return time.perf_counter() - start, sae.to(args.device)


def run_emlab_ungrouped(train, args, lr, steps):
    """emlab with a plain top-k instead of its grouped search (on the devices where that is the default)."""
    from emlab.sae import topk

    saved = dict(topk.GROUPED_MIN_LATENTS)
    topk.GROUPED_MIN_LATENTS.pop(torch.device(args.device).type, None)
    try:
        return run_emlab(train, args, lr, steps)
    finally:
        topk.GROUPED_MIN_LATENTS.clear()
        topk.GROUPED_MIN_LATENTS.update(saved)


def run_emlab_torch(train, args, lr, steps):
    """emlab without its compiled CPU kernels: every op of a CPU step a torch op."""
    from emlab.sae import cpu_kernels

    saved = cpu_kernels.MAX_THREADS
    cpu_kernels.MAX_THREADS = 0
    try:
        return run_emlab(train, args, lr, steps)
    finally:
        cpu_kernels.MAX_THREADS = saved


def run_emlab_eager(train, args, lr, steps):
    """emlab with eager steps on a GPU (the default replays CUDA graphs of the step there)."""
    return run_emlab(train, args, lr, steps, cuda_graphs=False)


def run_emlab_fp32(train, args, lr, steps):
    """emlab with full-fp32 matmuls on a GPU (the default runs the encoder matmul in TF32 there)."""
    return run_emlab(train, args, lr, steps, tf32=False)


def run_emlab_rawgrad(train, args, lr, steps):
    """emlab with Adam on the raw gradient (the default divides each step's gradient by its norm)."""
    return run_emlab(train, args, lr, steps, normalize_grad=False)


def run_sparsify(train, args, lr, steps):
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    d = train.shape[1]
    start = time.perf_counter()
    train = train.to(args.device)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=args.n_latents, k=args.k), device=args.device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(args.n_latents, dtype=torch.long, device=args.device)
    order = batch_order(train.shape[0], steps, args.batch).to(args.device)
    for step in range(steps):
        x = train[order[step * args.batch:(step + 1) * args.batch]]
        if step == 0:  # sparsify's trainer centres the decoder bias on the first batch
            sae.b_dec.data = x.mean(0)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, args.warmup, args.decay)
        dead = since_fired > args.dead_tokens
        out = sae(x, dead_mask=dead)
        (out.fvu + args.auxk_coef * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
    _sync(args.device)
    return time.perf_counter() - start, lambda xb: sae(xb).sae_out


def run_saelens(train, args, lr, steps):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    d = train.shape[1]
    order = batch_order(train.shape[0], steps, args.batch)
    batches = (train[order[s * args.batch:(s + 1) * args.batch]].to(args.device) for s in range(steps))
    start = time.perf_counter()
    # SAELens' losses are sums over d_in (not divided by the variance): its AuxK weight is the
    # same fraction of the main loss as ours.
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=args.n_latents, k=args.k,
                                                aux_loss_coefficient=args.auxk_coef))
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                           lr=lr, lr_end=0.0, lr_scheduler_name="constant", lr_warm_up_steps=max(1, round(args.warmup * steps)),
                           lr_decay_steps=round(args.decay * steps),
                           dead_feature_window=max(1, args.dead_tokens // args.batch), device=args.device)
    with contextlib.redirect_stderr(io.StringIO()):   # its progress bar
        sae = SAETrainer(cfg, sae, batches).fit()
    _sync(args.device)
    elapsed = time.perf_counter() - start
    sae.eval()
    return elapsed, lambda xb: sae(xb)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


RUNNERS = {"emlab": run_emlab, "emlab-ungrouped": run_emlab_ungrouped, "emlab-torch": run_emlab_torch,
           "emlab-eager": run_emlab_eager,
           "emlab-fp32": run_emlab_fp32,
           "emlab-rawgrad": run_emlab_rawgrad,
           "sparsify": run_sparsify,
           "saelens": run_saelens}
PACKAGES = {"sparsify": "sparsify (pip install eai-sparsify)", "saelens": "sae_lens (pip install sae-lens)"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acts", nargs="+", help="safetensors file(s) with activations [tokens, d], concatenated "
                                              "(default: synthetic)")
    p.add_argument("--key", help="tensor name in --acts (default: its only tensor)")
    p.add_argument("--tokens", type=int, default=2 ** 19, help="training tokens (synthetic data; also the budget)")
    p.add_argument("--epochs", type=float, default=None, help="budget in passes over the training rows "
                                                              "(instead of --tokens; each pass reshuffled)")
    p.add_argument("--held-out", type=int, default=2 ** 15, help="tokens kept for the FVU")
    p.add_argument("--d", type=int, default=128, help="synthetic activation width")
    p.add_argument("--n-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--base-lr", type=float, default=2e-4, help="Adam lr at 2^14 latents (scaled by 1/sqrt)")
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--decay", type=float, default=0.2)
    p.add_argument("--k-aux", type=int, default=None, help="default: d // 2, as sparsify and SAELens do")
    p.add_argument("--auxk-coef", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=200_000)
    p.add_argument("--no-normalize", action="store_true", help="turn emlab's input scaling off")
    p.add_argument("--device", default="cpu", help="cpu or cuda (every implementation trains there)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--only", default="emlab,sparsify,saelens")
    add_json_arg(p)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.acts:
        acts = torch.cat([load_activations(path, args.key) for path in args.acts])
        source = f"{args.acts} [{acts.shape[0]} x {acts.shape[1]}]"
    else:
        acts = synthetic_activations(args.tokens + args.held_out, args.d, n_features=8 * args.d, active=24.0, seed=0)
        source = f"synthetic [{acts.shape[0]} x {acts.shape[1]}], 24 of {8 * args.d} directions active per token"
    perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(1))
    held_out, train = acts[perm[:args.held_out]], acts[perm[args.held_out:]]
    budget = round(args.epochs * train.shape[0]) if args.epochs else min(args.tokens, train.shape[0])
    steps = budget // args.batch
    args.k_aux = args.k_aux or train.shape[1] // 2
    lr = SAETrainConfig(lr=args.base_lr).lr_for(args.n_latents)
    print(f"activations: {source}")
    print(f"n_latents={args.n_latents} k={args.k} batch={args.batch} steps={steps} tokens={steps * args.batch} "
          f"lr={lr:.2e} k_aux={args.k_aux} threads={torch.get_num_threads()} rounds={args.rounds}")

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    available = []
    for name in names:
        if name not in RUNNERS:
            sys.exit(f"--only: unknown implementation {name!r} (choose from {sorted(RUNNERS)})")
        if name in PACKAGES:
            try:
                __import__(PACKAGES[name].split()[0])
            except ImportError:
                print(f"skipping {name}: {PACKAGES[name]} is not installed")
                continue
        available.append(name)

    best: dict[str, float] = {}
    quality: dict[str, float] = {}
    for r in range(args.rounds):
        # rotate the order each round: a run right after another (a large one especially) can pay for the
        # memory that one left behind, and best-of-rounds should not favour whoever always goes first
        shift = r % len(available)
        for name in available[shift:] + available[:shift]:
            with contextlib.redirect_stdout(io.StringIO()):   # competitors print setup notes
                seconds, model = RUNNERS[name](train, args, lr, steps)
            best[name] = min(best.get(name, math.inf), seconds)
            quality[name] = fvu(model, held_out, args.device)
            print(f"  round {r + 1}: {name:13s} {seconds:7.2f} s", flush=True)

    tokens = steps * args.batch
    print(f"\n{'impl':14s} {'tokens/s':>10s} {'FVU':>8s}")
    for name in available:
        print(f"{name:14s} {tokens / best[name]:10.0f} {quality[name]:8.4f}")
    ours = [n for n in available if n.startswith("emlab")]
    for mine in ours:
        for name in available:
            if name not in ours:
                print(f"{mine} vs {name}: speed x{best[name] / best[mine]:.2f}, "
                      f"FVU {quality[mine]:.4f} vs {quality[name]:.4f} ({quality[mine] - quality[name]:+.4f})")
    emit([row("sae", f"{mine} vs {name}: TopK SAE training", tokens / best[mine], tokens / best[name], "tokens/s",
              note=f"{args.n_latents} latents, k={args.k}; FVU {quality[mine]:.4f} vs {quality[name]:.4f}")
          for mine in ours for name in available if name not in ours], args.json)


if __name__ == "__main__":
    main()
