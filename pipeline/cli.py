"""The `logitcache` command line. Every command takes a YAML config plus key=value overrides.

    logitcache run configs/demo.yaml                  # all stages, skipping finished ones
    logitcache tokenize configs/lm.yaml               # LM corpora: tokenize once (stages reuse it)
    logitcache cache configs/demo.yaml cache.encoding=topk cache.k=3
    logitcache caches ls
    logitcache caches inspect 3f9a2c
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import click

from pipeline.core.config import Config, load_config
from pipeline.core.errors import ConfigError, LogitcacheError
from pipeline.core.host import tune_process
from pipeline.core.validate import COUNT, FIELDS, Rule, argument, check_environment

CONFIG = click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
OVERRIDES = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


DEBUG = "logitcache.debug"


class _Group(click.Group):
    """Turns every error into a one-line message and exit code 1, without a traceback (unless
    --debug): a LogitcacheError as it is; anything else (an error in user code, or a bug) with its
    type, first line and the place it was raised."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except LogitcacheError as e:
            if ctx.meta.get(DEBUG):
                raise
            raise click.ClickException(str(e)) from None
        except Exception as e:
            if ctx.meta.get(DEBUG):
                raise
            raise click.ClickException(_unexpected(e)) from None


def _unexpected(e: Exception) -> str:
    """One line for an exception no check anticipated: what, where, and how to see more."""
    lines = str(e).strip().splitlines()
    what = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    frames = traceback.extract_tb(e.__traceback__)
    where = f" in {frames[-1].name} ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"unexpected {what}{where}; rerun with --debug for the full traceback"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="logitcache")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Offline logit caching for knowledge distillation: run the teachers once, train many students."""
    ctx.meta[DEBUG] = debug
    check_environment()  # every LOGITCACHE_ variable, before any command writes anything
    tune_process()


def _load(config: Path, overrides: tuple[str, ...], scheduler: str | None = None,
          workers: int | None = None) -> Config:
    extra = []
    if workers is not None:
        argument("--workers", workers, Rule(integer=True, low=1, hint="omit --workers to run in-process"))
    if scheduler is not None and workers is not None:
        raise ConfigError("--scheduler and --workers: give one, not both")
    if scheduler is not None:
        extra = ["cluster.kind=address", f"cluster.address={scheduler}"]
    elif workers is not None:
        extra = ["cluster.kind=local", f"cluster.workers={workers}"]
    return load_config(config, [*overrides, *extra])


def array_options(fn: Any) -> Any:
    fn = click.option("--num-shards", type=int, default=None, metavar="N",
                      help="Number of tasks in the array job; the plan itself never depends on it.")(fn)
    return click.option("--shard-index", type=int, default=None, metavar="I",
                        help="Run only this task's share of the plan: items I, I+N, I+2N, ...")(fn)


def fanout_options(fn: Any) -> Any:
    fn = click.option("--workers", type=int, default=None,
                      help="Fan out on a LocalCluster with this many worker processes.")(fn)
    return click.option("--scheduler", metavar="ADDRESS", default=None,
                        help="Fan out on an existing Dask scheduler, e.g. tcp://10.0.0.5:8786.")(fn)


@cli.command()
@CONFIG
@OVERRIDES
@fanout_options
def run(config: Path, overrides: tuple[str, ...], scheduler: str | None, workers: int | None) -> None:
    """Run teachers -> cache -> student -> evaluate, skipping stages whose output is up to date."""
    from pipeline.run.fanout import open_client
    from stages import cache, evaluate, student, teachers

    cfg = _load(config, overrides, scheduler, workers)
    with open_client(cfg.cluster) as client:
        teachers.main(cfg, client)
        cache.main(cfg, client=client)
        student.main(cfg, client)
    evaluate.main(cfg)


