"""Distillation losses as plain functions over student logits and decoded cache targets.

Conventions: student logits (B, C); dense teacher log-probs (B, C); top-k teacher ids and
log-probs (B, k) with the residual mass outside the top k (B,). Teacher targets are at the
student's temperature T already (see `retemper_*`). Every KD term is multiplied by T**2 so its
gradient scale does not change with T (Hinton et al. 2015), and reduced by the batch mean.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.core.errors import ArgumentError
from pipeline.core.validate import FIELDS, argument, choice
from pipeline.format import kl
from pipeline.format.encodings import Encoding, Targets


def kd_dense(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher || q_student) at temperature T, with the full teacher distribution."""
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    p = teacher_logp.exp()
    kl = (torch.xlogy(p, p) - p * logq).sum(-1)  # (B,)
    return temperature**2 * kl.mean()


def kd_topk(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor,
            residual: torch.Tensor, temperature: float, tail: str = "uniform") -> torch.Tensor:
    """T^2 * KL from top-k targets; the residual mass is modelled, never dropped.

    tail="uniform": the residual is spread evenly over the C-k classes outside the top k.
    tail="bucket": the C-k classes form one extra bucket whose student mass is their sum.
    """
    logq = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    num_classes, k = logq.shape[-1], ids.shape[-1]
    ids = ids.long()
    p = teacher_logp.float().exp()  # (B, k)
    r = residual.float()  # (B,)
    logq_top = logq.gather(-1, ids)  # (B, k)
    kl = (torch.xlogy(p, p) - p * logq_top).sum(-1)  # (B,)
    if k < num_classes:
        if tail == "uniform":
            u = r / (num_classes - k)  # each tail class's teacher probability
            logq_tail_sum = logq.sum(-1) - logq_top.sum(-1)  # sum of log q over the tail classes
            kl = kl + (num_classes - k) * torch.xlogy(u, u) - u * logq_tail_sum
        elif tail == "bucket":
            logq_tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), dim=-1)  # log Q_tail
            kl = kl + torch.xlogy(r, r) - r * logq_tail
        else:
            raise ValueError(f"tail={tail!r}: use 'uniform' or 'bucket'")
    return temperature**2 * kl.mean()


def hard_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits.float(), labels)


def mix(kd: torch.Tensor, ce: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """alpha * CE(hard labels) + (1 - alpha) * KD; without labels alpha must be 0."""
    if alpha == 0.0 or ce is None:
        return kd
    if alpha == 1.0:
        return ce
    return alpha * ce + (1.0 - alpha) * kd


def encoding_loss(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], encoding: Encoding,
                  temperature: float, divergence: str = "forward", tail: str = "uniform") -> torch.Tensor:
    """T^2 * mean over rows of D(teacher || student) for targets of any encoding (see
    `Encoding.targets`); student logits (n, C)."""
    z = kl.tempered(student_logits, temperature)  # (n, C)
    return temperature**2 * encoding.divergence(z, targets, divergence, tail).mean()


def multi_teacher_loss(student_logits: torch.Tensor, members: dict[str, dict[str, Any]], temperature: float,
                       divergence: str = "forward", tail: str = "uniform") -> torch.Tensor:
    """T^2 * sum over members m of w_m * mean over rows of D(teacher_m || student): distilling from
    each teacher separately, each through its own encoding's loss (`encoding_loss`). `members`:
    {name: {"targets", "weight", "encoding"}} as a batch of per-member targets carries them
    (Cache.dataset(combine="per_member")); weights sum to 1. Student logits (n, C)."""
    return sum((m["weight"] * encoding_loss(student_logits, m["targets"], m["encoding"], temperature, divergence, tail)
                for m in members.values()), student_logits.new_zeros(()))


