"""Click parameter types that check the kind of each file a command is given while the
command line is parsed, before the command does any work (:mod:`distillery.engine.filekinds`).

A wrong file ends the command with one line, ``Error: --OPTION PATH is <what it is>, not
<what was wanted>; give <what to pass>``, and exit status 1. Each type returns the value
as given (a ``str``), or the resolved path for configs.
"""

from __future__ import annotations

from pathlib import Path

import click

from distillery.engine import filekinds
from distillery.engine.cli_errors import UserError


def _name(param) -> str:
    if param is None:
        return ""
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return param.human_readable_name


class _FileKind(click.ParamType):
    """Base: ``check(value, name)`` raises :class:`filekinds.FileKindError`, which becomes one line."""

    def check(self, value: str, name: str):
        raise NotImplementedError

    def convert(self, value, param, ctx):
        if value is None:
            return None
        try:
            out = self.check(str(value), _name(param))
        except filekinds.FileKindError as e:
            raise UserError(str(e)) from e
        return str(value) if out is None else out


class Checkpoint(_FileKind):
    """An ultralytics segmentation checkpoint (the student's ``.pt``)."""

    name = "checkpoint"

    def check(self, value, name):
        filekinds.ultralytics_checkpoint(value, name)


class StudentOnnx(_FileKind):
    """An ONNX model; with ``student``, a segmentation export with ultralytics' metadata.
    ``refuse_target``: a ``distillery_int8_target`` that is the wrong artifact here."""

    name = "onnx"

    def __init__(self, student: bool = True, refuse_target: str | None = None, hint: str = filekinds.ONNX_HINT):
        self.student, self.refuse_target, self.hint = student, refuse_target, hint

    def check(self, value, name):
        meta = filekinds.onnx_model(value, name, student=self.student, hint=self.hint)
        if self.refuse_target and meta.get("distillery_int8_target") == self.refuse_target:
            raise filekinds.FileKindError(f"{name} {value} is the {self.refuse_target} INT8 artifact; {self.hint}")


class StudentModel(_FileKind):
    """A student to run: an ultralytics segmentation checkpoint, a segmentation ONNX export, or
    an OpenVINO model folder written by ``distillery export openvino``."""

    name = "student"

    def check(self, value, name):
        if Path(value).expanduser().is_dir():
            filekinds.openvino_folder(value, name)
        elif filekinds.describe(value) == "an ONNX model":
            filekinds.onnx_model(value, name, student=True)
        else:
            try:
                filekinds.ultralytics_checkpoint(value, name)
            except filekinds.FileKindError as e:
                raise filekinds.FileKindError(f"{e}, or an .onnx written by `distillery export onnx`, or a folder "
                                              "written by `distillery export openvino`") from e


class TrainModel(_FileKind):
    """What to train from: an ultralytics segmentation model YAML or checkpoint."""

    name = "model"

    def check(self, value, name):
        filekinds.model_config(value, name)


class CocoJson(_FileKind):
    name = "coco_json"

    def check(self, value, name):
        filekinds.coco_json(value, name)


class Store(_FileKind):
    """A label store; ``must_exist=False`` where the command creates one."""

    name = "store"

    def __init__(self, must_exist: bool = True):
        self.must_exist = must_exist

    def check(self, value, name):
        if not self.must_exist:
            filekinds.file_in_the_way(value, name, "store/")
        filekinds.label_store(value, name, must_exist=self.must_exist)


class ImageFolder(_FileKind):
    name = "image_folder"

    def check(self, value, name):
        filekinds.image_folder(value, name)


class ImageSource(_FileKind):
    """An image source: a folder, a text list of image paths, a COCO JSON, or an image."""

    name = "source"

    def check(self, value, name):
        filekinds.image_source(value, name)


class Config(_FileKind):
    """A config of ``kind`` (``teachers``, ``ontology``, ``rules``, ``device-profile``): a
    YAML file or a shipped name (:func:`distillery.engine.config.resolve_config`); returns its
    :class:`~pathlib.Path`."""

    name = "config"

    def __init__(self, kind: str):
        self.kind = kind

    def check(self, value, name) -> Path:
        from distillery.engine.config import CONFIG_KINDS, ConfigError, resolve_config

        try:
            path = resolve_config(self.kind, value)
        except ConfigError as e:
            raise filekinds.FileKindError(str(e)) from e
        return filekinds.yaml_mapping(path, name, what=CONFIG_KINDS[self.kind][1])


class Output(_FileKind):
    """Where a command writes: a file (``folder=False``) must not be an existing folder, a
    folder must not be an existing file, and no folder above it an existing file."""

    name = "output"

    def __init__(self, folder: bool, example: str):
        self.folder, self.example = folder, example
        self.name = "dir" if folder else "file"  # the metavar in --help

    def check(self, value, name):
        p = Path(value).expanduser()
        if self.folder and p.exists() and not p.is_dir():
            raise filekinds.FileKindError(f"{name} {value} is {filekinds.describe(p)}, not a folder; give a folder "
                                          f"path (e.g. {self.example})")
        if not self.folder and p.is_dir():
            raise filekinds.FileKindError(f"{name} {value} is a folder; give a file path (e.g. {self.example})")
        filekinds.file_in_the_way(p, name, self.example)


class FloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses NaN (which compares False with every bound, so
    click lets it through: ``--val-fraction nan`` would split nothing, silently) and, with
    ``finite=True``, infinity (``--lr inf`` trained an adapter of NaNs, exit 0).

    Args:
        finite: refuse ``inf`` too (for a value that enters arithmetic, e.g. a learning rate;
            not where ``inf`` means "never", as ``--flush-seconds``).
    """

    def __init__(self, *args, finite: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.finite = finite

    def convert(self, value, param, ctx):
        import math

        rv = super().convert(value, param, ctx)
        if isinstance(rv, float) and math.isnan(rv):
            self.fail(f"{value!r} is not a number; give {self._describe_range()}", param, ctx)
        if self.finite and isinstance(rv, float) and math.isinf(rv):
            self.fail(f"{value!r} is not a finite number; give {self._describe_range()}", param, ctx)
        return rv


class ImageSize(click.IntRange):
    """``--imgsz``: pixels, >= 32 and a multiple of 32, the YOLOv8 stride. ultralytics
    (``check_imgsz``) would round another value up with a warning, and the run's records would
    name a size it did not use."""

    def __init__(self):
        super().__init__(min=32)

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if rv % 32:
            self.fail(f"{rv} is not a multiple of 32 (the model's stride); ultralytics would run at "
                      f"{-(-rv // 32) * 32} instead", param, ctx)
        return rv

