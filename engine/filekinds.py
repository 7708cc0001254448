"""What kind of file a path is, checked before any work: every command (and the library
functions that take files) refuses a file of the wrong kind with one line, "X is <what it
is>, not <what was wanted>; give <what to pass>", instead of failing deep inside a library.

Each check is cheap and reads no more than it needs:

* ultralytics checkpoint: a PyTorch zip (``torch.save``) whose pickle is a dict with a
  ``model`` entry of an ``ultralytics.nn.tasks`` class; the pickle is read by an unpickler
  whose ``find_class`` returns inert stand-ins (the "restricting globals" recipe of the
  :mod:`pickle` documentation), so no code in the file runs and no tensor is loaded;
* ONNX model: ``onnx.load(..., load_external_data=False)`` of a file whose first byte is
  the ``ir_version`` field tag (``0x08``), with at least one graph node;
* COCO instances JSON: a text file whose first character is ``{`` (the loaders,
  :func:`distillery.engine.evaluation.load_gt` and ``labeling.coco.load_coco``, check the keys);
* label store: a folder holding ``labelsets/``; image folder: a folder with at least one
  image (:func:`distillery.engine.images.list_source`); YAML config: a text file whose top
  level is a mapping.

Every check raises :class:`FileKindError` (a ``ValueError``) naming the path.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

#: Bytes read to tell text from binary.
_SNIFF = 8192
#: ultralytics' model classes by task (``ultralytics.nn.tasks``); other names fall back to
#: "Seg" in the name meaning segmentation.
_TASK_OF_CLASS = {"SegmentationModel": "segment", "DetectionModel": "detect", "ClassificationModel": "classify",
                  "PoseModel": "pose", "OBBModel": "obb", "WorldModel": "detect", "RTDETRDetectionModel": "detect"}

CHECKPOINT_HINT = "give a student checkpoint (.pt), e.g. runs/NAME/weights/best.pt"
ONNX_HINT = "give the .onnx written by `distillery export onnx`"
COCO_HINT = "give a COCO instances .json (with images, annotations, categories)"
STORE_HINT = "give the folder passed as --store to `distillery label` or `distillery labels import`"
IMAGES_HINT = "give a folder of images (.jpg .jpeg .png .bmp .webp .tif .gif, searched recursively)"


class FileKindError(ValueError):
    """A path is missing or is another kind of file than the one wanted; the message names it."""


def _a(noun: str) -> str:
    """``noun`` with its indefinite article."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _prefix(path, name: str) -> str:
    return f"{name} {path}" if name else str(path)


