"""One error root per package under one project root; user errors told apart from bugs."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any, NoReturn

import pytest

import cluster.exceptions
import jobs.exceptions
import serving.exceptions
import streams.exceptions
from serving.exceptions import FramecastError, UserError

REPO = Path(__file__).resolve().parents[2]
ROOTS = {
    "serving": serving.exceptions.ServingError,
    "streams": streams.exceptions.StreamsError,
    "jobs": jobs.exceptions.JobsError,
    "cluster": cluster.exceptions.ClusterError,
}
EXCEPTION_MODULES = {
    "serving": serving.exceptions,
    "streams": streams.exceptions,
    "jobs": jobs.exceptions,
    "cluster": cluster.exceptions,
}


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every class named *Error with a base class in the four packages.

    (Records such as ``RowError`` are dataclasses without a base: not exceptions.)
    """
    found = []
    for package in ROOTS:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found += [(module, node.name) for node in ast.walk(tree)
                      if isinstance(node, ast.ClassDef) and node.name.endswith("Error")
                      and node.bases]
    return found


def test_every_error_framecast_defines_is_a_framecast_error() -> None:
    classes = _error_classes()
    assert ("serving.exceptions", "ArtifactError") in classes
    strays = []
    for module, name in classes:
        error = getattr(importlib.import_module(module), name)
        if not (isinstance(error, type) and issubclass(error, FramecastError)):
            strays.append(f"{module}.{name}")
    assert not strays, f"derive these from their package's root error: {strays}"


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_each_packages_errors_derive_from_its_root_under_the_project_root(package: str) -> None:
    root = ROOTS[package]
    assert issubclass(root, FramecastError)
    module = EXCEPTION_MODULES[package]
    defined = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, BaseException)
               and v.__module__ == module.__name__]
    assert root in defined
    shared = {FramecastError, UserError}
    strays = [c.__name__ for c in defined if c not in shared and not issubclass(c, root)]
    assert not strays, f"{package} errors outside {root.__name__}: {strays}"


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_the_hierarchy_is_drawn_in_the_module_docstring(package: str) -> None:
    module = EXCEPTION_MODULES[package]
    doc = module.__doc__ or ""
    for name, value in vars(module).items():
        if isinstance(value, type) and value.__module__ == module.__name__:
            assert name in doc, f"{module.__name__}'s docstring does not draw {name}"


@pytest.mark.parametrize(
    ("module", "name", "builtin"),
    [
        # DLQ records carry these class names in their error.class header: a contract.
        ("serving.frames", "FrameSchemaError", ValueError),
        ("serving.preprocess", "FrameDecodeError", ValueError),
        ("serving.fashion_mnist", "DatasetNotFoundError", FileNotFoundError),
        ("jobs.data", "DatasetError", ValueError),
    ],
)
def test_contract_names_and_builtin_bases_are_kept(
    module: str, name: str, builtin: type[Exception]
) -> None:
    error = getattr(importlib.import_module(module), name)
    assert error.__name__ == name
    assert issubclass(error, builtin)
    assert issubclass(error, UserError)


@pytest.mark.parametrize(
    ("error", "is_user_error"),
    [
        (serving.exceptions.ArtifactError("x"), True),
        (serving.exceptions.FrameDecodeError("too_large", "x"), True),
        (serving.exceptions.DeployError("x"), False),
        (streams.exceptions.SourceError("x"), True),
        (streams.exceptions.ProducerOptionError("x"), True),
        (streams.exceptions.KafkaConnectionError("x"), False),
        (jobs.exceptions.OptionError("x"), True),
        (jobs.exceptions.TrainingError("x"), False),
        (cluster.exceptions.SettingsError("x"), True),
        (cluster.exceptions.SubmitOptionError("x"), True),
        (cluster.exceptions.BrokerStartError("x"), False),
    ],
)
def test_user_errors_are_marked(error: FramecastError, is_user_error: bool) -> None:
    assert isinstance(error, UserError) is is_user_error
    assert isinstance(error, FramecastError)


def test_a_user_error_from_jobs_is_one_message_and_an_exit(tmp_path: Path) -> None:
    from rich.console import Console

    from jobs.cli import run_evaluate

    failures: list[tuple[str, int]] = []

    def fail(message: str, code: int = 1) -> NoReturn:
        failures.append((message, code))
        raise SystemExit(code)

    with pytest.raises(SystemExit):
        run_evaluate(tmp_path / "none", None, None, "auto", True, Console(), fail)
    assert failures == [(f"{tmp_path / 'none'}: artifact directory does not exist", 1)]


def test_a_bug_in_jobs_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    import jobs.evaluate
    from jobs.cli import run_evaluate

    def broken(*_: Any, **__: Any) -> NoReturn:
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(jobs.evaluate, "evaluate_artifact", broken)

    def fail(message: str, code: int = 1) -> NoReturn:
        raise AssertionError(f"a bug was reported as a user error: {message}")

    with pytest.raises(ValueError, match="a bug"):
        run_evaluate(tmp_path, None, None, "auto", True, Console(), fail)
