"""What the Hydra entry points (train, generate) share: expected errors as one line (the
`one_line_errors` decorator), and the command line checked before Hydra starts, with Hydra's own
parser and compose API, so that a mistake in it gets one line (Hydra's messages take several)."""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import CompactHydraException, HydraException, InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from gpt2_lightning.weights import WeightsError

CONF = Path(__file__).parent / "conf"
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
HYDRA = ("defaults", "hydra")  # a config's keys that are Hydra's, not the program's


EXPECTED = (ValueError, OSError, WeightsError, OmegaConfBaseException)


def one_line(error: BaseException) -> str:
    """OmegaConf's messages add `full_key: ...` and `object_type=...` lines: keep the key."""
    key = getattr(error, "full_key", None)
    if isinstance(error, MissingMandatoryValue) and key:
        return f"{key} is required here: set it on the command line, {key}=..."
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{first} (at {key})" if isinstance(error, OmegaConfBaseException) and key else first


def user_error(error: BaseException) -> tuple[str, BaseException] | None:
    """The config node and the mistake behind an error, or None for a bug. instantiate wraps what
    a constructor raised; what lightning.Trainer refuses in its arguments is the user's too."""
    node = ""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        found = re.search(r"full_key: (\S+)", str(error))
        node = found.group(1) if found else node
        error = error.__cause__
        if node == "trainer" and isinstance(error, Exception):
            return node, error
    return (node, error) if isinstance(error, EXPECTED) else None


class JobConfigError(CompactHydraException):
    """A config mistake inside a multirun job; Hydra prints it as its message alone."""


def one_line_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Decorates a Hydra task: an expected mistake ends the process with `error: <one line>` and
    exit 1 instead of Hydra's traceback (HYDRA_FULL_ERROR=1 shows it); in a multirun it fails that
    job only (Optuna marks the trial FAIL and goes on). Ctrl-C outside a step ends with exit 130,
    a reader that closed the pipe (`| head`) quietly."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # Python's recipe: stdout to devnull, or the flush at exit fails
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (*EXPECTED, InstantiationException) as error:
            found = user_error(error)
            if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            node, cause = found
            line = one_line(cause)
            if node and not isinstance(cause, ValueError):  # ours name their keys; others not
                line = f"{node}: {line}"
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise JobConfigError(f"error: {line}") from None
            print(f"error: {line}", file=sys.stderr)
            sys.exit(1)

    return run


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
    group = key.split(".", 1)[0]
    if not parent and "." in key and (CONF / group).is_dir():  # eval.path=x without eval=...
        return f"{text}: no {group} is chosen: add {group}=<one of {_options(CONF / group)}>"
    if not isinstance(node, DictConfig):
        return f"{text}: {parent} is {node!r}, which has no keys"
    keys = ", ".join(str(k) for k in node if k not in HYDRA) or "no keys"
    return f"{text}: {parent or 'the config'} has no key {leaf!r} (it has: {keys}){hint}"


# The commands that run once, with their own keys only, and a key=value to show in a hint.
ONE_RUN = {"generate": "top_k=null", "evaluate": "limit=null"}


def check_generate_command(args: list[str], name: str = "generate") -> None:
    """generate's (or evaluate's) command line: one run (no -m, no sweep: prompt=Hello, world is
    a list of two values to Hydra), its own keys only, each with a value. Flags are Hydra's."""
    if "-m" in args or "--multirun" in args:
        raise ValueError(f"{name} runs once: -m/--multirun is for train's sweeps")
    if any(a.startswith("-") for a in args):
        return
    for text in args:
        override = parse(text)
        if override.is_delete() or override.is_add():  # +key is silently unused, ~key a crash
            keys = ", ".join(k for k in OmegaConf.load(CONF / f"{name}.yaml") if k not in HYDRA)
            raise ValueError(
                f"{text!r}: {name} takes only its own keys ({keys}), each with a value: "
                f"set one instead, e.g. {ONE_RUN[name]}"
            )
        if override.is_sweep_override():
            raise ValueError(
                f"{text!r} is a list of values to Hydra (a sweep), and {name} takes one: quote "
                f"the value, e.g. '{override.key_or_group}=\"a, b\"'"
            )
    _compose_first_values(name, args)