def _head(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(_SNIFF)


def _is_text(head: bytes) -> bool:
    """No NUL and no C0 control byte other than tab, newline, form feed, carriage return, escape."""
    return not any(b < 32 and b not in (9, 10, 12, 13, 27) for b in head)


# -- ultralytics checkpoints (torch.save zips) ---------------------------------------------

class _Stub:
    """An inert stand-in for any class named in a pickle: it records its arguments and state."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, f):
        super().__init__(f)
        self._classes: dict = {}

    def find_class(self, module, name):
        key = (module, name)
        if key not in self._classes:
            self._classes[key] = type(name, (_Stub,), {"__module__": module})
        return self._classes[key]

    def persistent_load(self, pid):  # torch storages: not loaded
        return None


def read_checkpoint_header(path: str | os.PathLike):
    """The top-level object of a ``torch.save`` zip, read without running code from the file:
    plain values (dicts, numbers, strings) as they are, every object as an inert stand-in whose
    type has the original ``__module__`` and ``__name__``; tensors are ``None``.

    Raises:
        FileKindError: not a ``torch.save`` zip, or its pickle is damaged.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise FileKindError(f"{p} is a zip archive without data.pkl, not a PyTorch checkpoint")
            with z.open(names[0]) as f:
                return _InertUnpickler(f).load()
    except zipfile.BadZipFile as e:
        raise FileKindError(f"{p} is not a PyTorch checkpoint (not a torch.save zip)") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise FileKindError(f"{p} is a damaged PyTorch checkpoint ({e})") from e


def _checkpoint_task(obj) -> str | None:
    """ultralytics task of a checkpoint header (segment, detect, ...), None if not ultralytics."""
    if not isinstance(obj, dict):
        return None
    model = obj.get("ema") or obj.get("model")
    cls = type(model)
    if not cls.__module__.startswith("ultralytics."):
        return None
    return _TASK_OF_CLASS.get(cls.__name__, "segment" if "Seg" in cls.__name__ else "other")


def describe(path: str | os.PathLike) -> str:
    """What ``path`` is, in words, for error messages: ``missing``, ``a folder``, ``an ONNX
    model``, ``an ultralytics segment checkpoint``, ``a PyTorch file without an ultralytics
    model``, ``an image`` (by suffix, or Pillow identifies it), ``a damaged or cut-off ONNX file``,
    ``a JSON file``, ``a text file``, ``a binary file``..."""
    p = Path(path).expanduser()
    if not p.exists():
        return "missing"
    if p.is_dir():
        return "a folder"
    try:
        head = _head(p)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        try:
            task = _checkpoint_task(read_checkpoint_header(p))
        except FileKindError:
            return "a zip archive"
        return f"an ultralytics {task} checkpoint" if task else "a PyTorch file without an ultralytics model"
    if _looks_onnx(p, head):
        return "an ONNX model"
    from distillery.engine.images import IMAGE_SUFFIXES

    if p.suffix.lower() in IMAGE_SUFFIXES or _pillow_identifies(p):
        return "an image"
    if head[:1] == b"\x08" and p.suffix.lower() == ".onnx":  # ModelProto's ir_version field, then no model
        return "a damaged or cut-off ONNX file"
    if _is_text(head):
        s = head.lstrip()
        if s[:1] in (b"{", b"["):
            return "a JSON file"
        return "a YAML file" if p.suffix.lower() in (".yaml", ".yml") else "a text file"
    return "a binary file"


def _pillow_identifies(p: Path) -> bool:
    """Pillow recognises ``p`` as an image (``Image.open`` reads the header only)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p):
            return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _looks_onnx(p: Path, head: bytes) -> bool:
    return head[:1] == b"\x08" and _load_onnx(p) is not None


def _load_onnx(p: Path):
    import onnx
    from google.protobuf.message import DecodeError

    try:
        m = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError):
        return None
    return m if m.ir_version > 0 and len(m.graph.node) else None


def _existing_file(path, name: str, wanted: str, hint: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileKindError(f"{_prefix(path, name)} does not exist; {hint}")
    if not p.is_file():
        raise FileKindError(f"{_prefix(path, name)} is {describe(p)}, not {wanted}; {hint}")
    return p


def ultralytics_checkpoint(path: str | os.PathLike, name: str = "", task: str = "segment") -> Path:
    """``path`` if it is an ultralytics checkpoint of ``task`` (the student is ``segment``).

    Raises:
        FileKindError: missing, another kind of file, or a checkpoint of another task.
    """
    wanted = f"an ultralytics {task} checkpoint (.pt)"
    p = _existing_file(path, name, wanted, CHECKPOINT_HINT)
    what = describe(p)
    if what != f"an ultralytics {task} checkpoint":
        raise FileKindError(f"{_prefix(path, name)} is {what}, not {wanted}; {CHECKPOINT_HINT}")
    return p


def checkpoint_progress(path: str | os.PathLike) -> tuple[int, int | None]:
    """``(epoch, epochs)`` of an ultralytics checkpoint: the last finished epoch (0-based;
    -1 once training finished, when ultralytics' ``strip_optimizer`` sets it) and the run's
    ``train_args["epochs"]`` (None if absent).

    Raises:
        FileKindError: not an ultralytics checkpoint.
    """
    obj = read_checkpoint_header(path)
    if _checkpoint_task(obj) is None:
        raise FileKindError(f"{path} is {describe(path)}, not an ultralytics checkpoint")
    epochs = (obj.get("train_args") or {}).get("epochs")
    return int(obj.get("epoch", -1)), (int(epochs) if isinstance(epochs, int) else None)


def onnx_model(path: str | os.PathLike, name: str = "", student: bool = True, hint: str = ONNX_HINT) -> dict:
    """The metadata (``{key: value}`` strings) of the ONNX model at ``path``.

    Args:
        student: also require ultralytics' metadata of a segmentation export (``task`` is
            ``segment``, ``names`` present), which its predictor needs.

    Raises:
        FileKindError: missing, not an ONNX model, or (``student``) not a segmentation export.
    """
    wanted = "an ONNX model"
    p = _existing_file(path, name, wanted, hint)
    m = _load_onnx(p) if _head(p)[:1] == b"\x08" else None
    if m is None:
        raise FileKindError(f"{_prefix(path, name)} is {describe(p)}, not {wanted}; {hint}")
    meta = {q.key: q.value for q in m.metadata_props}
    if student and (meta.get("task") != "segment" or "names" not in meta):
        got = f"task {meta['task']}" if "task" in meta else "no ultralytics metadata"
        raise FileKindError(f"{_prefix(path, name)} is an ONNX model but not a segmentation student ({got}); {hint}")
    return meta


def coco_json(path: str | os.PathLike, name: str = "") -> Path:
    """``path`` if it is a text file holding a JSON object (the COCO loaders check its keys).

    Raises:
        FileKindError: missing, a folder, or not a JSON object.
    """
    wanted = "a COCO instances file"
    p = _existing_file(path, name, wanted, COCO_HINT)
    head = _head(p)
    if not (_is_text(head) and head.lstrip()[:1] == b"{"):
        raise FileKindError(f"{_prefix(path, name)} is {describe(p)}, not {wanted}; {COCO_HINT}")
    return p


def label_store(path: str | os.PathLike, name: str = "", must_exist: bool = True) -> Path:
    """``path`` if it is a label store (a folder holding ``labelsets/``).

    Args:
        must_exist: False for commands that create a store: a missing path or an empty
            folder is accepted too; a folder with other content is not (it would gain a
            ``labelsets/`` among unrelated files).

    Raises:
        FileKindError: naming the path and what it is.
    """
    p = Path(path).expanduser()
    if not p.exists():
        if must_exist:
            raise FileKindError(f"{_prefix(path, name or 'label store')} does not exist; {STORE_HINT}")
        return p
    if not p.is_dir():
        raise FileKindError(f"{_prefix(path, name)} is {describe(p)}, not a label store folder; {STORE_HINT}"
                            + ("" if must_exist else ", or a new folder"))
    if (p / "labelsets").is_dir():
        return p
    if must_exist:
        raise FileKindError(f"{_prefix(path, name)} is a folder but not a label store (no labelsets/ in it); "
                            f"{STORE_HINT}")
    if any(p.iterdir()):
        raise FileKindError(f"{_prefix(path, name)} is a folder of other files, not a label store (no labelsets/ "
                            "in it); give a new or empty folder, or an existing store")
    return p


def image_folder(path: str | os.PathLike, name: str = "") -> Path:
    """``path`` if it is a folder with at least one image file (searched recursively).

    Raises:
        FileKindError: missing, not a folder, or a folder without images.
    """
    from distillery.engine.images import list_source

    p = Path(path).expanduser()
    if not p.exists():
        raise FileKindError(f"{_prefix(path, name or 'image folder')} does not exist; {IMAGES_HINT}")
    if not p.is_dir():
        raise FileKindError(f"{_prefix(path, name)} is {describe(p)}, not a folder of images; {IMAGES_HINT}")
    if not list_source(p):
        raise FileKindError(f"{_prefix(path, name)} is a folder without images; {IMAGES_HINT}")
    return p


def yaml_mapping(path: str | os.PathLike, name: str = "", what: str = "YAML config") -> Path:
    """``path`` if it is a text file whose YAML top level is a mapping (what every config is);
    the config's own loader checks its keys.

    Raises:
        FileKindError: missing, a folder, a binary file, invalid YAML, or not a mapping.
    """
    from distillery.engine.config import ConfigError, load_yaml

    hint = f"give {_a(what)} YAML file (`distillery configs list` shows the shipped ones)"
    p = _existing_file(path, name, f"{_a(what)} YAML file", hint)
    if not _is_text(_head(p)):
        raise FileKindError(f"{_prefix(path, name)} is {describe(p)}, not {_a(what)} YAML file; {hint}")
    try:
        data = load_yaml(p, what)
    except ConfigError as e:
        raise FileKindError(f"{name + ' ' if name else ''}{e}") from e
    if not isinstance(data, dict):
        top = "empty" if data is None else ("a list" if isinstance(data, list) else f"a single value ({data!r:.40})")
        raise FileKindError(f"{_prefix(path, name)} is {describe(p)} whose YAML is {top}, not {_a(what)} (a "
                            f"mapping of keys); {hint}")
    return p


def image_source(path: str | os.PathLike, name: str = "") -> Path:
    """``path`` if it can be an image source (:func:`distillery.engine.images.list_source`): a
    folder, a text file (a list of image paths), a JSON file (COCO) or an image.

    Raises:
        FileKindError: missing, or another kind of file (a checkpoint, an ONNX model, binary).
    """
    hint = "give a folder of images, a .txt list of image paths or a COCO .json"
    p = Path(path).expanduser()
    if not p.exists():
        raise FileKindError(f"{_prefix(path, name)} does not exist; {hint}")
    what = describe(p)
    if what not in ("a folder", "a text file", "a YAML file", "a JSON file", "an image"):
        raise FileKindError(f"{_prefix(path, name)} is {what}, not an image source; {hint}")
    return p


def model_config(value: str, name: str = "", task: str = "segment") -> str:
    """A model to train from: an ultralytics model YAML (a local file, or a name ultralytics
    ships, e.g. ``yolov8n-seg.yaml``) or an ultralytics checkpoint, both of ``task``.
    Returns ``value``.

    Raises:
        FileKindError: neither, of another task, or a remote address (nothing is downloaded).
    """
    hint = f"give an ultralytics model YAML (e.g. yolov8n-seg.yaml) or a {task} checkpoint (.pt)"
    s = str(value)
    if "://" in s:
        raise FileKindError(f"{_prefix(value, name)} is a remote address; nothing is downloaded: {hint}")
    p = Path(s).expanduser()
    if p.suffix.lower() in (".yaml", ".yml"):
        from ultralytics.nn.tasks import guess_model_task, yaml_model_load

        if p.exists() and not p.is_file():
            raise FileKindError(f"{_prefix(value, name)} is {describe(p)}, not a model YAML; {hint}")
        try:
            d = yaml_model_load(p)  # a local file, else a name from ultralytics' cfg/models
        except FileNotFoundError as e:
            raise FileKindError(f"{_prefix(value, name)} is neither a file nor a model YAML ultralytics ships; "
                                f"{hint}") from e
        except Exception as e:  # noqa: BLE001 - YAML and key errors of ultralytics' own loader
            raise FileKindError(f"{_prefix(value, name)} is not an ultralytics model YAML ({e}); {hint}") from e
        if not isinstance(d, dict) or "backbone" not in d or "head" not in d:
            raise FileKindError(f"{_prefix(value, name)} is a YAML file without backbone and head, not an "
                                f"ultralytics model YAML; {hint}")
        got = guess_model_task(d)
        if got != task:
            raise FileKindError(f"{_prefix(value, name)} is an ultralytics {got} model YAML, not a {task} one; {hint}")
        return s
    if not p.exists():
        raise FileKindError(f"{_prefix(value, name)} does not exist; {hint}")
    what = describe(p)
    if what != f"an ultralytics {task} checkpoint":
        raise FileKindError(f"{_prefix(value, name)} is {what}, not an ultralytics model YAML or {task} "
                            f"checkpoint; {hint}")
    return s


#: ultralytics recognises an OpenVINO model folder by this name ending (``AutoBackend``)
OPENVINO_SUFFIX = "_openvino_model"
OPENVINO_FOLDER_HINT = "give the folder written by `distillery export openvino` (NAME_openvino_model/)"


def file_in_the_way(path: str | os.PathLike, name: str, example: str) -> None:
    """Refuse a path to be written whose parent folders include an existing file (``mkdir``
    would fail with a bare ``[Errno 17] File exists`` or ``[Errno 20] Not a directory``).

    Raises:
        FileKindError: naming ``name``, the file in the way and what it is.
    """
    p = Path(path).expanduser()
    blocked = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocked is not None:
        raise FileKindError(f"{name} {path}: {blocked} is {describe(blocked)}, not a folder, so nothing can be "
                            f"written under it; give another path (e.g. {example})")


def one_line(e: BaseException) -> str:
    """``str(e)`` on one line (a YAML or XML parser's message spans several)."""
    return " ".join(str(e).split())


def openvino_folder(path: str | os.PathLike, name: str = "") -> Path:
    """The ``*.xml`` of the OpenVINO segmentation student in folder ``path``, checked without
    importing OpenVINO: the name ends in ``_openvino_model``, one ``*.xml`` with its ``.bin``,
    the ``.xml`` well-formed XML whose root is ``<net>`` (the IR format), a ``metadata.yaml``
    mapping with ``task: segment`` and ``names``.

    Raises:
        FileKindError: naming the folder, what it is, and the fix.
    """
    p = Path(path).expanduser()
    what = f"{name} {path}" if name else str(path)
    if not p.exists():
        raise FileKindError(f"{what} does not exist; {OPENVINO_FOLDER_HINT}")
    if not p.is_dir():
        raise FileKindError(f"{what} is {describe(p)}, not an OpenVINO model folder; {OPENVINO_FOLDER_HINT}")
    if not p.name.endswith(OPENVINO_SUFFIX) or p.name == OPENVINO_SUFFIX:
        raise FileKindError(f"{what} is a folder whose name does not end in {OPENVINO_SUFFIX}, which is how ultralytics "
                            f"recognises an OpenVINO model; rename it (e.g. student{OPENVINO_SUFFIX}) or {OPENVINO_FOLDER_HINT}")
    xmls = sorted(p.glob("*.xml"))
    if len(xmls) != 1:
        raise FileKindError(f"{what} holds {len(xmls)} .xml files, not one OpenVINO model; {OPENVINO_FOLDER_HINT}")
    if not xmls[0].with_suffix(".bin").is_file():
        raise FileKindError(f"{what}: {xmls[0].name} has no {xmls[0].with_suffix('.bin').name} beside it; "
                            f"{OPENVINO_FOLDER_HINT}")
    import xml.etree.ElementTree as ET

    import yaml

    try:  # parsed here: OpenVINO's own error on a damaged IR is a traceback from inside ultralytics
        root_tag = None
        for _, el in ET.iterparse(xmls[0], events=("start",)):  # the whole file: a cut-off one fails at its end
            root_tag = root_tag or el.tag
    except (OSError, ET.ParseError) as e:
        raise FileKindError(f"{what}: {xmls[0].name} cannot be read as XML ({one_line(e)}); the IR is damaged: "
                            f"export it again. {OPENVINO_FOLDER_HINT}") from e
    if root_tag != "net":
        raise FileKindError(f"{what}: {xmls[0].name} is XML but not an OpenVINO IR (root <{root_tag}>, not <net>); "
                            f"{OPENVINO_FOLDER_HINT}")
    meta_path = p / "metadata.yaml"
    try:
        meta = yaml.safe_load(meta_path.read_text()) if meta_path.is_file() else None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise FileKindError(f"{what}: metadata.yaml cannot be read ({one_line(e)}); {OPENVINO_FOLDER_HINT}") from e
    if not isinstance(meta, dict) or meta.get("task") != "segment" or "names" not in meta:
        got = "no metadata.yaml" if meta is None else f"task {meta.get('task')}" if isinstance(meta, dict) else \
            "a metadata.yaml that is not a mapping"
        raise FileKindError(f"{what} is an OpenVINO model folder but not a segmentation student ({got}); "
                            f"{OPENVINO_FOLDER_HINT}")
    return xmls[0]
