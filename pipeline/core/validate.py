"""The rules values must follow, written once for every way a value arrives: a config field, a
command-line option, an environment variable, or an argument of the Python API.

    problem("student.alpha", 2.0, PROBABILITY)       # "student.alpha: 2.0 must be in [0, 1]"
    alpha = argument("alpha", alpha, PROBABILITY)    # the same line, raised as ArgumentError
    interval = env("LOGITCACHE_PROGRESS_INTERVAL")   # read, parsed and checked; ConfigError if bad
    check_environment()                              # every variable, before a command writes anything

`FIELDS` holds the rule of each config field that has one (pipeline/core/config.py checks them all
and keeps only the rules that tie fields together); the Python API checks its arguments with the
same rules, so `Cache.dataset(temperature=0)` is refused with the words `student.temperature=0` is.
`ENV` is the table of every environment variable logitcache reads (docs/runtime.md lists them).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import ArgumentError, ConfigError


@dataclass(frozen=True)
class Rule:
    """A whole number or a number, with bounds; `low_open`/`high_open` leave the bound itself out."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""  # why the bounds are what they are, or what to do: appended to the message

    def bounds(self) -> str:
        lo = None if self.low is None else _num(self.low)
        hi = None if self.high is None else _num(self.high)
        if lo is not None and hi is not None:
            if self.integer and not self.low_open and not self.high_open:
                return f"in {lo}..{hi}"
            return f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.high_open else '<='} {hi}"
        return ""

    def why(self, value: Any) -> str | None:
        """What is wrong with `value` ('must be > 0'), or None when it follows the rule."""
        kind = "a whole number" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.integer else numbers.Real):
            return f"must be {kind} {self.bounds()}".rstrip()
        if not math.isfinite(value):
            return f"must be a finite number {self.bounds()}".rstrip()
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            return f"must be {self.bounds()}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1 << 53 else repr(x)


COUNT = Rule(integer=True, low=1)  # a size or count of at least one
NONNEGATIVE_INT = Rule(integer=True, low=0)
POSITIVE = Rule(low=0, low_open=True)
NONNEGATIVE = Rule(low=0)
PROBABILITY = Rule(low=0, high=1)
SEED = Rule(integer=True, low=0, high=2**63 - 1)


def problem(where: str, value: Any, rule: Rule) -> str | None:
    """`where: value why; hint` when `value` breaks `rule`, else None: one entry of a config's problems."""
    why = rule.why(value)
    if why is None:
        return None
    return f"{where}: {value!r} {why}" + (f" ({rule.hint})" if rule.hint else "")


def argument(name: str, value: Any, rule: Rule) -> Any:
    """`value` when it follows `rule`; else ArgumentError naming the argument, in the words of the config."""
    line = problem(name, value, rule)
    if line is not None:
        raise ArgumentError(line)
    return value