def check_command_line(name: str, args: list[str]) -> None:
    """Exit with one line, before Hydra makes a run folder or starts a sweep, on a command line it
    would refuse in several: an override it cannot read, an option conf/ lacks, a key the config
    lacks, a run folder Hydra cannot make. A sweep is composed with the first value of each swept
    key. Flags (--cfg, --help, --config-dir, ...) are Hydra's; what only a job can judge is the
    job's."""
    try:
        if name in ONE_RUN:
            check_generate_command(args, name)
        elif not any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
            check_config_choices(args)
            cfg = _compose_first_values(name, [a for a in args if not a.startswith("-")])
            if cfg is not None:
                sweep = "-m" in args or "--multirun" in args or cfg.hydra.mode == RunMode.MULTIRUN
                check_output_folder(cfg, "hydra.sweep.dir" if sweep else "hydra.run.dir")
    except ValueError as error:
        sys.exit(f"error: {error}")


def check_output_folder(cfg: DictConfig, key: str) -> None:
    """The run (or sweep) folder at key must be one this user can make: Hydra makes it before the
    program runs, and a regular file in its way, or a folder not writable, is Hydra's traceback."""
    try:
        folder = Path(OmegaConf.select(cfg, key))
    except OmegaConfBaseException:
        return  # ${hydra:...}: only Hydra's run resolves it
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"{key}={folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={folder}: this user cannot write in {existing}")


def _options(group: Path) -> str:
    """The options of a config group folder, in natural order."""
    return ", ".join(sorted((f.stem for f in group.glob("*.yaml")), key=_natural_order))


def check_config_choices(args: list[str]) -> None:
    """An option of a config group that conf/ lacks (model=125M, -m model=tiny,7B), with the valid
    ones; Hydra's own message for it is a dozen lines. Config folders added with
    hydra.searchpath may hold more options: skipped then."""
    texts = [a for a in args if "=" in a]
    if any(a.startswith("hydra.searchpath") for a in texts):
        return
    for override in map(parse, texts):
        group = CONF / override.key_or_group
        if not group.is_dir() or override.is_delete():
            continue
        if override.is_sweep_override():
            if override.value_type != ValueType.SIMPLE_CHOICE_SWEEP:
                continue  # choice(), glob(), range(): left to Hydra
            values = [v for v in override.sweep_string_iterator() if not v.startswith("[")]
        else:
            value = override.value()  # one option, or a list of them (logger=[tensorboard,csv])
            values = value if isinstance(value, list) else [value]
        name = override.key_or_group
        options = _options(group)
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue  # model=${oc.env:SIZE}: Hydra resolves it
            if value is None:
                raise ValueError(f"{name}=null is not an option: valid are {options}, or ~{name}")
            if not (group / f"{str(value).removesuffix('.yaml')}.yaml").is_file():
                raise ValueError(f"{name}={value} is unknown: valid are {options}")


def _natural_order(name: str) -> tuple[int, str]:
    """124M before 355M before 1558M, then names without a number."""
    number = re.match(r"\d+", name)
    return (int(number.group()) if number else 1 << 62, name)


def _compose_first_values(name: str, texts: list[str]) -> DictConfig | None:
    """Compose the overrides, a sweep with its first values (x=a,b as x=a); a swept key that
    compose cannot take (range(), interval()) must exist in the composed config. The config, or
    None where Hydra's own report will say what is wrong."""
    fixed, given, swept = [], {}, {}
    for text in texts:
        override = parse(text)
        if not override.is_sweep_override():
            fixed.append(text)
        elif override.value_type == ValueType.SIMPLE_CHOICE_SWEEP:
            first = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
            fixed.append(first)
            given[first] = text
        else:
            swept[override.key_or_group] = override
    try:
        cfg = compose_config(name, fixed)
    except HydraException as error:  # +key=value adds a key that train may read, not generate
        reason = composition_error(name, error, fixed, given, can_add=name not in ONE_RUN)
        raise ValueError(reason) from None
    except Exception:
        return None
    for key, override in swept.items():
        if override.get_key_element().startswith("+") or key.startswith("hydra") or "/" in key:
            continue
        try:
            missing = OmegaConf.select(cfg, key, default=KeyError) is KeyError
        except OmegaConfBaseException:
            break
        if missing:
            raise ValueError(unknown_key(name, key, override.input_line, fixed))
    return cfg


def torch_device(name: str) -> torch.device:
    """device=auto|cpu|cuda[:index] of the generate and evaluate commands, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", name):
        raise ValueError(f"device={name!r} is not supported: use auto, cpu or cuda[:index]")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} is unavailable: this machine has no CUDA device")
    return torch.device(name)
