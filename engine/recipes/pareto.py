"""The search's Pareto plot (``search/pareto.png``): every candidate's adapter parameters against
its validation accuracy, coloured by generation, with the front, the best and the budget."""

from __future__ import annotations

import math
from pathlib import Path

from search import EvolutionSettings
from supernet import atomic_write


def pareto_plot(history: list[dict], best: dict, settings: EvolutionSettings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [h["params"] for h in history]
    accs = [h["score"] for h in history]
    order = sorted(range(len(history)), key=lambda i: (params[i], -accs[i]))
    front, best_acc = [], -math.inf
    for i in order:
        if accs[i] > best_acc:
            front.append(i)
            best_acc = accs[i]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    sc = ax.scatter(params, accs, c=[h["generation"] for h in history], s=10, cmap="viridis", alpha=0.7, label="candidates")
    fig.colorbar(sc, ax=ax, label="generation")
    ax.plot([params[i] for i in front], [accs[i] for i in front], "r-o", ms=3, lw=1, label="Pareto front")
    ax.scatter([best["params"]], [best["score"]], marker="*", s=150, c="red", edgecolors="k", zorder=5, label="best")
    if settings.max_params is not None:
        ax.axvline(settings.max_params, color="k", ls="--", lw=1, label="max_params")
    if settings.min_params is not None:
        ax.axvline(settings.min_params, color="gray", ls=":", lw=1, label="min_params")
    ax.set_xlabel("adapter parameters (head excluded)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("GLoRA evolutionary search")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
