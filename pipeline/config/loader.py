"""Load an experiment: ``defaults:`` chain of YAML files, the file itself, then CLI overrides.

Each layer is merged into the typed schema separately, so an error names the layer (file or the
command line) that introduced the bad key or value. The result records where every key was last
set, so later semantic checks can name the file too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config.errors import ConfigError
from pipeline.config.schema import ExperimentConfig
from pipeline.config.validate import check_semantics

CLI = "command line"


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, DictConfig]]:
    """The layers of one file: its defaults (recursively, in order) and then the file's own keys."""
    if path in chain:
        raise ConfigError(f"{path}: circular defaults: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        where = f" (listed in the defaults of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    defaults = node.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, (list, ListConfig)):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML paths relative to the file")
    layers: list[tuple[str, DictConfig]] = []
    for entry in defaults:
        layers += _read_yaml((path.parent / str(entry)).resolve(), (*chain, path))
    layers.append((str(path), node))
    return layers


def _leaf_keys(node: object, prefix: str = "") -> Iterable[str]:
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _leaf_keys(node._get_node(key), f"{prefix}{key}.")
        if prefix:
            yield prefix[:-1]
    else:
        yield prefix[:-1]


def _scalar_for_section(schema: DictConfig, layer: DictConfig, prefix: str = "") -> str | None:
    """The dotted key where ``layer`` gives a plain value for what the schema has as a section."""
    for key in layer.keys():
        if key not in schema:
            continue
        expected, given = schema._get_node(key), layer._get_node(key)
        if isinstance(expected, DictConfig) and expected._is_none() is False and not isinstance(given, DictConfig):
            return f"{prefix}{key}"
        if isinstance(expected, DictConfig) and isinstance(given, DictConfig):
            found = _scalar_for_section(expected, given, f"{prefix}{key}.")
            if found:
                return found
    return None


# OmegaConf's message for a value outside a Literal field, said as the other choice checks say it
_LITERAL = re.compile(r"Invalid value (?P<value>.*), expected one of \[(?P<allowed>.*)\]$")


def _explain(e: OmegaConfBaseException) -> str:
    text = getattr(e, "msg", None) or str(e)
    msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    literal = _LITERAL.match(msg)
    if literal:
        allowed = ", ".join(a.strip().strip("'") for a in literal["allowed"].split(","))
        msg = f"{literal['value']} is not one of {allowed}"
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    if type(e).__name__ == "ConfigKeyError" and key:
        return f"unknown key '{key}' ({msg})"
    return f"key '{key}': {msg}" if key else msg


def load_config(path: str | Path, overrides: Iterable[str] = (), *, check_paths: bool = True) -> DictConfig:
    """Load, merge, resolve and validate ``path`` with ``key=value`` overrides.

    Raises :class:`ConfigError` with a one-line reason naming the file (or the command line) and key.
    """
    path = Path(path).resolve()
    layers = _read_yaml(path, ())
    overrides = list(overrides)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{CLI}: override {item!r} is not of the form key=value")
    try:
        layers.append((CLI, OmegaConf.from_dotlist(overrides)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{CLI}: {_explain(e)}") from None

    cfg = OmegaConf.structured(ExperimentConfig)
    provenance: dict[str, str] = {}
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            key = _scalar_for_section(cfg, layer)
            reason = f"key '{key}': expected a mapping of settings, got a single value" if key else _explain(e)
            raise ConfigError(f"{source}: {reason}") from None
        for key in _leaf_keys(layer):
            provenance[key] = source
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {_explain(e)}") from None
    check_semantics(cfg, provenance=provenance, default_source=str(path), check_paths=check_paths)
    OmegaConf.set_readonly(cfg, True)
    return cfg
