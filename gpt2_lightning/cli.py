"""What the two Hydra entry points (train, generate) share: the command line read and composed
once with Hydra's own parser and compose API before Hydra starts, so that a mistake in it gets one
line (Hydra's own messages take several), and errors printed on one line."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF = Path(__file__).parent / "conf"
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
HYDRA = ("defaults", "hydra")  # a config's keys that are Hydra's, not the program's


def one_line(error: BaseException) -> str:
    """OmegaConf's messages add `full_key: ...` and `object_type=...` lines: keep the key."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"{first} (at {key})" if isinstance(error, OmegaConfBaseException) and key else first


def parse(text: str) -> Override:
    """One override, or a ValueError saying how to write it."""
    try:
        (override,) = OverridesParser.create().parse_overrides([text])
    except HydraException as error:
        reason = str(error).splitlines()[0]
        raise ValueError(
            f"{text!r} is not an override Hydra can read ({reason}): write key=value, and quote "
            f"a value holding spaces, commas, quotes or non-ASCII text: 'key=\"...\"' (see "
            f"{GRAMMAR})"
        ) from None
    return override


def override(key: str, value: str) -> str:
    """key=value written so that Hydra reads value back as this string (quoted where needed:
    brackets, commas, quotes, non-ASCII), for commands printed to the user."""
    quoted = '"' + value.replace('"', '\\"') + '"'
    for text in (f"{key}={value}", f"{key}={quoted}"):
        try:
            if parse(text).value() == value:
                return text
        except ValueError:
            pass
    return f"{key}={quoted}"  # backslashes before a quote: rare enough to leave as they are


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml with the overrides, Hydra's own config (cfg.hydra) included."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


def composition_error(
    name: str, error: HydraException, overrides: list[str], given: dict, can_add: bool = True
) -> str:
    """Hydra's reason in one line; for an unknown key, the keys its parent does have. given maps
    an override composed to the text on the command line it stands for (a sweep's first value);
    can_add: whether the program reads keys added with +key=value."""
    unknown = re.match(r"Could not override '(.+)'", str(error))
    if not unknown:
        reason = [line.strip() for line in str(error).splitlines() if line.strip()]
        if error.__cause__ is not None:  # e.g. "list index out of range"
            reason.append(f"({str(error.__cause__).splitlines()[0]})")
        return " ".join(reason)
    key = unknown.group(1)
    override = next(o for o in overrides if o.split("=", 1)[0] == key)
    return unknown_key(name, key, given.get(override, override), overrides, can_add)


def unknown_key(name: str, key: str, text: str, overrides: list[str], can_add: bool = True) -> str:
    """The nearest enclosing node that exists, and its keys."""
    hint = f"; to add a new key, write +{text}" if can_add else ""
    try:
        cfg = compose_config(name, [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=KeyError) if parent else cfg
        while node is KeyError:  # callbacks.nope.x: callbacks has no key nope
            parent, _, leaf = parent.rpartition(".")
            node = OmegaConf.select(cfg, parent, default=KeyError) if parent else cfg
    except Exception:
        return f"{text}: the config has no key {key!r}{hint}"
    if not isinstance(node, DictConfig):
        return f"{text}: {parent} is {node!r}, which has no keys"
    keys = ", ".join(str(k) for k in node if k not in HYDRA) or "no keys"
    return f"{text}: {parent or 'the config'} has no key {leaf!r} (it has: {keys}){hint}"


def check_generate_command(args: list[str]) -> None:
    """generate's command line: overrides Hydra can read, keys conf/generate.yaml has, no sweep
    (prompt=Hello, world is a list of two values to Hydra). Flags are left to Hydra."""
    if "-m" in args or "--multirun" in args:
        raise ValueError("generate runs once: -m/--multirun is for train's sweeps")
    if any(a.startswith("-") for a in args):
        return
    for text in args:
        override = parse(text)
        if override.is_delete() or override.is_add():  # +key is silently unused, ~key a crash
            keys = ", ".join(k for k in OmegaConf.load(CONF / "generate.yaml") if k not in HYDRA)
            raise ValueError(
                f"{text!r}: generate takes only its own keys ({keys}), each with a value: "
                f"set one instead, e.g. top_k=null"
            )
        if override.is_sweep_override():
            raise ValueError(
                f"{text!r} is a list of values to Hydra (a sweep), and generate takes one: quote "
                f"the value, e.g. '{override.key_or_group}=\"a, b\"'"
            )
    try:
        compose_config("generate", args)
    except HydraException as error:
        raise ValueError(composition_error("generate", error, args, {}, can_add=False)) from None
    except Exception:
        return  # Hydra's own report will say what is wrong
