"""`vpgtrans serve` refuses bad requests with an HTTP 4xx and an OpenAI-style error body, and keeps serving."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from serve_helpers import data_url, live_server, make_model, png_bytes, request, require_serve_extra, user_turn

from vpgtrans.testing import tiny_images

require_serve_extra()
MODEL = "tiny-chat"


def _bomb_png(width: int, height: int) -> bytes:
    """A real grey PNG of width x height zeros: a few dozen KB that decode to width*height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


GOOD = png_bytes(tiny_images(1, seed=9)[0])


def _body(*messages: dict, **fields) -> dict:
    return {"model": MODEL, "messages": list(messages), "max_tokens": 4, "temperature": 0, **fields}


def _image_body(data: bytes, text: str = "describe") -> dict:
    return _body(user_turn(text, data_url(data)))


# (id, request body as dict or raw bytes, expected status, expected error code or a message fragment)
CASES = [
    ("not an image", _image_body(b"hello, I am text"), 400, "invalid_image"),
    ("truncated image", _image_body(GOOD[:len(GOOD) // 2]), 400, "invalid_image"),
    ("empty image", _image_body(b""), 400, "invalid_image"),
    ("decompression bomb", _image_body(_bomb_png(8000, 8000)), 400, "image_too_large"),
    ("invalid base64", _body(user_turn("hi", "data:image/png;base64,@@@not-base64@@@")), 400, "invalid_image_url"),
    ("remote URL", _body(user_turn("hi", "http://example.com/cat.png")), 400, "invalid_image_url"),
    ("malformed JSON", b'{"model": "tiny-chat", "messages": [', 400, "invalid_json"),
    ("not JSON at all", b"\x00\x01binary", 400, "invalid_json"),
    ("unknown field", _image_body(GOOD) | {"frobnicate": True}, 400, "unknown_parameter"),
    ("unknown field in a message", _body({"role": "user", "content": "hi", "mood": "happy"}), 400,
     "unknown_parameter"),
    ("too many images", _body({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(GOOD)}},
        {"type": "image_url", "image_url": {"url": data_url(GOOD)}}, {"type": "text", "text": "compare"}]}),
     400, "too_many_images"),
    ("too many images across turns", _body(user_turn("a", data_url(GOOD)), {"role": "assistant", "content": "b"},
                                           user_turn("c", data_url(GOOD))), 400, "too_many_images"),
    ("no image", _body(user_turn("hello")), 400, "image_required"),
    ("over-long prompt (tokens)", _image_body(GOOD, "describe " * 400), 400, "context_length_exceeded"),
    ("over-long prompt (characters)", _image_body(GOOD, "x" * 100_000), 400, "context_length_exceeded"),
    ("wrong model", _image_body(GOOD) | {"model": "gpt-4o"}, 404, "model_not_found"),
    ("n=2", _image_body(GOOD) | {"n": 2}, 400, "n"),
    ("temperature out of range", _image_body(GOOD) | {"temperature": 5}, 400, "temperature"),
    ("seed past int64", _image_body(GOOD) | {"seed": 2 ** 70}, 400, "seed"),
    ("five stop strings", _image_body(GOOD) | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("ends with the assistant", _body(user_turn("a", data_url(GOOD)), {"role": "assistant", "content": "b"}), 400,
     "alternate"),
    ("no messages", _body(), 400, "messages"),
    ("unknown content part", _body({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}), 400,
     "messages"),
]


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory):
    model_dir = make_model(tiny_paths, tmp_path_factory.mktemp("serve-bad") / MODEL)
    with live_server(model_dir, "--max-body-mb", "20") as (url, _):
        yield url


def _assert_openai_error(status: int, body, expected_status: int, fragment: str) -> None:
    assert status == expected_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert fragment in (error["code"] or "") or fragment in error["message"] or fragment in (error["param"] or "")


@pytest.mark.parametrize("body, status, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_4xx_with_an_openai_error(server, body, status, fragment):
    code, reply = request("POST", server + "/v1/chat/completions", body)
    _assert_openai_error(code, reply, status, fragment)


def test_bad_input_unknown_key_inside_image_url_is_named(server):
    turn = user_turn("describe", data_url(GOOD))
    turn["content"][0]["image_url"]["detial"] = "low"  # misspelt "detail"
    code, reply = request("POST", server + "/v1/chat/completions", _body(turn))
    _assert_openai_error(code, reply, 400, "unknown_parameter")
    assert "detial" in reply["error"]["message"] and "image_url" in reply["error"]["param"], reply


def test_bad_input_a_50_mb_body_is_refused(server):
    huge = base64.b64encode(b"\x00" * (37 << 20))  # 50 MB of base64 in one image part
    body = b'{"model": "tiny-chat", "messages": [{"role": "user", "content": [{"type": "image_url", ' \
           b'"image_url": {"url": "data:image/png;base64,' + huge + b'"}}]}]}'
    assert len(body) > 49 << 20
    code, reply = request("POST", server + "/v1/chat/completions", body)
    _assert_openai_error(code, reply, 413, "request_too_large")
    # Without a Content-Length (chunked), the limit is counted as the bytes arrive.
    chunks = (body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20))
    code, reply = request("POST", server + "/v1/chat/completions", chunks,  # type: ignore[arg-type]
                          headers={"Transfer-Encoding": "chunked"})
    _assert_openai_error(code, reply, 413, "request_too_large")


def test_bad_input_unknown_route_and_method(server):
    _assert_openai_error(*request("GET", server + "/v1/nope"), 404, "not_found")
    _assert_openai_error(*request("GET", server + "/v1/chat/completions"), 405, "Method")


def test_bad_input_then_the_server_still_answers(server):
    for _, body, _, _ in CASES[:6]:
        request("POST", server + "/v1/chat/completions", body)
    code, reply = request("POST", server + "/v1/chat/completions", _image_body(GOOD))
    assert code == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert request("GET", server + "/health")[1]["status"] == "ok"


def test_bad_input_images_of_every_mode_are_accepted(server):
    from PIL import Image

    base = tiny_images(1, seed=3)[0]
    for mode in ("L", "RGBA", "P", "CMYK", "I;16"):
        buf = io.BytesIO()
        image = base.convert(mode) if mode != "I;16" else Image.new("I;16", (30, 20), 4000)
        image.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        code, reply = request("POST", server + "/v1/chat/completions", _image_body(buf.getvalue()))
        assert code == 200, (mode, reply)
