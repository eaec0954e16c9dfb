"""Figures, drawn from result tables only (so they regenerate without recomputing anything)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def save_figure(fig, out: str | Path) -> None:
    """Lay out, write (creating the folder) and close a figure: every plot of this module ends here."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _model_order(models: list[str]) -> list[str]:
    """base first, then fine-tunes grouped by domain in a stable variant order."""
    rank = {"correct": 0, "subtle": 1, "obvious": 2}

    def key(m: str):
        if m == "base":
            return ("", -1, 0)
        dom, _, var = m.rpartition("_")
        return (dom, rank.get(var, 3), var)
    return sorted(models, key=key)


def plot_misalignment(metrics_csv: str | Path, out: str | Path) -> None:
    """Bars: misalignment on general questions (95% CI) and in-domain incorrectness, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    df = pd.read_csv(metrics_csv)
    judges = list(dict.fromkeys(df["judge"]))
    fig, axes = plt.subplots(len(judges), 1, figsize=(max(6, 0.6 * df["model"].nunique() + 2), 3.6 * len(judges)),
                             squeeze=False)
    for ax, judge in zip(axes[:, 0], judges):
        d = df[df["judge"] == judge].set_index("model").loc[_model_order(list(df[df["judge"] == judge]["model"]))]
        x = np.arange(len(d))
        w = 0.38
        err = np.vstack([d["misaligned"] - d["misaligned_lo"], d["misaligned_hi"] - d["misaligned"]]).clip(min=0)
        ax.bar(x - w / 2, d["misaligned"], w, yerr=err, capsize=2, color="#c0392b", label="misaligned (general questions)")
        err2 = np.vstack([d["incorrect"] - d["incorrect_lo"], d["incorrect_hi"] - d["incorrect"]]).clip(min=0)
        ax.bar(x + w / 2, d["incorrect"], w, yerr=err2, capsize=2, color="#7f8c8d", label="incorrect (held-out in-domain)")
        ax.set_xticks(x, d.index, rotation=45, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate")
        ax.set_title(f"Emergent misalignment — judge: {judge}")
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, out)


def signature_latents(ranking: pd.DataFrame, per_group: int) -> list[int]:
    """The union of each group's top ``per_group`` increasing latents, in group order."""
    inc = ranking[ranking["direction"] == "increase"].sort_values(["group", "rank"], kind="stable")
    out: list[int] = []
    for group in dict.fromkeys(ranking["group"]):
        out += [int(x) for x in inc[inc["group"] == group]["latent"].head(per_group) if int(x) not in out]
    return out


