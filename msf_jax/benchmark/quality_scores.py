"""The quality benchmark's scores: classifier FID and accuracy with bootstrap spreads, paired
differences between settings that share their samples' indices, and the MSF-vs-DiT headline."""

from __future__ import annotations

import numpy as np


def features_path(score_json: str) -> str:
    """Where a score (`X.json`) keeps its samples' features: `X.features.npy`."""
    return score_json[:-len(".json")] + ".features.npy"


class Scorer:
    """FID / accuracy of uint8 images on the classifier's features, against the reference set."""

    def __init__(self, model, ref_images: np.ndarray, bootstrap: int, seed: int = 0):
        from msf_jax.metrics.classifier import apply_batched
        from msf_jax.metrics.features import FeatureStats

        self.model, self.bootstrap, self.seed = model, int(bootstrap), seed
        self._apply = apply_batched
        feats, _ = apply_batched(model, ref_images)
        self.ref = FeatureStats.from_features(feats)

    def __call__(self, images: np.ndarray, labels: np.ndarray | None, features_out: str = "") -> dict:
        """Scores; `features_out` also keeps the samples' features (.npy) for paired comparisons."""
        from msf_jax.metrics.features import FeatureStats
        from msf_jax.runtime import paths

        feats, logits = self._apply(self.model, images)
        if features_out:
            with paths.committed(features_out) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(feats, np.float32))
        fid = FeatureStats.from_features(feats).frechet_distance(self.ref)
        rng = np.random.default_rng(self.seed)
        boot = [FeatureStats.from_features(feats[rng.integers(0, len(feats), len(feats))]).frechet_distance(self.ref)
                for _ in range(self.bootstrap)]
        out = {"fid": fid, "fid_boot_std": float(np.std(boot)) if boot else float("nan")}
        if labels is not None:
            hits = logits.argmax(-1) == labels
            out["accuracy"] = float(hits.mean())
            out["accuracy_std"] = float(np.sqrt(out["accuracy"] * (1 - out["accuracy"]) / len(hits)))
        return out


def paired_fid_difference(features_a: np.ndarray, features_b: np.ndarray, ref, bootstrap: int = 200,
                          seed: int = 0) -> dict:
    """FID(b) - FID(a) against the reference statistics `ref`, with a paired bootstrap spread.

    Sample i of a and of b share their label and noise (the benchmark samples indices 0..N-1 with the
    same seed in every setting and run), so each bootstrap draw resamples the same indices for both:
    the spread of the difference, which is smaller than either figure's own spread when the two
    settings' samples are alike. Returns {"a", "b", "diff", "diff_std", "p_b_better"} (the fraction of
    draws in which b scores lower)."""
    from msf_jax.metrics.features import FeatureStats

    if features_a.shape != features_b.shape:
        raise ValueError(f"paired comparison needs the same samples: features {features_a.shape} vs {features_b.shape}")
    fid = lambda f: FeatureStats.from_features(f).frechet_distance(ref)  # noqa: E731
    a, b = fid(features_a), fid(features_b)
    rng, n, diffs = np.random.default_rng(seed), len(features_a), []
    for _ in range(int(bootstrap)):
        idx = rng.integers(0, n, n)
        diffs.append(fid(features_b[idx]) - fid(features_a[idx]))
    diffs = np.asarray(diffs)
    return {"a": a, "b": b, "diff": b - a, "diff_std": float(diffs.std()), "p_b_better": float(np.mean(diffs < 0))}


def headline(rows: list[dict], features: dict[str, list[str]], ref, bootstrap: int = 200) -> dict | None:
    """MSF vs the DiT, each at its best row (lowest mean FID): the paired FID difference per seed.

    Per seed, FID(MSF) - FID(DiT) on the same sample indices with its paired bootstrap spread
    (`paired_fid_difference`); over seeds, the mean and the std of those per-seed differences (with one
    seed, the paired bootstrap std). Picking each family's best of several rows on the same samples
    favours it a little (more so the family with more rows). `features`: {setting id: one
    .features.npy path per seed}. None when a family has no row or a row kept no features."""
    from msf_jax.runtime import paths

    best = {}
    for family in ("msf", "dit"):
        candidates = [r for r in rows if r["family"] == family]
        if not candidates:
            return None
        best[family] = min(candidates, key=lambda r: r["fid"])

    def load(path):
        with paths.open(path, "rb") as f:
            return np.load(f)

    paths_msf, paths_dit = features.get(best["msf"]["id"], []), features.get(best["dit"]["id"], [])
    if not paths_msf or len(paths_msf) != len(paths_dit) or not all(map(paths.exists, paths_msf + paths_dit)):
        return None
    per_seed = [paired_fid_difference(load(d), load(m), ref, bootstrap) for m, d in zip(paths_msf, paths_dit)]
    diffs = np.array([p["diff"] for p in per_seed])
    msf, dit = best["msf"], best["dit"]
    return {"msf": msf["label"], "dit": dit["label"], "msf_fid": msf["fid"], "dit_fid": dit["fid"],
            "diff": float(diffs.mean()),
            "diff_spread": float(diffs.std(ddof=1)) if len(diffs) > 1 else per_seed[0]["diff_std"],
            "diff_per_seed": [float(d) for d in diffs], "diff_boot_std_per_seed": [p["diff_std"] for p in per_seed],
            "relative": float(-diffs.mean() / dit["fid"]) if dit["fid"] > 0 else float("nan"),
            "sampling_flops_ratio": msf["flops_per_image"] / dit["flops_per_image"],
            "training_flops_ratio": msf["train_flops"] / dit["train_flops"] if dit["train_flops"] else float("nan")}


def headline_text(h: dict, seeds: list[int]) -> str:
    """The headline as one markdown paragraph."""
    spread = "std over seeds" if len(seeds) > 1 else "paired bootstrap std"
    per_seed = ", ".join(f"{d:+.3f} ± {s:.3f}" for d, s in zip(h["diff_per_seed"], h["diff_boot_std_per_seed"]))
    return (f"**MSF vs DiT, each at its best row:** {h['msf']} {h['msf_fid']:.3f} vs {h['dit']} {h['dit_fid']:.3f}; "
            f"paired FID difference {h['diff']:+.3f} ± {h['diff_spread']:.3f} ({spread}; per seed {per_seed}), "
            f"{100 * abs(h['relative']):.0f}% {'lower' if h['relative'] >= 0 else 'higher'}, at "
            f"{h['sampling_flops_ratio']:.2f}x the DiT's sampling FLOPs and {h['training_flops_ratio']:.2f}x its "
            "training FLOPs. Each family's best row is picked on these samples, which favours it slightly.")