def choice(name: str, value: Any, options: Collection[str]) -> str:
    """`value` when it is one of `options`; else ArgumentError listing them (as the config does)."""
    if not isinstance(value, str) or value not in options:
        raise ArgumentError(f"{name}: {value!r} is not one of {', '.join(options)}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(f"{name}: expected True or False, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Config fields with a rule of their own (the rules that tie fields together stay in config.validate)

VOCAB_SIZE = Rule(integer=True, low=258, high=1 << 24,
                  hint="the BPE trained here starts from 256 byte tokens and end-of-text; "
                       "give a few thousand, or set data.tokenizer")
MAX_SEQUENCES = Rule(integer=True, low=1, hint="the cap on training sequences; unset it to use the whole corpus")

FIELDS: dict[str, Rule] = {
    "data.test_fraction": Rule(low=0, high=1, low_open=True, high_open=True),
    "data.split_seed": SEED,
    "data.num_classes": Rule(integer=True, low=2),
    "data.vocab_size": VOCAB_SIZE,
    "data.seq_len": Rule(integer=True, low=2, high=1 << 20),
    "data.max_sequences": MAX_SEQUENCES,
    "teachers.temperature": POSITIVE,
    "teachers.epochs": COUNT,
    "teachers.batch_size": COUNT,
    "teachers.lr": POSITIVE,
    "teachers.weight_decay": NONNEGATIVE,
    "teachers.checkpoint_every": COUNT,
    "cache.k": COUNT,
    "cache.logp_range": POSITIVE,
    "cache.draws": Rule(integer=True, low=1, high=255, hint="counts are stored as uint8"),
    "cache.dense_max_classes": Rule(integer=True, low=2),
    "cache.rows_per_shard": COUNT,
    "cache.chunk_rows": COUNT,
    "cache.batch_size": COUNT,
    "cache.logit_rows": COUNT,
    "cache.context": Rule(integer=True, low=2, high=1 << 20),
    "cache.stride": COUNT,
    "cache.views": Rule(integer=True, low=0, high=65535, hint="view indices are stored as uint16"),
    "augment.padding": Rule(integer=True, low=0, high=64, hint="pixels of shift each way"),
    "augment.translate": Rule(integer=True, low=0, high=64, hint="pixels of shift each way"),
    "augment.flip": PROBABILITY,
    "augment.mixup_prob": PROBABILITY,
    "augment.mixup_alpha": POSITIVE,
    "augment.cutmix_prob": PROBABILITY,
    "augment.cutmix_alpha": POSITIVE,
    "student.seeds": SEED,  # each seed
    "student.epochs": COUNT,
    "student.batch_size": COUNT,
    "student.lr": POSITIVE,
    "student.momentum": NONNEGATIVE,
    "student.weight_decay": NONNEGATIVE,
    "student.temperature": POSITIVE,
    "student.alpha": PROBABILITY,
    "student.logit_chunk": COUNT,
    "student.seq_len": Rule(integer=True, low=1, high=1 << 20),
    "student.shuffle_chunks": COUNT,
    "student.checkpoint_every": COUNT,
    "cluster.workers": COUNT,
    "cluster.threads_per_worker": COUNT,
    "cluster.gpus_per_worker": NONNEGATIVE_INT,
    "cluster.retries": NONNEGATIVE_INT,
    "cluster.worker_timeout": POSITIVE,
    "cluster.slurm.jobs": COUNT,
    "cluster.slurm.processes": COUNT,
    "cluster.slurm.cores": COUNT,
    "evaluate.ece_bins": COUNT,
    "seed": SEED,
}


def field_problems(cfg: Any, section: str = "") -> list[str]:
    """Every field in FIELDS that breaks its rule (unset optional fields have none to break): of a
    whole config, or with `section` ("augment.") of that section's dataclass alone."""
    out = []
    for path, rule in FIELDS.items():
        if not path.startswith(section):
            continue
        value: Any = cfg
        for part in path[len(section):].split("."):
            value = getattr(value, part)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            line = None if v is None else problem(path, v, rule)
            if line is not None:
                out.append(line)
                break
    return out


# ---------------------------------------------------------------------------------------------
# Environment variables


@dataclass(frozen=True)
class EnvVar:
    """An environment variable: how its text becomes a value (`parse` raises ValueError with what to
    set instead), its default when unset or empty, and what it changes."""

    parse: Callable[[str], Any]
    default: Any
    effect: str


def _number(rule: Rule, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value: Any = int(text) if rule.integer else float(text)
        except ValueError:
            value = None
        if value is None or rule.why(value) is not None:
            raise ValueError(f"set it to {what} {rule.bounds()}")
        return value
    return parse


def _path(kind: str) -> Callable[[str], Path]:
    def parse(text: str) -> Path:
        p = Path(text).expanduser()
        if kind == "file" and p.is_dir():
            raise ValueError("it names a directory; set it to a file path (created if missing)")
        if kind == "directory" and p.exists() and not p.is_dir():
            raise ValueError("it names a file; set it to a directory (created if missing)")
        return p
    return parse


def _switch(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("set it to 1 (on) or 0 (off)")
    return text == "1"


ENV: dict[str, EnvVar] = {
    "LOGITCACHE_DIGESTS": EnvVar(_path("file"), None, "where digests are remembered per machine"),
    "LOGITCACHE_SHARD_CACHE": EnvVar(_path("directory"), None, "local copies of remote caches' shards"),
    "LOGITCACHE_SHARD_CACHE_BYTES": EnvVar(_number(Rule(integer=True, low=1), "a number of bytes"), 20 << 30,
                                           "the shard cache's size limit"),
    "LOGITCACHE_LOCK_LEASE": EnvVar(_number(POSITIVE, "a number of seconds"), 60.0,
                                    "seconds after which an untouched build lock is taken over"),
    "LOGITCACHE_TMP_GRACE": EnvVar(_number(NONNEGATIVE, "a number of seconds"), 3600.0,
                                   "seconds before another host's temporary file is swept"),
    "LOGITCACHE_MAX_OPEN_SHARDS": EnvVar(_number(COUNT, "a whole number"), 64, "shard files a reader keeps open"),
    "LOGITCACHE_READ_THREADS": EnvVar(_number(NONNEGATIVE_INT, "a whole number"), None,
                                      "threads that decode chunks (unset: by the cores)"),
    "LOGITCACHE_PROGRESS_INTERVAL": EnvVar(_number(NONNEGATIVE, "a number of seconds"), 30.0,
                                           "seconds between progress lines without a terminal (0: every update)"),
    "LOGITCACHE_STEADY_HEAP": EnvVar(_switch, True, "the CLI's mmap-threshold pin"),
    "XDG_CACHE_HOME": EnvVar(_path("directory"), None, "where per-user caches go (default ~/.cache)"),
}


def env(name: str) -> Any:
    """The value of environment variable `name` (one of ENV): its default when unset or empty; a
    ConfigError naming it and what to set when its text is not a valid value."""
    var = ENV[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return var.default
    try:
        return var.parse(text)
    except ValueError as e:
        raise ConfigError(f"{name}={text!r}: {e}, or unset it") from None


def check_environment() -> None:
    """Every variable of ENV, checked at once: the CLI calls this before a command writes anything."""
    problems = []
    for name in ENV:
        try:
            env(name)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))
