"""Config: the file equals the defaults; every bad value is a one-line error naming its key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from pipeline.config import (
    Config,
    DownloadConfig,
    Resize,
    Thumbnail,
    TransformConfig,
    load_config,
    parse_config,
    with_overrides,
)
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_config_file_equals_the_defaults():
    assert load_config(ROOT / "config.toml") == Config()


def test_every_key_of_the_shipped_config_is_commented():
    lines = (ROOT / "config.toml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\w+\s*=", line):
            above = lines[number - 1].strip()
            assert (
                above.startswith("#") or re.match(r"^\w+\s*=", above) or above.startswith("[[")
            ), f"config.toml line {number + 1}: {line!r} has no comment above it"
    data = tomllib.loads((ROOT / "config.toml").read_text())
    assert set(data) == set(Config.__dataclass_fields__)


def error_for(toml: str, tmp_path: Path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


@pytest.mark.parametrize(
    ("toml", "key", "shown"),
    [
        ('[download]\nworkers = "4"\n', "download.workers", "'4'"),
        ("[download]\nworkers = true\n", "download.workers", "True"),
        ("[download]\nworkers = 0\n", "download.workers", "0"),
        ("[download]\nworkers = 5000\n", "download.workers", "5000"),
        ('[download]\nconnect_timeout = "fast"\n', "download.connect_timeout", "'fast'"),
        ("[download]\nretry_after_max = 100.0\n", "download.retry_after_max", "100.0"),
        ('[download]\ncontent_types = "image/*"\n', "download.content_types", "image/*"),
        ('[download]\ncontent_types = ["images"]\n', "download.content_types", "images"),
        ("[download]\nspeed = 3\n", "download.speed", "not a known key"),
        ("[executor]\nlanes = -1\n", "executor.lanes", "-1"),
        ("[executor]\nlanes = 300\n", "executor.lanes", "300"),
        ('[executor]\nlanes = "auto"\n', "executor.lanes", "'auto'"),
        ('[input]\nurl_column = ""\n', "input.url_column", "''"),
        ('[input]\ndedupe = "yes"\n', "input.dedupe", "'yes'"),
        ('[input]\ncsv_column = "link"\n', "input.csv_column", "not a known key"),
        ("[transform]\nquality = 101\n", "transform.quality", "101"),
        ('[transform]\nformat = "gif"\n', "transform.format", "gif"),
        ('[transform]\nbackground = "white"\n', "transform.background", "white"),
        ('[transform]\nstart_method = "fork"\n', "transform.start_method", "fork"),
        ("[transform]\nreducing_gap = 0.5\n", "transform.reducing_gap", "0.5"),
        ("[transform]\ntimeout = -1\n", "transform.timeout", "-1"),
        ("[queues]\nfetched = 0\n", "queues.fetched", "0"),
        ("[queue]\nfetched = 1\n", "queue", "not a known section"),
        ("[input]\nshard_size = 0\n", "input.shard_size", "0"),
        ('[[transform.ops]]\nop = "sepia"\n', "transform.ops[0].op", "sepia"),
        ('[[transform.ops]]\nop = "blur"\n[[transform.ops]]\nop = "thumbnail"\nwidth = 9\n',
         "transform.ops[1](thumbnail)", "height"),
        ('[[transform.ops]]\nop = "thumbnail"\nwidth = 9\nheight = 9\nsize = 3\n',
         "transform.ops[0](thumbnail).size", "not a known key"),
        ('[[transform.ops]]\nop = "resize"\nwidth = 9\nheight = 9\nmode = "crop"\n',
         "transform.ops[0](resize).mode", "crop"),
        ('[[transform.ops]]\nop = "blur"\nradius = -1\n', "transform.ops[0](blur).radius", "-1"),
        ('[[transform.ops]]\nop = "resize"\nwidth = 9\nheight = 9\nenlarge = 0\n',
         "transform.ops[0](resize).enlarge", "true or false"),
        ("[transform]\nmin_width = -1\n", "transform.min_width", "-1"),
        ("[transform]\nmin_height = 70000\n", "transform.min_height", "70000"),
        ("[transform]\nmax_aspect_ratio = 0.5\n", "transform.max_aspect_ratio", "0 (off) or"),
        ('[transform]\nreencode = "no"\n', "transform.reencode", "'no'"),
        ('[input]\nhash_column = "url"\n', "input.hash_column", "another column than url_column"),
        ('[download]\nuser_agent = "a\\r\\nX: 1"\n', "download.user_agent", "'a\\r\\nX: 1'"),
        ('[download]\nuser_agent = " ua"\n', "download.user_agent", "' ua'"),
        ('[download]\nuser_agent = "ua\\u00e9"\n', "download.user_agent", "printable ASCII"),
        ('[download]\ndeny_networks = ["10.0.0.0/33"]\n', "download.deny_networks", "10.0.0.0/33"),
        ('[download]\ndeny_networks = ["intranet"]\n', "download.deny_networks", "intranet"),
        ('[download]\nallow_private = "no"\n', "download.allow_private", "'no'"),
        ("[download]\nstraggler_after = 0\n", "download.straggler_after", "0"),
        ("[download]\nmax_stragglers = -1\n", "download.max_stragglers", "-1"),
        ("[output]\nflush_rows = 0\n", "output.flush_rows", "0"),
        ('[output]\nformat = "tar"\n', "output.format", "one of files, webdataset"),
        ("[output]\nshard_size = 0\n", "output.shard_size", "0"),
        ('[output]\nparquet = "yes"\n', "output.parquet", "'yes'"),
        ("[output]\nflush_seconds = 0\n", "output.flush_seconds", "0"),
        ('[[transform.ops]]\nop = "resize"\nwidth = 65535\nheight = 65535\n',
         "transform.ops[0] resizes to 65535 x 65535", "more than max_pixels (89478485)"),
        ('[transform]\nmax_pixels = 99\n[[transform.ops]]\nop = "resize"\nwidth = 10\n'
         'height = 10\n', "transform.ops[0]", "100 pixels, more than max_pixels (99)"),
    ],
)  # fmt: skip
def test_a_bad_value_names_its_key(tmp_path, toml, key, shown):
    message = error_for(toml, tmp_path)
    assert key in message and shown in message


def test_fork_is_refused_with_the_reason(tmp_path):
    message = error_for('[transform]\nstart_method = "fork"\n', tmp_path)
    assert "forkserver" in message and "thread" in message


def test_test_only_ops_are_not_offered_to_users(tmp_path):
    message = error_for('[[transform.ops]]\nop = "sepia"\n', tmp_path)
    assert "thumbnail" in message and "_crash" not in message


def test_invalid_toml_and_a_missing_file(tmp_path):
    assert "invalid TOML" in error_for("[download\n", tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "none.toml")


def test_ints_are_accepted_for_floats():
    config = parse_config({"download": {"connect_timeout": 5, "deadline": 30}})
    assert config.download.connect_timeout == 5.0 and isinstance(config.download.deadline, float)


def test_ops_are_built_in_order():
    config = parse_config({"transform": {"ops": [
        {"op": "thumbnail", "width": 10, "height": 20},
        {"op": "resize", "width": 5, "height": 5, "mode": "fill"},
        {"op": "resize", "width": 5, "height": 5, "mode": "cover", "enlarge": False},
        {"op": "resize", "width": 5, "height": 5, "mode": "pad"},
    ]}})  # fmt: skip
    assert config.transform.ops == (Thumbnail(10, 20), Resize(5, 5, "fill"),
                                     Resize(5, 5, "cover", False), Resize(5, 5, "pad"))  # fmt: skip


def test_overrides_are_validated_like_the_file():
    config = with_overrides(Config(), "download", workers=64)
    assert config.download.workers == 64 and config.transform == TransformConfig()
    with pytest.raises(ConfigError, match=r"download\.workers .*\(got 0\)"):
        with_overrides(Config(), "download", workers=0)


def test_content_types_default_to_images():
    # the pool's size and bounds are the run's shape: tests/test_shape.py
    assert DownloadConfig().content_types == ("image/*",)
