"""Augmented views: parameters drawn per (seed, sample_id, view), stored compactly, replayed exactly.

    aug = AugmentConfig(crop="resized", scale=(0.6, 1.0), flip=0.5)
    stored = draw(aug, seed, sample_ids, views, (H, W), transfer_ids)   # the columns a cache stores
    params = expand(spec, {"sample_id": ..., "view": ..., **stored})     # every parameter of each view
    x = render_rows(lookup, params, aug)                                 # (n, C, H, W) float32 pixels

The cache stage draws each view's parameters, stores them beside the targets, and runs the
teachers on `render_rows` of the stored (already rounded) parameters; the student, and a user's
loop through `pipeline.replay_views`, rebuild the pixels with the same function from the same
stored columns, so all see the same bytes.

Parameters come from a counter-based generator: every uniform is a hash (splitmix64 rounds) of
(seed, sample_id, view, draw index). Any worker computes any view without state; view v of a
sample is the same whatever the number of views or the shard plan, and reruns are identical.
What is an exact integer function of those uniforms (whether a view is mixed, and how; the centre
of a cutmix box; the λ of a cutmix view, the area it keeps) is recomputed by `expand` rather than
stored; what goes through floating-point library functions whose last bits may differ between
builds (log, exp, the Beta quantile) is stored as drawn.

Rows of a views cache are view-major inside each shard (all of its samples' view 0, then view 1,
...), and the shard's sample count is a multiple of the chunk size, so a chunk holds one view of
`chunk_rows` consecutive samples (a block). A student reads one view per block per epoch
(`epoch_blocks`): 1/N of the cache.

Pixels are rebuilt with explicit gathers and one eager elementwise op at a time (no interpolation
kernel, no matmul, no fused multiply-add): each output pixel depends only on its own row's input
and parameters, never on the batch it is rendered in, so the result is bit-identical in any batch.

torchvision's functional transforms (resized_crop, horizontal_flip, affine) would be the natural
library, but its PyPI wheels link against the CUDA torch libraries and do not import with the CPU
torch wheel this project pins; the transforms here follow torchvision's RandomResizedCrop,
RandomCrop(padding) and timm's mixup/cutmix parameterization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.core.config import AugmentConfig
from pipeline.core.errors import CacheError, DataError
from pipeline.format.views import ViewSpec, box_dtype, mixes, pad_of

_TRIES = 10  # RandomResizedCrop attempts before the fallback crop (as torchvision)


# columns of the uniforms matrix: 2 per resized-crop try, then the named draws below
_U_TOP, _U_LEFT, _U_TY, _U_TX, _U_FLIP, _U_MIX, _U_PARTNER, _U_LAM, _U_CY, _U_CX = range(2 * _TRIES, 2 * _TRIES + 10)


_NUM_UNIFORMS = 2 * _TRIES + 10


def check_images(input_shape: tuple[int, ...], where: str) -> tuple[int, int]:
    if len(input_shape) != 3:
        raise DataError(f"{where}: augmented views need image inputs (channels, height, width), the data has "
                        f"shape {tuple(input_shape)}; set cache.views=0 and remove the augment section")
    return int(input_shape[1]), int(input_shape[2])


# ---------------------------------------------------------------------------------------------
# Counter-based uniforms

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection on uint64 with full avalanche."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_keys(*parts: np.ndarray | int) -> np.ndarray:
    """uint64 hash of broadcast integer arrays (one key per element; order-sensitive)."""
    arrays = np.broadcast_arrays(*[np.asarray(p, dtype=np.int64) for p in parts])
    with np.errstate(over="ignore"):
        z = np.full(arrays[0].shape, 0x6A09E667F3BCC909, dtype=np.uint64)
        for a in arrays:
            z = _mix64(z + _GOLDEN + a.astype(np.uint64))  # negative ids wrap, as in two's complement
    return z


def uniforms(seed: int, sample_ids: np.ndarray, views: np.ndarray, k: int) -> np.ndarray:
    """(n, k) float64 uniforms in [0, 1): draw j of view `views[i]` of sample `sample_ids[i]`."""
    key = hash_keys(seed, sample_ids, views)[:, None]  # (n, 1)
    with np.errstate(over="ignore"):
        z = _mix64(key + _GOLDEN * np.arange(1, k + 1, dtype=np.uint64)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---------------------------------------------------------------------------------------------
# Drawing parameters


def draw(aug: AugmentConfig, seed: int, sample_ids: np.ndarray, views: np.ndarray, hw: tuple[int, int],
         transfer_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The stored columns of views `views[i]` of samples `sample_ids[i]`, in their stored dtypes
    (`expand` adds what is recomputed rather than stored).

    box (n, 4): top, left, height, width of the source region in the image zero-padded by
    `pad_of(aug)` pixels; flip (n,) 0/1; with mixup/cutmix: partner (n,) sample id or -1 (int32 when
    every transfer id fits, else int64); with mixup: lam (n,) float16, the weight of a mixup view's
    own image and label (1 on other rows); with cutmix: cut_size (n, 2), height and width of timm's
    box before clipping (0 on other rows). `transfer_ids`: the ids partners are drawn from (the
    whole transfer set, so a view never depends on the shard plan)."""
    H, W = hw
    n = len(sample_ids)
    u = uniforms(seed, np.asarray(sample_ids, np.int64), np.asarray(views, np.int64), _NUM_UNIFORMS)
    h, w = np.full(n, H, np.int64), np.full(n, W, np.int64)
    top, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
    if aug.crop == "resized":
        h, w = _resized_size(aug, u, H, W)
        top = np.floor(u[:, _U_TOP] * (H - h + 1)).astype(np.int64)
        left = np.floor(u[:, _U_LEFT] * (W - w + 1)).astype(np.int64)
    elif aug.crop == "padded":  # RandomCrop(size, padding=p): a shift by -p..p pixels
        top = np.floor(u[:, _U_TOP] * (2 * aug.padding + 1)).astype(np.int64) - aug.padding
        left = np.floor(u[:, _U_LEFT] * (2 * aug.padding + 1)).astype(np.int64) - aug.padding
    if aug.translate:
        t = aug.translate
        top = top + np.floor(u[:, _U_TY] * (2 * t + 1)).astype(np.int64) - t
        left = left + np.floor(u[:, _U_TX] * (2 * t + 1)).astype(np.int64) - t
    pad = pad_of(aug)
    out = {
        "box": np.stack([top + pad, left + pad, h, w], axis=1).astype(box_dtype(aug, hw)),
        "flip": (u[:, _U_FLIP] < aug.flip).astype(np.uint8),
    }
    if mixes(aug):
        out.update(_draw_mix(aug, u, np.asarray(sample_ids, np.int64), transfer_ids, hw))
    return out


