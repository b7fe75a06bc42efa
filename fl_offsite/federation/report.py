"""PNG curves of a run, for people without TensorBoard at hand."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def render(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "summary.json"
    if not path.is_file():
        raise UserError(f"run_dir: {run_dir} has no summary.json; pass a run directory made "
                        "by `fl-offsite simulate`")
    summary = json.loads(path.read_text())
    rounds = summary.get("rounds") or []
    if not rounds:
        raise UserError(f"run_dir: {run_dir} has no completed round yet")
    metric = summary["main_metric"]
    steps = [0] + [r["round"] for r in rounds]
    outputs = []

    def save(fig, name: str) -> None:
        from matplotlib.ticker import MaxNLocator

        for axes in fig.axes:  # rounds are whole numbers
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        outputs.append(run_dir / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    evaluated = [r for r in rounds if r["plugin"]]  # every eval_every rounds, and the last
    ax.plot([0] + [r["round"] for r in evaluated],
            [summary["zero_shot"][metric]] + [r["plugin"][metric] for r in evaluated],
            "o-", label="plug-in (full model + adapter)")
    if all(r["emulator"] for r in evaluated):
        ax.plot([0] + [r["round"] for r in evaluated], [summary["emulator_zero_shot"][metric]] +
                [r["emulator"][metric] for r in evaluated], "s--", label="emulator + adapter")
    ax.axhline(summary["zero_shot"][metric], color="gray", linestyle=":", label="zero-shot")
    ax.set(xlabel="round", ylabel=metric, title="Plug-in vs emulator vs zero-shot")
    ax.legend()
    save(fig, "report_metric.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    with_loss = [r for r in rounds if r["train_loss"]]
    x = [r["round"] for r in with_loss]
    ax.plot(x, [r["train_loss"]["mean"] for r in with_loss], "o-", label="mean")
    ax.fill_between(x, [r["train_loss"]["min"] for r in with_loss],
                    [r["train_loss"]["max"] for r in with_loss], alpha=0.3, label="min-max")
    ax.set(xlabel="round", ylabel="client train loss", title="Client training loss")
    ax.legend()
    save(fig, "report_client_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps[1:], [r["bytes_down_total"] / 1e6 for r in rounds], "o-", label="down (total)")
    ax.plot(steps[1:], [r["bytes_up_total"] / 1e6 for r in rounds], "s-", label="up (total)")
    ax.set(xlabel="round", ylabel="MB", title="Traffic (payload bytes, cumulative)")
    ax.legend()
    save(fig, "report_traffic.png")
    return outputs
