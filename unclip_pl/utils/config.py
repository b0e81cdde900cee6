"""Config checks and building with one-line errors: what ``train.py`` runs before anything is built.

* :func:`check_config` resolves every interpolation, names missing required values, and checks plain values
  (int, float, bool, str) against the annotations of the ``_target_`` they are passed to, so
  ``data.batch_size=lots`` is reported by its key instead of failing deep inside a DataLoader.
* :func:`build` is ``hydra.utils.instantiate`` whose failure is one sentence naming the config block and target.
* :func:`build_accepting` passes only the keyword arguments a target declares: the training entry offers the same
  run-time objects (the frozen CLIP, the tokenizer, the run config, ...) to every stage's module and data module,
  and each takes what its constructor names.

Only public Hydra and OmegaConf APIs are used (``hydra.utils.get_object``, ``OmegaConf.is_interpolation``).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration mistake, reported as one sentence instead of a traceback."""


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ---------------------------------------------------------------------------------------------------- walking
def _children(cfg: DictConfig | ListConfig, prefix: str) -> Iterator[tuple[str, Any, bool]]:
    """``(dotted path, value, missing)`` of each direct child; interpolations are not followed (a block such as
    ``sample: ${prior.sample}`` is checked once, where it is defined)."""
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        if OmegaConf.is_interpolation(cfg, key):
            continue
        if OmegaConf.is_missing(cfg, key):
            yield f"{prefix}{key}", None, True
        else:
            yield f"{prefix}{key}", cfg[key], False


def missing_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Dotted paths of every ``???`` value."""
    out = []
    for path, value, missing in _children(cfg, prefix):
        if missing:
            out.append(path)
        elif isinstance(value, (DictConfig, ListConfig)):
            out += missing_keys(value, path + ".")
    return out


def target_nodes(cfg: DictConfig | ListConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig]]:
    """``(dotted path, node)`` of every block with a ``_target_`` (Hydra's own ``hydra:`` block excluded)."""
    if isinstance(cfg, DictConfig) and "_target_" in cfg:
        yield prefix.rstrip("."), cfg
    for path, value, _ in _children(cfg, prefix):
        if path == "hydra":
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            yield from target_nodes(value, path + ".")


# ---------------------------------------------------------------------------------------------------- checking
def check_config(cfg: DictConfig) -> None:
    """Resolve every interpolation and find missing required values up front, naming the key."""
    missing = sorted(missing_keys(cfg))
    if missing:
        raise ConfigError(f"Missing required config value(s): {', '.join(missing)} (set them on the command line, "
                          f"e.g. {missing[0]}=...).")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"Config key '{key}' could not be resolved: {first_line(e)}") from None
    for path, node in target_nodes(cfg):
        check_types(node, path)


def _annotations(target: Any) -> dict[str, Any]:
    """Constructor (or function) annotations; a class forwarding ``**kwargs`` to its bases gets theirs too."""
    fns = [c.__init__ for c in reversed(target.__mro__)] if inspect.isclass(target) else [target]
    hints: dict[str, Any] = {}
    for fn in fns:  # base classes first, so a subclass's annotation wins
        hints.update(typing.get_type_hints(fn))
    return hints


def check_types(node: DictConfig, what: str) -> None:
    """Check ``node``'s plain values against the annotations of its ``_target_`` (int, float, bool, str and
    optionals/unions of them); interpolated values are checked by what they resolve to."""
    try:
        hints = _annotations(get_object(node._target_))
    except Exception:  # noqa: BLE001 - an unimportable target or unresolvable annotations: nothing to check here
        return
    for key, annotation in hints.items():
        if key not in node or OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        allowed = _plain_types(annotation)
        if allowed is None or value is None or isinstance(value, (DictConfig, ListConfig)):
            continue
        ok = (bool in allowed) if isinstance(value, bool) else (
            isinstance(value, allowed) or (float in allowed and isinstance(value, int)))
        if not ok:
            raise ConfigError(f"{what}.{key} should be {' or '.join(t.__name__ for t in allowed)}, got {value!r}.")


def _plain_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows, or None when it allows anything else too."""
    plain = (int, float, bool, str, type(None))
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    if all(a in plain for a in args):
        return tuple(a for a in args if a is not type(None))
    return None


# ---------------------------------------------------------------------------------------------------- building
def build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)`` with a one-line :class:`ConfigError` naming the config block and target."""
    if isinstance(node, DictConfig) and "_target_" in node:
        check_types(node, what)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"Could not build {what} ({node.get('_target_', '?')}): {first_line(cause)}") from e


def accepted(target: Any, offered: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``offered`` that ``target``'s signature names (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


def build_accepting(node: DictConfig, what: str, required: dict[str, Any] | None = None, **offered: Any) -> Any:
    """:func:`build` with the ``required`` keyword arguments, and those of ``offered`` that the target's constructor
    declares. These are run-time objects (a model, a tokenizer, the resolved run config) and are passed as they are:
    the block is instantiated as a partial and then called with them, because ``instantiate(node, **kwargs)`` would
    merge them into the config and build every ``_target_`` inside them (the run config is full of those)."""
    try:
        target = get_object(node._target_)
    except Exception as e:  # noqa: BLE001 - a misspelt _target_: one line naming the block
        raise ConfigError(f"Could not build {what}: cannot import _target_ {node._target_!r} ({first_line(e)})") \
            from None
    factory = build(node, what, _partial_=True)
    try:
        return factory(**(required or {}), **accepted(target, offered))
    except Exception as e:  # noqa: BLE001 - as instantiate does: any constructor failure names the block
        raise ConfigError(f"Could not build {what} ({node._target_}): {first_line(e)}") from e
