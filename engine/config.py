"""YAML loading for configs: ``yaml.safe_load`` semantics, but a key given twice in one
mapping is an error (PyYAML silently keeps the last one, which would, e.g., drop a
prompt from an ontology without a word)."""

from __future__ import annotations

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
