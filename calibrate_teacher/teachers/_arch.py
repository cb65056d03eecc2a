"""Build the architecture named by ``--arch`` (``pkg.module:factory`` or ``path/file.py:factory``).

User code is imported only here, only when ``--arch`` names it, and only the module named.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate_teacher.errors import InvalidValueError, TeacherError

if TYPE_CHECKING:
    import torch

ARCH_HELP = "expected pkg.module:factory or path/to/file.py:factory"


def parse_arch_kwargs(arch_kwargs: Mapping[str, object] | str | None) -> dict[str, object]:
    """Return the factory's keyword arguments from a mapping or a JSON object string."""
    if arch_kwargs is None:
        return {}
    if isinstance(arch_kwargs, str):
        try:
            value = json.loads(arch_kwargs) if arch_kwargs.strip() else {}
        except json.JSONDecodeError as exc:
            raise InvalidValueError(
                f"--arch-kwargs {arch_kwargs!r}: not valid JSON ({exc.msg}); "
                """expected an object such as '{"num_classes": 100}'"""
            ) from exc
    else:
        value = dict(arch_kwargs)
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InvalidValueError(
            f"--arch-kwargs {arch_kwargs!r}: expected a JSON object of keyword arguments"
        )
    return value


def build_model(arch: str, arch_kwargs: Mapping[str, object] | str | None) -> torch.nn.Module:
    """Import the factory ``arch`` names, call it with ``arch_kwargs``, return the module.

    Raises:
        InvalidValueError: ``arch`` or ``arch_kwargs`` is malformed.
        TeacherError: the module, file or attribute cannot be found, the factory rejects the
            keyword arguments, or it does not return a ``torch.nn.Module``.
    """
    import torch

    kwargs = parse_arch_kwargs(arch_kwargs)
    target, sep, attr = arch.rpartition(":")
    if not sep or not target or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise InvalidValueError(f"--arch {arch!r}: {ARCH_HELP}")
    owner = _import_target(arch, target)
    factory: object = owner
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise TeacherError(f"--arch {arch!r}: {target} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TeacherError(f"--arch {arch!r}: {attr} is not callable")
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise TeacherError(
            f"--arch {arch!r}: calling {attr}(**{kwargs}) failed ({exc}); fix --arch-kwargs"
        ) from exc
    except Exception as exc:  # user code: whatever it raises is its error, not ours
        raise user_code_error(arch, f"calling {attr}(**{kwargs})", exc) from exc
    if not isinstance(model, torch.nn.Module):
        raise TeacherError(
            f"--arch {arch!r}: {attr} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _import_target(arch: str, target: str) -> object:
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target).expanduser()
        if not file.is_file():
            raise TeacherError(f"--arch {arch!r}: file {file} does not exist")
        # A stable private name per file, so importing the same file twice reuses the module.
        name = (
            "_calibrate_teacher_arch_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
        )
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise TeacherError(f"--arch {arch!r}: {file} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # user code: whatever it raises is its error, not ours
            del sys.modules[name]
            raise user_code_error(arch, f"importing {file}", exc) from exc
        except BaseException:
            del sys.modules[name]
            raise
        return module
    if not all(p.isidentifier() for p in target.split(".")):
        raise InvalidValueError(f"--arch {arch!r}: {ARCH_HELP}")
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and not target.startswith(exc.name):
            raise user_code_error(arch, f"importing {target}", exc) from exc
        raise TeacherError(
            f"--arch {arch!r}: cannot import {target} ({exc}); install it or point to a .py file"
        ) from exc
    except Exception as exc:  # user code: whatever it raises is its error, not ours
        raise user_code_error(arch, f"importing {target}", exc) from exc


def user_code_error(arch: str, doing: str, exc: BaseException) -> TeacherError:
    """One line for an exception raised by the user's ``--arch`` code, naming where it came from."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    mine = Path(__file__).resolve().parent.parent
    user = [f for f in frames if not Path(f.filename).resolve().is_relative_to(mine)]
    where = ""
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" at {exc.filename}:{exc.lineno}"
    elif user:
        where = f" at {user[-1].filename}:{user[-1].lineno}"
    text = " ".join(str(exc).split())[:200]
    return TeacherError(
        f"--arch {arch!r}: {doing} raised {type(exc).__name__}{where}"
        f"{': ' + text if text else ''}; fix the architecture code or --arch-kwargs"
    )
