"""Loss curves of a run as a PNG."""

from __future__ import annotations

from pathlib import Path

from launcher.errors import UserError
from launcher.runtime.metrics import METRICS_FILE, read_metrics


def plot_losses(run_dir: Path, out: Path) -> Path:
    records = read_metrics(run_dir / METRICS_FILE)
    train = [r for r in records if "loss" in r and not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    if not train:
        raise UserError(f"{run_dir / METRICS_FILE}: no training steps recorded yet")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
