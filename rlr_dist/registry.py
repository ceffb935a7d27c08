"""Name -> class registries for what users choose in a config (estimators, regularisers, divergences,
rewards, model layouts), with one way to build an entry and errors that name the config field.

A component is written flat in YAML, ``{name: rlr, h: 2}``; :meth:`Registry.build` checks the parameters
against the class's constructor (unknown, missing, wrong type — coerced from its annotations, so
``--estimator.h=two`` reads "estimator.h: expected int, got 'two'"), runs the class's optional
``check_params`` hook, then constructs it. Any failure becomes a :class:`~rlr_dist.config.ConfigError`
prefixed with ``where`` (the dotted field of the section).

Classes outside the package plug in without editing it:

* by dotted path in the config, ``name: my_pkg.rewards:MyReward`` (imported on first use, checked to be a
  subclass of the registry's base class);
* by a Python entry point of the registry's group (``[project.entry-points."rlr_dist.rewards"]`` in the
  plug-in's ``pyproject.toml``), loaded when the name is first asked for; the toy world registers its
  digit rewards this way.
"""
from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any, Callable, Generic, TypeVar

from rlr_dist.config import ConfigError, coerce

T = TypeVar("T")


class ParamError(ValueError):
    """A component's parameter is wrong; ``field`` is its name (dotted inside nested parameters)."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg


def check_param(field: str, ok: bool, msg: str) -> None:
    """Raise :class:`ParamError` for ``field`` unless ``ok``."""
    if not ok:
        raise ParamError(field, msg)


def _join(where: str | None, field: str) -> str:
    return f"{where}.{field}" if where else field


class Registry(Generic[T]):
    """``register`` classes under names; ``get`` / ``check`` / ``build`` them by name or dotted path.

    base: the class every entry must subclass (checked for dotted-path plug-ins).
    group: the entry-point group searched for names not registered in the package.
    """

    def __init__(self, kind: str, base: type | None = None, group: str | None = None) -> None:
        self.kind, self.base, self.group = kind, base, group
        self._items: dict[str, T] = {}
        self._entry_points: dict[str, Any] | None = None

    # ------------------------------------------------------------------ registration and lookup
    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            setattr(obj, "registry_name", name)
            return obj

        return deco

    def _eps(self) -> dict[str, Any]:
        if self._entry_points is None:
            from importlib.metadata import entry_points

            self._entry_points = {ep.name: ep for ep in entry_points(group=self.group)} if self.group else {}
        return self._entry_points

    def get(self, name: str, where: str | None = None) -> T:
        """The class registered as ``name``, a plug-in's entry point, or ``module:Class``."""
        field = _join(where, "name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{field}: required; choose one of {self.names()} or give module:Class")
        if name in self._items:
            return self._items[name]
        if ":" in name:
            obj = self._import(name, field)
        elif name in self._eps():
            try:
                obj = self._eps()[name].load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in: say which
                raise ConfigError(f"{field}: {self.kind} {name!r} (entry point {self._eps()[name].value}) "
                                  f"failed to load: {type(e).__name__}: {e}") from None
        else:
            raise ConfigError(f"{field}: unknown {self.kind} {name!r}; choose one of {self.names()} "
                              "(or give module:Class for one of your own)")
        if ":" not in name:  # a loaded entry point joins the registry; a module:Class stays the user's
            self._items.setdefault(name, obj)
        if "registry_name" not in vars(obj):  # not a name inherited from a registered parent
            setattr(obj, "registry_name", name)
        return obj

    def _import(self, path: str, field: str) -> T:
        module, _, attr = path.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise ConfigError(f"{field}: cannot import {module!r} for {self.kind} {path!r}: {e}") from None
        except AttributeError:
            raise ConfigError(f"{field}: module {module!r} has no {attr!r} ({self.kind} {path!r})") from None
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise ConfigError(f"{field}: {path!r} is not a {self.base.__name__} subclass")
        return obj

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._eps()))

    def items(self) -> list[tuple[str, T]]:
        """Registered entries (entry points not yet loaded are left out)."""
        return sorted(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._eps()

    # ------------------------------------------------------------------ building
    def check(self, name: str, params: dict | None = None, where: str | None = None) -> dict:
        """Validate ``params`` for entry ``name`` without constructing it; returns them coerced to the
        constructor's annotated types. Raises :class:`ConfigError` naming ``where.<param>``."""
        cls = self.get(name, where)
        params = dict(params or {})
        init = cls.__init__
        if init is object.__init__ or getattr(init, "__objclass__", None) is object or _inherits_module_init(cls):
            sig_params: dict[str, inspect.Parameter] = {}
            takes_any = False
        else:
            sig = inspect.signature(init)
            sig_params = {k: p for k, p in list(sig.parameters.items())[1:]
                          if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        for key in sorted(params):
            if key not in sig_params and not takes_any:
                hint = (f" (parameters go beside the name: {{name: {name}, {', '.join(f'{k}: ...' for k in params[key])}}})"
                        if key == "params" and isinstance(params[key], dict) else "")
                raise ConfigError(f"{_join(where, key)}: unknown parameter of {self.kind} {name!r}; it takes "
                                  f"{sorted(sig_params)}{hint}")
        for key, p in sig_params.items():
            if p.default is p.empty and key not in params:
                raise ConfigError(f"{_join(where, key)}: required parameter of {self.kind} {name!r} is missing")
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - unresolvable annotations: no coercion
            hints = {}
        out = {k: coerce(hints[k], v, _join(where, k)) if k in hints else v for k, v in params.items()}
        hook = getattr(cls, "check_params", None)
        if hook is not None:  # called with the parameters it names (an inherited hook knows its class's only)
            hp = inspect.signature(hook).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in hp.values()):
                out_for_hook = {k: v for k, v in out.items() if k in hp}
            else:
                out_for_hook = out
            self._call(hook, where, name, **out_for_hook)
        return out

    def build(self, name: str, params: dict | None = None, where: str | None = None, /, **more: Any) -> T:
        """``cls(**params)`` for entry ``name`` after :meth:`check`; ``more`` adds parameters (for code:
        ``ESTIMATORS.build("rlr", h=2)``). Constructor errors become :class:`ConfigError` naming the field."""
        cls = self.get(name, where)
        params = self.check(name, {**(params or {}), **more}, where)
        return self._call(cls, where, name, **params)

    def _call(self, fn: Callable, where: str | None, name: str, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except ParamError as e:
            raise ConfigError(f"{_join(where, e.field)}: {e.msg}") from None
        except ConfigError as e:  # a nested component's error, relative to this one ("parts[0].target: ...")
            raise ConfigError(_join(where, str(e))) from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where or name}: {e}" if where or str(e).find(name) < 0 else str(e)) from None


def _inherits_module_init(cls: type) -> bool:
    """A torch module without a constructor of its own takes no parameters."""
    try:
        from torch import nn
    except ImportError:  # pragma: no cover
        return False
    return cls.__init__ is nn.Module.__init__