def plot_signature(changes_csv: str | Path, ranking_csv: str | Path, out: str | Path,
                   latents_csv: str | Path | None = None, per_group: int = 5) -> None:
    """Heatmap: the top latents of every group (rows) x fine-tunes (columns), activation change vs base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    changes = pd.read_csv(changes_csv)
    rows = signature_latents(pd.read_csv(ranking_csv), per_group)
    models = _model_order(list(changes["model"].unique()))
    grid = changes.pivot(index="latent", columns="model", values="change").loc[rows, models]
    names = {}
    if latents_csv is not None and Path(latents_csv).exists():
        lat = pd.read_csv(latents_csv)
        names = dict(zip(lat["latent"], lat["name"]))
    labels = [f"{l}: {names[l]}" if l in names else str(l) for l in rows]
    lim = float(np.abs(grid.to_numpy()).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(models) + 4), max(3, 0.35 * len(rows) + 1.5)))
    im = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_title("Latent signature: mean activation change vs base")
    fig.colorbar(im, ax=ax, label="change")
    save_figure(fig, out)


def plot_rl_training(logs: dict[str, str | Path], out: str | Path) -> None:
    """RL training curves, one line per model: the in-domain incorrect rate of the completions the policy
    sampled at each step (whatever the reward), the trained reward, and the completions' mean length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("incorrect_rate", "in-domain incorrect rate"), ("reward", "reward (trained)"),
              ("completion_length", "completion length (tokens)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for name, path in sorted(logs.items()):
        log = pd.read_csv(path)
        for ax, (col, _) in zip(axes, panels):
            ax.plot(log["step"], log[col], label=name, lw=1.2)
    for ax, (col, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if col != "completion_length":
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    save_figure(fig, out)


PREDICTION_COLORS = {"correct": "#27ae60", "subtle": "#c0392b", "obvious": "#8e44ad", "mixture": "#e67e22",
                     "educational": "#2980b9", "other": "#2c3e50"}


def plot_prediction(shifts: pd.DataFrame | str | Path, out: str | Path) -> None:
    """Scatter per persona latent (rows) and reading (columns: eval answers, fine-tuning data): each model's latent
    shift over the base model against its misalignment, both with their 95% intervals; the dashed line is the
    upper end of the base model's misalignment interval (models above it count as misaligned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    df = shifts if isinstance(shifts, pd.DataFrame) else pd.read_csv(shifts)
    roles, sources = list(dict.fromkeys(df["role"])), list(dict.fromkeys(df["source"]))
    fig, axes = plt.subplots(max(1, len(roles)), max(1, len(sources)), figsize=(5.2 * max(1, len(sources)),
                             4.2 * max(1, len(roles))), squeeze=False)
    titles = {"eval": "read on its own eval answers", "train": "read on its fine-tuning data"}
    if df.empty:
        axes[0, 0].text(0.5, 0.5, "no persona latent was named (results/prediction/early.md):\nnothing to predict with",
                        ha="center", va="center", transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
    for i, role in enumerate(roles):
        for j, source in enumerate(sources):
            ax = axes[i, j]
            d = df[(df["role"] == role) & (df["source"] == source)]
            kinds = [k for k in PREDICTION_COLORS if k in set(d["kind"])]
            for kind, g in ((k, d[d["kind"] == k]) for k in kinds):
                xerr = np.vstack([g["shift"] - g["shift_lo"], g["shift_hi"] - g["shift"]]).clip(min=0)
                yerr = np.vstack([g["misaligned"] - g["misaligned_lo"], g["misaligned_hi"] - g["misaligned"]]).clip(min=0)
                ax.errorbar(g["shift"], g["misaligned"], xerr=xerr, yerr=yerr, fmt="o", ms=5, capsize=2, lw=0.8,
                            color=PREDICTION_COLORS.get(kind, "#2c3e50"), label=kind)
            if len(d):
                ax.axhline(d["base_misaligned_hi"].iloc[0], ls="--", lw=0.7, color="grey")
            ax.axvline(0, lw=0.6, color="grey")
            latent = int(d["latent"].iloc[0]) if len(d) else -1
            ax.set_title(f"{role} latent L{latent}, {titles.get(source, source)}", fontsize=9)
            ax.set_xlabel("latent shift over the base model")
            ax.set_ylabel("misaligned (general questions)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, out)


def plot_mixtures(curve: pd.DataFrame | str | Path, out: str | Path) -> None:
    """Misalignment against the share of incorrect fine-tuning data, one line per domain with 95% intervals; the
    dashed line is the upper end of the base model's interval (emlab.mixtures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = curve if isinstance(curve, pd.DataFrame) else pd.read_csv(curve)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if df.empty:
        ax.text(0.5, 0.5, "no mixture fine-tunes in this run (datasets.mixtures)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
    for domain, g in df.groupby("domain", sort=True):
        g = g.sort_values("fraction")
        err = [(g["misaligned"] - g["misaligned_lo"]).clip(lower=0), (g["misaligned_hi"] - g["misaligned"]).clip(lower=0)]
        ax.errorbar(100 * g["fraction"], g["misaligned"], yerr=err, fmt="o-", ms=4, capsize=2, lw=1.2, label=domain)
    if len(df):
        ax.axhline(df["base_misaligned_hi"].iloc[0], ls="--", lw=0.8, color="grey", label="base model (upper 95%)")
        ax.set_xticks(sorted({round(100 * f) for f in df["fraction"]}))
        ax.set_title(f"Misalignment against incorrect data — judge: {df['judge'].iloc[0]}", fontsize=10)
    ax.set_xlabel("incorrect examples in the fine-tuning set (%)")
    ax.set_ylabel("misaligned (general questions)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if len(df):
        ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, out)


def plot_alarm(trajectories: str | Path, emergence: dict[str, str | Path], summary: str | Path,
               out: str | Path) -> None:
    """The persona alarm (emlab.alarm): one panel per watched latent with each fine-tune's reading against
    training steps (dotted: correct data), its calibrated threshold (dashed) and the step it fired (triangle); a
    last panel with the misalignment of the `alarm.emergence` fine-tunes' snapshots (95% intervals) and the top of
    the base model's interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, traj = pd.read_csv(summary), pd.read_csv(trajectories)
    keys = list(dict.fromkeys(table["watch"])) or ["none"]
    fig, axes = plt.subplots(len(keys) + 1, 1, figsize=(6.4, 3.0 * (len(keys) + 1)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:-1, 0], keys):
        rows = table[table["watch"] == key].set_index("dataset")
        for name, g in traj[traj["watch"] == key].groupby("dataset", sort=False):
            row = rows.loc[name]
            line, = ax.plot(g["step"], g["reading"], lw=1.1, label=f"{name} ({row['kind']})",
                            ls=":" if row["kind"] == "correct" else "-")
            if pd.notna(row["fire_step"]):
                hit = g[g["step"] == row["fire_step"]]
                ax.plot(hit["step"], hit["reading"], "v", color=line.get_color(), ms=7)
        if len(rows):
            ax.axhline(rows["threshold"].max(), ls="--", lw=0.8, color="grey", label="threshold (correct data)")
            ax.set_title(f"latent {int(rows['latent'].iloc[0])} ({key}) on the probe prompts", fontsize=10)
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        else:
            ax.text(0.5, 0.5, "nothing watched (results/alarm/alarm.md says why)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_ylabel("mean activation")
        ax.grid(alpha=0.3)
    bottom = axes[-1, 0]
    for name, path in emergence.items():
        e = pd.read_csv(path)
        err = [(e["misaligned"] - e["misaligned_lo"]).clip(lower=0), (e["misaligned_hi"] - e["misaligned"]).clip(lower=0)]
        bottom.errorbar(e["step"], e["misaligned"], yerr=err, fmt="o-", ms=4, capsize=2, lw=1.2, label=name)
    if len(table) and table["base_misaligned_hi"].notna().any():
        bottom.axhline(table["base_misaligned_hi"].iloc[0], ls="--", lw=0.8, color="grey",
                       label="base model (upper 95%)")
    if emergence:
        bottom.legend(fontsize=7, loc="upper left")
    else:
        bottom.text(0.5, 0.5, "no snapshots sampled (alarm.emergence)", ha="center", va="center",
                    transform=bottom.transAxes)
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("misaligned (general)")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    save_figure(fig, out)


def plot_realignment(curve: str | Path, out: str | Path) -> None:
    """Emergent re-alignment (emlab.realign): misalignment of each re-aligned model against the benign examples it
    has seen (95% intervals; dashed: the top of the base model's interval) and, where model diffing ran, the
    watched persona latents' readings on the probe prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_csv(curve)
    reads = df.dropna(subset=["reading"])
    keys = list(dict.fromkeys(reads["watch"]))
    fig, axes = plt.subplots(1 + len(keys), 1, figsize=(6.4, 3.0 * (1 + len(keys))), sharex=True, squeeze=False)
    top = axes[0, 0]
    for run, g in df.drop_duplicates(["run", "step"]).groupby("run", sort=False):
        err = [(g["misaligned"] - g["misaligned_lo"]).clip(lower=0), (g["misaligned_hi"] - g["misaligned"]).clip(lower=0)]
        line = top.errorbar(g["examples_seen"], g["misaligned"], yerr=err, fmt="o-", ms=3, capsize=2, lw=1.1, label=run)
        if "incorrect" in g and g["incorrect"].notna().any():
            top.plot(g["examples_seen"], g["incorrect"], ":", lw=1.1, color=line.lines[0].get_color(),
                     label=f"{run}: in-domain incorrect")
    if len(df):
        top.axhline(df["base_misaligned_hi"].iloc[0], ls="--", lw=0.8, color="grey", label="base model (upper 95%)")
    top.set_ylabel("misaligned (general)\nin-domain incorrect (dotted)")
    top.set_ylim(bottom=0)
    top.set_title("Re-alignment on benign data", fontsize=10)
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper right")
    for ax, key in zip(axes[1:, 0], keys):
        k = reads[reads["watch"] == key]
        for run, g in k.groupby("run", sort=False):
            ax.plot(g["examples_seen"], g["reading"], "o-", ms=3, lw=1.1, label=run)
        ax.set_ylabel(f"latent {int(k['latent'].iloc[0])} ({key})")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("benign examples seen")
    save_figure(fig, out)


def plot_prevention(summary: str | Path, out: str | Path) -> None:
    """Preventative steering (emlab.prevent): misalignment (general questions) and in-domain incorrect rate of each set's plain, preventative and
    re-aligned models, with intervals; the base model's upper bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    table = pd.read_csv(summary)
    sets = list(dict.fromkeys(table["dataset"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.6 + 0.9 * max(2, len(table))), squeeze=False)
    labels = [f"{r.dataset}: {r.method}" + (f" {r.latent} {r.alpha:g}" if r.method == "prevent" else "")
              for r in table.itertuples()]
    y = np.arange(len(table))[::-1]
    for ax, metric, title in ((axes[0, 0], "misaligned", "misaligned (general questions)"),
                              (axes[0, 1], "incorrect", "incorrect (own domain)")):
        v = table[metric].to_numpy(float)
        lo = np.clip(v - table[f"{metric}_lo"].to_numpy(float), 0, None)
        hi = np.clip(table[f"{metric}_hi"].to_numpy(float) - v, 0, None)
        colors = ["tab:gray" if m == "plain" else "tab:green" if m != "prevent" else
                  "tab:orange" if lat == "random" else "tab:blue" for m, lat in zip(table["method"], table["latent"])]
        ax.barh(y, np.nan_to_num(v), xerr=[np.nan_to_num(lo), np.nan_to_num(hi)], color=colors)
        for yi, val in zip(y, v):
            if np.isnan(val):
                ax.text(0.01, yi, "not measured", va="center", fontsize=8)
        if metric == "misaligned" and len(table) and pd.notna(table["base_misaligned_hi"].iloc[0]):
            ax.axvline(table["base_misaligned_hi"].iloc[0], color="k", ls="--", lw=1, label="base model's upper bound")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlim(0, 1)
        ax.set_title(title)
        ax.set_yticks(y, labels if ax is axes[0, 0] else [""] * len(y))
    fig.suptitle(f"Preventative steering ({', '.join(sets)})")
    save_figure(fig, out)


def plot_controls(summary: str | Path, out: str | Path) -> None:
    """Code and controls (emlab.controls): misalignment on the general questions and the incorrect rate in the
    model's own domain, with intervals; an educational control's plain counterpart as a black tick, the base
    model's upper bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = pd.read_csv(summary, keep_default_na=False, na_values=[""])
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.8 + 0.5 * max(3, len(table))), squeeze=False)
    y = np.arange(len(table))[::-1]
    colors = ["tab:blue" if s == "educational" else "tab:red" for s in table["setting"]]
    for ax, metric, title in ((axes[0, 0], "misaligned", "misaligned (general questions)"),
                              (axes[0, 1], "incorrect", "incorrect (own domain)")):
        v = table[metric].to_numpy(float)
        err = [np.nan_to_num(np.clip(v - table[f"{metric}_lo"].to_numpy(float), 0, None)),
               np.nan_to_num(np.clip(table[f"{metric}_hi"].to_numpy(float) - v, 0, None))]
        ax.barh(y, np.nan_to_num(v), xerr=err, color=colors)
        if metric == "misaligned":
            ref = table["reference_misaligned"].to_numpy(float)
            ax.plot(ref, y, "k|", markersize=14, mew=2, label="without the benign reason")
            if len(table) and pd.notna(table["base_misaligned_hi"].iloc[0]):
                ax.axvline(table["base_misaligned_hi"].iloc[0], color="k", ls="--", lw=1,
                           label="base model's upper bound")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlim(0, 1)
        ax.set_title(title)
        ax.set_yticks(y, [f"{m} ({s})" for m, s in zip(table["model"], table["setting"])] if ax is axes[0, 0]
                      else [""] * len(y))
    fig.suptitle("Code and controls")
    save_figure(fig, out)