def _sharded_command(name: str, help_text: str) -> None:
    """`logitcache NAME CONFIG`: one sharded stage, in-process, on Dask, or as an array-job task."""

    @cli.command(name, help=help_text)
    @CONFIG
    @OVERRIDES
    @array_options
    @fanout_options
    def command(config: Path, overrides: tuple[str, ...], shard_index: int | None, num_shards: int | None,
                scheduler: str | None, workers: int | None) -> None:
        import importlib

        from pipeline.run.fanout import open_client

        stage = importlib.import_module(f"stages.{name}")
        array_task = shard_index is not None or num_shards is not None
        if array_task and (scheduler is not None or workers is not None):
            raise ConfigError("--shard-index/--num-shards run one array task in-process; "
                              "drop --workers/--scheduler (or the shard options to fan out on Dask)")
        cfg = _load(config, overrides, scheduler, workers)
        # an array task is already one of many Slurm jobs: it never opens the config's cluster
        with open_client(cfg.cluster, array_task=array_task) as client:
            stage.main(cfg, client, shard_index, num_shards)


_sharded_command("teachers", "Fit the built-in teachers of the ensemble (user checkpoints are only checked).")
_sharded_command("cache", "Run the teacher ensemble once over the transfer set and write the soft-target cache.")
_sharded_command("student", "Train the students (every model x grid point x seed, and hard-label twins) from the cache.")


@cli.command("evaluate")
@CONFIG
@OVERRIDES
def evaluate_cmd(config: Path, overrides: tuple[str, ...]) -> None:
    """Score teachers, ensemble and students on held-out data; write report.md and report.json."""
    from stages import evaluate

    evaluate.main(_load(config, overrides))


@cli.command("tokenize")
@CONFIG
@OVERRIDES
def tokenize_cmd(config: Path, overrides: tuple[str, ...]) -> None:
    """Tokenize data.source (and data.test_source, data.transfer.source) once into flat token files
    under <workspace>/tokens/<id>/; the LM stages map them. Does nothing if they already exist."""
    from pipeline.inputs.tokens import read_manifest, tokenize

    cfg = _load(config, overrides)
    path = tokenize(cfg.data, cfg.workspace)
    manifest = read_manifest(path)
    splits = manifest["splits"]
    counts = ", ".join(f"{name} {splits[name]['n_docs']} docs {splits[name]['n_tokens']} tokens"
                       + (f" ({splits[name]['trained_tokens']} trained)" if "mask" in splits[name] else "")
                       for name in ("train", "test", "transfer") if name in splits)
    click.echo(f"tokens {path.name}: {counts}; {manifest['dtype']}, vocabulary {manifest['vocab_size']}, {path}")


@cli.group(cls=_Group)
def caches() -> None:
    """List and inspect caches."""


DEFAULT_ROOT = Path("data/caches")


def root_options(fn: Any) -> Any:
    fn = click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                      help="Take the cache root from this config (cache.root, else <workspace>/caches).")(fn)
    return click.option("--root", type=str, default=None,
                        help=f"Directory or URL (s3://bucket/caches) that holds the caches [default: {DEFAULT_ROOT}, "
                             "or the --config's].")(fn)


def _root(root: str | None, config: Path | None) -> Any:
    """--root if given (a Path, or a URL kept as text), else the config's cache root, else data/caches."""
    from pipeline.format.remote import is_url, local_path

    if root is not None:
        return root.rstrip("/") if is_url(root) else local_path(root)
    if config is not None:
        cfg = load_config(config)
        return cfg.cache_url or cfg.cache_root
    return DEFAULT_ROOT


@caches.command("ls")
@root_options
def caches_ls(root: Path | None, config: Path | None) -> None:
    """List caches: id, status, rows, encoding, size, bytes per row, configs that produced them."""
    from pipeline.tools.inspect import list_caches

    click.echo(list_caches(_root(root, config)))


@caches.command("inspect")
@click.argument("cache_ref", metavar="ID_OR_PATH")
@root_options
@click.option("--verify", is_flag=True, help="Recompute every shard's sha256 and compare with the manifest.")
def caches_inspect(cache_ref: str, root: Path | None, config: Path | None, verify: bool) -> None:
    """Show one cache's manifest (or, for a partial cache, which shards are missing)."""
    from pipeline.tools.inspect import inspect_cache

    click.echo(json.dumps(inspect_cache(cache_ref, _root(root, config), verify), indent=2))


