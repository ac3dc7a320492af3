"""What a views cache records about its augmented views: the ViewSpec and the columns it stores.

Drawing and rendering views live in pipeline/inputs/augment.py; choosing a view per epoch in
pipeline/train/plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from pipeline.core.config import AugmentConfig, augment_problems
from pipeline.core.errors import CacheError

FORMAT = 2  # 2: view-major rows, compact columns (partner id at the ids' width, cut_size); 1 is refused


@dataclass(frozen=True)
class ViewSpec:
    """What a views cache records: the view count, the augmentation, the seed of its draws, and the
    image size (height, width) its boxes refer to."""

    count: int
    augment: AugmentConfig
    seed: int
    hw: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        from pipeline.core.config import to_dict

        return {"format": FORMAT, "count": self.count, "seed": self.seed, "augment": to_dict(self.augment)}

    @staticmethod
    def of(spec: dict[str, Any], where: Any) -> ViewSpec:
        """The views of a cache with this spec (its `views` entry and the dataset's input shape)."""
        d = spec["views"]
        if d.get("format") != FORMAT:
            raise CacheError(f"{where}: a views cache of an earlier format (a sample's views in contiguous rows, "
                             "wider columns), which this version cannot read selectively; rebuild it with "
                             "`logitcache cache CONFIG`")
        names = {f.name for f in fields(AugmentConfig)}
        recorded = d.get("augment")
        if not isinstance(recorded, dict):
            raise CacheError(f"{where}: the views' augmentation is not recorded as a mapping; the manifest is damaged "
                             "or from another program, rebuild the cache with `logitcache cache CONFIG`")
        unknown = sorted(set(recorded) - names)
        if unknown:  # replayed without them, the pixels would silently differ from those the teachers saw
            raise CacheError(f"{where}: its views use augment settings this version cannot replay "
                             f"({', '.join(unknown)}); read it with the newer logitcache that wrote it, or rebuild it with "
                             "`logitcache cache CONFIG`")
        aug = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
        problems = augment_problems(aug)
        if problems:
            raise CacheError(f"{where}: its views' augmentation is invalid ({problems[0]}); the manifest is damaged, "
                             "rebuild the cache with `logitcache cache CONFIG`")
        shape = spec["dataset"]["input_shape"]
        return ViewSpec(int(d["count"]), aug, int(d["seed"]), (int(shape[1]), int(shape[2])))


def mixes(aug: AugmentConfig) -> bool:
    return aug.mixup_prob > 0 or aug.cutmix_prob > 0


def pad_of(aug: AugmentConfig) -> int:
    """Zero padding around the image in which boxes are stored (so box corners are >= 0)."""
    return (aug.padding if aug.crop == "padded" else 0) + aug.translate


def box_dtype(aug: AugmentConfig, hw: tuple[int, int]) -> type:
    return np.uint8 if max(hw) + 2 * pad_of(aug) <= 255 else np.uint16


def view_dtype(count: int) -> type:
    return np.uint8 if count <= 256 else np.uint16


PARAMS = ("box", "flip", "partner", "lam", "cut")  # what `expand` gives and `render` takes, beside sample_id


def column_names(aug: AugmentConfig) -> list[str]:
    """The view columns a cache made with `aug` stores, in order (see cache.VIEW_COLUMNS)."""
    names = ["view", "box", "flip"]
    if mixes(aug):
        names.append("partner")
    if aug.mixup_prob > 0:
        names.append("lam")
    if aug.cutmix_prob > 0:
        names.append("cut_size")
    return names