def _resized_size(aug: AugmentConfig, u: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """torchvision RandomResizedCrop.get_params' size: first of 10 tries that fits, else its fallback."""
    n = len(u)
    area = H * W
    lo, hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    h, w = np.zeros(n, np.int64), np.zeros(n, np.int64)
    found = np.zeros(n, bool)
    for t in range(_TRIES):
        target = area * (aug.scale[0] + u[:, 2 * t] * (aug.scale[1] - aug.scale[0]))
        ar = np.exp(lo + u[:, 2 * t + 1] * (hi - lo))
        wt = np.round(np.sqrt(target * ar)).astype(np.int64)
        ht = np.round(np.sqrt(target / ar)).astype(np.int64)
        ok = ~found & (wt > 0) & (wt <= W) & (ht > 0) & (ht <= H)
        h[ok], w[ok] = ht[ok], wt[ok]
        found |= ok
    in_ratio = W / H
    if in_ratio < aug.ratio[0]:
        fw, fh = W, int(round(W / aug.ratio[0]))
    elif in_ratio > aug.ratio[1]:
        fh, fw = H, int(round(H * aug.ratio[1]))
    else:
        fh, fw = H, W
    h[~found], w[~found] = fh, fw
    return h, w


def _kind(aug: AugmentConfig, u: np.ndarray) -> np.ndarray:
    """0: not mixed, 1: mixup, 2: cutmix; (n,) from the view's uniforms."""
    return np.where(u[:, _U_MIX] < aug.mixup_prob, 1, np.where(u[:, _U_MIX] < aug.mixup_prob + aug.cutmix_prob, 2, 0))


def _draw_mix(aug: AugmentConfig, u: np.ndarray, sample_ids: np.ndarray, transfer_ids: np.ndarray | None,
              hw: tuple[int, int]) -> dict[str, np.ndarray]:
    from scipy.special import betaincinv  # scipy comes with scikit-learn

    if transfer_ids is None or len(transfer_ids) < 2:
        raise DataError("augment: mixup/cutmix need a transfer set of at least 2 samples to draw partners from")
    H, W = hw
    pool = np.asarray(transfer_ids, np.int64)
    kind = _kind(aug, u)
    idx = np.floor(u[:, _U_PARTNER] * len(pool)).astype(np.int64)
    idx = np.where(pool[idx] == sample_ids, (idx + 1) % len(pool), idx)  # never the sample itself
    narrow = pool.min() > np.iinfo(np.int32).min and pool.max() <= np.iinfo(np.int32).max
    out = {"partner": np.where(kind > 0, pool[idx], -1).astype(np.int32 if narrow else np.int64)}
    alpha = np.where(kind == 2, aug.cutmix_alpha, aug.mixup_alpha)
    lam = betaincinv(alpha, alpha, u[:, _U_LAM])  # Beta(alpha, alpha) by its inverse CDF
    if aug.mixup_prob > 0:
        out["lam"] = np.where(kind == 1, lam, 1.0).astype(np.float16)
    if aug.cutmix_prob > 0:  # timm's rand_bbox: a box of side sqrt(1 - lam) around a uniform centre
        size = np.stack([(H * np.sqrt(1.0 - lam)).astype(np.int64), (W * np.sqrt(1.0 - lam)).astype(np.int64)], 1)
        out["cut_size"] = np.where((kind == 2)[:, None], size, 0).astype(box_dtype(aug, hw))
    return out


def expand(spec: ViewSpec, rows: dict[str, np.ndarray], where: Any = "views") -> dict[str, np.ndarray]:
    """Every parameter of the views `rows` holds (sample_id, view and the stored columns), as the
    renderer takes them: the stored columns, and with mixup/cutmix partner (n,) int64 sample id or -1,
    lam (n,) float16 for every row (a cutmix view's is the area it keeps, 1 - h w / (H W)) and with
    cutmix cut (n, 4), top, left, height, width of the region pasted from the partner (height 0 when
    none), timm's box clipped to the image. Exact integer functions of the counter-based uniforms."""
    aug = spec.augment
    out = {k: v for k, v in rows.items() if k != "cut_size"}
    if not mixes(aug):
        return out
    H, W = spec.hw
    n = len(rows["sample_id"])
    u = uniforms(spec.seed, np.asarray(rows["sample_id"], np.int64), np.asarray(rows["view"], np.int64), _NUM_UNIFORMS)
    kind = _kind(aug, u)
    partner = np.asarray(rows["partner"], np.int64)
    if ((partner >= 0) != (kind > 0)).any():
        raise CacheError(f"{where}: the stored partners do not match the views spec's draws; the cache is corrupt, "
                         "rebuild it")
    cut = np.zeros((n, 4), np.int64)
    if "cut_size" in rows:
        size = rows["cut_size"].astype(np.int64)
        cy, cx = np.floor(u[:, _U_CY] * H).astype(np.int64), np.floor(u[:, _U_CX] * W).astype(np.int64)
        y0, y1 = np.clip(cy - size[:, 0] // 2, 0, H), np.clip(cy + size[:, 0] // 2, 0, H)
        x0, x1 = np.clip(cx - size[:, 1] // 2, 0, W), np.clip(cx + size[:, 1] // 2, 0, W)
        is_cut = kind == 2
        cut[is_cut] = np.stack([y0, x0, y1 - y0, x1 - x0], axis=1)[is_cut]
        out["cut"] = cut.astype(box_dtype(aug, spec.hw))
    lam = rows["lam"].astype(np.float64) if "lam" in rows else np.ones(n)
    kept = 1.0 - cut[:, 2] * cut[:, 3] / (H * W)  # the area a cutmix view keeps
    out["partner"] = partner
    out["lam"] = np.where(kind == 2, kept, np.where(kind == 1, lam, 1.0)).astype(np.float16)
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def _crop_resize(img: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Bilinear resize of each row's box (in the image padded by `pad` zeros) to the image size.

    img (n, C, H, W) float32; box (n, 4) int64; flip (n,) bool. Source coordinates follow
    F.interpolate(mode="bilinear", align_corners=False) on the cropped region; a box of the image's
    own size is copied exactly (weights 0 and 1)."""
    n, C, H, W = img.shape
    if pad:
        img = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    top, left, h, w = (box[:, i:i + 1] for i in range(4))  # (n, 1) each

    def axis(size: int, start: torch.Tensor, length: torch.Tensor) -> tuple[torch.Tensor, ...]:
        i = torch.arange(size, dtype=torch.float32)[None, :]
        src = ((i + 0.5) * (length.float() / size) - 0.5).clamp(min=0)  # (n, size)
        i0 = src.floor().long().minimum(length - 1)
        i1 = (i0 + 1).minimum(length - 1)
        frac = src - i0.float()
        return start + i0, start + i1, frac, 1.0 - frac

    y0, y1, fy, gy = axis(H, top, h)
    x0, x1, fx, gx = axis(W, left, w)
    Wp = img.shape[-1]
    flat = img.reshape(n, C, -1)  # (n, C, Hp * Wp)

    def at(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:  # (n, C, H, W)
        idx = (ys[:, :, None] * Wp + xs[:, None, :]).reshape(n, 1, H * W).expand(n, C, H * W)
        return flat.gather(2, idx).reshape(n, C, H, W)

    fx, gx = fx[:, None, None, :], gx[:, None, None, :]
    fy, gy = fy[:, None, :, None], gy[:, None, :, None]
    upper = at(y0, x0) * gx + at(y0, x1) * fx
    lower = at(y1, x0) * gx + at(y1, x1) * fx
    out = upper * gy + lower * fy
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def render(images: torch.Tensor, params: dict[str, np.ndarray], aug: AugmentConfig,
           partners: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels of views (n, C, H, W) float32 from their source images and stored parameters.

    Mixup: lam * T(x) + (1 - lam) * T(partner), T this view's crop and flip; cutmix: T(x) with
    the `cut` region taken from T(partner)."""
    images = images.float().cpu()
    box = torch.from_numpy(params["box"].astype(np.int64))
    flip = torch.from_numpy(params["flip"].astype(bool))
    out = _crop_resize(images, box, flip, pad_of(aug))
    if "partner" not in params or partners is None:
        return out
    other = _crop_resize(partners.float().cpu(), box, flip, pad_of(aug))
    lam = torch.from_numpy(params["lam"].astype(np.float32))[:, None, None, None]
    has = torch.from_numpy(params["partner"] >= 0)[:, None, None, None]
    is_cut = torch.zeros_like(has)
    if "cut" in params:
        cut = torch.from_numpy(params["cut"].astype(np.int64))
        H, W = out.shape[-2:]
        ys, xs = torch.arange(H)[None, :], torch.arange(W)[None, :]
        inside_y = (ys >= cut[:, :1]) & (ys < cut[:, :1] + cut[:, 2:3])  # (n, H)
        inside_x = (xs >= cut[:, 1:2]) & (xs < cut[:, 1:2] + cut[:, 3:4])  # (n, W)
        is_cut = has & (cut[:, 2] > 0)[:, None, None, None]
        out = torch.where(is_cut & (inside_y[:, None, :, None] & inside_x[:, None, None, :]), other, out)
    blended = out * lam + other * (1.0 - lam)
    return torch.where(has & ~is_cut, blended, out)


def render_rows(images: Callable[[np.ndarray], Any], params: dict[str, np.ndarray], aug: AugmentConfig
                ) -> torch.Tensor:
    """Pixels (n, C, H, W) of the rows `params` describes (they carry `sample_id`, and `partner` with
    mixing, as `expand` gives them); `images(ids)` returns the source images (n, C, H, W) of sample
    ids, as an array or tensor."""
    x = torch.as_tensor(images(np.asarray(params["sample_id"], np.int64)))
    partners = None
    if "partner" in params:
        pid = params["partner"]
        safe = np.where(pid >= 0, pid, params["sample_id"])  # rows without a partner: any image, unused
        partners = torch.as_tensor(images(np.asarray(safe, np.int64)))
    return render(x, params, aug, partners)


def soft_labels(params: dict[str, np.ndarray], label_of: Callable[[np.ndarray], np.ndarray],
                num_classes: int) -> torch.Tensor | None:
    """Label distributions (n, C) float32 of mixed views: lam on the sample's label, 1 - lam on the
    partner's (`label_of(ids)` gives class ids by sample id); None when no row has a partner (plain
    integer labels apply)."""
    if "partner" not in params or not (params["partner"] >= 0).any():
        return None
    y = torch.from_numpy(np.asarray(label_of(params["sample_id"]), np.int64))
    pid = params["partner"]
    yp = torch.from_numpy(np.asarray(label_of(np.where(pid >= 0, pid, params["sample_id"])), np.int64))
    lam = torch.from_numpy(params["lam"].astype(np.float32))[:, None]
    eye = torch.eye(num_classes)
    return eye[y] * lam + eye[yp] * (1.0 - lam)
