"""The settings an output folder is pinned to: named pairs, compared key by key."""

from __future__ import annotations

import json

import pytest

from pipeline.config import Config, InputConfig, OutputConfig, Resize, TransformConfig
from pipeline.settings import OLDER, differences, pinned


def test_settings_are_named_pairs_and_each_difference_names_its_key():
    then = pinned(Config())
    assert then["transform.quality"] == 85 and then["output.format"] == "files"
    assert then["transform.ops"][1] == {"op": "thumbnail", "width": 256, "height": 256}
    assert differences(json.loads(json.dumps(then)), pinned(Config())) is None

    now = pinned(Config(transform=TransformConfig(quality=95, ops=(Resize(64, 32, "fill"),))))
    assert differences(then, now) == (
        "transform.quality was 85, now 95; transform.ops was "
        "[exif_transpose, thumbnail(width=256, height=256)], now "
        '[resize(width=64, height=32, mode="fill", enlarge=true)]'
    )
    tars = pinned(Config(output=OutputConfig(format="webdataset", shard_size=50)))
    assert differences(then, tars) == (
        'output.format was "files", now "webdataset"; output.shard_size was (not set), now 50'
    )


def test_the_older_list_form_is_read_back_and_anything_else_is_an_older_version():
    older = {
        "input": {"shard_size": 10000, "url_column": "url", "dedupe": False},
        "folder_size": 1000,
        "output": ["jpeg", 85, "#ffffff", "bicubic", 2.0, 89478485],
        "ops": [["ExifTranspose"], ["Thumbnail", 256, 256]],
    }
    assert differences(older, pinned(Config())) is None
    tars = {**older, "layout": ["webdataset", 10000, "numbered"]}
    webdataset = pinned(Config(output=OutputConfig(format="webdataset")))
    assert differences(tars, webdataset) is None
    assert differences({**tars, "layout": ["webdataset", 10000]}, webdataset) == OLDER  # by shard
    captions = {**older, "samples": ["caption", ["id"]]}
    mine = OutputConfig(caption_column="caption", sample_columns=("id",))
    assert differences(captions, pinned(Config(output=mine))) is None
    assert differences(captions, pinned(Config())) == (
        'output.caption_column was "caption", now ""; output.sample_columns was ["id"], now ["*"]'
    )
    higher = pinned(Config(transform=TransformConfig(quality=95)))
    assert differences(older, higher) == "transform.quality was 85, now 95"
    for unknown in (None, ["jpeg", 85], {**older, "output": ["jpeg"]}, {**older, "ops": [["X"]]}):
        assert differences(unknown, pinned(Config())) == OLDER


def test_a_setting_added_since_a_folder_was_made_counts_as_its_default():
    now = pinned(Config())
    then = {k: v for k, v in now.items() if k != "input.hash_column"}
    then["transform.ops"] = [{"op": "exif_transpose"}, {"op": "thumbnail", "width": 256}]
    assert differences(then, now) == (
        "transform.ops was [exif_transpose, thumbnail(width=256)], "
        "now [exif_transpose, thumbnail(width=256, height=256)]"
    )  # a parameter without a default is not guessed
    then["transform.ops"][1]["height"] = 256
    assert differences(then, now) is None
    assert differences(then, pinned(Config(input=InputConfig(hash_column="sha")))) == (
        'input.hash_column was "", now "sha"'
    )


@pytest.mark.parametrize(
    ("changed", "said"),
    [
        ({"reencode": False}, "transform.reencode was true, now false"),
        ({"min_width": 64}, "transform.min_width was 0, now 64"),
        ({"min_height": 64}, "transform.min_height was 0, now 64"),
        ({"max_aspect_ratio": 10.0}, "transform.max_aspect_ratio was 0.0, now 10.0"),
        ({"input_formats": ("JPEG",)}, "transform.input_formats was"),
    ],
)
def test_settings_that_decide_final_rows_or_kept_bytes_are_pinned(changed, said):
    """A filter or the decoders decide rows that are final, reencode whether bytes are kept:
    a resumed run with another value would mix both in one folder."""
    message = differences(pinned(Config()), pinned(Config(transform=TransformConfig(**changed))))
    assert message is not None and message.startswith(said)
