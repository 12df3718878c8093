"""The settings an output folder is pinned to: those that decide keys and output bytes.

``run.json`` keeps them as named pairs (``"transform.quality": 85``); a rerun with another value
of any of them is refused, naming each key that differs and both its values. Folders made before
the pairs were named held lists (``"output": ["jpeg", 85, ...]``): they are read back into pairs,
so those folders resume as they did.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .config import OPS, Config

#: The transform settings of an output's bytes, in the order older run.json files listed them.
_TRANSFORM_KEYS = ("format", "quality", "background", "resample", "reducing_gap", "max_pixels")
# and those that decide which rows are final (filtered, not_image) or whether bytes are kept
_FINAL_KEYS = ("input_formats", "min_width", "min_height", "max_aspect_ratio", "reencode")
_SHOWN = 3  # differing keys named in one message
OLDER = (
    "made by an older version of pipeline, whose settings cannot be compared; rerun with "
    "--restart to start over, or choose another --out"
)


def pinned(config: Config) -> dict[str, Any]:
    """The settings that decide keys and output bytes, by dotted key, as run.json holds them."""
    transform = config.transform
    settings: dict[str, Any] = {  # where and how inputs are reached decides no key
        f"input.{k}": v
        for k, v in dataclasses.asdict(config.input).items()
        if k != "storage_options"
    }
    output = config.output
    settings["output.folder_size"] = output.folder_size
    settings["output.format"] = output.format
    if output.format != "files":  # tars: their size decides which samples share one
        settings["output.shard_size"] = output.shard_size
        settings["version.tar_names"] = "numbered"  # 00000.tar.. across the folder
    settings["output.caption_column"] = output.caption_column
    settings["output.sample_columns"] = list(output.sample_columns)
    for key in (*_TRANSFORM_KEYS, *_FINAL_KEYS):
        settings[f"transform.{key}"] = getattr(transform, key)
    settings["transform.ops"] = [
        {"op": _op_names()[type(op).__name__], **dataclasses.asdict(op)} for op in transform.ops
    ]
    normal: dict[str, Any] = json.loads(json.dumps(settings))  # as read back: tuples are lists
    return normal


def differences(then: Any, now: dict[str, Any]) -> str | None:
    """None if the settings earlier runs recorded (``then``) are ``now``'s; else what differs,
    in words: ``transform.quality was 85, now 95``."""
    old = _named(then)
    if old is None:
        return OLDER
    # a setting added since the folder was made had its default then: what it did before
    old = {**pinned(Config()), **old}
    keys = list(now) + [key for key in old if key not in now]
    differ = [key for key in keys if old.get(key) != now.get(key)]
    versions = [key for key in differ if key.startswith("version.")]  # how files were laid out
    if any(old.get(key) is not None for key in versions):
        return OLDER
    differ = [key for key in differ if key not in versions]  # (with output.format, say)
    if not differ:
        return None
    shown = [f"{key} was {_show(old.get(key))}, now {_show(now.get(key))}" for key in differ]
    more = len(shown) - _SHOWN
    return "; ".join(shown[:_SHOWN]) + (f"; and {more} more" if more > 0 else "")


def _named(then: Any) -> dict[str, Any] | None:
    """Recorded settings as named pairs (older lists translated), or None if not understood."""
    if not isinstance(then, dict):
        return None
    try:
        named = then if "transform.ops" in then else _from_lists(then)
        return {**named, "transform.ops": [_op_defaults(op) for op in named["transform.ops"]]}
    except (KeyError, TypeError, ValueError):
        return None


def _op_defaults(op: dict[str, Any]) -> dict[str, Any]:
    """An op as recorded, with the defaults of parameters it gained since."""
    params = {
        f.name: f.default
        for f in dataclasses.fields(OPS[op["op"]])
        if f.default is not dataclasses.MISSING and f.name not in op
    }
    return {**op, **json.loads(json.dumps(params))}


def _from_lists(then: dict[str, Any]) -> dict[str, Any]:
    """The older form: ``input`` a dict, ``output`` and ``ops`` lists, ``layout`` for tars (with
    "numbered" since tars are numbered across the folder), ``samples`` unless the defaults."""
    named = {f"input.{key}": value for key, value in then["input"].items()}
    named["output.folder_size"] = then["folder_size"]
    layout = then.get("layout", ["files"])
    named["output.format"] = layout[0]
    if layout[0] != "files":
        named["output.shard_size"] = layout[1]
        named["version.tar_names"] = layout[2] if len(layout) > 2 else "by shard"
    caption, columns = then.get("samples", ["", ["*"]])
    named["output.caption_column"], named["output.sample_columns"] = caption, columns
    output = then["output"]
    if len(output) != len(_TRANSFORM_KEYS):
        raise ValueError("an unknown list of transform settings")
    named.update((f"transform.{k}", v) for k, v in zip(_TRANSFORM_KEYS, output, strict=True))
    ops = []
    for cls_name, *values in then["ops"]:
        name = _op_names()[cls_name]
        fields = [f.name for f in dataclasses.fields(OPS[name])]
        if len(values) > len(fields):
            raise ValueError(f"an unknown form of {name}")
        ops.append({"op": name, **dict(zip(fields, values, strict=False))})  # later: defaults
    named["transform.ops"] = ops
    return named


def _op_names() -> dict[str, str]:
    """Each op's name in config.toml, by its class's name (ops may be registered at any time)."""
    return {cls.__name__: name for name, cls in OPS.items()}


def _show(value: Any) -> str:
    """A setting as the user wrote it: ops as ``thumbnail(width=256, height=256)``."""
    if value is None:
        return "(not set)"
    if isinstance(value, list) and all(isinstance(op, dict) and "op" in op for op in value):
        return "[" + ", ".join(_show_op(op) for op in value) + "]"
    return json.dumps(value)


def _show_op(op: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in op.items() if k != "op")
    return f"{op['op']}({params})" if params else str(op["op"])