def row_losses(logits: torch.Tensor, targets: dict[str, torch.Tensor], labels: torch.Tensor | None,
               settings: dict, encoding: Encoding) -> torch.Tensor:
    """Summed loss of a chunk of rows (student logits (n, V)): alpha * CE + (1 - alpha) * T^2 * D."""
    alpha, T = settings["alpha"], settings["temperature"]
    total = logits.new_zeros(())
    if labels is not None and alpha > 0:
        total = total + alpha * F.cross_entropy(logits.float(), labels, reduction="sum")
    if alpha == 1.0:
        return total
    z = kl.tempered(logits, T)
    kd = T**2 * encoding.divergence(z, targets, settings["divergence"], settings["tail"]).sum()
    return total + (1.0 - alpha) * kd


def chunked_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: dict[str, torch.Tensor],
                 labels: torch.Tensor | None, settings: dict, encoding: Encoding, chunk: int) -> torch.Tensor:
    """Mean loss over rows of hidden states (n, d), computing (chunk, V) logits at a time.

    Each chunk is checkpointed, so the (n, V) logits are never held for the backward pass."""
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    total = hidden.new_zeros(())
    for s in range(0, n, chunk):
        part = {k: v[s:s + chunk] for k, v in targets.items()}
        lab = labels[s:s + chunk] if labels is not None else None

        def f(h: torch.Tensor, part=part, lab=lab) -> torch.Tensor:
            return row_losses(head(h), part, lab, settings, encoding)

        total = total + (checkpoint(f, hidden[s:s + chunk], use_reentrant=False) if hidden.requires_grad
                         else f(hidden[s:s + chunk]))
    return total / n


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Mean cross-entropy of rows of hidden states (n, d) against class ids (n,), computing
    (chunk, V) logits at a time, each chunk checkpointed: the (n, V) logits are never held."""
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    total = hidden.new_zeros(())
    for s in range(0, n, chunk):
        def f(h: torch.Tensor, y: torch.Tensor = labels[s:s + chunk]) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

        total = total + (checkpoint(f, hidden[s:s + chunk], use_reentrant=False) if hidden.requires_grad
                         else f(hidden[s:s + chunk]))
    return total / n


# ---------------------------------------------------------------------------------------------
# The loss


def kd_loss(student_logits: torch.Tensor, batch: dict[str, Any], temperature: float, alpha: float = 0.0,
            labels: torch.Tensor | None = None, divergence: str = "forward", tail: str = "uniform",
            encoding: Encoding | None = None) -> torch.Tensor:
    """alpha * CE(labels) + (1 - alpha) * T^2 * mean D(teacher || student) over the batch's rows.

    Works for every encoding (dense; top-k with tail "uniform" or "bucket"; sampled and hybrid,
    forward KL only for sampled). Classification: logits (B, C). Token caches: logits (rows, V) in
    the batch's row order, or (B, L, V) for the batch's B sequences, read at (sequence, position);
    labels likewise (rows,) or (B, L), or label distributions (rows, C) float (a views cache's
    mixed views: batch["labels"]). A padding batch (batch["padding"]) weighs 0."""
    _check_arguments(batch, temperature, alpha, divergence, tail, student_logits, "student_logits")
    enc = encoding if encoding is not None else batch.get("encoding")
    if enc is None:
        raise ValueError("kd_loss: the batch has no 'encoding'; pass encoding=cache.encoding")
    rows = int(batch["sample_id"].shape[0])
    logits = student_logits
    if logits.dim() == 3:
        if "sequence" not in batch:
            raise ValueError(f"kd_loss: logits {tuple(logits.shape)} are (B, L, V) but this is not a token cache; "
                             "pass (B, C) logits")
        seq, pos = batch["sequence"].to(logits.device), batch["position"].to(logits.device)
        n_seq = int(batch["sequence_id"].shape[0])
        if logits.shape[0] != n_seq or int(pos.max()) >= logits.shape[1]:
            raise ValueError(f"kd_loss: logits {tuple(logits.shape)} but the batch has {n_seq} sequences with "
                             f"positions up to {int(pos.max())}; pass (B, L, V) with B={n_seq}, L > {int(pos.max())}")
        logits = _token_rows(logits, seq, pos)  # (rows, V)
        if labels is not None and labels.dim() == 2 and labels.shape[0] == n_seq and not labels.is_floating_point():
            labels = labels.to(logits.device)[seq, pos]
    elif logits.dim() != 2 or logits.shape[0] != rows:
        raise ValueError(f"kd_loss: logits {tuple(logits.shape)} but the batch has {rows} rows; pass ({rows}, "
                         f"{enc.num_classes})" + (" or (sequences, length, vocab)" if "sequence" in batch else ""))
    if logits.shape[-1] != enc.num_classes:
        raise ValueError(f"kd_loss: logits have {logits.shape[-1]} classes, the cache {enc.num_classes}; "
                         "slice a padded output layer to the cache's classes (logits[..., :C])")
    if alpha > 0 and labels is None:
        raise ValueError(f"kd_loss: alpha={alpha} mixes in cross-entropy, which needs labels")
    _check_labels(labels, batch, logits.shape[0], enc.num_classes)
    if batch.get("padding"):
        return _nothing(logits)
    if "members" in batch:  # per-member targets: one loss per teacher, weighted
        kd = multi_teacher_loss(logits, _member_targets(batch, temperature, logits.device), temperature, divergence,
                                tail) if alpha < 1 else logits.new_zeros(())
        ce = hard_ce(logits, _labels(labels, logits.device)) if alpha > 0 else None
        return mix(kd, ce, alpha)
    return row_losses(logits, _targets(batch, temperature, alpha, logits.device), _labels(labels, logits.device),
                      _settings(temperature, alpha, divergence, tail), enc) / rows


def chunked_kd_loss(hidden: torch.Tensor, head: torch.nn.Module, batch: dict[str, Any], temperature: float,
                    alpha: float = 0.0, labels: torch.Tensor | None = None, divergence: str = "forward",
                    tail: str = "uniform", logit_chunk: int = 1024) -> torch.Tensor:
    """`kd_loss` from a token batch's hidden states (rows, d) in the batch's row order and the
    output layer `head`: (logit_chunk, V) logits at a time, each chunk checkpointed, so the
    (rows, V) logits are never held (a 128k vocabulary at 16k rows would be 8 GB)."""
    _check_arguments(batch, temperature, alpha, divergence, tail, hidden, "hidden")
    argument("logit_chunk", logit_chunk, FIELDS["student.logit_chunk"])
    enc = batch["encoding"]
    if hidden.dim() != 2 or hidden.shape[0] != int(batch["sample_id"].shape[0]):
        raise ValueError(f"chunked_kd_loss: hidden {tuple(hidden.shape)} but the batch has "
                         f"{int(batch['sample_id'].shape[0])} rows; pass (rows, d) in the batch's row order")
    if alpha > 0 and labels is None:
        raise ValueError(f"chunked_kd_loss: alpha={alpha} mixes in cross-entropy, which needs labels")
    _check_labels(labels, batch, hidden.shape[0], enc.num_classes)
    if batch.get("padding"):
        return _nothing(hidden)
    return chunked_loss(hidden, head, _targets(batch, temperature, alpha, hidden.device),
                        _labels(labels, hidden.device), _settings(temperature, alpha, divergence, tail), enc,
                        logit_chunk)


DIVERGENCES = ("forward", "reverse", "jsd")


TAILS = ("uniform", "bucket")


IGNORE_INDEX = -100  # cross-entropy's label for rows it leaves out (F.cross_entropy's default)


def _check_arguments(batch: Any, temperature: Any, alpha: Any, divergence: Any, tail: Any, out: Any,
                     out_name: str) -> None:
    """The loss's settings, by the rules of the config fields they mirror (student.temperature, ...)."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise ArgumentError(f"{out_name}: expected a float tensor, got "
                            f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}")
    if not isinstance(batch, dict) or "sample_id" not in batch:
        raise ArgumentError(f"batch: expected a batch dict of Cache.dataset, got {type(batch).__name__}")
    argument("temperature", temperature, FIELDS["student.temperature"])
    argument("alpha", alpha, FIELDS["student.alpha"])
    choice("divergence", divergence, DIVERGENCES)
    choice("tail", tail, TAILS)


