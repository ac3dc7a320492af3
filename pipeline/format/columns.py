"""The per-row columns a cache shard stores, and the unit of reads (Chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.format.encodings import Column, Encoding

ROW_COLUMNS = {
    "sample_id": Column("sample_id", ("row",), "int64 id of the input row these targets belong to; joins the cache "
                        "to the dataset"),
    "position": Column("position", ("row",), "position of the token within its sequence; rows of a sequence are "
                       "contiguous"),
}


# augmented views (cache.views > 0; pipeline/views.py draws and replays them); a cache stores the
# ones its augmentation uses, after sample_id
VIEW_COLUMNS = {
    "view": Column("view", ("row",), "index of this augmented view of the sample (uint8, uint16 above 256 views); "
                   "rows are view-major in a shard: view v of its sample i is row v * samples + i"),
    "box": Column("box", ("row", "box"), "top, left, height, width of the source region in the image zero-padded "
                  "by the spec's pad, resized bilinearly to the image size, (rows, 4)"),
    "flip": Column("flip", ("row",), "1 when the view is flipped horizontally (after the crop)"),
    "partner": Column("partner", ("row",), "sample id mixed into this view by mixup/cutmix, -1 when none (int32 "
                      "when every transfer id fits, else int64)"),
    "lam": Column("lam", ("row",), "float16 weight of a mixup view's own image and label (1 on other rows; a "
                  "cutmix view's is recomputed from its box)"),
    "cut_size": Column("cut_size", ("row", "side"), "cutmix: height and width of the pasted box before clipping "
                       "(0 when none); its centre is recomputed from the view's draws, (rows, 2)"),
}


# what a student with another tokenizer aligns by (pipeline/train/crosstok.py): stored in the token
# caches of text corpora (spec "alignment"), after position; the targets are of the token that
# follows the row's position, and these say which token that was
ALIGN_COLUMNS = {
    "span_start": Column("span_start", ("row",), "int32 first character of the predicted token in its document's "
                         "text (Python str index); an eos ending a document starts at the document's length"),
    "span_length": Column("span_length", ("row",), "uint16 characters the predicted token spans (0 for an eos; "
                          "the bytes of one character split over several tokens each span that character)"),
    "label": Column("label", ("row",), "teacher-vocabulary id of the predicted token, at the ids' width (uint16 "
                    "up to 65,536 tokens, else uint32)"),
    "label_logp": Column("label_logp", ("row",), "float16 log-probability of the predicted token under the "
                         "targets' distribution (the ensemble's at the cache's temperature), whatever the encoding keeps"),
}


VOCAB_FILE = "vocab.json"  # the teacher tokenizer's token bytes, once per aligned cache (pipeline/inputs/vocab.py)


OFFSETS = Column("offsets", ("sequence",), "first row of each sequence in this shard, plus the row count, "
                 "(sequences + 1,)")


def stored_columns(enc: Encoding, token_rows: bool, view_names: list[str] | tuple[str, ...] = (),
                   aligned: bool = False) -> list[Column]:
    """Every per-row column of a shard, in order: sample_id (and position for tokens), the
    alignment columns when `aligned`, the view columns named, then targets."""
    base = [ROW_COLUMNS["sample_id"], ROW_COLUMNS["position"]] if token_rows else [ROW_COLUMNS["sample_id"]]
    align = list(ALIGN_COLUMNS.values()) if aligned else []
    return base + align + [VIEW_COLUMNS[n] for n in view_names] + enc.columns()


def aligned(spec: dict[str, Any]) -> bool:
    """Whether a cache with this spec stores ALIGN_COLUMNS."""
    return "alignment" in spec


def view_column_names(spec: dict[str, Any], where: Any = "cache") -> list[str]:
    """The view columns of a cache with this spec (none without views)."""
    if "views" not in spec:
        return []
    from pipeline.format.views import ViewSpec, column_names

    return column_names(ViewSpec.of(spec, where).augment)


@dataclass(frozen=True)
class Chunk:
    shard: int  # position in the manifest's shard list
    index: int  # chunk within the shard
    start: int  # first row within the shard
    stop: int

