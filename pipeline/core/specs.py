"""Model specs: one frozen dataclass per architecture, and the table that turns a config's `arch`
into one.

    teachers:
      members:
        - {name: cnn, arch: cnn, channels: [32, 64], hidden: [128], dropout: 0.2, seed: 2}
        - {name: gpt-teacher, arch: gpt, layers: 2, d_model: 128, heads: 4}

Each spec holds the fields its architecture reads, so a field of another architecture (a `gpt`
member given `channels`) is refused by the config loader with the architectures it applies to.
The builders live in `pipeline/models` (`ARCHITECTURES`, keyed by these classes); adding an
architecture is a spec here, a builder module there, and one entry in each table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """What every model has: its name and, for training, settings that override its section's."""

    name: str
    arch: str = "mlp"
    # training settings; for students, None means "use the student section's value"
    epochs: int | None = None
    lr: float | None = None
    seed: int = 0  # teachers: init/shuffle seed (students use student.seeds)
    temperature: float | None = None  # students only
    alpha: float | None = None  # students only

    task: ClassVar[str] = "classify"  # the data.task whose inputs and outputs the model takes
    trained_here: ClassVar[bool] = True  # False: a teacher loaded from the files it names
    weights_field: ClassVar[str] = ""  # the field naming a loaded teacher's weights

    @property
    def weights(self) -> str | None:
        """The file or directory a loaded teacher's weights come from; None if trained here."""
        return getattr(self, self.weights_field) if self.weights_field else None

    def problems(self, where: str, teacher: bool) -> list[str]:
        """Every invalid value of this spec, as `field: what is wrong; what to do` messages."""
        e = []
        if "/" in self.name or "\\" in self.name or self.name.startswith(".") or not self.name:
            e.append(f"{where}.name: {self.name!r} must be non-empty, without '/', and not start with '.'")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            e.append(f"{where}.alpha: must be in [0, 1]")
        if self.temperature is not None and self.temperature <= 0:
            e.append(f"{where}.temperature: must be > 0")
        if self.epochs is not None and self.epochs < 1:
            e.append(f"{where}.epochs: {self.epochs} must be >= 1")
        if self.lr is not None and self.lr <= 0:
            e.append(f"{where}.lr: {self.lr} must be > 0")
        if teacher:
            for name in ("temperature", "alpha"):
                if getattr(self, name) is not None:
                    e.append(f"{where}.{name}: applies to students only (teachers.temperature sets the cache's); remove it")
            if not self.trained_here:
                for name in ("epochs", "lr"):
                    if getattr(self, name) is not None:
                        e.append(f"{where}.{name}: {self.arch} teachers are loaded, not trained here; remove it")
        elif self.seed != 0:
            e.append(f"{where}.seed: students take their seeds from student.seeds; remove it")
        return e


def _dropout(spec: Any, where: str) -> list[str]:
    return [] if 0.0 <= spec.dropout < 1.0 else [f"{where}.dropout: must be in [0, 1)"]


def _sizes(spec: Any, where: str, *names: str) -> list[str]:
    if any(v < 1 for n in names for v in getattr(spec, n)):
        return [f"{where}: layer sizes must be positive"]
    return []


@dataclass(frozen=True)
class MLPSpec(ModelSpec):
    arch: Literal["mlp"] = "mlp"
    hidden: tuple[int, ...] = (256, 256)  # hidden layer sizes
    dropout: float = 0.0

    def problems(self, where: str, teacher: bool) -> list[str]:
        return [*super().problems(where, teacher), *_dropout(self, where), *_sizes(self, where, "hidden")]


@dataclass(frozen=True)
class CNNSpec(ModelSpec):
    arch: Literal["cnn"] = "cnn"
    hidden: tuple[int, ...] = (256, 256)  # width of the head's hidden layers
    channels: tuple[int, ...] = (32, 64)  # channels of each conv block
    dropout: float = 0.0

    def problems(self, where: str, teacher: bool) -> list[str]:
        return [*super().problems(where, teacher), *_dropout(self, where), *_sizes(self, where, "hidden", "channels")]