def _check_labels(labels: Any, batch: dict[str, Any], rows: int, num_classes: int) -> None:
    """Class ids (rows,) in [0, C) (or -100, left out), or label distributions (rows, C): finite, >= 0,
    each summing to 1.
    A batch of mixed views (mixup/cutmix: a partner per row) has no single class per row, so class
    ids are refused there: its labels are batch["labels"], the lambda-mixed distributions."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise ArgumentError(f"labels: expected a tensor, got {type(labels).__name__}; pass torch.as_tensor(labels)")
    if labels.is_floating_point():
        if tuple(labels.shape) != (rows, num_classes):
            raise ArgumentError(f"labels: float labels {tuple(labels.shape)} are label distributions and must be "
                                f"({rows}, {num_classes}); class ids are an integer tensor ({rows},) (labels.long())")
        sums = labels.float().sum(-1)
        if not bool(torch.isfinite(labels).all()) or bool((labels < 0).any()) or \
                not bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3)):
            raise ArgumentError("labels: label distributions must be finite, >= 0, and sum to 1 in each row")
        return
    if labels.dtype == torch.bool or tuple(labels.shape) != (rows,):
        raise ArgumentError(f"labels: {labels.dtype} {tuple(labels.shape)}; give class ids ({rows},) as an integer "
                            f"tensor, or label distributions ({rows}, {num_classes}) as floats")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        raise ArgumentError(f"labels: class id {int(labels[bad][0])} outside [0, {num_classes}) (and not the ignored "
                            f"{IGNORE_INDEX})")
    partner = batch.get("partner")
    if isinstance(partner, torch.Tensor) and bool((partner >= 0).any()):
        raise ArgumentError("labels: this batch holds mixed views (mixup/cutmix) whose labels are lambda-mixed "
                            "distributions, not class ids; pass labels=batch['labels'] (build the dataset with "
                            "labels=y), or alpha=0")


def _token_rows(logits: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """logits (B, L, V) at the batch's rows (sequence, position): a view when the rows are every
    position of every sequence in order (a plain token batch), else a gathered copy. The copy and
    its backward (a (B, L, V) zero tensor scattered into) cost as much as the loss itself."""
    B, L = logits.shape[:2]
    if len(seq) == B * L and bool((pos.view(B, L) == torch.arange(L, device=pos.device)).all()) \
            and bool((seq.view(B, L) == torch.arange(B, device=seq.device)[:, None]).all()):
        return logits.reshape(B * L, -1)
    return logits[seq, pos]


def _nothing(out: torch.Tensor) -> torch.Tensor:
    """The loss of a padding batch (an item again, so every DDP rank steps together): 0, joined to
    the model's output so backward runs and all-reduces a zero gradient; 0 even when the output is
    not finite (a loss times 0 would be NaN)."""
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out)).sum() * 0.0


def _settings(temperature: float, alpha: float, divergence: str, tail: str) -> dict[str, Any]:
    return {"alpha": alpha, "temperature": temperature, "divergence": divergence, "tail": tail}


def _labels(labels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Class ids (n,) as int64, or label distributions (n, C) as float32, on `device`."""
    if labels is None:
        return None
    return labels.to(device).long() if labels.dim() == 1 else labels.to(device).float()


def _member_targets(batch: dict[str, Any], temperature: float, device: torch.device) -> dict[str, dict[str, Any]]:
    """A per-member batch's targets (as `_targets` checks and moves one set of them)."""
    out = {}
    for name, m in batch["members"].items():
        targets = _targets({**batch, "targets": m["targets"]}, temperature, 0.0, device)
        out[name] = {**m, "targets": targets}
    return out


def _targets(batch: dict[str, Any], temperature: float, alpha: float, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's re-tempered targets on `device` (none for a hard-label loss)."""
    if alpha == 1.0:
        return {}
    if float(batch.get("temperature", temperature)) != float(temperature):
        raise ValueError(f"kd_loss: the batch's targets are at T={batch['temperature']}, not {temperature}; build "
                         f"the dataset with temperature={temperature} or pass temperature={batch['temperature']}")
    targets = batch["targets"]
    if isinstance(targets, Targets):  # made now, on the loss's device
        return targets.to(device).made()
    return {k: v.to(device, non_blocking=True) for k, v in targets.items()}
