"""Stage 2: run the teacher ensemble once over the transfer set and write the soft-target cache.

    logitcache cache configs/demo.yaml
    logitcache cache configs/demo.yaml cache.encoding=topk cache.k=3 cache.backend=parquet
    logitcache cache configs/demo.yaml --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8
    logitcache cache configs/demo.yaml cache.members=separate         # each teacher's targets, kept apart

The cache directory is named by a hash of everything that determines the targets (dataset
fingerprint, each teacher's spec and checkpoint hash, ensemble mode and weights, temperature,
encoding, the teachers' device type and precision, format version) plus the shard layout. Same inputs, same id: a complete cache is found
and nothing runs. The plan splits the transfer set into fixed row ranges (cache.rows_per_shard),
never by worker count; shards already on disk are skipped, so a rerun after a crash redoes only
the missing ones. With cache.views = N a row is one augmented view: a shard holds all N views of
its samples, view-major (all of its samples' view 0, then view 1, ...: a chunk holds one view).
The targets are computed by pipeline/run/targets.py: on a GPU the teachers run under bf16 autocast
by default (cache.precision) and the encoding runs on the device; writing a shard overlaps
computing the next.

With cache.members separate (or both) each teacher's targets (and the ensemble's) go to a member
store shared by every cache that needs them (pipeline/format/members.py), a shard named by its
index and the digest of its rows; the cache's manifest lists the stores' shards it reads. A cache
with one more teacher, or more rows, computes only the shards its stores lack, and says what it
reuses ("cache X: reusing 3 members' targets from Y; computing 1 (d)").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import Config, dump_yaml
from pipeline.core.errors import CacheError, DataError
from pipeline.core.io import (
    atomic_write_json,
    atomic_write_text,
    check_writable,
    read_json,
    remove_dead_tmp,
    sha256_file,
)
from pipeline.core.progress import bar, log
from pipeline.format import manifest as fmt
from pipeline.format import members, remote
from pipeline.format.columns import VOCAB_FILE
from pipeline.format.shards import recorded_digest, shard_entry
from pipeline.run.fanout import expected_workers, run_all, task_share
from pipeline.run.identity import Context, Unit, context, record
from pipeline.run.targets import (
    Shard,
    ShardResult,
    Teachers,
    kept_models,
    pending_units,
    run_shards,
    shard_path,
    unit_path,
)


def plan(cfg: Config, ctx: Context | None = None) -> list[Shard]:
    """Fixed ranges of cache.rows_per_shard rows (with views: whole samples, each with all its
    views; for language models a row is a trained position, and a shard the positions of its
    rows)."""
    ctx = ctx or context(cfg)
    step = ctx.rows_per_shard
    if ctx.token_rows:
        corpus = ctx.splits.corpus
        rows = int(corpus.rows_before(np.array([corpus.n_tokens]))[0])
        firsts = np.arange(0, rows, step)
        starts = corpus.positions_of_rows(firsts)
        stops = np.append(starts[1:], corpus.n_tokens)
        return [Shard(i, int(a), int(b), count=min(step, rows - int(r)), first=int(r))
                for i, (a, b, r) in enumerate(zip(starts, stops, firsts))]
    per_item = ctx.views.count if ctx.views else 1
    n, step = len(ctx.splits.transfer), step // per_item
    return [Shard(i, start, min(start + step, n), per_item) for i, start in enumerate(range(0, n, step))]


def run_shard(cfg: Config, shard: Shard) -> ShardResult:
    ctx = context(cfg)
    return run_shards(ctx, [shard], Teachers(ctx))[0]


def missing(ctx: Context) -> list[Shard]:
    """Planned shards some unit lacks here (a stat each)."""
    return [s for s in plan(ctx.cfg, ctx) if any(not unit_path(ctx, u, s).exists() for u in ctx.units)]


def _listed(ctx: Context, unit: Unit, shard: Shard) -> str:
    """A shard's path as the manifest's shard checks name it (members.shard_problems)."""
    name = unit_path(ctx, unit, shard).name
    return f"shards/{name}" if unit.spec is None else f"{members.STORES}/{unit.store}/shards/{name}"


def _lost(ctx: Context, manifest: dict[str, Any]) -> list[Shard]:
    """Shards a complete manifest lists that are gone from disk (a stat each)."""
    gone = set(members.shard_problems(ctx.dir, manifest, hash_them=False)["missing"])
    return [s for s in plan(ctx.cfg, ctx) if any(_listed(ctx, u, s) in gone for u in ctx.units)]


def _repair(ctx: Context, manifest: dict[str, Any], lost: list[Shard]) -> None:
    """Recompute shards deleted from a complete cache; shard bytes are deterministic, so each must
    match the manifest's sha256 again, or the cache is refused."""
    run_shards(ctx, lost, Teachers(ctx))
    listed = {(base, e["path"]): e["sha256"] for base, e in members.cache_shards(ctx.dir, manifest)}
    for s in lost:
        for u in ctx.units:
            path = unit_path(ctx, u, s)
            if recorded_digest(path)[0] != listed[(path.parent.parent, f"shards/{path.name}")]:
                raise CacheError(f"{path}: recomputed, but its sha256 differs from the manifest's (the teachers' "
                                 f"numerics differ from the run that made it); delete {ctx.dir} and rerun "
                                 "`logitcache cache CONFIG`")
    log(f"cache {ctx.dir.name}: {len(lost)} shards recomputed, identical to the manifest's")