@caches.command("push")
@click.argument("cache_ref", metavar="ID_OR_PATH")
@click.argument("url", metavar="ROOT_URL")
@root_options
def caches_push(cache_ref: str, url: str, root: str | None, config: Path | None) -> None:
    """Publish a complete local cache to object storage under ROOT_URL (s3://bucket/caches): each
    object created only if absent, manifest.json last; rerun to finish an interrupted push."""
    from pipeline.format.manifest import resolve
    from pipeline.format.remote import is_url, push

    if not is_url(url):
        raise ConfigError(f"ROOT_URL {url}: give an object store URL such as s3://bucket/caches")
    click.echo(push(resolve(cache_ref, _root(root, config)), url.rstrip("/")))


@caches.command("fidelity")
@click.argument("cache_ref", metavar="ID_OR_PATH")
@root_options
@click.option("--rows", type=int, default=2000, show_default=True, help="Cached rows to re-run the teachers on.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where fidelity.json and fidelity.png go (default <workspace>/fidelity/<cache_id>).")
def caches_fidelity(cache_ref: str, root: Path | None, config: Path | None, rows: int, out: Path | None) -> None:
    """Re-run the teachers on sampled rows: KL, mass kept, top-1 agreement and loss bias of this cache
    and of every other encoding and k, to choose them from data."""
    from pipeline.tools.fidelity import fidelity, table

    argument("--rows", rows, COUNT)
    click.echo(table(fidelity(cache_ref, _root(root, config), rows, out)))


@cli.command("import-logprobs")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tokenizer", required=True, type=click.Path(path_type=Path),
              help="Local directory (or file) with the tokenizer.json the server's model uses.")
@click.option("--out", "root", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Cache root; the cache goes to OUT/<cache_id>.")
@click.option("--top-n", type=int, required=True, help="Log-probs kept per token (<= 20; the cache's k).")
@click.option("--teacher", default="served", show_default=True,
              help="Teacher name and revision recorded in the cache's spec (part of its id).")
@click.option("--backend", type=click.Choice(["zarr", "parquet"]), default="zarr", show_default=True)
@click.option("--rows-per-shard", type=int, default=None,
              help="Token rows per shard (default: 16 chunks, at most 131,072 tokens).")
@click.option("--chunk-rows", type=int, default=None,
              help="Rows per chunk / row group (default: the power of two nearest 2 MiB of stored rows).")
def import_logprobs_cmd(file: Path, tokenizer: Path, root: Path, top_n: int, teacher: str, backend: str,
                        rows_per_shard: int | None, chunk_rows: int | None) -> None:
    """Turn served prompt log-probs (vLLM prompt_logprobs or OpenAI completions logprobs, JSONL) into a
    token-level top-k cache; the JSONL schema is in pipeline/tools/importer.py and docs/language-models.md."""
    from pipeline.tools.importer import MAX_TOP_N, import_logprobs

    for name, value in (("rows-per-shard", rows_per_shard), ("chunk-rows", chunk_rows)):
        if value is not None:
            argument(f"--{name}", value, FIELDS[f"cache.{name.replace('-', '_')}"])
    argument("--top-n", top_n, Rule(integer=True, low=1, high=MAX_TOP_N, hint="servers return at most "
                                    f"{MAX_TOP_N} log-probs per token"))
    if not teacher.strip():
        raise ConfigError("--teacher: empty; name the teacher and its revision, e.g. my-llm@rev1")
    path = import_logprobs(file, tokenizer, root, top_n, teacher, backend, rows_per_shard, chunk_rows)
    manifest = json.loads((path / "manifest.json").read_text())
    click.echo(f"cache {path.name}: {manifest['rows']} token rows, top-{top_n} with residual, {path}")


@cli.command("job-script")
@CONFIG
@OVERRIDES
def job_script(config: Path, overrides: tuple[str, ...]) -> None:
    """Print the #SBATCH script dask-jobqueue would submit for the config's cluster.slurm section."""
    from pipeline.run.fanout import slurm_cluster

    cluster = slurm_cluster(_load(config, overrides).cluster)
    try:
        click.echo(cluster.job_script())
    finally:
        cluster.close()


def main() -> None:
    cli(prog_name="logitcache")
