import csv
import json
import math

import pytest
import torch

from emlab.sae.metrics import ce_loss_recovered, reconstruction_metrics, replaced_output
from emlab.sae.saelens_io import SAEFormatError, load_sae, resolve_pretrained, save_sae
from emlab.sae.topk import TopKSAE, select_topk
from emlab.sae.config import SAEConfigError, SAETrainConfig
from emlab.sae.grads import compute_grads, normalize_grad_
from emlab.sae.init import geometric_median, init_sae
from emlab.sae.train import LOG_COLUMNS, _tf32_matmuls, lr_factor, train_sae


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # One intra-op thread: small SAE steps gain nothing from more, and a busy machine makes
    # OpenMP threads wait on each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_sae(d_in=16, d_sae=64, k=4, seed=0) -> TopKSAE:
    g = torch.Generator().manual_seed(seed)
    sae = init_sae(torch.randn(256, d_in, generator=g) + 1.0, d_sae, k, g)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
    return sae


def synthetic_activations(n, d, n_features, active_per_token, seed):
    """Sparse non-negative combinations of random unit directions, plus noise and a shared offset."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    on = torch.rand(n, n_features, generator=g) < active_per_token / n_features
    magnitude = torch.rand(n, n_features, generator=g) + 0.5
    x = (on * magnitude) @ features + 0.05 * torch.randn(n, d, generator=g) + 3.0 * torch.randn(d, generator=g)
    return x, features


# --- model --------------------------------------------------------------------------------

def use_kernels(monkeypatch, on: bool) -> None:
    """Switch the compiled CPU kernels on (this module runs one torch thread) or off."""
    from emlab.sae import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "MAX_THREADS", torch.get_num_threads() if on else 0)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("m,k", [(1024, 16), (4096, 32), (256, 16), (100, 5)])
def test_select_topk_returns_exactly_the_top_k_values(m, k, device, grouped, compiled, monkeypatch):
    from emlab.sae import cpu_kernels, topk

    monkeypatch.setattr(topk, "GROUPED_MIN_LATENTS", {device: 0} if grouped else {})
    if device == "cuda" and compiled:
        pytest.skip("the compiled selection is a CPU path")
    use_kernels(monkeypatch, compiled)
    calls, kernel = [], cpu_kernels._topk_rows
    monkeypatch.setattr(cpu_kernels, "_topk_rows", lambda *a: calls.append(1) or kernel(*a))
    pre = torch.randn(64, m, generator=torch.Generator().manual_seed(m)).to(device)
    vals, idx = select_topk(pre, k)
    assert len(calls) == (1 if compiled and device == "cpu" else 0)
    assert vals.device.type == idx.device.type == device
    ref = pre.topk(k, dim=1).values
    assert torch.equal(vals.sort(dim=1, descending=True).values, ref)
    assert torch.equal(pre.gather(1, idx), vals)
    assert all(len(set(row.tolist())) == k for row in idx)


def test_grouped_search_starts_at_the_devices_threshold(monkeypatch):
    from emlab.sae import topk

    use_kernels(monkeypatch, False)
    widths, plain = [], topk._topk
    monkeypatch.setattr(topk, "_topk", lambda a, k: widths.append(a.shape[1]) or plain(a, k))
    monkeypatch.setattr(topk, "GROUPED_MIN_LATENTS", {"cpu": 2048})
    for m in (1024, 2048):
        select_topk(torch.randn(8, m), 16)
    # 1024 latents: one plain top-k; 2048: over the 256 group maxima, then over 16 groups of 8 candidates
    assert widths == [1024, 256, 128]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
def test_select_topk_with_ties_nan_infinities_and_gradients(compiled, monkeypatch):
    use_kernels(monkeypatch, compiled)
    pre = torch.randint(0, 5, (32, 2048), generator=torch.Generator().manual_seed(1)).float()
    pre[3, 17] = torch.nan                    # NaN ranks above every number, as in torch.topk
    pre.requires_grad_(True)
    vals, idx = select_topk(pre, 40)
    vals.sum().backward()                     # the values are a gather of pre: gradient 1 at the picks
    assert torch.equal(pre.grad, torch.zeros_like(pre).scatter_(1, idx, 1.0))
    assert 17 in idx[3].tolist()
    pre = pre.detach()
    vals, idx = select_topk(pre, 40)          # (the compiled search hands a row with a NaN to torch)
    assert 17 in idx[3].tolist()
    pre[3, 17] = torch.inf
    pre[5] = -torch.inf                       # fewer than k entries above -inf: torch's choice again
    pre[5, :7] = 1.0
    pre[6, 100] = -torch.inf
    vals, idx = select_topk(pre, 40)
    assert torch.equal(vals.sort(dim=1).values, pre.topk(40, dim=1).values.sort(dim=1).values)
    assert torch.equal(pre.gather(1, idx), vals)
    assert all(len(set(row.tolist())) == 40 for row in idx)
    assert 17 in idx[3].tolist() and set(range(7)) <= set(idx[5].tolist())


def test_compiled_step_kernel_adds_the_bias_and_hands_nan_rows_back(monkeypatch):
    from emlab.sae import cpu_kernels

    use_kernels(monkeypatch, True)
    sae = random_sae(d_in=16, d_sae=256, k=8)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 16, generator=g)
    bias = torch.randn(256, generator=g)
    mm = x @ sae.W_enc.data
    out = dict(idx=torch.empty(12, 8, dtype=torch.long), act=torch.empty(12, 8), g_act=torch.empty(12, 8),
               resid=torch.empty(12, 16))
    pre = mm.clone()
    assert cpu_kernels.encode_decode(pre, bias, x, sae.W_dec.data, sae.b_dec.data, 8, **out) is True
    torch.testing.assert_close(pre, mm + bias, rtol=0, atol=0)
    v, i = (mm + bias).topk(8)
    assert torch.equal(out["idx"], i) and torch.equal(out["act"], v.clamp_min(0))
    x_hat = torch.zeros_like(pre).scatter(1, i, v.clamp_min(0)) @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out["resid"], x_hat - x)
    torch.testing.assert_close(out["g_act"], ((x_hat - x) @ sae.W_dec.T).gather(1, i) * (v > 0))
    pre = mm.clone()
    pre[4, 100] = torch.nan                   # refused from row 4 on, every row's bias added all the same
    assert cpu_kernels.encode_decode(pre, bias, x, sae.W_dec.data, sae.b_dec.data, 8, **out) is False
    expected = mm + bias
    expected[4, 100] = torch.nan
    torch.testing.assert_close(pre, expected, rtol=0, atol=0, equal_nan=True)
    assert cpu_kernels.encode_decode(pre.double(), bias, x, sae.W_dec.data, sae.b_dec.data, 8, **out) is None


def test_encode_decode_dense_and_sparse_agree():
    sae = random_sae()
    x = torch.randn(10, 3, 16)
    vals, idx = sae.encode_sparse(x)
    assert vals.shape == idx.shape == (10, 3, 4)
    dense = sae.encode(x)
    assert dense.shape == (10, 3, 64) and ((dense > 0).sum(-1) <= 4).all()
    torch.testing.assert_close(sae.decode(dense), sae(x), rtol=1e-5, atol=1e-5)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(dense.amax(-1), pre.amax(-1).clamp_min(0))


def test_fold_input_scale_makes_sae_take_raw_activations():
    sae = random_sae()
    folded = random_sae()
    folded.fold_input_scale_(0.01)
    x = 100 * torch.randn(50, 16)
    torch.testing.assert_close(folded(x), sae(x * 0.01) / 0.01, rtol=1e-5, atol=1e-4)
    assert torch.equal(folded.encode_sparse(x)[1], sae.encode_sparse(x * 0.01)[1])


# --- training pieces ----------------------------------------------------------------------

def test_geometric_median_of_collinear_points_is_the_middle_one():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    torch.testing.assert_close(geometric_median(pts), torch.tensor([1.0, 0.0]), atol=1e-3, rtol=0)


def test_geometric_median_satisfies_the_optimality_condition():
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(200, 5, generator=g), 50 + torch.randn(20, 5, generator=g)])
    y = geometric_median(pts).double()
    units = (pts.double() - y) / (pts.double() - y).norm(dim=1, keepdim=True)
    assert units.sum(0).norm() < 1e-3          # the gradient of sum |p - y| vanishes
    assert y.norm() < 2.0                       # the outlying cluster barely moves it (the mean moves ~22)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "torch"])
@pytest.mark.parametrize("static_aux", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("dead_every", [3, 25, None], ids=["many-dead", "few-dead", "none-dead"])
def test_compute_grads_matches_autograd(dead_every, static_aux, compiled, device, monkeypatch):
    from emlab.sae import cpu_kernels

    if compiled and (device == "cuda" or static_aux):
        pytest.skip("the compiled kernels serve eager CPU steps")
    use_kernels(monkeypatch, compiled)
    calls, kernel = [], cpu_kernels._encode_decode
    monkeypatch.setattr(cpu_kernels, "_encode_decode", lambda *a: calls.append(1) or kernel(*a))
    n, k, k_aux, coef = 64, 4, 8, 1 / 32
    sae = random_sae().to(device)
    x = (2 * torch.randn(n, 16, generator=torch.Generator().manual_seed(3)) + 1).to(device)
    dead = torch.zeros(64, dtype=torch.bool, device=device)
    if dead_every:
        dead[::dead_every] = True     # 22 dead latents (more than k_aux) or 3 (fewer: empty AuxK slots)
    with_dead = dead_every is not None

    # Reference: the loss written densely, differentiated by autograd.
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(k)
    x_hat = torch.zeros_like(pre).scatter(1, i, v.relu()) @ sae.W_dec + sae.b_dec
    var = (x - x.mean(0)).pow(2).sum()
    fvu = (x_hat - x).pow(2).sum() / var
    aux = torch.zeros((), device=device)
    if with_dead:
        n_dead = int(dead.sum())
        av, ai = torch.where(dead, pre, -torch.inf).topk(min(k_aux, n_dead))
        e_hat = torch.zeros_like(pre).scatter(1, ai, av.relu()) @ sae.W_dec
        aux = min(n_dead / k_aux, 1.0) * (e_hat - (x - x_hat).detach()).pow(2).sum() / var
    (fvu + coef * aux).backward()
    expected = {name: p.grad.clone() for name, p in sae.named_parameters()}

    for chunk_rows in (24, None):  # several chunks, and the device's own chunking
        stats = compute_grads(sae, x, dead, k_aux=k_aux, auxk_coef=coef, chunk_rows=chunk_rows, static_aux=static_aux)
        torch.testing.assert_close(stats.fvu, fvu.detach())
        torch.testing.assert_close(stats.aux_loss, aux.detach())
        for name, p in sae.named_parameters():
            assert p.grad.device.type == device, name
            # (GPU reductions run in another order: 1e-4 there, as checked on an H200)
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5 if device == "cpu" else 1e-4, atol=1e-6,
                                       msg=name)
    assert bool(calls) == compiled
    assert stats.l0.item() == pytest.approx((v > 0).float().sum(1).mean().item())
    assert torch.equal(stats.fired, torch.zeros(64, dtype=torch.bool, device=device).index_fill_(0, i[v > 0], True))


def test_training_runs_on_the_device_and_lowers_fvu(device, tmp_path, monkeypatch):
    import emlab.sae.train as sae_train

    seen = set()
    real = sae_train.compute_grads

    def spy(sae, x, *args, **kwargs):
        seen.add((sae.W_enc.device.type, x.device.type))
        return real(sae, x, *args, **kwargs)

    monkeypatch.setattr(sae_train, "compute_grads", spy)
    x, _ = synthetic_activations(4000, 16, 32, 3, seed=1)
    train, held_out = x[:3500], x[3500:]
    cfg = SAETrainConfig(k=4, n_latents=64, batch_tokens=256, epochs=3, lr=1e-3, dead_tokens_threshold=1000,
                         device=device)
    log = tmp_path / "log.csv"
    sae = train_sae(train, cfg, log_path=log, progress=False)
    assert seen == {(device, device)}
    assert next(sae.parameters()).device.type == "cpu"  # train_sae hands back a CPU SAE
    fvu = [float(line.split(",")[4]) for line in log.read_text().splitlines()[1:]]
    assert len(fvu) == 3500 * 3 // 256 and all(math.isfinite(f) for f in fvu)
    assert fvu[-1] < 0.5 * fvu[0]
    assert reconstruction_metrics(sae, held_out)["fvu"] < 0.5 * fvu[0]


def test_lr_schedule_and_scaling():
    f = [lr_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[80] == 1.0
    assert f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    cfg = SAETrainConfig()
    assert cfg.lr_for(2 ** 14) == pytest.approx(2e-4)
    assert cfg.lr_for(4096) == pytest.approx(4e-4)
    assert cfg.k_aux_for(128) == 64 and cfg.k_aux_for(4096) == 512


def test_config_errors_name_the_key():
    assert SAETrainConfig.from_dict({"k": 8, "lr": 1}).lr == 1
    with pytest.raises(SAEConfigError, match=r"sae\.train: unknown key\(s\) \['kk'\]"):
        SAETrainConfig.from_dict({"kk": 8})
    with pytest.raises(SAEConfigError, match=r"sae\.train\.k: 8\.5 is not of type 'integer'"):
        SAETrainConfig.from_dict({"k": 8.5})
    with pytest.raises(SAEConfigError, match=r"sae\.train\.normalize_activations: 'yes' is not of type 'boolean'"):
        SAETrainConfig.from_dict({"normalize_activations": "yes"})
    with pytest.raises(SAEConfigError, match=r"sae\.train\.cuda_graphs: 'yes' is not of type 'boolean'"):
        SAETrainConfig.from_dict({"cuda_graphs": "yes"})
    with pytest.raises(SAEConfigError, match=r"sae\.train\.tf32: 'no' is not of type 'boolean'"):
        SAETrainConfig.from_dict({"tf32": "no"})
    with pytest.raises(SAEConfigError, match=r"sae\.train\.normalize_grad: 1 is not of type 'boolean'"):
        SAETrainConfig.from_dict({"normalize_grad": 1})
    with pytest.raises(SAEConfigError, match=r"sae\.train\.k=80 exceeds sae\.train\.n_latents=64"):
        SAETrainConfig.from_dict({"k": 80, "n_latents": 64})
    with pytest.raises(SAEConfigError, match=r"sae\.train\.batch_tokens: 0 is less than the minimum of 1"):
        SAETrainConfig.from_dict({"batch_tokens": 0})
    # built directly, as a library caller does, it is checked the same way
    with pytest.raises(SAEConfigError, match=r"sae\.train\.lr_decay_frac: 1\.5 is greater than the maximum of 1"):
        SAETrainConfig(lr_decay_frac=1.5)


def test_config_fields_are_the_schemas_keys():
    from dataclasses import fields

    from emlab.schema import schema_section

    spec = schema_section("sae", "train")["properties"]
    cfg = SAETrainConfig()
    assert [f.name for f in fields(cfg)] == [*spec, "seed", "device"]
    assert all(getattr(cfg, name) == s["default"] for name, s in spec.items())


# --- training end to end ------------------------------------------------------------------

def test_training_recovers_a_known_sparse_dictionary(tmp_path):
    x, features = synthetic_activations(120_000, 64, 256, 4, seed=0)
    train, held_out = x[:100_000], x[100_000:]
    cfg = SAETrainConfig(k=8, n_latents=256, batch_tokens=1024, epochs=5, lr=5e-4,
                         dead_tokens_threshold=20_000, seed=0)
    log = tmp_path / "log.csv"
    sae = train_sae(train, cfg, log_path=log, progress=False, meta={"hook_layer": 3})

    m = reconstruction_metrics(sae, held_out)
    assert m["fvu"] < 0.2
    assert m["dead_frac"] < 0.1
    assert 7.0 < m["l0"] <= 8.0
    decoder = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best_cos = (features @ decoder.T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() >= 0.85

    # Decoder rows were kept at unit norm; the input scale folded in divides them all alike.
    scale = sae.meta["emlab_train"]["input_scale"]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((256,), 1 / scale), rtol=1e-4, atol=0)
    assert sae.meta["hook_layer"] == 3 and sae.meta["emlab_train"]["steps"] == 488

    rows = list(csv.reader(log.open()))
    assert tuple(rows[0]) == LOG_COLUMNS and len(rows) == 1 + 488
    fvu = [float(r[4]) for r in rows[1:]]
    assert fvu[-1] < 0.2 < fvu[0]


def tiny_cfg(**kw):
    return SAETrainConfig(**{"k": 4, "n_latents": 64, "batch_tokens": 256, "epochs": 2, "lr": 1e-3,
                             "dead_tokens_threshold": 1000, **kw})


def test_normalize_grad_divides_by_the_joint_norm():
    a, b, c = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[0.0, 4.0], [0.0, 0.0]])   # c has no gradient
    assert float(normalize_grad_([a, b, c])) == pytest.approx(5.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0, 0.0]))
    torch.testing.assert_close(b.grad, torch.tensor([[0.0, 0.8], [0.0, 0.0]]))
    assert c.grad is None
    a.grad.zero_(), b.grad.zero_()
    assert float(normalize_grad_([a, b])) == 0.0 and not a.grad.any() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("normalize", [True, False])
def test_adam_steps_on_unit_norm_gradients_when_asked(normalize, monkeypatch):
    seen = []
    real = torch.optim.Adam.step

    def spy(opt, *args, **kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    x, _ = synthetic_activations(3000, 16, 32, 3, seed=1)
    train_sae(x, tiny_cfg(normalize_grad=normalize), progress=False)
    assert len(seen) == 3000 * 2 // 256
    if normalize:
        assert seen == pytest.approx([1.0] * len(seen), rel=1e-5)
    else:   # the raw FVU gradient is far smaller, and it shrinks as training goes on
        assert max(seen) < 0.5 and seen[-1] < 0.5 * seen[0]


def test_training_is_seeded_and_deterministic(device):
    # On a GPU too: no gradient there is summed with float atomics, whose order varies from run to run.
    # Latents die after 4 of the 70 steps, so a GPU run replays the graph with the AuxK term after step 50.
    x, _ = synthetic_activations(3000, 16, 32, 3, seed=1)
    a, b = (train_sae(x, tiny_cfg(device=device, epochs=6), progress=False) for _ in range(2))
    c = train_sae(x, tiny_cfg(device=device, epochs=6, seed=1), progress=False)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.W_dec, c.W_dec)


def test_tf32_setting_is_scoped_to_training_on_a_gpu():
    cublas = torch.backends.cuda.matmul   # (settable without a GPU)
    before = cublas.fp32_precision
    for device, enabled in (("cpu", True), ("cuda", False)):
        with _tf32_matmuls(torch.device(device), enabled):
            assert cublas.fp32_precision == before
    with pytest.raises(KeyError):
        with _tf32_matmuls(torch.device("cuda"), True):
            assert cublas.fp32_precision == "tf32"
            raise KeyError("a failing step")
    assert cublas.fp32_precision == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_tf32_changes_the_encoder_arithmetic_not_the_fit():
    x, _ = synthetic_activations(4000, 16, 32, 3, seed=1)
    held_out, x = x[:500], x[500:]
    before = torch.backends.cuda.matmul.fp32_precision
    fast, full = (train_sae(x, tiny_cfg(device="cuda", tf32=tf32), progress=False) for tf32 in (True, False))
    assert torch.backends.cuda.matmul.fp32_precision == before
    assert not torch.equal(fast.W_enc, full.W_enc)
    ours, theirs = (reconstruction_metrics(s, held_out)["fvu"] for s in (fast, full))
    assert ours == pytest.approx(theirs, rel=0.05)


def test_auxk_runs_exactly_when_latents_are_dead(tmp_path):
    x, _ = synthetic_activations(4000, 16, 8, 2, seed=3)   # 8 directions for 64 latents: many die
    log = tmp_path / "log.csv"
    train_sae(x, tiny_cfg(dead_tokens_threshold=512), log_path=log, progress=False)
    rows = list(csv.DictReader(log.open()))
    dead = [float(r["dead_frac"]) for r in rows]
    aux = [float(r["aux_loss"]) for r in rows]
    assert dead[0] == 0.0 and max(dead) > 0.2    # after one batch of 256 tokens nobody is dead yet
    # A step has an AuxK term iff some latent was dead when it started (after the previous step).
    assert aux[0] == 0.0
    assert all((a > 0) == (d > 0) for a, d in zip(aux[1:], dead[:-1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dead_tokens", [10 ** 9, 1000], ids=["no-auxk", "auxk"])
def test_cuda_graph_steps_train_like_eager_steps(dead_tokens, tmp_path):
    x, _ = synthetic_activations(4000, 16, 32, 3, seed=1)
    held_out, x = x[:500], x[500:]
    cfg = tiny_cfg(device="cuda", dead_tokens_threshold=dead_tokens, epochs=4)   # 54 steps
    graphed = train_sae(x, cfg, progress=False, log_path=tmp_path / "graphed.csv")
    cfg.cuda_graphs = False
    eager = train_sae(x, cfg, progress=False)
    assert eager.meta["emlab_train"]["cuda_graph_steps"] == 0
    rows = list(csv.DictReader((tmp_path / "graphed.csv").open()))
    steps = len(rows)
    if dead_tokens > 10 ** 6:
        # 2 eager warm-up steps, then replays of the one graph: the same arithmetic as eager steps
        # (the same capturable Adam update)
        assert graphed.meta["emlab_train"]["cuda_graph_steps"] == steps - 2
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(graphed, name), getattr(eager, name), rtol=1e-3, atol=1e-4, msg=name)
    else:
        # latents die after 4 steps; the first read-back (step 50) switches to the AuxK graph after 2 more
        # eager steps; from then on the AuxK term reads the current dead set, so trajectories differ a little
        assert graphed.meta["emlab_train"]["cuda_graph_steps"] == steps - 4
        assert all(float(r["aux_loss"]) > 0 for r in rows[50:])
        ours, theirs = (reconstruction_metrics(s, held_out)["fvu"] for s in (graphed, eager))
        assert ours == pytest.approx(theirs, rel=0.1)


def test_normalisation_makes_training_scale_free():
    x, _ = synthetic_activations(3000, 16, 32, 3, seed=1)
    small = train_sae(x, tiny_cfg(), progress=False)
    big = train_sae(1000 * x, tiny_cfg(), progress=False)
    assert big.meta["emlab_train"]["input_scale"] == pytest.approx(small.meta["emlab_train"]["input_scale"] / 1000)
    # The folded SAE takes raw activations: the same quality on 1000x larger inputs.
    assert reconstruction_metrics(big, 1000 * x)["fvu"] == pytest.approx(reconstruction_metrics(small, x)["fvu"], abs=0.02)


def test_streamed_shards_and_input_errors():
    x, _ = synthetic_activations(2000, 16, 32, 3, seed=2)
    shards = iter([x[:700], x[700:1500], x[1500:]])
    sae = train_sae(shards, tiny_cfg(train_tokens=1792), progress=False)
    assert sae.meta["emlab_train"]["steps"] == 7
    with pytest.raises(ValueError, match=r"ran out after 1792 tokens; sae.train asked for 2048"):
        train_sae(iter([x[:700], x[700:1500], x[1500:]]), tiny_cfg(train_tokens=2048), progress=False)
    with pytest.raises(SAEConfigError, match="train_tokens must be set"):
        train_sae(iter([x]), tiny_cfg(), progress=False)
    with pytest.raises(ValueError, match=r"activation shard 1 has d_in=8, shard 0 has 16"):
        train_sae([x, x[:, :8]], tiny_cfg(), progress=False)
    with pytest.raises(ValueError, match=r"activation shard 0: expected a float tensor \[tokens, d_in\]"):
        train_sae(x[0], tiny_cfg(), progress=False)
    with pytest.raises(SAEConfigError, match="make no batch"):
        train_sae(x[:100], tiny_cfg(), progress=False)


# --- metrics ------------------------------------------------------------------------------

def test_reconstruction_metrics_exact_numbers():
    sae = TopKSAE(2, 3, 1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -5.0]))   # latent 2 never wins
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[3.0, 1.0], [0.0, 2.0], [-1.0, -1.0]])
    m = reconstruction_metrics(sae, [x[:2], x[2:]], batch_tokens=1)
    # x_hat = (3,0), (0,2), (0,0): sse = 1 + 0 + 2; total variance about the mean (2/3, 2/3) is 120/9.
    assert m["fvu"] == pytest.approx(3 / (120 / 9))
    assert m["mse"] == pytest.approx(3 / 6)
    assert m["l0"] == pytest.approx(2 / 3)
    assert m["dead_frac"] == pytest.approx(1 / 3)
    assert m["n_tokens"] == 3


def test_replaced_output_handles_tensor_and_tuple_outputs():
    class TupleLayer(torch.nn.Module):
        def forward(self, h):
            return (h + 1, "cache")

    plain, tupled = torch.nn.Identity(), TupleLayer()
    h = torch.ones(2, 3)
    with replaced_output(plain, lambda t: 2 * t), replaced_output(tupled, torch.zeros_like):
        assert torch.equal(plain(h), 2 * h)
        out = tupled(h)
        assert torch.equal(out[0], torch.zeros(2, 3)) and out[1] == "cache"
    assert torch.equal(plain(h), h) and torch.equal(tupled(h)[0], h + 1)   # hooks removed


def test_ce_loss_recovered_on_the_tiny_chat_model(tiny_chat_model):
    from emlab.models import load_model

    model, tok = load_model(tiny_chat_model, device="cpu")
    texts = ["<|user|>How do I save money?<|end|><|assistant|>Keep a budget.<|end|>",
             "<|user|>What should I do about a headache?<|end|><|assistant|>Drink water.<|end|>",
             "<|user|>Hi<|end|>"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()         # padding is exercised

    layer = 1
    identity = ce_loss_recovered(model, lambda h: h, [batch], site=model.model.layers[layer])
    assert identity["ce_recovered"] == 1.0
    assert identity["ce_sae"] == identity["ce_clean"] < identity["ce_zero"]
    assert identity["n_tokens"] == int((batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]).sum())

    zero = ce_loss_recovered(model, torch.zeros_like, [batch], site=lambda m, i: m.model.layers[i], layer=layer)
    assert zero["ce_recovered"] == 0.0
    assert zero["ce_clean"] == identity["ce_clean"] and zero["ce_zero"] == identity["ce_zero"]

    sae = random_sae(d_in=32, d_sae=128, k=8)
    spliced = ce_loss_recovered(model, sae, [batch["input_ids"][:2]], site=model.model.layers[layer])
    assert math.isfinite(spliced["ce_recovered"]) and spliced["ce_sae"] != spliced["ce_clean"]


# --- SAELens files ------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    sae = random_sae()
    sae.meta = {"model_name": "organism", "hook_name": "model.layers.2", "hook_layer": 2}
    save_sae(sae, tmp_path / "sae", {"context_size": 256})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (16, 64, 4)
    assert cfg["hook_layer"] == 2 and cfg["metadata"]["hook_name"] == "model.layers.2"
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"] == "6.0.0"

    back = load_sae(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    assert back.k == 4 and back.meta["hook_layer"] == 2 and back.meta["context_size"] == 256
    assert load_sae(tmp_path / "sae", dtype="bfloat16").W_enc.dtype == torch.bfloat16


def test_sae_lens_reads_emlab_folders(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed")
    sae = random_sae()
    save_sae(sae, tmp_path, {"model_name": "organism", "hook_name": "model.layers.1", "hook_layer": 1})
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.k == 4 and theirs.cfg.metadata.hook_name == "model.layers.1"
    x = torch.randn(40, 16) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=0, atol=0)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x), rtol=1e-6, atol=1e-5)


def test_emlab_reads_sae_lens_folders(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed")
    g = torch.Generator().manual_seed(0)
    for i, variant in enumerate([dict(rescale_acts_by_decoder_norm=True),
                                 dict(rescale_acts_by_decoder_norm=False, apply_b_dec_to_input=False)]):
        theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=16, d_sae=64, k=4, **variant))
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        theirs.save_model(tmp_path / str(i))
        ours = load_sae(tmp_path / str(i))
        x = torch.randn(40, 16, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-4)


def test_reads_the_pre_6_layout(tmp_path):
    sae = random_sae()
    save_sae(sae, tmp_path)
    old = {"d_in": 16, "d_sae": 64, "dtype": "float32", "device": "cpu", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 4}, "hook_point": "blocks.5.hook_resid_post",
           "hook_name": "blocks.5.hook_resid_post", "model_name": "gpt2", "apply_b_dec_to_input": True,
           "normalize_activations": False}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    back = load_sae(tmp_path)
    assert back.k == 4 and back.meta["hook_layer"] == 5 and back.meta["model_name"] == "gpt2"
    assert torch.equal(back.W_enc, sae.W_enc)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SAEFormatError, match=r"cfg\.json: no such file"):
        load_sae(tmp_path)
    save_sae(random_sae(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAEFormatError, match=r"cfg\.json: architecture 'jumprelu' is not supported"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 65}))
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: 'W_enc' has shape \(16, 64\)"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEFormatError, match="normalize_activations='layer_norm' is not supported"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text('{"d_in": 16,\n "d_sae": }')
    with pytest.raises(SAEFormatError, match=r"cfg\.json:2: not valid JSON"):
        load_sae(tmp_path)


def test_resolve_pretrained(tmp_path):
    save_sae(random_sae(), tmp_path / "local")
    assert resolve_pretrained(str(tmp_path / "local")).d_sae == 64
    assert resolve_pretrained({"path": tmp_path / "local"}).k == 4
    with pytest.raises(SAEFormatError, match=r"sae\.pretrained\.path: .* is not a folder"):
        resolve_pretrained({"path": tmp_path / "missing"})
    with pytest.raises(SAEFormatError, match=r"sae\.pretrained: unknown key\(s\) \['layer'\]"):
        resolve_pretrained({"release": "r", "sae_id": "s", "layer": 3})
    with pytest.raises(SAEFormatError, match="needs both 'release' and 'sae_id'"):
        resolve_pretrained({"release": "gpt2-small-res-jb"})
    pytest.importorskip("sae_lens", reason="sae-lens is not installed")
    # conftest sets HF_HUB_OFFLINE=1, so the hub cannot be reached.
    with pytest.raises(SAEFormatError, match="could not load SAELens release 'gpt2-small-res-jb'.*HF_HUB_OFFLINE"):
        resolve_pretrained({"release": "gpt2-small-res-jb", "sae_id": "blocks.8.hook_resid_pre"})


@pytest.mark.parametrize("m", [512, 1 << 16, (1 << 16) + 1])
def test_grouping_by_latent_is_a_stable_argsort(m):
    from emlab.sae.grads import _group_by_latent

    keys = torch.randint(0, m, (5000,), generator=torch.Generator().manual_seed(0))
    keys[:100] = m - 1  # many equal keys: stability decides their order
    assert torch.equal(_group_by_latent(keys, m), torch.argsort(keys, stable=True))
