"""router/json_codec.py: msgspec's speed, the standard library's acceptance and values."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import json_codec
from router.openai_request import parse_body

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(_json_values)
def test_decodes_what_json_decodes_to_the_same_values(value: object) -> None:
    text = json.dumps(value)
    assert json_codec.loads(text.encode()) == json.loads(text)
    assert json_codec.loads(text) == json.loads(text)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "\\ud800 lone surrogate"}',  # msgspec refuses it; vLLM's json accepts it
        b'{"temperature": NaN}',
        b'{"seed": 123456789012345678901234567890}',  # past 64 bits: an int still (orjson makes it a float)
        b'{"x": 1e400}',  # past a double: json says inf
        '{"prompt": "utf-16"}'.encode("utf-16"),  # json detects UTF-16 and UTF-32 by their BOM-less shape
        b'{"a": 1, "a": 2}',  # duplicate keys: the last one wins in both
    ],
)
def test_what_msgspec_refuses_decodes_as_json_does(raw: bytes) -> None:
    got, want = json_codec.loads(raw), json.loads(raw)
    assert repr(got) == repr(want)  # repr: NaN != NaN


def test_nan_survives_the_fallback() -> None:
    assert math.isnan(json_codec.loads(b"[NaN]")[0])


@pytest.mark.parametrize("raw", [b"{bad", b"", b'{"a": 1} trailing', b"\xff\xfe\xfd"])
def test_malformed_documents_raise_value_errors(raw: bytes) -> None:
    with pytest.raises(ValueError):
        json_codec.loads(raw)


def test_too_deep_a_document_is_a_400_not_a_500() -> None:
    deep = b'{"model": "m", "prompt": "x", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(Exception) as info:
        parse_body(deep, "completions")
    assert getattr(info.value, "status", None) == 400


def test_a_plain_body_never_reaches_the_slow_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("json.loads called for a document msgspec decodes")

    monkeypatch.setattr(json_codec.json, "loads", refuse)
    body = b'{"model": "m", "prompt": [1, 2, 3], "max_tokens": 8, "stream": true}'
    assert parse_body(body, "completions").prompt == (1, 2, 3)
