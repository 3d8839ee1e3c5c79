"""Pictures of slot usage: the sorted usage curve of every memory layer and the N x N heat map of its slots."""

from __future__ import annotations

from pathlib import Path

from ..errors import MemeditError
from ..storage.checkpoint import atomic_path
from .stats import SlotStats


def plot_usage(stats: SlotStats, path: str | Path) -> Path:
    """Write a figure to ``path`` (format from its suffix): left, accesses per slot sorted descending, one curve per
    layer (log-log); right, one heat map per layer of accesses on the N x N grid (row i, column j of slot i*N + j)."""
    try:
        import matplotlib  # lazy: optional ([plot] extra) and slow to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: optional ([plot] extra) and slow to import
        from matplotlib.colors import LogNorm  # lazy: optional ([plot] extra) and slow to import
    except ImportError:
        raise MemeditError("--plot needs matplotlib: pip install 'memedit[plot]'") from None
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    N = stats.n_keys
    nl = len(stats.layers)
    fig, axes = plt.subplots(1, 1 + nl, figsize=(5 + 4.2 * nl, 4.2), squeeze=False)
    curve = axes[0, 0]
    for li, L in enumerate(stats.layers):
        use = stats.counts[li].sum(0).double()  # (S,) over heads
        desc = use.sort(descending=True).values.numpy()
        curve.plot(range(1, len(desc) + 1), desc, label=f"layer {L}")
        grid = use.view(N, N).numpy()
        ax = axes[0, 1 + li]
        positive = grid[grid > 0]
        norm = LogNorm(vmin=max(positive.min(), 1), vmax=positive.max()) if positive.size else None
        im = ax.imshow(grid, cmap="viridis", norm=norm, interpolation="nearest")
        ax.set_title(f"layer {L}: accesses per slot (white: dead)")
        ax.set_xlabel("second-half sub-key j")
        ax.set_ylabel("first-half sub-key i")
        fig.colorbar(im, ax=ax, fraction=0.046)
    curve.set_xscale("log")
    curve.set_yscale("symlog", linthresh=1)
    curve.set_ylim(bottom=0)
    curve.set_xlabel("slot rank (most used first)")
    curve.set_ylabel("accesses (all heads)")
    curve.set_title(f"sorted slot usage, {stats.tokens:,} tokens")
    curve.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110)
    except ValueError as e:
        raise MemeditError(f"cannot write a plot as {fmt!r}: {e}; use a .png, .pdf or .svg name") from None
    finally:
        plt.close(fig)
    return path
