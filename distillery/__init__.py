"""Distillery: an offline pseudo-label data engine and a YOLOv8-seg student trainer.

The repository keeps its stage folders at the top level (``engine/``, ``labeling/``,
``student/``, ``export/``, ``configs/``); they install and import under this one
namespace: ``distillery.engine``, ``distillery.labeling``, ``distillery.student``,
``distillery.export`` and ``distillery.configs`` (package data). See ``pyproject.toml``'s
``package-dir`` mapping.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distillery")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"
