"""Config files: YAML loading (a key given twice is an error) and the configs shipped as
package data (``distillery.configs``).

YAML is read with ``yaml.safe_load`` semantics, but a key given twice in one mapping is an
error (PyYAML silently keeps the last one, which would, e.g., drop a prompt from an ontology
without a word). The parsed data is then validated by a pydantic model; see
:mod:`distillery.engine.schema`.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A YAML config file is missing, invalid, or repeats a key."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, what: str = "config"):
    """Parse a YAML file; raises :class:`ConfigError` naming the file on every failure."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{what} file {str(p)!r} not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} file {str(p)!r} cannot be read ({e})") from e
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({e})") from e


#: Kinds of shipped config: (sub-folder of ``distillery.configs``, what it is, the CLI option that takes it).
CONFIG_KINDS: dict[str, tuple[str, str, str]] = {
    "teachers": ("teachers", "teachers preset", "--teachers"),
    "ontology": ("ontologies", "ontology", "--ontology"),
    "rules": ("curation", "curation rules", "--rules"),
    "device-profile": ("devices", "device profile", "--device-profile"),
}


def shipped_configs(kind: str | None = None) -> dict[str, dict[str, Path]]:
    """The YAML configs shipped as package data (``distillery.configs``, read with
    :mod:`importlib.resources`), as ``{kind: {name: path}}``; ``name`` is the file stem.

    Raises:
        KeyError: ``kind`` is not one of :data:`CONFIG_KINDS`.
    """
    from importlib.resources import files

    root = files("distillery.configs")
    kinds = [kind] if kind is not None else list(CONFIG_KINDS)
    out = {}
    for k in kinds:
        folder = root / CONFIG_KINDS[k][0]
        out[k] = {Path(f.name).stem: Path(str(f)) for f in sorted(folder.iterdir(), key=lambda f: f.name)
                  if f.name.endswith(".yaml")} if folder.is_dir() else {}
    return out


def resolve_config(kind: str, value: str | os.PathLike) -> Path:
    """A config given on the command line: an existing file path, or the name of a shipped
    config of ``kind`` (``default``, ``coco80``, ``jetson-orin-nx``; see ``distillery configs list``).

    A path that exists wins over a shipped name; a value that is neither raises.

    Raises:
        ConfigError: ``value`` is not a file and not a shipped name; the message lists the
            shipped names.
    """
    p = Path(value).expanduser()
    if p.is_file():
        return p
    sub, what, option = CONFIG_KINDS[kind]
    shipped = shipped_configs(kind)[kind]
    if str(value) in shipped:
        return shipped[str(value)]
    if p.is_dir():
        raise ConfigError(f"{option} {str(value)!r} is a folder, not a {what} YAML file; give a .yaml file or a "
                          f"shipped name ({', '.join(shipped) or 'none'})")
    raise ConfigError(f"{option} {str(value)!r} is neither a file nor a shipped {what} (shipped: "
                      f"{', '.join(shipped) or 'none'}); `distillery configs list` shows them")