def write_teacher_vocab(ctx: Context) -> None:
    """The teacher tokenizer's token bytes, eos and fingerprint (VOCAB_FILE), beside spec.json: what a
    student with another tokenizer maps the targets' ids by, without the teacher's tokenizer."""
    from pipeline.inputs.text import Tokenizer
    from pipeline.inputs.vocab import token_bytes, write_vocab

    path = ctx.dir / VOCAB_FILE
    if path.is_file():
        return
    corpus = ctx.splits.corpus
    tok = Tokenizer(Path(read_json(corpus.directory / "manifest.json", DataError, "rerun `logitcache tokenize`")
                         ["tokenizer"]), "data.tokenizer")
    write_vocab(path, token_bytes(tok.hf), corpus.eos, tok.fingerprint)


def finalize(ctx: Context, url: str | None = None) -> dict[str, Any]:
    """The manifest, from the sidecars of the shards here, or with `url` of those in the store: there
    it is published (and written here too when every shard is also here)."""
    cfg = ctx.cfg
    planned = plan(cfg, ctx)
    if ctx.units[0].spec is not None:
        return _finalize_members(ctx, planned)
    if url is None:
        entries = [shard_entry(ctx.dir, s.index, cfg.cache.backend, s.first_row, s.rows) for s in planned]
    else:
        entries = [remote.published_entry(url, s.index, shard_path(ctx, s).name, s.first_row, s.rows)
                   for s in planned]
    extra = {
        "backend": cfg.cache.backend, "encoding": ctx.encoding.params(), "num_classes": ctx.encoding.num_classes,
        "temperature": cfg.teachers.temperature, "teachers": [t["name"] for t in ctx.spec["teachers"]],
        "ensemble": cfg.teachers.ensemble, "dataset": ctx.spec["dataset"],
    }
    if ctx.views is not None:  # a row is a view
        extra["views"] = ctx.spec["views"]
        extra["bytes_per_view"] = round(sum(e["bytes"] for e in entries) / max(sum(e["rows"] for e in entries), 1), 2)
    if ctx.token_rows:  # a row is a trained token; the other positions are context, not stored
        nbytes, positions = sum(e["bytes"] for e in entries), ctx.spec["dataset"]["positions"]
        extra["bytes_per_token"] = round(nbytes / max(sum(e["rows"] for e in entries), 1), 2)
        extra["trained_tokens"] = sum(e["rows"] for e in entries)
        extra["positions"] = positions
        extra["bytes_per_position"] = round(nbytes / max(positions, 1), 2)
    if "alignment" in ctx.spec:  # the teacher vocabulary students of other tokenizers map by
        extra["vocab_sha256"] = sha256_file(ctx.dir / VOCAB_FILE)
    if url is None or not missing(ctx):
        manifest = fmt.write_manifest(ctx.dir, ctx.spec, entries, extra)
    else:
        manifest = fmt.manifest_of(ctx.dir.name, ctx.spec, entries, extra)
    if url is not None:
        remote.publish_manifest(ctx.dir, url, manifest)
    return manifest


