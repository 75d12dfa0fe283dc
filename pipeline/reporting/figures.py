"""Figures: DVC plot tables and the same figures as PNG (offline), and the orthogonal views of a map."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pipeline.core import metrics as M
from pipeline.io.artifacts import save_csv


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, y, logits, temperature, threshold, binary: bool, raw_logits=None) -> None:
    """DVC plot tables (CSV) and the same figures as PNG, which open offline anywhere. The calibrated
    probabilities are softmax(logits / temperature); `raw_logits` (default `logits`) give the "before"."""
    plt = _plt()

    plots, figs = out / "plots", out / "figures"
    plots.mkdir(exist_ok=True)
    figs.mkdir(exist_ok=True)
    raw = M.apply_temperature(logits if raw_logits is None else raw_logits, 1.0)
    cal = M.apply_temperature(logits, temperature)
    p_raw = raw[:, 1] if binary else raw
    p_cal = cal[:, 1] if binary else cal
    rel_raw, rel_cal = M.reliability_curve(y, p_raw), M.reliability_curve(y, p_cal)
    save_csv(plots / "calibration_test.csv", ["confidence", "observed", "count", "calibrated"],
         [[c, a, n, "before"] for c, a, n in zip(rel_raw["confidence"], rel_raw["accuracy"], rel_raw["count"])
          if n > 0] +
         [[c, a, n, "after"] for c, a, n in zip(rel_cal["confidence"], rel_cal["accuracy"], rel_cal["count"])
          if n > 0])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    for rel, lab in ((rel_raw, "before scaling"), (rel_cal, f"after (T={temperature:.2f})")):
        keep = np.asarray(rel["count"]) > 0
        ax.plot(np.asarray(rel["confidence"])[keep], np.asarray(rel["accuracy"])[keep], "o-", label=lab)
    ax.set(xlabel="predicted probability", ylabel="observed frequency", title="Reliability (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figs / "calibration_test.png", dpi=110)
    plt.close(fig)
    if not binary or len(np.unique(y)) < 2:
        return
    roc = M.roc_points(y, p_cal)
    pr = M.pr_points(y, p_cal)
    save_csv(plots / "roc_test.csv", ["fpr", "tpr", "threshold"], [[r["fpr"], r["tpr"], r["threshold"]] for r in roc])
    save_csv(plots / "pr_test.csv", ["recall", "precision", "threshold"],
         [[r["recall"], r["precision"], r["threshold"]] for r in pr])
    rep = M.binary_report(y, p_cal, threshold)
    (tn, fp), (fn, tp) = rep["confusion_matrix"]
    save_csv(plots / "confusion_test.csv", ["actual", "predicted"],
         [["negative", "negative"]] * tn + [["negative", "positive"]] * fp + [["positive", "negative"]] * fn +
         [["positive", "positive"]] * tp)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    axes[0].plot([r["fpr"] for r in roc], [r["tpr"] for r in roc])
    axes[0].plot([0, 1], [0, 1], "k:", lw=1)
    axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (test), AUROC {M.auroc(y, p_cal):.3f}")
    axes[1].plot([r["recall"] for r in pr], [r["precision"] for r in pr])
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall (test)")
    axes[2].imshow([[tn, fp], [fn, tp]], cmap="Blues")
    for (i, j), v in np.ndenumerate([[tn, fp], [fn, tp]]):
        axes[2].text(j, i, str(v), ha="center", va="center")
    axes[2].set(xticks=[0, 1], yticks=[0, 1], xticklabels=["neg", "pos"], yticklabels=["neg", "pos"],
                xlabel="predicted", ylabel="actual", title=f"Confusion at threshold {threshold:.3f}")
    fig.tight_layout()
    fig.savefig(figs / "roc_pr_confusion_test.png", dpi=110)
    plt.close(fig)


_VIEWS_FIGURES: dict = {}  # panels -> (figure, [(axes, grey image, map image)], title): one figure per process


def _views_figure(panels: int):
    """The figure of `orthogonal_views` with `panels` panels, made once and redrawn for every case: building a
    figure, its axes and colour bar took most of a case's 0.1 s."""
    if panels not in _VIEWS_FIGURES:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.1 * panels + 0.6, 3.2))
        FigureCanvasAgg(fig)
        axes = np.atleast_1d(fig.subplots(1, panels))
        empty = np.zeros((2, 2))
        artists = []
        for ax in axes:
            # RAS: right on the viewer's right, anterior/superior up
            grey = ax.imshow(empty, origin="lower", cmap="gray")
            heat = ax.imshow(empty, origin="lower", cmap="inferno", alpha=0.45, vmin=0, vmax=1)
            ax.axis("off")
            artists.append((ax, grey, heat))
        fig.colorbar(artists[-1][2], ax=list(axes), fraction=0.025, pad=0.02, label="saliency")
        _VIEWS_FIGURES[panels] = (fig, artists, fig.suptitle("", fontsize=9))
    return _VIEWS_FIGURES[panels]


def orthogonal_views(image: np.ndarray, cam: np.ndarray, title: str) -> bytes:
    """PNG: axial, coronal and sagittal slices through the map's peak, overlay + colour bar."""
    if image.ndim == 2:
        views = [("image", image, cam)]
    else:
        i, j, k = np.unravel_index(int(np.argmax(cam)), cam.shape)
        views = [("axial", image[:, :, k], cam[:, :, k]), ("coronal", image[:, j, :], cam[:, j, :]),
                 ("sagittal", image[i, :, :], cam[i, :, :])]
    fig, artists, suptitle = _views_figure(len(views))
    for (ax, grey, heat), (name, img, m) in zip(artists, views):
        extent = (-0.5, img.shape[0] - 0.5, -0.5, img.shape[1] - 0.5)
        grey.set_data(img.T)
        grey.autoscale()  # the grey window of this slice, as a new imshow would take it
        heat.set_data(m.T)
        for artist in (grey, heat):
            artist.set_extent(extent)
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_title(name, fontsize=9)
    suptitle.set_text(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()
