"""Configuration: a frozen dataclass per section of ``config.toml``, loaded with tomllib, validated.

Every value is checked where it is defined (``__post_init__``), so a config built from the file,
from CLI overrides or in a test goes through the same rules. A wrong type, an unknown key or an
out-of-range value is a ConfigError naming the dotted key, e.g.
``config.toml: download.workers must be >= 1 (got 0)``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import multiprocessing
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

RESAMPLE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")
OUTPUT_FORMATS = ("jpeg", "png", "webp")
RESIZE_MODES = ("fit", "fill", "cover", "pad", "stretch")
_MEDIA_TYPE = re.compile(r"[a-z0-9.+-]+/(?:\*|[a-z0-9.+-]+)")
OUTPUT_LAYOUTS = ("files", "webdataset")
# the decoders a downloaded body may be opened with: Pillow would otherwise try all of its ~40
INPUT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# decoders that hand the server's bytes to another program (EPS runs Ghostscript): never allowed
UNSAFE_FORMATS = {"EPS": "runs Ghostscript on the file", "PDF": "is not an image decoder"}
_COLOR = re.compile(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


# an HTTP header value (RFC 9110 field-value, ASCII only): no CR, LF, NUL or other control
# characters, which would end the header early or be refused by the HTTP library for every URL
_HEADER_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def _require(ok: bool, key: str, rule: str, got: object) -> None:
    if not ok:
        raise ConfigError(key, f"must be {rule} (got {got!r})")


def _default_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


# --- transform ops: one dataclass per op name accepted in [[transform.ops]] -----------------------


@dataclass(frozen=True, slots=True)
class ExifTranspose:
    """Rotate/flip the image upright according to its EXIF Orientation tag."""


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """Shrink to fit in width x height, keeping the aspect ratio; never enlarges."""

    width: int
    height: int

    def __post_init__(self) -> None:
        _check_box(self.width, self.height)


@dataclass(frozen=True, slots=True)
class Resize:
    """Scale to width x height: ``fit`` inside the box, ``fill`` it and crop, ``cover`` it (no
    crop: a square box makes the shortest side its size), ``pad`` (fit, then pad to the box with
    the background) or ``stretch``. ``enlarge = false``: never scale an image up."""

    width: int
    height: int
    mode: str = "fit"
    enlarge: bool = True

    def __post_init__(self) -> None:
        _check_box(self.width, self.height)
        _require(self.mode in RESIZE_MODES, "mode", f"one of {', '.join(RESIZE_MODES)}", self.mode)


@dataclass(frozen=True, slots=True)
class CenterCrop:
    """Cut the central width x height region (less where the image is smaller)."""

    width: int
    height: int

    def __post_init__(self) -> None:
        _check_box(self.width, self.height)


@dataclass(frozen=True, slots=True)
class Grayscale:
    """Convert to shades of grey, keeping any alpha channel."""


@dataclass(frozen=True, slots=True)
class Rotate:
    """Rotate counter-clockwise by ``degrees``; the canvas grows to hold the whole image."""

    degrees: float

    def __post_init__(self) -> None:
        _require(-360 <= self.degrees <= 360, "degrees", "in [-360, 360]", self.degrees)


@dataclass(frozen=True, slots=True)
class Sharpen:
    """Unsharp mask: ``radius`` in pixels, ``percent`` strength, ``threshold`` in levels."""

    radius: float = 2.0
    percent: int = 150
    threshold: int = 3

    def __post_init__(self) -> None:
        _require(0 < self.radius <= 100, "radius", "in (0, 100]", self.radius)
        _require(0 <= self.percent <= 1000, "percent", "in [0, 1000]", self.percent)
        _require(0 <= self.threshold <= 255, "threshold", "in [0, 255]", self.threshold)


@dataclass(frozen=True, slots=True)
class Blur:
    """Gaussian blur of ``radius`` pixels."""

    radius: float = 2.0

    def __post_init__(self) -> None:
        _require(0 < self.radius <= 100, "radius", "in (0, 100]", self.radius)


def _check_box(width: int, height: int) -> None:
    _require(1 <= width <= 65535, "width", "in [1, 65535]", width)
    _require(1 <= height <= 65535, "height", "in [1, 65535]", height)


Op = ExifTranspose | Thumbnail | Resize | CenterCrop | Grayscale | Rotate | Sharpen | Blur
#: Every op name [[transform.ops]] accepts, and its dataclass. ``pipeline.ops.register`` adds to
#: it (the tests' slow and crashing ops); messages offer the built-in ones.
OPS: dict[str, type[Any]] = {
    "exif_transpose": ExifTranspose,
    "thumbnail": Thumbnail,
    "resize": Resize,
    "center_crop": CenterCrop,
    "grayscale": Grayscale,
    "rotate": Rotate,
    "sharpen": Sharpen,
    "blur": Blur,
}
BUILTIN_OPS = tuple(OPS)


# --- sections ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InputConfig:
    shard_size: int = 10_000
    url_column: str = "url"  # the column (csv, tsv, parquet) or field (jsonl) holding the URL
    dedupe: bool = False  # a URL seen before in the input gets a "duplicate" row, not a fetch
    hash_column: str = ""  # a column with each image's sha256 (hex): a download must match it
    # fsspec options for inputs given as URLs (s3://...): endpoint, profile, anon...; never shown
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(
            1 <= self.shard_size <= 1_000_000, "shard_size", "in [1, 1000000]", self.shard_size
        )
        _require(bool(self.url_column), "url_column", "a non-empty column name", self.url_column)
        other = f"another column than url_column ({self.url_column!r}), or empty (off)"
        _require(self.hash_column != self.url_column, "hash_column", other, self.hash_column)


@dataclass(frozen=True, slots=True)
class OutputConfig:
    dir: str = "out"
    format: str = "files"
    shard_size: int = 10_000
    parquet: bool = False
    folder_size: int = 1000
    flush_rows: int = 100
    flush_seconds: float = 1.0
    caption_column: str = ""  # the input column written as each sample's .txt; "": none
    sample_columns: tuple[str, ...] = ("*",)  # the input columns in a sample's .json; "*": all
    # an output in a store (dir = "s3://..."): fsspec options (endpoint, profile...); never shown
    storage_options: dict[str, Any] = field(default_factory=dict)
    staging: str = ""  # local folder files wait in before their put; "": a temporary folder
    uploads: int = 16  # puts at once, per lane (and per packer) into a store
    lease: float = 60.0  # seconds a store's lock outlives its owner's last renewal (a kill)

    def __post_init__(self) -> None:
        _require(bool(self.dir), "dir", "a non-empty path", self.dir)
        _require(1 <= self.uploads <= 256, "uploads", "in [1, 256]", self.uploads)
        _require(1 <= self.lease <= 3600, "lease", "in [1, 3600] seconds", self.lease)
        columns = self.sample_columns
        _require(
            columns == ("*",) or all(c and c != "*" for c in columns),
            "sample_columns",
            '["*"] (every column) or a list of column names',
            list(columns),
        )
        layouts = ", ".join(OUTPUT_LAYOUTS)
        _require(self.format in OUTPUT_LAYOUTS, "format", f"one of {layouts}", self.format)
        _require(
            1 <= self.shard_size <= 1_000_000, "shard_size", "in [1, 1000000]", self.shard_size
        )
        _require(
            10 <= self.folder_size <= 10_000, "folder_size", "in [10, 10000]", self.folder_size
        )
        _require(1 <= self.flush_rows <= 100_000, "flush_rows", "in [1, 100000]", self.flush_rows)
        _require(0 < self.flush_seconds <= 60, "flush_seconds", "in (0, 60]", self.flush_seconds)


@dataclass(frozen=True, slots=True)
class DownloadConfig:
    workers: int = 16
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 60.0
    retries: int = 2
    backoff: float = 0.5
    backoff_max: float = 8.0
    backoff_jitter: float = 0.25
    retry_after_max: float = 15.0
    max_redirects: int = 5
    max_bytes: int = 20_000_000
    content_types: tuple[str, ...] = ("image/*",)
    per_host: int = 0
    chunk_size: int = 1_048_576
    user_agent: str = "pipeline/0.1"
    # a name publishers can address in X-Robots-Tag ("mytoken: noai"); sent in the User-Agent
    user_agent_token: str = ""
    # X-Robots-Tag directives that refuse a response unread (opted_out); () = ignore them all
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    host_failures: int = 3  # connect failures in a row after which a host's URLs are not tried
    proxy: str = "env"  # "env": HTTP(S)_PROXY and NO_PROXY; a URL; "" or "none": no proxy
    # link-local (cloud metadata at 169.254.169.254), and "this network": never an image host
    deny_networks: tuple[str, ...] = ("169.254.0.0/16", "fe80::/10", "0.0.0.0/8")
    allow_private: bool = True
    straggler_after: float = 2.0
    max_stragglers: int = 128
    max_buffered_bytes: int = 512_000_000  # per lane: bodies read and not yet transformed

    def __post_init__(self) -> None:
        _require(1 <= self.workers <= 1024, "workers", "in [1, 1024]", self.workers)
        _require(
            0 < self.connect_timeout <= 600, "connect_timeout", "in (0, 600]", self.connect_timeout
        )
        _require(0 < self.read_timeout <= 3600, "read_timeout", "in (0, 3600]", self.read_timeout)
        _require(0 < self.deadline <= 86400, "deadline", "in (0, 86400]", self.deadline)
        _require(0 <= self.retries <= 20, "retries", "in [0, 20]", self.retries)
        after = self.straggler_after
        _require(0 < after <= 3600, "straggler_after", "in (0, 3600]", after)
        _require(
            0 <= self.max_stragglers <= 4096, "max_stragglers", "in [0, 4096]", self.max_stragglers
        )
        _require(0 <= self.backoff <= 60, "backoff", "in [0, 60]", self.backoff)
        _require(0 <= self.backoff_max <= 600, "backoff_max", "in [0, 600]", self.backoff_max)
        _require(
            0 <= self.backoff_jitter <= 60, "backoff_jitter", "in [0, 60]", self.backoff_jitter
        )
        below = f"in [0, download.deadline) = [0, {self.deadline:g})"
        _require(
            0 <= self.retry_after_max < self.deadline,
            "retry_after_max",
            below,
            self.retry_after_max,
        )
        _require(0 <= self.max_redirects <= 50, "max_redirects", "in [0, 50]", self.max_redirects)
        _require(self.max_bytes >= 1024, "max_bytes", ">= 1024", self.max_bytes)
        _require(
            self.max_bytes <= self.max_buffered_bytes <= 1 << 40,
            "max_buffered_bytes",
            f">= download.max_bytes ({self.max_bytes}) and <= 1099511627776",
            self.max_buffered_bytes,
        )
        for pattern in self.content_types:
            ok = bool(_MEDIA_TYPE.fullmatch(pattern))
            _require(ok, "content_types", "media types such as image/* or image/jpeg", pattern)
        _require(
            0 <= self.per_host <= 1024, "per_host", "in [0, 1024] (0 = no limit)", self.per_host
        )
        _require(
            4096 <= self.chunk_size <= 64 << 20,
            "chunk_size",
            "in [4096, 67108864]",
            self.chunk_size,
        )
        _require(bool(self.user_agent), "user_agent", "a non-empty string", self.user_agent)
        for network in self.deny_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                _require(False, "deny_networks", "CIDR networks such as 10.0.0.0/8", network)
        _require(
            bool(_HEADER_VALUE.fullmatch(self.user_agent)),
            "user_agent",
            "printable ASCII, without line breaks or control characters (an HTTP header value)",
            self.user_agent,
        )
        token = self.user_agent_token
        _require(not token or bool(_TOKEN.fullmatch(token)), "user_agent_token", _TOKEN_RULE, token)
        for directive in self.disallowed_header_directives:
            ok = bool(_TOKEN.fullmatch(directive))
            _require(ok, "disallowed_header_directives", "directives such as noai", directive)
        _require(
            0 <= self.host_failures <= 1000, "host_failures", "in [0, 1000]", self.host_failures
        )
        _check_proxy(self.proxy)

    @property
    def full_user_agent(self) -> str:
        """The User-Agent sent: ``pipeline/0.1 (compatible; mytoken)`` when a token is set."""
        token = self.user_agent_token
        return f"{self.user_agent} (compatible; {token})" if token else self.user_agent


# a robots token: what a publisher names in "X-Robots-Tag: mytoken: noai" (RFC 9309 product token)
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TOKEN_RULE = "a name of letters, digits, '-', '_' or '.' (at most 64), such as mybot"
PROXY_OFF = ("", "none")


def _check_proxy(proxy: str) -> None:
    if proxy in ("env", *PROXY_OFF):
        return
    match = re.fullmatch(r"https?://([^/?#\s]+)/?", proxy)
    _require(
        match is not None and bool(_HEADER_VALUE.fullmatch(proxy)),
        "proxy",
        '"env", "" (none) or a proxy URL such as http://10.0.0.1:3128',
        proxy,
    )


@dataclass(frozen=True, slots=True)
class TransformConfig:
    workers: int = 0
    start_method: str = field(default_factory=_default_start_method)
    max_in_flight: int = 0
    format: str = "jpeg"
    quality: int = 85
    background: str = "#ffffff"
    resample: str = "bicubic"
    reducing_gap: float = 2.0
    max_pixels: int = 89_478_485
    input_formats: tuple[str, ...] = INPUT_FORMATS
    crash_retries: int = 1
    max_tasks_per_child: int = 0
    shutdown_grace: float = 2.0
    timeout: float = 30.0  # seconds one image may take in a worker (wall time); 0 = off
    min_width: int = 0  # filters, on the header's size: smaller images get a "filtered" row
    min_height: int = 0
    max_aspect_ratio: float = 0.0  # max(w, h) / min(w, h); 0 = off
    reencode: bool = True  # false: an image no op changes is written as downloaded
    ops: tuple[Op, ...] = (ExifTranspose(), Thumbnail(256, 256))

    def __post_init__(self) -> None:
        _require(0 <= self.workers <= 512, "workers", "in [0, 512] (0 = all cores)", self.workers)
        _check_start_method(self.start_method)
        _require(
            0 <= self.max_in_flight <= 100_000,
            "max_in_flight",
            "in [0, 100000]",
            self.max_in_flight,
        )
        _require(
            self.format in OUTPUT_FORMATS,
            "format",
            f"one of {', '.join(OUTPUT_FORMATS)}",
            self.format,
        )
        _require(1 <= self.quality <= 100, "quality", "in [1, 100]", self.quality)
        _require(
            bool(_COLOR.fullmatch(self.background)),
            "background",
            "#rgb or #rrggbb",
            self.background,
        )
        _require(
            self.resample in RESAMPLE_FILTERS,
            "resample",
            f"one of {', '.join(RESAMPLE_FILTERS)}",
            self.resample,
        )
        ok_gap = self.reducing_gap == 0 or self.reducing_gap >= 1
        _require(ok_gap, "reducing_gap", "0 (off) or >= 1.0", self.reducing_gap)
        _require(self.max_pixels >= 1, "max_pixels", ">= 1", self.max_pixels)
        _check_input_formats(self.input_formats)
        for index, op in enumerate(self.ops):  # outputs are bounded as inputs are
            if isinstance(op, Resize) and op.width * op.height > self.max_pixels:
                raise ConfigError(
                    f"ops[{index}]",
                    f"resizes to {op.width} x {op.height} = {op.width * op.height} pixels, more "
                    f"than max_pixels ({self.max_pixels}): each image would take "
                    f"{op.width * op.height * 4 / 2**20:,.0f} MB of memory",
                )
        _require(0 <= self.crash_retries <= 5, "crash_retries", "in [0, 5]", self.crash_retries)
        limit = self.max_tasks_per_child
        _require(0 <= limit <= 10**9, "max_tasks_per_child", "in [0, 1000000000] (0 = none)", limit)
        grace = self.shutdown_grace
        _require(0 <= grace <= 600, "shutdown_grace", "in [0, 600]", grace)
        _require(0 <= self.timeout <= 86400, "timeout", "in [0, 86400] (0 = off)", self.timeout)
        _require(0 <= self.min_width <= 65535, "min_width", "in [0, 65535]", self.min_width)
        _require(0 <= self.min_height <= 65535, "min_height", "in [0, 65535]", self.min_height)
        ratio = self.max_aspect_ratio
        _require(ratio == 0 or ratio >= 1, "max_aspect_ratio", "0 (off) or >= 1.0", ratio)


def _check_input_formats(formats: tuple[str, ...]) -> None:
    for name in formats:
        if name.upper() in UNSAFE_FORMATS:
            why = UNSAFE_FORMATS[name.upper()]
            raise ConfigError("input_formats", f"must not name {name}: its decoder {why}")
    _require(bool(formats), "input_formats", "a non-empty list", list(formats))
    if formats == INPUT_FORMATS:
        return
    from PIL import Image  # only to check names: the default list never loads Pillow here

    Image.init()
    known = sorted(set(Image.OPEN) - set(UNSAFE_FORMATS))
    for name in formats:
        rule = f"names of Pillow decoders ({', '.join(known)})"
        _require(name.upper() in known, "input_formats", rule, name)


def _check_start_method(method: str) -> None:
    if method == "fork":
        raise ConfigError(
            "start_method",
            "must not be 'fork': forking a process that runs download threads can copy a held "
            "lock into the child and hang it; use 'forkserver' or 'spawn'",
        )
    known = [m for m in multiprocessing.get_all_start_methods() if m != "fork"]
    _require(method in known, "start_method", f"one of {', '.join(known)}", method)


@dataclass(frozen=True, slots=True)
class QueuesConfig:
    fetched: int = 32
    results: int = 256

    def __post_init__(self) -> None:
        _require(1 <= self.fetched <= 100_000, "fetched", "in [1, 100000]", self.fetched)
        _require(1 <= self.results <= 100_000, "results", "in [1, 100000]", self.results)


EXECUTOR_KINDS = ("local", "dask")
_DASK_ADDRESS = re.compile(r"(?:tcp|tls|ws|wss|inproc|ucx)://\S+")


@dataclass(frozen=True, slots=True)
class ExecutorConfig:
    """Where shards run: here, or as tasks of a Dask cluster (one shard per task)."""

    kind: str = "local"
    address: str = "local"  # a scheduler such as tcp://SCHEDULER:8786, or "local": a LocalCluster
    local_workers: int = 2  # workers of a LocalCluster (address = "local")
    shards_in_flight: int = 0  # 0 = 2 x the cluster's workers
    retries: int = 2  # a failed shard task is run again this many times (Dask's retries=)
    lanes: int = 0  # download processes, each with its threads and its share of the pool; 0: auto
    heartbeat: float = 30.0  # a lane silent this long is killed and replaced

    def __post_init__(self) -> None:
        kinds = ", ".join(EXECUTOR_KINDS)
        _require(self.kind in EXECUTOR_KINDS, "kind", f"one of {kinds}", self.kind)
        address = self.address
        _require(
            address == "local" or bool(_DASK_ADDRESS.fullmatch(address)),
            "address",
            '"local" or a scheduler address like tcp://host:8786',
            address,
        )
        _require(1 <= self.local_workers <= 256, "local_workers", "in [1, 256]", self.local_workers)
        flight = self.shards_in_flight
        _require(0 <= flight <= 10_000, "shards_in_flight", "in [0, 10000]", flight)
        _require(0 <= self.retries <= 20, "retries", "in [0, 20]", self.retries)
        _require(0 <= self.lanes <= 256, "lanes", "in [0, 256]", self.lanes)
        _require(0.5 <= self.heartbeat <= 3600, "heartbeat", "in [0.5, 3600]", self.heartbeat)


@dataclass(frozen=True, slots=True)
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    queues: QueuesConfig = field(default_factory=QueuesConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


SECTIONS: dict[str, type[Any]] = typing.get_type_hints(Config)


# --- loading ----------------------------------------------------------------------------------


def load_config(path: Path | None) -> Config:
    """Read and validate ``path``; None gives the built-in defaults."""
    if path is None:
        return Config()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file: {exc.strerror}", str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"invalid TOML: {exc}", str(path)) from None
    except UnicodeDecodeError as exc:  # binary bytes: TOML is UTF-8 text
        raise ConfigError(
            "", f"not UTF-8 text (byte {exc.start}): not a TOML file", str(path)
        ) from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.message, str(path)) from None


def parse_config(data: dict[str, Any]) -> Config:
    """Build a Config from a parsed TOML document; errors name the dotted key."""
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(name, f"is not a known section (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(name, "must be a table")
        sections[name] = _build(SECTIONS[name], table, name)
    return Config(**sections)


def with_overrides(config: Config, section: str, **values: Any) -> Config:
    """Replace some values of one section (from the CLI), validating them like the file's."""
    current = getattr(config, section)
    try:
        updated = dataclasses.replace(current, **values)
    except ConfigError as exc:
        raise ConfigError(f"{section}.{exc.key}", exc.message) from None
    return dataclasses.replace(config, **{section: updated})