def _finalize_members(ctx: Context, planned: list[Shard]) -> dict[str, Any]:
    """The manifest of a cache of per-member targets: each unit's store and the shards of it this
    cache reads (from their writers' sidecars and a stat), and what the first plan reused."""
    cfg, units = ctx.cfg, []
    for u in ctx.units:
        remove_dead_tmp(u.dir / "shards")  # from killed writers; never read as data
        remove_dead_tmp(u.dir / "digests")
        entries = []
        for s in planned:
            path = unit_path(ctx, u, s)
            digest, nbytes = recorded_digest(path)
            entries.append({"index": s.index, "path": f"shards/{path.name}", "first_row": s.first_row, "rows": s.rows,
                            "sha256": digest, "bytes": nbytes})
        nbytes, rows = sum(e["bytes"] for e in entries), sum(e["rows"] for e in entries)
        units.append({"name": u.name, "kind": u.spec["store"], "store": u.store,
                      "teachers": [ctx.spec["teachers"][t]["name"] for t in u.teachers],
                      "encoding": ctx.encoding.params(), "rows": rows, "bytes": nbytes,
                      "bytes_per_row": round(nbytes / max(rows, 1), 2), "shards": entries})
    rows = units[0]["rows"]
    nbytes = sum(u["bytes"] for u in units)
    extra = {
        "rows": rows, "bytes": nbytes, "bytes_per_row": round(nbytes / max(rows, 1), 2),
        "backend": cfg.cache.backend, "encoding": ctx.encoding.params(), "num_classes": ctx.encoding.num_classes,
        "temperature": cfg.teachers.temperature, "teachers": [t["name"] for t in ctx.spec["teachers"]],
        "ensemble": cfg.teachers.ensemble, "weights": ctx.spec["weights"], "members": cfg.cache.members,
        "dataset": ctx.spec["dataset"], "units": units,
    }
    reuse = ctx.dir / "reuse.json"
    if reuse.is_file():
        extra["reuse"] = read_json(reuse, CacheError, f"delete {reuse} and rerun `logitcache cache CONFIG`")
    return fmt.write_manifest(ctx.dir, ctx.spec, [], extra)


def _reuse(ctx: Context, planned: list[Shard]) -> dict[str, Any]:
    """Which planned shards each unit's store holds already, and the complete caches that read them."""
    have = {u.name: [s.index for s in planned if unit_path(ctx, u, s).exists()] for u in ctx.units}
    present = {_listed(ctx, u, s) for u in ctx.units for s in planned if s.index in have[u.name]}
    shared: dict[str, int] = {}
    for path in ctx.cfg.cache_root.glob("*/manifest.json"):
        if path.parent == ctx.dir:
            continue
        try:
            other = fmt.read_manifest(path.parent)
        except CacheError:  # another cache's problem
            continue
        if other is None or other.get("status") != "complete" or not members.is_members(other):
            continue
        common = len(present & {f"{members.STORES}/{u['store']}/{e['path']}" for u in other["units"]
                                for e in u["shards"]})
        if common:
            shared[path.parent.name] = common
    return {"reused": {n: len(v) for n, v in have.items()},
            "computed": {n: len(planned) - len(v) for n, v in have.items()},
            "from": sorted(shared, key=lambda k: (-shared[k], k))}


