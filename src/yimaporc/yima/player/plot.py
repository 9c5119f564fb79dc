"""``yimaporc play --plot``: buffer level, flow-control thresholds and delta p over time.

matplotlib is an optional extra; the CLI checks for it before playing.
"""

from __future__ import annotations

from typing import Any


def plot_session(session: Any, path: str) -> None:
    """Draw a finished :class:`~.shell.PlayerSession` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pres = session.presentation
    fig, ax = plt.subplots(figsize=(10, 5))
    ax2 = ax.twinx()
    for name, p in pres.players.items():
        t0 = p.start_ct
        levels = p.buffer_levels
        ax.plot([t for t, _ in levels], [b / 1e3 for _, b in levels], label=f"level {name}")
        cfg = p.config
        lines: list[tuple[float, str]] = []
        if cfg.flow == "delta-p" and cfg.bands is not None:
            lines = [(x, "band threshold") for x in cfg.bands.thresholds]
        elif cfg.flow == "pause-resume" and cfg.pause is not None:
            lines = [(cfg.pause.high, "pause at"), (cfg.pause.low, "resume at")]
        for x, label in lines:
            ax.axhline(x / 1e3, linestyle=":", linewidth=0.8, color="grey")
            ax.annotate(label, (0, x / 1e3), fontsize=7, color="grey")
        end = levels[-1][0] if levels else 0.0
        for node in p.nodes:
            changes = [(at - t0, s) for at, n, s in p.speed_changes if n == node]
            ts, dp = [0.0], [1.0]
            for t, s in changes:
                ts += [t, t]
                dp += [dp[-1], 1 / s if s > 0 else 0.0]
            ts.append(max(end, ts[-1]))
            dp.append(dp[-1])
            ax2.plot(ts, dp, linewidth=0.8, alpha=0.7, label=f"delta p {name} node {node}")
    ax.set_xlabel("seconds since the session start (cluster clock)")
    ax.set_ylabel("buffer level (kB)")
    ax2.set_ylabel("delta p (x nominal inter-packet delay)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
    ax.set_title("yimaporc play: buffer level, thresholds, delta p")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
