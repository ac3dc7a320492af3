"""A user's model given as `package.module:function` (plus a state_dict file for teachers).

Its identity holds the sha256 of the factory's source file, so editing the model's forward
changes the cache id (spec.version covers what the source hash misses).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.core.errors import ModelError
from pipeline.core.io import file_digest
from pipeline.core.specs import ImportSpec
from pipeline.models.common import check_output_width, first_line


def import_factory(spec: ImportSpec, where: str) -> Callable[..., Any]:
    """The function named by spec.factory; any failure of the user's module is one ModelError."""
    assert spec.factory is not None
    module_name, _, fn_name = spec.factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"{where}: cannot import {spec.factory!r} ({e}); "
                         "check the module is on PYTHONPATH") from None
    except SyntaxError as e:
        raise ModelError(f"{where}: {e.filename}:{e.lineno}: SyntaxError in {module_name}: {e.msg}") from None
    except Exception as e:  # the module itself raised while being imported
        raise ModelError(f"{where}: importing {module_name} raised {first_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"{where}: module {module_name} has no function {fn_name!r}; "
                         "give 'package.module:function'")
    return fn


def build(spec: ImportSpec, input_shape: tuple[int, ...], num_classes: int, where: str) -> nn.Module:
    fn = import_factory(spec, f"{where}.factory")
    try:
        model = fn(**spec.kwargs)
    except TypeError as e:
        if "argument" in str(e):  # unexpected / missing keyword arguments
            raise ModelError(f"{where}.kwargs: {spec.factory}(**{spec.kwargs}) failed: {first_line(e)}; "
                             "pass only the factory's parameters") from None
        raise ModelError(f"{where}.factory: {spec.factory} raised {first_line(e)}") from None
    except Exception as e:
        raise ModelError(f"{where}.factory: {spec.factory} raised {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{where}.factory: {spec.factory} returned {type(model).__name__}, not a torch nn.Module")
    return check_output_width(model, input_shape, num_classes, where, spec.name)


def identity(spec: ImportSpec, weights: Path, num_classes: int, where: str) -> dict[str, Any]:
    return {"code_sha256": factory_source_sha256(spec, f"{where}.factory")}


def code_files(spec: ImportSpec) -> list[Path]:
    """The factory module's source file, when it can be found without importing the module."""
    if not spec.factory:
        return []
    try:
        found = importlib.util.find_spec(spec.factory.partition(":")[0])
    except Exception:  # reported by the identity check itself
        return []
    return [Path(found.origin)] if found is not None and found.origin and found.has_location else []


def factory_source_sha256(spec: ImportSpec, where: str) -> str:
    """sha256 of the source file of the factory's module, found without running the module when
    its package is already importable; editing a model's forward changes the cache id."""
    assert spec.factory is not None
    module_name = spec.factory.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as e:
        raise ModelError(f"{where}: cannot import {spec.factory!r} ({e}); check the module is on PYTHONPATH") from None
    except Exception as e:  # a parent package's __init__ failed
        raise ModelError(f"{where}: importing {module_name} raised {first_line(e)}") from None
    if found is None:
        raise ModelError(f"{where}: cannot import {spec.factory!r} (no module named {module_name!r}); "
                         "check the module is on PYTHONPATH")
    source = Path(found.origin) if found.origin and found.has_location else None
    if source is None or source.suffix != ".py":  # a compiled or namespace module: ask the loaded one
        fn = import_factory(spec, where)
        name = inspect.getsourcefile(fn) or getattr(inspect.getmodule(fn), "__file__", None)
        source = Path(name) if name else None
    if source is None or not source.is_file():
        raise ModelError(f"{where}: cannot find the source file of {spec.factory!r} to put in the cache id; "
                         "define the factory in a .py module")
    return file_digest(source)