def _reuse_line(name: str, reuse: dict[str, Any], shards: int) -> str:
    """'cache X: reusing 3 members' targets from Y; computing 1 (d)', or what else the plan found."""
    have = reuse["reused"]
    old = [n for n, k in have.items() if k]
    new = [n for n, k in have.items() if not k]
    if not old:
        return f"cache {name}: computing {len(new)} members' targets ({', '.join(new)}), {shards} shards each"
    counts = sorted({have[n] for n in old})
    span = "" if counts == [shards] else f" for {counts[0]} of {shards} shards" if len(counts) == 1 \
        else f" for {sum(have[n] for n in old)} of their {shards * len(old)} shards"
    where = f" from {', '.join(reuse['from'][:3])}" if reuse["from"] else " from their stores"
    todo = [f"{len(new)} ({', '.join(new)})"] if new else []
    lacking = {shards - have[n] for n in old} - {0}
    if lacking:
        m = lacking.pop() if len(lacking) == 1 else None
        lack = [n for n in old if have[n] < shards]
        todo.append(f"{m} shard{'s' * (m > 1)} of {len(lack)} members" if m is not None else
                    f"{sum(shards - have[n] for n in lack)} shards of {len(lack)} members")
    return f"cache {name}: reusing {len(old)} members' targets{span}{where}; computing {' and '.join(todo) or 'nothing'}"


def main(cfg: Config, client: Any = None, shard_index: int | None = None, num_shards: int | None = None) -> Path:
    """Plan, skip finished shards, compute the rest, finalize the manifest.

    In-process, writing a shard overlaps computing the next; with a Dask client, the pending
    shards are mapped over the workers in groups that carry this call's cache id: a worker that
    finds other inputs (a checkpoint overwritten meanwhile) refuses instead of writing into it."""
    task_share([], shard_index, num_shards)  # reject a bad --shard-index before any work
    check_writable(cfg.cache_root, "cache.root" if cfg.cache.root and not cfg.cache_url else "workspace")
    ctx = context(cfg)
    url = ctx.url
    if url is not None and remote.complete(url):
        _record_config(cfg, ctx.dir)
        record(ctx)
        log(f"cache {ctx.dir.name}: complete in {url}, nothing to do")
        return ctx.dir
    manifest = fmt.read_manifest(ctx.dir)
    if manifest is not None and manifest.get("status") == "complete":
        _record_config(cfg, ctx.dir)
        record(ctx)
        lost = _lost(ctx, manifest)
        if lost:
            log(f"cache {ctx.dir.name}: {len(lost)} shards listed in the manifest are missing; recomputing them")
            _repair(ctx, manifest, lost)
        else:
            log(f"cache {ctx.dir.name}: complete ({manifest['rows']} rows), nothing to do")
        if url is not None:  # a run killed while publishing it
            log(f"cache {ctx.dir.name}: published to {remote.push(ctx.dir, cfg.cache_url)}")
        return ctx.dir
    _refuse_other_layout(cfg, ctx)
    _record_config(cfg, ctx.dir)
    record(ctx)
    atomic_write_json(ctx.dir / "spec.json", ctx.spec)
    if "alignment" in ctx.spec:
        write_teacher_vocab(ctx)
    planned = plan(cfg, ctx)
    shards = task_share(planned, shard_index, num_shards)
    if ctx.units[0].spec is not None:  # member stores: what they hold already is reused, never recomputed
        for u in ctx.units:
            if not (u.dir / "store.json").is_file():
                atomic_write_json(u.dir / "store.json", u.spec)
        reuse = _reuse(ctx, planned)
        if not (ctx.dir / "reuse.json").is_file():  # the first plan's: what growing this cache cost
            atomic_write_json(ctx.dir / "reuse.json", reuse)
        log(_reuse_line(ctx.dir.name, reuse, len(planned)))
        todo = [s for s in shards if pending_units(ctx, s)]
    else:
        in_store = remote.published(url) if url is not None else set()
        staged = {s.index for s in shards if shard_path(ctx, s).exists()}
        if url is not None:
            for s in shards:  # staged here by a run killed before it published them
                if s.index in staged and shard_path(ctx, s).name not in in_store:
                    remote.publish_shard(ctx.dir, shard_path(ctx, s).name, url)
        todo = [s for s in shards if s.index not in staged and shard_path(ctx, s).name not in in_store]
    done_rows = sum(s.rows for s in shards) - sum(s.rows for s in todo)
    log(f"cache {ctx.dir.name}: {len(todo)} of {len(planned)} shards to compute "
        f"({ctx.encoding.label()}, {cfg.cache.backend}, device {ctx.device}, {ctx.precision})")
    progress_desc = f"cache {ctx.dir.name[:8]}"
    if client is not None:
        groups = _groups(todo, expected_workers(cfg.cluster, client), ctx.dir.name)
        run_all(client, cfg, run_group, groups, rows=lambda g: g.rows, desc=progress_desc, gpu=True)
    else:
        progress = bar(sum(s.rows for s in shards), progress_desc)
        progress.update(done_rows)
        if todo:
            run_shards(ctx, todo, Teachers(ctx), on_done=lambda s: progress.update(s.rows))
        progress.close()
    return _finish(ctx)


