"""Name -> class registries and the one builder that turns ``{type: Name, **kwargs}`` blocks into objects.

Each layer owns registries (``MODELS``, ``LOSSES``, ``TRANSFORMS``, ... and the engine's ``OPTIMIZERS``,
``LR_SCHEDULERS``, ``LR_WARMUPS``, ``EMAS``); a class joins one when its module is imported. A config block
maps one-to-one onto the constructor's keyword arguments; values shared by several components are passed by
the caller as ``build(..., num_classes=...)`` so that who reads what stays visible in code.

A block whose arguments do not fit the constructor is a :class:`ConfigError` naming the file and key path; an
exception raised inside a constructor is not rewritten, so a bug keeps its traceback.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = [
    "COLLATORS",
    "DATASETS",
    "EMAS",
    "EVALUATORS",
    "LOSSES",
    "LR_SCHEDULERS",
    "LR_WARMUPS",
    "MODELS",
    "OPTIMIZERS",
    "REGISTRIES",
    "SCALERS",
    "TRANSFORMS",
    "ConfigError",
    "Registry",
    "constructor_arguments",
    "did_you_mean",
    "find_registry",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or block is wrong; the message names the file, the key path and a fix."""


def did_you_mean(key: str, allowed: Iterable[str]) -> str:
    """Return `` Did you mean 'x'?`` for the closest allowed name, or an empty string."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def constructor_arguments(obj: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """Keyword arguments a registered class or function accepts (not ``self``, ``*args``, ``**kwargs``)."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters
    return {
        name: p
        for name, p in params.items()
        if name != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _accepts_var_kwargs(obj: Callable[..., Any]) -> bool:
    target = obj.__init__ if inspect.isclass(obj) else obj
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(target).parameters.values())


