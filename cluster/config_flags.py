"""Command-line flags generated from a pydantic model: the model is the one list of settings.

:class:`ConfigFlags` gives a typer command one ``--field-name`` option per field of a model:
the flag's choices (a ``Literal``), constraints (``PositiveInt``, ``Field(gt=...)``), default
and help (the field's ``description``) are read from the field, never restated. Every option
defaults to ``None``, so the command knows which flags the user set; only those go into
``model_validate``, and the model's defaults fill the rest. Values reach the model as the
text the user typed: the model parses and checks them, and a bad one is reported naming the
field (``train.prune: Input should be 'none', 'polynomial', 'constant' or '2:4'``).

A bool field is a switch: ``--qat`` when it defaults to False, ``--augment/--no-augment``
when it defaults to True.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Generic, Literal, TypeVar, Union, get_args, get_origin

import annotated_types
import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from cluster.exceptions import SettingsError

ModelT = TypeVar("ModelT", bound=BaseModel)
Command = TypeVar("Command", bound=Callable[..., Any])


class ConfigFlags(Generic[ModelT]):
    """The flags of one model; ``section`` prefixes its errors (``train.epochs: ...``)."""

    def __init__(self, model: type[ModelT], section: str, *, exclude: Collection[str] = ()):
        self.model = model
        self.section = section
        self.fields: dict[str, FieldInfo] = {
            name: field for name, field in model.model_fields.items() if name not in exclude}

    def add_options(self, command: Command) -> Command:
        """Give command (which takes ``**flags``) one typer option per field, after its own
        parameters; typer reads them from its ``__signature__``."""
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params = own + [self._parameter(name, field) for name, field in self.fields.items()]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    def given(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The flags the user set, out of a command's keyword arguments."""
        return {name: values[name] for name in self.fields if values.get(name) is not None}

    def validate(self, given: Mapping[str, Any]) -> ModelT:
        """The model of the flags given; SettingsError naming each offending field."""
        try:
            return self.model.model_validate(dict(given))
        except ValidationError as error:
            raise SettingsError(describe_errors(error, self.section)) from None

    def to_args(self, given: Mapping[str, Any]) -> list[str]:
        """The command line that sets given again (for a job that runs the same command)."""
        args: list[str] = []
        for name, value in given.items():
            flag = _flag(name)
            if isinstance(value, bool):
                args.append(flag if value else f"--no-{flag[2:]}")
            else:
                args += [flag, str(value)]
        return args

    def _parameter(self, name: str, field: FieldInfo) -> inspect.Parameter:
        kind, choices = _kind(field.annotation)
        help_text = field.description or ""
        if not field.is_required() and field.default not in (None, False):
            # Not typer's "[default: ...]": the option's own default is None (flag not set).
            shown = "on" if field.default is True else field.default
            help_text = f"{help_text.rstrip('.')} (default: {shown})."
        if kind is bool:
            decl = _flag(name) + (f"/--no-{_flag(name)[2:]}" if field.default else "")
            option = typer.Option(decl, help=help_text, show_default=False)
            annotation: Any = Annotated[bool | None, option]
        else:
            metavar = f"[{'|'.join(choices)}]" if choices else f"<{kind.__name__}>"
            bounds = _bounds(field)
            option = typer.Option(_flag(name), metavar=f"{metavar} {bounds}".strip(),
                                  help=help_text, show_default=False)
            annotation = Annotated[str | None, option]
        default = ... if field.is_required() else None
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                 annotation=annotation)


def describe_errors(error: ValidationError, section: str) -> str:
    """One line per invalid field: ``train.prune: Input should be ... (got 'cubic')``."""
    lines = []
    for item in error.errors():
        where = ".".join([section, *(str(part) for part in item["loc"])])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] not in ("value_error", "missing", "extra_forbidden"):
            message += f" (got {item['input']!r})"
        lines.append(f"{where}: {message}")
    return "\n".join(lines)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(annotation: Any) -> tuple[type, tuple[str, ...]]:
    """(the field's type without None and constraints, its Literal choices if any)."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        return str, tuple(str(choice) for choice in get_args(annotation))
    return annotation, ()


def _bounds(field: FieldInfo) -> str:
    """The field's numeric constraints as typer shows ranges: ``[x>0]``, ``[0<x<0.5]``."""
    metadata = list(field.metadata)
    for arg in get_args(field.annotation):  # PositiveInt | None keeps its Gt inside
        if get_origin(arg) is Annotated:
            metadata += get_args(arg)[1:]
    low: tuple[str, Any] | None = None
    high: tuple[str, Any] | None = None
    for item in metadata:
        if isinstance(item, annotated_types.Gt):
            low = (">", item.gt)
        elif isinstance(item, annotated_types.Ge):
            low = (">=", item.ge)
        elif isinstance(item, annotated_types.Lt):
            high = ("<", item.lt)
        elif isinstance(item, annotated_types.Le):
            high = ("<=", item.le)
    if low and high:
        return f"[{low[1]}{low[0].replace('>', '<')}x{high[0]}{high[1]}]"
    if low or high:
        op, value = low or high  # type: ignore[misc]
        return f"[x{op}{value}]"
    return ""
