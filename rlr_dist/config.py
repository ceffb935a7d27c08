"""Typed, validated configuration: dataclasses built from YAML dicts, with dotted overrides.

Every component declares one dataclass; :func:`build` turns a plain dict into it, checking keys and
types and naming the offending field (``model.lora.rank: expected int, got 'eight'``). Validation
that needs more than a type lives in the dataclass's ``__post_init__`` and raises :class:`ConfigError`
through :func:`check`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is wrong; the message starts with the dotted field name."""


class PathArg(str):
    """Annotation of a parameter that names a local path or a URI (``s3://``, ``toy:``, a hub id). Relative
    local paths are resolved against the directory a run is started from, before anything starts, so
    actors (whose working directory may differ) read the same file (:func:`resolve_path`)."""


def resolve_path(value: str | None, base: Path, output: bool = False) -> str | None:
    """``value`` made absolute against ``base`` when it is a relative local path: always for an ``output``
    (it may not exist yet), for an input only when ``base / value`` exists (else it may be a hub id)."""
    if value is None or "://" in value or (":" in value and not Path(value).drive and value.split(":", 1)[0].isidentifier()):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (base / p).resolve()
    return str(candidate) if output or candidate.exists() else value


def check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {msg}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; errors name ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        if len(args) == 2 and type(None) in args:  # Optional[X]: X's own error, with its field names
            return coerce(next(a for a in args if a is not type(None)), value, where)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[-1])
        raise ConfigError(f"{where}: {' / '.join(errors)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        out = [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Component):
        return tp.parse(value, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str or tp is PathArg:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a {'path' if tp is PathArg else 'string'}, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type[C], data: dict | None, where: str = "") -> C:
    """``cls(**data)`` with every key and type checked; ``where`` prefixes field names in errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown field; {cls.__name__} has {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if not where or msg.startswith(where):
            raise
        last = where.rsplit(".", 1)[-1]  # a nested section naming itself ("lora.rank" inside "model.lora")
        raise ConfigError(where + msg[len(last):] if msg.startswith(last + ".") else f"{where}.{msg}") from None
    return obj


class Component:
    """A registered component as a config section, written flat: ``{name: rlr, h: 2}``.

    Subclasses name their registry (:meth:`registry`, imported lazily) and the section keys that are not
    the component's parameters (``reserved``: key -> (type, default), e.g. a reward's ``on_nonfinite``).
    Parsing checks the name and the parameters against the class (:meth:`Registry.check`) without
    constructing it; :meth:`build` constructs it.
    """

    reserved: dict[str, tuple[Any, Any]] = {}

    def __init__(self, name: str, params: dict | None = None, where: str = "", **options: Any) -> None:
        self.name, self.where = name, where
        self.params = self.registry().check(name, params or {}, where)
        unknown = set(options) - set(self.reserved)
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}: not a section option of {type(self).__name__}")
        self.options = {k: coerce(tp, options.get(k, default), f"{where}.{k}")
                        for k, (tp, default) in self.reserved.items()}

    @classmethod
    def registry(cls):
        raise NotImplementedError

    @classmethod
    def parse(cls, value: Any, where: str) -> "Component":
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping {{name: ..., <parameters>}}, got {value!r}")
        data = dict(value)
        if "name" not in data:
            raise ConfigError(f"{where}.name: required; choose one of {cls.registry().names()}")
        name = data.pop("name")
        options = {k: data.pop(k) for k in list(data) if k in cls.reserved}
        return cls(name, data, where, **options)

    def build(self, **context: Any) -> Any:
        """The component itself (``context``: extra constructor arguments that are not config, if any)."""
        return self.registry().build(self.name, {**self.params, **context}, self.where)

    def __getattr__(self, key: str) -> Any:  # reserved options read like fields: ``cfg.reward.on_nonfinite``
        options = self.__dict__.get("options", {})
        if key in options:
            return options[key]
        raise AttributeError(key)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.params, **self.options}

    def path_params(self) -> list[tuple[str, str]]:
        """``(dotted field, value)`` of every :class:`PathArg` parameter, nested components' included."""
        return _path_params(self.registry(), self.name, self.params, self.where)

    def resolved(self, base: Path) -> "Component":
        """A copy whose :class:`PathArg` parameters are resolved against ``base`` (those of nested components
        too: a parameter that is a ``{name: ...}`` mapping or a list of them)."""
        params = _resolve_params(self.registry(), self.name, self.params, base)
        return type(self)(self.name, params, self.where, **self.options)

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"


def _is_path(tp) -> bool:
    return tp is PathArg or PathArg in typing.get_args(tp)


def _hints(registry, name: str) -> dict:
    try:
        return typing.get_type_hints(registry.get(name).__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing is known to be a path
        return {}


def _path_params(registry, name: str, params: dict, where: str) -> list[tuple[str, str]]:
    hints, out = _hints(registry, name), []
    for key, value in params.items():
        field = f"{where}.{key}" if where else key
        if isinstance(value, str) and _is_path(hints.get(key)):
            out.append((field, value))
        elif isinstance(value, dict) and isinstance(value.get("name"), str):
            out += _path_params(registry, value["name"], value, field)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, dict) and isinstance(v.get("name"), str):
                    out += _path_params(registry, v["name"], v, f"{field}[{i}]")
    return out


def _resolve_params(registry, name: str, params: dict, base: Path) -> dict:
    hints = _hints(registry, name)

    def walk(key: str, value: Any) -> Any:
        if isinstance(value, str) and _is_path(hints.get(key)):
            return resolve_path(value, base)
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            return {**value, **_resolve_params(registry, value["name"], value, base)}
        if isinstance(value, list):
            return [walk(key, v) if isinstance(v, dict) else v for v in value]
        return value

    return {k: walk(k, v) for k, v in params.items() if k != "name"}


def to_dict(obj: Any) -> Any:
    """Plain dict/list form of a config (for YAML dumps and MLflow params)."""
    if isinstance(obj, Component):
        return to_dict(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds; an empty file (or one of comments only) is an error, not the
    defaults: a run that trains on defaults because its file was empty is a silent surprise."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; give a YAML file (e.g. jobs/configs/digits.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e}") from None
    if not isinstance(data, dict):
        what = "is empty" if data is None else f"holds a {type(data).__name__}, not a mapping of sections"
        raise ConfigError(f"config file {str(p)!r} {what}; see jobs/configs/ for examples")
    if not data:
        raise ConfigError(f"config file {str(p)!r} sets nothing ({{}}); see jobs/configs/ for examples")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (a leading ``--`` is allowed; values are parsed as YAML)."""
    out = _deep_copy(data)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r}: expected --dotted.key=value")
        key, raw = text.split("=", 1)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty name in {key!r}")
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: the value {raw!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d