@dataclass(frozen=True)
class Group:
    """Consecutive shards run by one Dask task: fewer, larger tasks, and writes overlap compute."""

    shards: tuple[Shard, ...]
    cache_id: str  # the driver's: the task recomputes it from the files and refuses a mismatch

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def _groups(todo: list[Shard], workers: int, cache_id: str) -> list[Group]:
    size = max(1, -(-len(todo) // (4 * max(workers, 1))))  # about four tasks per worker
    return [Group(tuple(todo[i:i + size]), cache_id) for i in range(0, len(todo), size)]


def run_group(cfg: Config, group: Group) -> list[ShardResult]:
    ctx = context(cfg)
    if ctx.dir.name != group.cache_id:
        raise CacheError(f"cache {group.cache_id}: this worker computes id {ctx.dir.name} from the same config, so "
                         "the data or a teacher checkpoint changed while the cache was being written; rerun "
                         "`logitcache cache CONFIG` once the files are final")
    return run_shards(ctx, group.shards, kept_models(ctx))


def _finish(ctx: Context) -> Path:
    url = ctx.url
    if url is None:
        still_missing = missing(ctx)
    else:
        in_store = remote.published(url)
        still_missing = [s for s in plan(ctx.cfg, ctx) if shard_path(ctx, s).name not in in_store]
    if still_missing:
        log(f"cache {ctx.dir.name}: {len(still_missing)} shards still missing{' in the store' if url else ''}; "
            "the manifest is written by the call that finds every shard present")
        return ctx.dir
    manifest = finalize(ctx, url)
    log(f"cache {ctx.dir.name}: complete, {manifest['rows']} rows, {manifest['bytes']} bytes "
        f"({manifest['bytes_per_row']} B/row)" + (f", published to {url}" if url else ""))
    return ctx.dir


def _refuse_other_layout(cfg: Config, ctx: Context) -> None:
    """A partly written cache of the same targets with another shard plan must be finished or deleted
    first: array tasks that disagree on cache.rows_per_shard would otherwise fill two caches. A
    complete one is only pointed out, since its layout can be set to reuse it instead of running
    the teachers again; one whose spec.json cannot be read is another cache's problem, not this one's."""
    mine = fmt.target_id(ctx.spec)
    for spec_file in sorted(cfg.cache_root.glob("*/spec.json")):
        other = spec_file.parent
        if other == ctx.dir:
            continue
        complete = (other / "manifest.json").is_file()
        try:
            spec = fmt.read_spec(spec_file)
        except CacheError:
            if complete:
                continue
            raise
        if fmt.target_id(spec) != mine or spec.get("layout") == ctx.spec["layout"]:
            continue
        lay = spec["layout"]
        settings = (f"rows_per_shard={lay['rows_per_shard']}, chunk_rows={lay['chunk_rows']}, "
                    f"backend={lay['backend']}, codec={lay.get('codec', 'zstd')}")
        if complete:
            log(f"cache {ctx.dir.name}: {other} holds the same targets complete, with {settings}; set those "
                "cache settings to use it instead of computing this one")
            continue
        raise CacheError(f"{other}: a partly written cache of the same targets uses {settings}; rerun with "
                         "those settings to finish it, or delete that directory to start over with the new ones")


def _record_config(cfg: Config, directory: Path) -> None:
    atomic_write_text(directory / "configs" / f"{cfg.run_name}.yaml", dump_yaml(cfg))

