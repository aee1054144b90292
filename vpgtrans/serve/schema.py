"""The OpenAI chat-completions request, checked strictly, and turned into one conversation about one image."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class ApiError(Exception):
    """A request the server refuses: HTTP status + an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Unknown fields are refused (OpenAI does the same), so a misspelt option never silently does nothing.
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    """An image as a data: URL."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
    """A text content part."""

    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    """An image content part."""

    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]
# A plain union tries both shapes and reports the first one's failure: an unknown key inside image_url came back as
# "messages.0.content.str: Input should be a valid string". Choosing the shape by the value's own type reports
# the error of the shape the client meant, naming the key.
Content = Annotated[Union[Annotated[str, Tag("text")], Annotated[list[Part], Tag("parts")]],
                    Discriminator(lambda v: "parts" if isinstance(v, list) else "text")]


class Message(_Strict):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Content | None = None
    name: str | None = None


class StreamOptions(_Strict):
    """`stream_options`: only include_usage is meaningful here."""

    include_usage: bool = False


class ResponseFormat(_Strict):
    """`response_format`: plain text is all a vpgtrans model writes."""

    type: Literal["text"]


class ChatRequest(_Strict):
    """POST /v1/chat/completions: the subset of OpenAI's fields a vpgtrans model can honour."""

    model: str
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    user: str | None = None
    response_format: ResponseFormat | None = None

    def stops(self) -> list[str]:
        """Stop strings as a list (OpenAI allows up to 4)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        return stops


@dataclass
class Conversation:
    """(question, answer) turns, the question to answer now, and the one image they are about."""

    history: list[tuple[str, str]]
    question: str
    image: Any
    image_key: str
    prompt_chars: int = field(default=0)


_DATA_URL = re.compile(r"^data:([\w/+.-]*)((?:;[\w=.+-]+)*?)(;base64)?,", re.IGNORECASE)


def _text(content: str | list[Any] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(p.text for p in content if isinstance(p, TextPart))


def image_bytes(url: str, param: str) -> bytes:
    """The bytes of a data: URL; anything else is refused (the server never fetches from the network)."""
    match = _DATA_URL.match(url)
    if not match:
        raise ApiError(400, "image_url must be a data: URL (data:image/png;base64,...); this server does not fetch "
                            "images from the network", param=param, code="invalid_image_url")
    payload = url[match.end():]
    try:
        if match.group(3):
            return base64.b64decode(payload, validate=True)
        from urllib.parse import unquote_to_bytes

        return unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url data is not valid base64", param=param, code="invalid_image_url") from None


def decode_image(data: bytes, max_pixels: int, param: str) -> Any:
    """Fully decode image bytes to RGB, refusing non-images, truncated files and decompression bombs."""
    from PIL import Image, UnidentifiedImageError

    from ..images import to_rgb

    if not data:
        raise ApiError(400, "image is empty (0 bytes)", param=param, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                # Checked from the header, before a single pixel is decoded.
                if width * height > max_pixels:
                    raise ApiError(400, f"image is {width}x{height} = {width * height} pixels, over this server's "
                                        f"limit of {max_pixels} (--max-image-pixels): send a smaller image",
                                   param=param, code="image_too_large")
                img.load()
                return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(400, f"image refused as a decompression bomb ({exc})", param=param,
                       code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(400, f"image could not be decoded: not an image, or a truncated one ({exc})", param=param,
                       code="invalid_image") from None


def conversation(request: ChatRequest, max_pixels: int) -> Conversation:
    """Check the messages' shape and decode the image: user/assistant turns ending with a user turn, one image."""
    turns: list[tuple[str, str]] = []  # (role, text)
    images: list[tuple[bytes, str]] = []
    for i, msg in enumerate(request.messages):
        if msg.role in ("system", "developer"):
            continue  # the model's template has no place for a system prompt
        if msg.role == "assistant" and isinstance(msg.content, list) and any(
                isinstance(p, ImagePart) for p in msg.content):
            raise ApiError(400, "assistant messages cannot carry images", param=f"messages.{i}.content")
        if isinstance(msg.content, list):
            images += [(image_bytes(p.image_url.url, f"messages.{i}.content.{j}.image_url.url"),
                        f"messages.{i}.content.{j}.image_url")
                       for j, p in enumerate(msg.content) if isinstance(p, ImagePart)]
        turns.append((msg.role, _text(msg.content).strip()))
    roles = [r for r, _ in turns]
    if not roles or roles[-1] != "user" or any(r == roles[k + 1] for k, r in enumerate(roles[:-1])) \
            or roles[0] != "user":
        raise ApiError(400, "messages must alternate user and assistant turns, starting and ending with a user "
                            "turn (system messages may come anywhere and are not used)", param="messages")
    if not images:
        raise ApiError(400, "this model answers about an image: put one image_url part (a data: URL) in a user "
                            "message", param="messages", code="image_required")
    if len(images) > 1:
        raise ApiError(400, f"too many images: {len(images)} in this conversation, this model takes 1; start a "
                            "new conversation for another image", param="messages", code="too_many_images")
    data, param = images[0]
    image = decode_image(data, max_pixels, param)
    history = [(turns[k][1], turns[k + 1][1]) for k in range(0, len(turns) - 1, 2)]
    return Conversation(history=history, question=turns[-1][1], image=image,
                        image_key=hashlib.sha256(data).hexdigest(), prompt_chars=sum(len(t) for _, t in turns))