@dataclass(frozen=True)
class ImportSpec(ModelSpec):
    """A user model: `factory(**kwargs)` returns the nn.Module; teachers load `checkpoint` into it."""

    arch: Literal["import"] = "import"
    factory: str | None = None  # "package.module:function" returning an nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the factory
    checkpoint: str | None = None  # teachers: state_dict file
    version: str | None = None  # bump when the model's code changes in ways its source hash misses

    trained_here: ClassVar[bool] = False
    weights_field: ClassVar[str] = "checkpoint"

    def problems(self, where: str, teacher: bool) -> list[str]:
        e = super().problems(where, teacher)
        if not self.factory:
            e.append(f"{where}.factory: arch=import needs factory: 'package.module:function'")
        elif ":" not in self.factory:
            e.append(f"{where}.factory: {self.factory!r} must look like 'package.module:function'")
        if teacher and not self.checkpoint:
            e.append(f"{where}.checkpoint: arch=import teachers need a state_dict file")
        if not teacher and self.checkpoint is not None:
            e.append(f"{where}.checkpoint: students are trained from scratch; checkpoints apply to teachers; remove it")
        return e


@dataclass(frozen=True)
class GPTSpec(ModelSpec):
    """The built-in small causal transformer."""

    arch: Literal["gpt"] = "gpt"
    layers: int = 2  # transformer blocks
    heads: int = 4  # attention heads
    d_model: int = 128  # width
    dropout: float = 0.0

    task: ClassVar[str] = "lm"

    def problems(self, where: str, teacher: bool) -> list[str]:
        e = [*super().problems(where, teacher), *_dropout(self, where)]
        if self.layers < 1 or self.heads < 1 or self.d_model < 1:
            e.append(f"{where}: layers, heads and d_model must be >= 1")
        elif self.d_model % self.heads:
            e.append(f"{where}.d_model: {self.d_model} is not a multiple of heads={self.heads}")
        return e


@dataclass(frozen=True)
class HFSpec(ModelSpec):
    """A Hugging Face causal LM saved in a local directory (`save_pretrained`)."""

    arch: Literal["hf"] = "hf"
    path: str | None = None  # local directory for AutoModelForCausalLM.from_pretrained

    task: ClassVar[str] = "lm"
    trained_here: ClassVar[bool] = False
    weights_field: ClassVar[str] = "path"

    def problems(self, where: str, teacher: bool) -> list[str]:
        e = super().problems(where, teacher)
        if not self.path:
            e.append(f"{where}.path: arch hf needs a local model directory")
        return e


SPECS: dict[str, type[ModelSpec]] = {"mlp": MLPSpec, "cnn": CNNSpec, "import": ImportSpec, "gpt": GPTSpec, "hf": HFSpec}


def spec_class(arch: Any, where: str) -> type[ModelSpec]:
    """The spec class of `arch`; an unknown one is a ConfigError listing the known ones."""
    if not isinstance(arch, str) or arch not in SPECS:
        raise ConfigError(f"{where}.arch: {arch!r} is not one of {', '.join(SPECS)}")
    return SPECS[arch]


def foreign_field(key: str, arch: str) -> str | None:
    """Why `key` is refused on `arch`: the architectures it applies to, or None if it is no model field."""
    archs = [a for a, cls in SPECS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    return f"applies to arch {' or '.join(archs)}, not {arch}; remove it" if archs else None


def identity(spec: ModelSpec) -> dict[str, Any]:
    """A spec as it enters teacher, cache and student-run identities: the fields that differ from
    their defaults, so a new field with a default never changes an existing identity, and the
    architecture unless it is mlp (the default when these identities were first defined)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(spec):
        if f.name == "arch":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(spec, f.name)
        if default is dataclasses.MISSING or value != default:
            out[f.name] = _plain(value)
    if spec.arch != "mlp":
        out["arch"] = spec.arch
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, as JSON holds them."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
