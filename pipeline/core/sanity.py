"""Saliency sanity checks (pure): model randomization (Adebayo et al.) and localization against a lesion mask."""

from __future__ import annotations

import numpy as np


def spearman_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    import warnings

    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    with warnings.catch_warnings():  # a constant map (e.g. all-zero after ReLU) has no rank order: rho = 0
        warnings.simplefilter("ignore")
        rho = spearmanr(a.ravel(), b.ravel()).statistic
    ssim = structural_similarity(a, b, data_range=1.0, win_size=min(7, *[s | 1 for s in a.shape if s >= 3] or [3]))
    return float(np.nan_to_num(rho)), float(ssim)


def localization(cam: np.ndarray, mask: np.ndarray) -> dict:
    """Pointing game hit and saliency share inside the lesion, with their random-map expectations."""
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    share = float(mask.mean())
    total = float(cam.sum())
    return {"hit": bool(mask[peak]), "inside": float(cam[mask].sum() / total) if total > 0 else 0.0,
            "random_hit": share, "random_inside": share}


def summarize(rand_stats: list, loc: list) -> dict:
    out: dict = {}
    if rand_stats:
        rho = float(np.mean([r for r, _ in rand_stats]))
        ssim = float(np.mean([s for _, s in rand_stats]))
        # Adebayo et al.: maps of a randomized model must differ from the trained model's. The flag
        # uses the rank correlation (their headline measure; < 0.5); SSIM is reported beside it.
        out["randomization"] = {"spearman": round(rho, 4), "ssim": round(ssim, 4), "n": len(rand_stats),
                                "passed": bool(rho < 0.5)}
    if loc:
        out["pointing_game"] = {"hit_rate": round(float(np.mean([d["hit"] for d in loc])), 4),
                                "random_baseline": round(float(np.mean([d["random_hit"] for d in loc])), 5),
                                "n": len(loc)}
        out["energy_inside"] = {"mean": round(float(np.mean([d["inside"] for d in loc])), 4),
                                "random_baseline": round(float(np.mean([d["random_inside"] for d in loc])), 5),
                                "n": len(loc)}
    return out