def _build(cls: type[Any], table: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key not in hints:
            raise ConfigError(dotted, f"is not a known key (known: {', '.join(hints) or 'none'})")
        if key == "ops" and cls is TransformConfig:
            values[key] = _build_ops(value, dotted)
        else:
            values[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}.{exc.key}", exc.message) from None
    except TypeError as exc:  # a required key is missing
        missing = re.findall(r"'(\w+)'", str(exc))
        raise ConfigError(prefix, f"needs {', '.join(missing) or 'more keys'}") from None


def _build_ops(value: Any, key: str) -> tuple[Op, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, "must be an array of tables ([[transform.ops]])")
    ops = []
    for i, table in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(where, "must be a table with an 'op' key")
        params = dict(table)
        name = params.pop("op", None)
        if name not in OPS:
            raise ConfigError(
                f"{where}.op", f"must be one of {', '.join(BUILTIN_OPS)} (got {name!r})"
            )
        ops.append(_build(OPS[name], params, f"{where}({name})"))
    return tuple(ops)


def _coerce(value: Any, expected: Any, key: str) -> Any:
    if expected == dict[str, Any]:
        if not isinstance(value, dict):
            raise ConfigError(key, "must be a table of fsspec options ({ key = value, ... })")
        return value
    if expected == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings (got {value!r})")
        return tuple(value)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in _TYPE_NAMES and type(value) is not expected:
        raise ConfigError(key, f"must be {_TYPE_NAMES[expected]} (got {value!r})")
    return value


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
