"""A check of the command line's config keys before Hydra runs, shared by ``train.py``, ``sample.py`` and ``eval.py``.

A mistyped key (``prior.module.model.net.dimm=3``) makes Hydra stop while composing, before the task function runs,
with a bare "Key 'dimm' is not in struct". :func:`exit_on_unknown_override` composes the same config with Hydra's
compose API first and, only when that fails on a key that does not exist, prints one ``Config error:`` line per
unknown key naming the keys that do exist at that level and the closest match, then exits with status 2. Any other
outcome (success, or another kind of error) is left to Hydra, unchanged.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

#: Hydra flags this check understands (any other flag, e.g. --config-name or --info, skips the check).
_PLAIN_FLAGS = {"-m", "--multirun", "-r", "--run", "--resolve"}
_VALUE_FLAGS = {"-c", "--cfg", "-p", "--package"}
_MAX_UNKNOWN = 5


def exit_on_unknown_override(script: str, config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit with status 2 and one ``Config error:`` line per override of a key that does not exist.

    ``script``: the entry script (its ``conf/`` folder is the config directory, as in its ``hydra.main``);
    ``argv``: the command line (default ``sys.argv``)."""
    config_dir = os.path.join(os.path.dirname(os.path.abspath(script)), "conf")
    errors = unknown_override_errors(config_dir, config_name, list(sys.argv if argv is None else argv)[1:])
    if errors:
        for e in errors:
            print(f"Config error: {e}", file=sys.stderr)
        sys.exit(2)


def unknown_override_errors(config_dir: str, config_name: str, args: Sequence[str]) -> list[str]:
    """One sentence per override in ``args`` (the command line after the script) whose key does not exist in the
    composed config; empty when the config composes, or fails for any other reason (Hydra then reports it)."""
    from hydra.core.global_hydra import GlobalHydra

    pairs = _overrides(args)
    if not pairs or GlobalHydra.instance().is_initialized():
        return []
    unknown: list[str] = []
    for _ in range(_MAX_UNKNOWN + 1):
        cfg, missing_at = _compose(config_dir, config_name, [composed for composed, _ in pairs])
        if cfg is not None:
            break
        index = _failing_override([composed for composed, _ in pairs], missing_at)
        if index is None or len(unknown) == _MAX_UNKNOWN:
            return []  # not a missing key, or not one we can pin on an override: Hydra's own message
        unknown.append(pairs.pop(index)[1])
    else:
        return []
    return [_describe(cfg, o) for o in unknown]


# ------------------------------------------------------------------------------------------------------- helpers
def _overrides(args: Sequence[str]) -> list[tuple[str, str]] | None:
    """(override to compose with, as typed) for each override of a Hydra command line; in a multirun each sweep is
    reduced to its first value (the first job's config, where Hydra would fail). None when a flag is present that
    this check does not model."""
    out, multirun, skip = [], False, False
    for a in args:
        if skip:
            skip = False
        elif a in _PLAIN_FLAGS:
            multirun |= a in ("-m", "--multirun")
        elif a in _VALUE_FLAGS:
            skip = True
        elif a.startswith("-"):
            if not any(a.startswith(f"{f}=") for f in _VALUE_FLAGS if f.startswith("--")):
                return None
        else:
            out.append(a)
    if not multirun:
        return [(a, a) for a in out]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    first = []
    for a in out:
        try:
            o = parser.parse_override(a)
            first.append((f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
                          if o.is_sweep_override() else a, a))
        except Exception:  # an interval sweep or unparsable: leave the check to Hydra
            return None
    return first


def _compose(config_dir: str, config_name: str, overrides: list[str]) -> tuple[DictConfig | None, str | None]:
    """(the composed config, None), or (None, the dotted path where a key was missing), or (None, None)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True), None
    except ConfigCompositionException as e:
        cause = e.__cause__
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and getattr(cause, "full_key", None):
            return None, str(cause.full_key)
        return None, None
    except Exception:
        return None, None


def _key(override: str) -> str | None:
    """The dotted key of a plain ``key=value`` override (None for ``+``/``++``/``~``, ``group@package`` and others)."""
    if "=" not in override or override[0] in "+~":
        return None
    key = override.split("=", 1)[0]
    return None if "@" in key or "/" in key else key


def _failing_override(overrides: list[str], missing_at: str | None) -> int | None:
    if not missing_at:
        return None
    for i, o in enumerate(overrides):
        key = _key(o)
        if key is not None and (key == missing_at or key.startswith(missing_at + ".")):
            return i
    return None


def _describe(cfg: DictConfig, override: str) -> str:
    """Where the key of ``override`` stops existing in ``cfg``: the keys there and the closest one."""
    key = _key(override) or override
    node: Any = cfg
    path: list[str] = []
    for part in key.split("."):
        where = f"'{'.'.join(path)}'" if path else "the top level of the config"
        if not isinstance(node, DictConfig):
            value = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node._value()
            return (f"{override}: '{'.'.join(path)}' is a value ({value!r}), not a group of keys, so it has no key "
                    f"'{part}'.")
        keys = [str(k) for k in node.keys()]
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            return (f"{override}: no key '{part}' at {where}.{hint} Keys there: {', '.join(keys) or '(none)'}. "
                    f"To add a new key, use +{override}.")
        node = node._get_node(part)
        path.append(part)
    return f"{override}: unknown key '{key}'."  # not reached for a key Hydra rejected
