"""The picture of a diff (finetune/diff.py): per-position KL as a heatmap (prompts × positions) and the
per-layer residual-stream cosine distance, written atomically as one PNG."""
from __future__ import annotations

from pathlib import Path

from models.atomic import atomic_path


def _plain(text: str) -> str:
    """A label matplotlib shows as written (a '$' pair would start mathtext)."""
    return text.replace("$", r"\$")


def write_png(result: dict, path: Path) -> Path:
    """Draw `result` to `path` (appears only when complete); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    rows = result["prompts"]
    width = max(len(r["kl"]) for r in rows)
    grid = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        grid[i, :len(r["kl"])] = r["kl"]
    fig, (ax_kl, ax_layers) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.35 * len(rows) + 2)),
                                           gridspec_kw={"width_ratios": [3, 1.4]})
    try:
        image = ax_kl.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap="magma",
                             vmin=0.0, vmax=max(float(np.nanmax(grid)), 1e-12))
        fig.colorbar(image, ax=ax_kl, label="KL(A||B), nats")
        ax_kl.set_xlabel("position (token)")
        ax_kl.set_ylabel("prompt")
        ax_kl.set_yticks(range(len(rows)))
        ax_kl.set_title(_plain(f"next-token KL: A={result['a']['spec']}  B={result['b']['spec']}"), fontsize=9)
        layers = result.get("layers")
        if layers:
            cd = layers["cosine_distance"]
            ax_layers.plot(range(1, len(cd) + 1), cd, marker="o")
            ax_layers.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax_layers.set_xlabel("decoder layer")
            ax_layers.set_ylabel("1 - cos(h_A, h_B), mean over positions")
            ax_layers.set_ylim(bottom=0)
        else:
            ax_layers.text(0.5, 0.5, _plain(result.get("layers_note", "no layer comparison")), ha="center",
                           va="center", wrap=True, transform=ax_layers.transAxes)
        ax_layers.set_title("residual stream", fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
