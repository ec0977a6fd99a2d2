"""``smim-status --plot``: one PNG of a run's curves against step, drawn headless (matplotlib's Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from smim_dist.status import Evaluation  # noqa: E402


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    return [step for step, _ in points], [value for _, value in points]


def plot_run(rows: list[dict], evaluations: list[Evaluation], out: Path, title: str) -> None:
    """Loss and image-blind loss (the level of a model that ignores the image), learning rate, images/s and MFU, and
    every evaluation score, each against the optimizer step."""
    figure, ((losses, rate), (speed, scores)) = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    figure.suptitle(title)
    for key, label in (("loss", "loss (masked patches)"), ("image_blind_loss", "image-blind loss")):
        losses.plot(*series(rows, key), label=label)
    losses.set_ylabel("loss")
    losses.legend()
    rate.plot(*series(rows, "lr"))
    rate.set_ylabel("learning rate")
    speed.plot(*series(rows, "images_per_s"), label="images/s")
    speed.set_ylabel("images/s")
    mfu_steps, mfu = series(rows, "mfu")
    if mfu:
        twin = speed.twinx()
        twin.plot(mfu_steps, [100 * value for value in mfu], color="tab:orange", label="MFU")
        twin.set_ylabel("MFU (%)")
    names = sorted({name for entry in evaluations for name in entry.scores})
    for name in names:
        points = [(entry.step, entry.scores[name]) for entry in evaluations if name in entry.scores]
        scores.plot([step for step, _ in points], [value for _, value in points], marker="o", label=name)
    if names:
        scores.legend(fontsize="small")
    else:
        scores.text(0.5, 0.5, "no evaluation results yet", ha="center", va="center", transform=scores.transAxes)
    scores.set_ylabel("evaluation score")
    for axis in (speed, scores):
        axis.set_xlabel("step")
    for axis in (losses, rate, speed, scores):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
