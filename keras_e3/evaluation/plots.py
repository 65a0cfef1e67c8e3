"""PNG plots of `keras-e3 evaluate` (matplotlib, Agg; no pyplot state).

Every function draws one figure and saves it atomically (a temporary file
in the same folder, then `os.replace`) as a PNG at `path`:

  - `reliability_diagram`: accuracy per confidence bin of the ensemble
    (bars, with the gap to the diagonal) and of each member (lighter lines),
    ECE in the title, and the examples per bin below.
  - `member_metrics`: accuracy, NLL, ECE and Brier score of each member and
    of the ensemble, as bars.
  - `routing_maps`: for a few images, for each MoE block and ensemble
    member, the expert each patch is dispatched to, as a colored grid over
    the image (black: dropped, dispatched to no expert); for Experts
    Choice the taking expert with the largest gate (black: taken by none),
    for Soft MoE the expert whose slots give the patch the largest combine
    weight.
  - `expert_load`: per MoE block, the fraction of token copies each expert
    processes (Soft MoE: its mean combine weight), colored by the member
    (E³ partition) that owns it.
  - `ood_histograms`: the in-distribution and OOD distributions of each
    OOD score.
  - `corruption_boxes`: accuracy, NLL and ECE against corruption severity,
    one box per severity over the corruptions, models side by side.
"""

import numpy as np

from keras_e3.io_utils import atomic_path

MEMBER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f")
ENSEMBLE_COLOR = "#222222"


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("The evaluation plots need matplotlib: pip install "
                          "matplotlib (or run with --no-plots).") from e
    return Figure(**kwargs)


