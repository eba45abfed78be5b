"""Parsing `s3://bucket/prefix` URLs: what is accepted, what is refused and how it is explained."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciuic_common.errors import InvalidArgument
from ciuic_common.storage import S3Url, bucket_name_problem

buckets = st.from_regex(r"\A[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z").filter(
    lambda name: bucket_name_problem(name) is None
)
keys = st.text(max_size=200)


@pytest.mark.parametrize(
    ("url", "bucket", "key"),
    [
        ("s3://datasets/imagenet/train/", "datasets", "imagenet/train/"),
        (
            "s3://model-registry/tiny-ds/3/onnx/model.onnx",
            "model-registry",
            "tiny-ds/3/onnx/model.onnx",
        ),
        ("s3://data.ciuic.example", "data.ciuic.example", ""),
        ("s3://data/", "data", ""),
        ("S3://data/Mixed Case/x", "data", "Mixed Case/x"),
        # Keys are verbatim: no query, fragment or percent-decoding as in HTTP URLs.
        ("s3://data/a?b#c%20d//e", "data", "a?b#c%20d//e"),
    ],
)
def test_a_valid_url_splits_into_bucket_and_key(url: str, bucket: str, key: str) -> None:
    assert S3Url.parse(url) == S3Url(bucket, key)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("datasets/train", "not an S3 URL"),
        ("https://datasets/train", "not an S3 URL"),
        ("s3:/datasets/train", "not an S3 URL"),
        ("s3://", "not a valid bucket name"),
        ("s3:///train", "not a valid bucket name"),
        ("s3://ab/train", "3-63"),
        ("s3://Datasets/train", "lowercase"),
        ("s3://data_sets/train", "lowercase"),
        ("s3://-data/train", "starts and ends"),
        ("s3://" + "a" * 64 + "/train", "3-63"),
        ("s3://data..sets/train", "two adjacent dots"),
        ("s3://192.168.0.1/train", "IP address"),
        ("s3://data/" + "k" * 1025, "longer than 1024 bytes"),
    ],
)
def test_an_invalid_url_is_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason) as error:
        S3Url.parse(url)
    assert repr(url)[:40] in str(error.value)  # names the URL it refused


@given(buckets, keys)
def test_printing_and_parsing_round_trips(bucket: str, key: str) -> None:
    url = S3Url(bucket, key)
    assert S3Url.parse(str(url)) == url


@given(st.text(max_size=100))
def test_parsing_any_text_either_succeeds_or_raises_invalid_argument(text: str) -> None:
    try:
        url = S3Url.parse(text)
    except InvalidArgument:
        return
    assert bucket_name_problem(url.bucket) is None
    assert text.lower().startswith("s3://")


def test_join_appends_path_segments_with_single_slashes() -> None:
    root = S3Url("runs", "")
    assert root.join("r1", "j2/", "/model.pt") == S3Url("runs", "r1/j2/model.pt")
    assert S3Url("runs", "r1/").join("log.txt") == S3Url("runs", "r1/log.txt")
    assert str(S3Url("runs", "r1").join()) == "s3://runs/r1"