class Registry:
    """A named table of classes (or factory functions) that config blocks refer to by ``type``.

    Examples:
        >>> MODELS = Registry("model")
        >>> @MODELS.register()
        ... class Foo:
        ...     def __init__(self, width: int = 8) -> None: ...
        >>> MODELS.build({"type": "Foo", "width": 16})
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._entries: dict[str, Callable[..., Any]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {sorted(self._entries)})"

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering a class or function under ``name`` (default: its ``__name__``).

        Raises:
            KeyError: the name is already held, naming the module that holds it.
        """

        def decorator(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            if key in self._entries:
                owner = self._entries[key]
                raise KeyError(
                    f"'{key}' is already registered in the {self.name} registry by "
                    f"{owner.__module__}.{owner.__qualname__}; pick another name."
                )
            self._entries[key] = obj  # type: ignore[assignment]
            return obj

        return decorator

    def get(self, name: str, where: str = "") -> Callable[..., Any]:
        """Look up ``name``; an unknown name raises ConfigError listing the registered ones."""
        if name not in self._entries:
            at = f"{where}: " if where else ""
            raise ConfigError(
                f"{at}unknown {self.name} type '{name}'.{did_you_mean(name, self._entries)} "
                f"Registered {self.name} types: {', '.join(self.names)}."
            )
        return self._entries[name]

    def check_block(
        self,
        block: Mapping[str, Any],
        where: str = "",
        provided: Iterable[str] = (),
        locate: Callable[[str], str] | None = None,
        nested: Iterable[str] = (),
    ) -> None:
        """Check that ``block`` names a registered type, only that constructor's arguments, and all of its
        required ones.

        Args:
            block: ``{type: Name, **kwargs}``.
            where: ``file: key.path`` of the block, used in messages.
            provided: argument names the builder passes itself (they must not appear in the block).
            locate: ``key -> "file: key.path.key"`` for a key inside the block (default: ``where.key``), so a
                message names the file that set the bad key rather than the one that started the block.
            nested: keys of the block the builder turns into arguments itself (sub-blocks it builds first,
                the optimizer's param groups); they need not be present, because their builder fills or
                reports them.

        Raises:
            ConfigError: an unknown type, a key the builder provides, an unknown argument (with the closest
                valid one) or a missing required argument, naming the block and the argument.
        """
        locate = locate or (lambda key: f"{where}.{key}")
        if not isinstance(block, Mapping) or "type" not in block:
            raise ConfigError(
                f"{where}: expected a mapping with a 'type' key, got {block!r}. "
                f"Registered {self.name} types: {', '.join(self.names)}."
            )
        cls = self.get(block["type"], where)
        if _accepts_var_kwargs(cls):
            return
        args = constructor_arguments(cls)
        provided = set(provided)
        for key in block:
            if key == "type":
                continue
            if key in provided:
                raise ConfigError(
                    f"{locate(key)}: '{key}' is set once at the top level of the config and passed to "
                    f"{block['type']} by the builder; remove it here."
                )
            if key not in args:
                default = ""
                close = difflib.get_close_matches(key, sorted(args), n=1, cutoff=0.6)
                if close and args[close[0]].default is not inspect.Parameter.empty:
                    default = f" (default {args[close[0]].default!r})"
                hint = f" Did you mean '{close[0]}'{default}?" if close else ""
                raise ConfigError(
                    f"{locate(key)} is not an argument of {block['type']}.{hint} "
                    f"Valid arguments: {', '.join(sorted(set(args) - provided))}."
                )
        given = set(block) | provided | set(nested)
        for name, parameter in args.items():
            if parameter.default is inspect.Parameter.empty and name not in given:
                raise ConfigError(
                    f"{locate(name)} is missing: {block['type']} has no default for '{name}'; "
                    "set it in the block."
                )

    def build(self, block: Mapping[str, Any], where: str = "", **provided: Any) -> Any:
        """Build ``block`` (``{type: Name, **kwargs}``), adding the builder's ``provided`` keyword arguments.

        Nested blocks are *not* built here: the caller builds children first and passes them in, so the
        order of construction is visible in the caller's code.

        Raises:
            ConfigError: the block's arguments do not fit the constructor (see :meth:`check_block`), checked
                before anything is constructed; or the constructor raised ConfigError about a value, then
                prefixed with ``where``. Any other exception raised inside the constructor (a bug) propagates
                unchanged, with its traceback.
        """
        self.check_block(block, where, provided)
        cls = self.get(block["type"], where)
        kwargs = {k: v for k, v in block.items() if k != "type"}
        try:
            inspect.signature(cls).bind(**kwargs, **provided)
        except TypeError as error:  # what check_block cannot see, e.g. a positional-only argument
            raise ConfigError(f"{where}: bad arguments for {block['type']}: {error}.") from None
        try:
            return cls(**kwargs, **provided)
        except ConfigError as error:
            # The constructor's own check of a config value: add which block it came from (the original stays
            # chained, with its traceback). Any other exception from inside the constructor is a bug and
            # propagates untouched.
            if not where:
                raise
            raise ConfigError(f"{where}: {error}") from error


MODELS = Registry("model")
LOSSES = Registry("loss")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
COLLATORS = Registry("collate function")
# Filled by dfine.engine.optim / schedules / ema when they are imported (dfine/__init__.py imports them).
OPTIMIZERS = Registry("optimizer")
LR_SCHEDULERS = Registry("lr scheduler")
LR_WARMUPS = Registry("lr warm-up scheduler")
EMAS = Registry("ema")
SCALERS = Registry("grad scaler")
EVALUATORS = Registry("evaluator")
REGISTRIES: tuple[Registry, ...] = (
    MODELS,
    LOSSES,
    DATASETS,
    TRANSFORMS,
    COLLATORS,
    OPTIMIZERS,
    LR_SCHEDULERS,
    LR_WARMUPS,
    EMAS,
    SCALERS,
    EVALUATORS,
)


def find_registry(name: str) -> Registry | None:
    """The registry holding ``name``, or None."""
    for registry in REGISTRIES:
        if name in registry:
            return registry
    return None