def save_figure(fig, path):
    """Saves `fig` as a PNG at `path` atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _member_color(m):
    return MEMBER_COLORS[m % len(MEMBER_COLORS)]


# --------------------------------------------------------------------------


def reliability_diagram(member_probs, labels, path, num_bins=15):
    """Reliability diagram of the ensemble (mean of `member_probs`
    [N, M, C]) and, lighter, of each member when M > 1."""
    from keras_e3.metrics import ece
    from keras_e3.metrics import reliability

    member_probs = np.asarray(member_probs, np.float64)
    m = member_probs.shape[1]
    probs = member_probs.mean(axis=1)
    stats = reliability(probs, labels, num_bins)
    edges = stats["edges"]
    width = np.diff(edges)
    fig = _figure(figsize=(6.4, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True,
                               gridspec_kw={"height_ratios": [3, 1]})
    full = stats["count"] > 0
    acc = np.where(full, stats["accuracy"], 0.0)
    conf = np.where(full, stats["confidence"], 0.0)
    top.bar(edges[:-1], acc, width=width, align="edge", color="#4c72b0",
            edgecolor="white", label="ensemble accuracy")
    gap_low = np.minimum(acc, conf)
    top.bar(edges[:-1][full], np.abs(conf - acc)[full], width=width[full],
            bottom=gap_low[full], align="edge", color="#dd8452", alpha=0.45,
            edgecolor="#dd8452", hatch="//", label="gap to confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect")
    if m > 1:
        for i in range(m):
            s = reliability(member_probs[:, i], labels, num_bins)
            ok = s["count"] > 0
            member_ece = ece(member_probs[:, i], labels, num_bins)
            top.plot(s["confidence"][ok], s["accuracy"][ok], "o-", ms=3,
                     lw=1, alpha=0.5, color=_member_color(i + 1),
                     label=f"member {i} (ECE {member_ece:.3f})")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    title = "Reliability diagram" + (" (ensemble)" if m > 1 else "")
    top.set_title(f"{title}: ECE = {ece(probs, labels, num_bins):.4f} "
                  f"({num_bins} bins, N = {len(labels)})")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(edges[:-1], stats["count"], width=width, align="edge",
               color="#4c72b0", edgecolor="white")
    if stats["count"].max() > 0:
        bottom.set_yscale("log")
        bottom.set_ylim(0.8, stats["count"].max() * 2.0)
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("examples\n(log scale)")
    bottom.grid(alpha=0.3)
    return save_figure(fig, path)


def member_metrics(metrics, ensemble_size, path):
    """Bars of accuracy / NLL / ECE / Brier per member and the ensemble
    (`metrics` is `evaluate_predictions`' dict)."""
    m = int(ensemble_size)
    names = ([f"member {i}" for i in range(m)] + ["ensemble"] if m > 1
             else ["model"])
    prefixes = [f"member_{i}" for i in range(m)] + ["ensemble"] if m > 1 \
        else ["ensemble"]
    colors = ([_member_color(i + 1) for i in range(m)] + [ENSEMBLE_COLOR]
              if m > 1 else [ENSEMBLE_COLOR])
    panels = (("accuracy", "accuracy (higher is better)"),
              ("nll", "NLL (lower is better)"),
              ("ece", "ECE (lower is better)"),
              ("brier", "Brier score (lower is better)"))
    fig = _figure(figsize=(3.0 * len(panels) + 0.5, 3.6),
                  layout="constrained")
    axes = fig.subplots(1, len(panels))
    x = np.arange(len(names))
    for ax, (key, title) in zip(axes, panels):
        values = [metrics[f"{p}/{key}"] for p in prefixes]
        bars = ax.bar(x, values, color=colors, width=0.6,
                      alpha=0.9, edgecolor="black", linewidth=0.5)
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(x, names, rotation=30 if len(names) > 3 else 0,
                      ha="right" if len(names) > 3 else "center")
        ax.set_title(title, fontsize=10)
        hi = max(max(values), 1e-6)
        if key == "accuracy":
            lo = min(values)
            ax.set_ylim(max(0.0, lo - 2 * (1 - lo) - 0.02),
                        1.0 + 0.15 * (1 - lo) + 0.01)
        else:
            ax.set_ylim(0, hi * 1.18)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("value")
    fig.suptitle("Members vs ensemble" if m > 1 else "Model metrics")
    return save_figure(fig, path)


def _expert_colors(num_experts, ensemble_size):
    """One color per expert; each member's partition gets its own hue
    family (a colormap per member)."""
    from matplotlib import colormaps

    per_member = num_experts // ensemble_size
    if ensemble_size == 1:
        cmap = colormaps["tab10" if num_experts <= 10 else "tab20"]
        return [cmap(e % cmap.N) for e in range(num_experts)]
    # Member m's hue is MEMBER_COLORS[m + 1], as in the other plots.
    families = ("Oranges", "Greens", "Reds", "Purples", "YlOrBr", "RdPu",
                "Greys", "Blues")
    colors = []
    for e in range(num_experts):
        m, j = divmod(e, per_member)
        cmap = colormaps[families[m % len(families)]]
        colors.append(cmap(0.35 + 0.55 * (j + 0.5) / per_member))
    return colors


def _display_image(image, value_range):
    image = np.asarray(image, np.float64)
    if value_range is not None:
        low, high = [float(v) for v in value_range]
    else:
        low, high = float(image.min()), float(image.max())
    image = np.clip((image - low) / max(high - low, 1e-12), 0.0, 1.0)
    if image.shape[-1] == 1:
        return image[..., 0], "gray"
    return image[..., :3], None


# Per router: what the routing maps show, and what a patch no expert
# serves is called (Soft MoE serves every token).
MAP_TITLES = {
    "top_k": ("Expert routing per patch (highest-gate expert the token is "
              "dispatched to)", "dropped (×)"),
    "experts_choice": ("Experts Choice per patch (highest-gate expert "
                       "among those that took the token)",
                       "taken by no expert (×)"),
    "soft": ("Soft MoE per patch (expert whose slots give the token the "
             "largest combine weight)", None),
}


def routing_maps(images, top_expert, grid_size, num_experts, ensemble_size,
                 path, labels=None, value_range=None, alpha=0.55,
                 router="top_k"):
    """Expert of each patch, per image (rows) and MoE block x member
    (columns).

    `top_expert` maps block names to [n, M, patches] expert indices (-1:
    dropped), patches in row-major grid order (class token excluded);
    `router` ("top_k", "experts_choice", "soft") words the title and the
    legend.
    """
    title, unserved = MAP_TITLES[router]
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch

    images = np.asarray(images)
    n = images.shape[0]
    m = int(ensemble_size)
    gh, gw = grid_size
    layers = list(top_expert)
    columns = [(name, j) for name in layers for j in range(m)]
    colors = _expert_colors(num_experts, m)
    cell = 2.1
    fig = _figure(figsize=(cell * (1 + len(columns)) + 1.8,
                           cell * n + 0.9), layout="constrained")
    axes = np.asarray(fig.subplots(n, 1 + len(columns), squeeze=False))
    h, w = images.shape[1:3]
    annotate = gh * gw <= 64
    for i in range(n):
        shown, cmap = _display_image(images[i], value_range)
        ax = axes[i, 0]
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=1)
        label = f"label {labels[i]}" if labels is not None else ""
        ax.set_ylabel(f"image {i}\n{label}", fontsize=9)
        if i == 0:
            ax.set_title("input", fontsize=9)
        for c, (name, j) in enumerate(columns, start=1):
            ax = axes[i, c]
            experts = np.asarray(top_expert[name])[i, j].reshape(gh, gw)
            overlay = np.zeros((gh, gw, 4))
            for e in range(num_experts):
                overlay[experts == e] = to_rgba(colors[e], alpha)
            overlay[experts < 0] = (0.0, 0.0, 0.0, 0.85)
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=1,
                      extent=(0, w, h, 0))
            ax.imshow(overlay, extent=(0, w, h, 0), interpolation="nearest")
            for r in range(gh + 1):
                ax.axhline(r * h / gh, color="white", lw=0.5)
            for q in range(gw + 1):
                ax.axvline(q * w / gw, color="white", lw=0.5)
            if annotate:
                for r in range(gh):
                    for q in range(gw):
                        e = experts[r, q]
                        ax.text((q + 0.5) * w / gw, (r + 0.5) * h / gh,
                                "×" if e < 0 else str(e), ha="center",
                                va="center", fontsize=7, color="white",
                                fontweight="bold")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            if i == 0:
                block = name.replace("encoderblock_", "block ")
                ax.set_title(f"{block}, member {j}" if m > 1 else block,
                             fontsize=9)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(facecolor=to_rgba(colors[e], 0.9),
                     label=(f"expert {e} (member {e // (num_experts // m)})"
                            if m > 1 else f"expert {e}"))
               for e in range(num_experts)]
    if unserved:
        handles.append(Patch(facecolor="black", label=unserved))
    fig.legend(handles=handles, loc="outside right center", fontsize=8,
               title="dispatched to", title_fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def expert_load(layers, ensemble_size, path, num_examples=None):
    """Per MoE block, bars of the fraction of token copies per expert (Soft
    MoE: each expert's mean combine weight), with the balanced load.

    `layers` maps block names to dicts with "router", "expert_load",
    "uniform_load", "dropped_fraction" (and, for Soft MoE,
    "mean_top_expert_weight"), as `keras_e3.evaluation.routing_stats`.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    names = list(layers)
    m = int(ensemble_size)
    num_experts = len(layers[names[0]]["expert_load"])
    colors = _expert_colors(num_experts, m)
    fig = _figure(figsize=(max(4.4, 0.45 * num_experts + 2.4) * len(names)
                           + 0.4, 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True))
    router = layers[names[0]].get("router", "top_k")
    uniform = float(layers[names[0]]["uniform_load"])
    top = uniform
    for ax, name in zip(axes, names):
        load = np.asarray(layers[name]["expert_load"])
        ax.bar(np.arange(num_experts), load, color=colors, edgecolor="black",
               linewidth=0.5)
        ax.axhline(uniform, ls="--", color="gray", lw=1)
        ax.set_xticks(np.arange(num_experts))
        ax.set_xlabel("expert")
        block = name.replace("encoderblock_", "block ")
        ax.set_title(f"{block}: " + _load_caption(layers[name], router),
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        top = max(top, float(load.max()))
    axes[0].set_ylabel("mean combine weight" if router == "soft" else
                       "fraction of the member's tokens" if m > 1
                       else "fraction of tokens")
    axes[0].set_ylim(0, top * 1.4)
    handles = [Line2D([], [], ls="--", color="gray", label="balanced")]
    if m > 1:
        per_member = num_experts // m
        handles = [Patch(facecolor=colors[j * per_member + per_member // 2],
                         edgecolor="black", linewidth=0.5,
                         label=f"member {j} partition")
                   for j in range(m)] + handles
    axes[-1].legend(handles=handles, fontsize=8, loc="upper right",
                    ncol=min(len(handles), 3))
    seen = f" over {num_examples} images" if num_examples else ""
    what = ("each token's combine weight on the expert's slots"
            if router == "soft" else "tokens dispatched to each expert")
    fig.suptitle(f"Expert load{seen}\n({what}; class token included)",
                 fontsize=10)
    return save_figure(fig, path)


def _load_caption(layer, router):
    if router == "soft":
        return (f"top expert weight {layer['mean_top_expert_weight']:.2f} "
                "on average")
    if router == "experts_choice":
        return f"{layer['dropped_fraction']:.1%} of tokens taken by none"
    return f"{layer['dropped_fraction']:.1%} of tokens dropped"


def ood_histograms(scores, path, bins=30):
    """Histograms of each OOD score (`{name: (in scores, OOD scores)}`)."""
    from keras_e3.metrics import auroc

    names = list(scores)
    fig = _figure(figsize=(3.6 * len(names) + 0.4, 3.4),
                  layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names):
        s_in, s_out = (np.asarray(s, np.float64) for s in scores[name])
        lo = min(s_in.min(), s_out.min())
        hi = max(s_in.max(), s_out.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        ax.hist(s_in, bins=edges, alpha=0.6, color="#4c72b0",
                label="in-distribution", density=True)
        ax.hist(s_out, bins=edges, alpha=0.6, color="#dd8452", label="OOD",
                density=True)
        ax.set_title(f"{name.replace('_', ' ')}: AUROC "
                     f"{auroc(s_in, s_out):.3f}", fontsize=10)
        ax.set_xlabel("score (higher = more OOD)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle("OOD scores", fontsize=10)
    return save_figure(fig, path)


def corruption_boxes(rows_by_model, path, metrics=("accuracy", "nll", "ece"),
                     output="ensemble"):
    """Metrics against corruption severity, the plot of Ovadia et al.
    (2019), "Can you trust your model's uncertainty?": one panel per
    metric; per severity (0: clean) one box per model over the corruptions
    (whiskers: min and max), the models side by side.

    Args:
        rows_by_model: {model name: `evaluate_corruptions` rows}.
        path: the PNG to write.
        metrics: the row keys to plot.
        output: which model output ("ensemble", "member_0", ...).
    """
    names = list(rows_by_model)
    if not names:
        raise ValueError("corruption_boxes needs at least one model's rows.")
    severities = sorted({int(r["severity"]) for rows in rows_by_model.values()
                         for r in rows if r["model"] == output})
    fig = _figure(figsize=(4.2 * len(metrics), 3.6))
    width = 0.8 / len(names)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for i, name in enumerate(names):
            data = [[r[metric] for r in rows_by_model[name]
                     if r["model"] == output and int(r["severity"]) == s]
                    for s in severities]
            positions = [s + (i - (len(names) - 1) / 2) * width
                         for s in severities]
            kept = [(p, d) for p, d in zip(positions, data) if d]
            if not kept:
                continue
            color = MEMBER_COLORS[i % len(MEMBER_COLORS)]
            boxes = ax.boxplot([d for _, d in kept],
                               positions=[p for p, _ in kept],
                               widths=width * 0.9, whis=(0, 100),
                               patch_artist=True, manage_ticks=False)
            for box in boxes["boxes"]:
                box.set(facecolor=color, alpha=0.55, edgecolor=color)
            for part in ("whiskers", "caps", "medians"):
                for line in boxes[part]:
                    line.set(color=color)
            ax.plot([], [], color=color, linewidth=6, alpha=0.55, label=name)
        ax.set_xticks(severities)
        ax.set_xticklabels(["clean" if s == 0 else str(s)
                            for s in severities])
        ax.set_xlabel("corruption severity")
        ax.set_ylabel({"nll": "NLL", "ece": "ECE", "brier": "Brier"}.get(
            metric, metric))
        ax.grid(axis="y", alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Under corruption ({output}; boxes over the corruptions)",
                 fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
