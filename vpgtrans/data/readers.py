"""Annotation readers: COCO captions, JSONL, MiniGPT-4 `cc_sbu_align`, webdataset tar shards.

Every reader returns a list of records (plain dicts): ``image`` (an absolute path, or a member
name inside ``archive`` for tar shards), ``caption`` or ``question``/``answer``, ``where`` (file
and row, for messages) and any other fields of the row. Bad rows go through a `BadSamples`
log: the first one raises a one-line DataError unless skipping was asked for.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
FORMATS = ("auto", "jsonl", "coco", "cc_sbu_align", "webdataset")


class BadSamples:
    """Counts bad rows/images; raises on the first one unless `skip` is set."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.items: list[str] = []

    def add(self, error: DataError) -> None:
        """Record one bad sample (or raise it when not skipping)."""
        if not self.skip:
            raise error
        self.items.append(str(error))

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        """One line: how many were skipped and the first reason."""
        if not self.items:
            return "no bad samples"
        return f"skipped {len(self.items)} bad sample(s); first: {self.items[0]}"


# Longer than any real caption or question; a megabyte "caption" is a broken row, not text to train on.
MAX_TEXT_CHARS = 20_000


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON value")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(text: str, where: str, fix: str, line: int | None = None) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys, bounded nesting; any problem is one DataError naming `where`.

    `line`: the text is that one line of a file (JSONL), so messages name it rather than a line inside it.
    """
    at = f"{where} line {line}" if line is not None else where
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        at = f"{where} line {line if line is not None else exc.lineno}"
        raise DataError(f"{at}: malformed JSON ({exc.msg})", fix) from None
    except RecursionError:
        raise DataError(f"{at}: JSON nested too deeply", fix) from None
    except ValueError as exc:
        raise DataError(f"{at}: {exc}", fix) from None


def _load_json(path: Path) -> Any:
    if not path.exists():
        raise DataError(f"annotation file not found: {path}", "check the data path in the recipe")
    if path.is_dir():
        raise DataError(f"annotation path is a directory: {path}", "point the recipe at the annotation file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start})", "save the annotation file as UTF-8") from None
    if not text.strip():
        raise DataError(f"annotation file is empty: {path}", "point the recipe at a non-empty annotation file")
    try:
        return parse_json(text, str(path), "fix that line of the annotation file")
    except DataError:
        _refuse_json_lines(text, path)  # only a file that failed to parse is looked at again
        raise


def _refuse_json_lines(text: str, path: Path) -> None:
    """A JSON Lines file given to a reader of one JSON document: say so (json reports 'Extra data' on line 2)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].lstrip().startswith("{"):
        return
    try:
        if not all(isinstance(json.loads(ln), dict) for ln in lines[:2]):  # two whole objects, one per line
            return
    except json.JSONDecodeError:
        return
    raise DataError(f"{path} holds one JSON object per line (JSON Lines), but the recipe reads its data as one JSON "
                    "document (data.format json / coco)", "set data.format=jsonl (or pass the matching --recipe)")


def _need(row: Any, key: str, where: str) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}",
                        "each row must be an object like {\"image\": ..., \"caption\": ...}")
    if key not in row or row[key] in (None, ""):
        raise DataError(f"{where}: missing key '{key}'", f"add '{key}' to that row or pass --skip-bad-samples")
    return row[key]


def _text(value: Any, key: str, where: str, numbers: bool = False) -> str:
    """A caption/question/answer as text; numbers only where allowed (VQA answers), never objects or NaN."""
    ok = isinstance(value, str) or (numbers and isinstance(value, (int, float)) and not isinstance(value, bool)
                                    and value == value and abs(value) != float("inf"))
    if not ok:
        raise DataError(f"{where}: '{key}' should be text, got {type(value).__name__} {str(value)[:40]!r}",
                        "fix that row or pass --skip-bad-samples")
    text = str(value)
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: '{key}' is {len(text):,} characters long (at most {MAX_TEXT_CHARS:,})",
                        "fix that row or pass --skip-bad-samples")
    return text


def _texts(value: Any, key: str, where: str, numbers: bool = False) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise DataError(f"{where}: empty {key} list", f"give at least one {key} or remove the row")
    return [_text(v, key, where, numbers) for v in items]


def _text_fields(row: dict[str, Any], where: str, task: str) -> dict[str, Any]:
    """caption, or question + answer, depending on what the row has and the task asks for."""
    if task == "vqa" or (task == "auto" and "caption" not in row and "question" in row):
        question = _text(_need(row, "question", where), "question", where)
        answer = _need(row, "answer", where)
        answers = _texts(answer, "answer", where, numbers=True)
        return {"question": question, "answer": answers if isinstance(answer, list) else answers[0]}
    caption = _need(row, "caption", where)
    captions = _texts(caption, "caption", where)
    if isinstance(caption, list):
        return {"caption": captions[0], "captions": captions}
    return {"caption": captions[0]}


def _record(row: dict[str, Any], image: str, where: str, task: str, **extra: Any) -> dict[str, Any]:
    rec = {k: v for k, v in row.items() if k not in ("image", "caption", "question", "answer")}
    rec.update(extra)
    rec.update(_text_fields(row, where, task))
    rec["image"] = image
    rec["where"] = where
    return rec


def read_jsonl(path: str | Path, *, task: str = "auto", image_root: str | Path | None = None,
               bad: BadSamples | None = None) -> list[dict[str, Any]]:
    """`{"image": path, "caption": ...}` (or question/answer) per line; relative paths against the file's dir."""
    path = Path(path).expanduser().resolve()
    bad = bad if bad is not None else BadSamples()
    if not path.exists():
        raise DataError(f"annotation file not found: {path}", "check the data path in the recipe")
    root = Path(image_root).expanduser().resolve() if image_root else path.parent
    if path.is_dir():
        raise DataError(f"annotation path is a directory: {path}", "point the recipe at the .jsonl file")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path.name} line {lineno}"
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = parse_json(line.strip(), str(path), "fix that line or pass --skip-bad-samples", lineno)
                image = _text(_need(row, "image", where), "image", where)
                records.append(_record(row, str(root / image), where, task))
            except UnicodeDecodeError as exc:
                bad.add(DataError(f"{path} line {lineno}: not UTF-8 text (byte {exc.start})",
                                  "save the file as UTF-8 or pass --skip-bad-samples"))
            except DataError as exc:
                bad.add(exc)
    if not records and not len(bad):
        raise DataError(f"annotation file is empty: {path}", "point the recipe at a non-empty annotation file")
    return records


def read_coco(path: str | Path, *, image_root: str | Path | None = None, task: str = "caption",
              bad: BadSamples | None = None) -> list[dict[str, Any]]:
    """COCO captions (`{"images": [...], "annotations": [...]}`) or LAVIS-style `[{"image", "caption"}]`."""
    path = Path(path).expanduser().resolve()
    bad = bad if bad is not None else BadSamples()
    data = _load_json(path)
    root = Path(image_root).expanduser().resolve() if image_root else path.parent
    records = []
    if isinstance(data, list):  # LAVIS / Karpathy split files
        for i, row in enumerate(data):
            where = f"{path.name} item {i}"
            try:
                image = _text(_need(row, "image", where), "image", where)
                caps = row.get("caption")
                for cap in caps if isinstance(caps, list) else [caps]:
                    records.append(_record({**row, "caption": cap}, str(root / image), where, task))
            except DataError as exc:
                bad.add(exc)
        return records
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a COCO captions file (no 'annotations' list)",
                        "use format jsonl for one-object-per-line files")
    if not isinstance(data.get("images", []), list):
        raise DataError(f"{path}: 'images' should be a list", "fix the annotation file")
    files = {}
    for i, img in enumerate(data.get("images", [])):
        try:
            at = f"{path.name} images[{i}]"
            files[_text(_need(img, "id", at), "id", at, numbers=True)] = _text(_need(img, "file_name", at),
                                                                              "file_name", at)
        except DataError as exc:
            bad.add(exc)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path.name} annotations[{i}]"
        try:
            image_id = _need(ann, "image_id", where)
            name = files.get(_text(image_id, "image_id", where, numbers=True))
            if name is None:
                raise DataError(f"{where}: image_id {image_id} is not in 'images'", "fix the annotation file")
            records.append(_record(ann, str(root / name), where, task))
        except DataError as exc:
            bad.add(exc)
    return records


def read_cc_sbu_align(folder: str | Path, *, task: str = "caption",
                      bad: BadSamples | None = None) -> list[dict[str, Any]]:
    """MiniGPT-4's `cc_sbu_align/`: `filter_cap.json` annotations + `image/{image_id}.jpg`."""
    folder = Path(folder).expanduser().resolve()
    bad = bad if bad is not None else BadSamples()
    data = _load_json(folder / "filter_cap.json")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{folder / 'filter_cap.json'}: no 'annotations' list", "is this a cc_sbu_align folder?")
    records = []
    for i, ann in enumerate(data["annotations"]):
        where = f"filter_cap.json annotations[{i}]"
        try:
            image_id = _text(_need(ann, "image_id", where), "image_id", where, numbers=True)
            records.append(_record(ann, str(folder / "image" / f"{image_id}.jpg"), where, task))
        except DataError as exc:
            bad.add(exc)
    return records


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style ranges: `shard-{000..003}.tar` → 4 names (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for n in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[:m.start()] + str(n).zfill(width) + pattern[m.end():]))
    return out


def _shards(spec: str | Path) -> list[Path]:
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        shards = [Path(p) for p in expand_braces(str(path))]
    missing = [str(p) for p in shards if not p.is_file()]
    if not shards or missing:
        raise DataError(f"no webdataset shard at {missing[0] if missing else spec}",
                        "pass a .tar file, a directory of .tar files or a pattern like data/{00000..00009}.tar")
    return [p.resolve() for p in shards]


def safe_member_name(name: str) -> bool:
    """True when a tar member name cannot point outside its archive (no absolute path, no '..')."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def read_webdataset(spec: str | Path, *, task: str = "caption", bad: BadSamples | None = None) -> list[dict[str, Any]]:
    """img2dataset shards: `key.jpg` + `key.txt` (caption) and/or `key.json` with the same key."""
    bad = bad if bad is not None else BadSamples()
    records = []
    for shard in _shards(spec):
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard) as tar:
                members = tar.getmembers()
                texts = {}
                for m in members:
                    if not m.isfile():
                        continue
                    if not safe_member_name(m.name):
                        bad.add(DataError(f"{shard.name}: unsafe member path {m.name!r}",
                                          "rebuild the shard with relative member names"))
                        continue
                    # webdataset: the key is the path up to the first dot of the file name.
                    folder, _, base = m.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = m
                for key, parts in groups.items():
                    for ext in ("txt", "json"):
                        if ext in parts:
                            texts[(key, ext)] = tar.extractfile(parts[ext]).read().decode("utf-8", "replace")
        except tarfile.TarError as exc:
            raise DataError(f"{shard}: not a readable tar file ({exc})", "re-create the shard") from None
        for key, parts in sorted(groups.items()):
            where = f"{shard.name}:{key}"
            try:
                image = next((parts[e].name for e in IMAGE_EXTS if e in parts), None)
                if image is None:
                    raise DataError(f"{where}: no image member ({'/'.join(IMAGE_EXTS)})", "every key needs an image")
                row: dict[str, Any] = {"key": key}
                if (key, "json") in texts:
                    meta = parse_json(texts[(key, "json")], f"{where}.json",
                                      "fix the shard or pass --skip-bad-samples")
                    if isinstance(meta, dict):
                        row.update(meta)
                if (key, "txt") in texts:
                    row["caption"] = texts[(key, "txt")].strip()
                records.append(_record(row, image, where, task, archive=str(shard)))
            except DataError as exc:
                bad.add(exc)
    return records


def detect_format(path: str | Path) -> str:
    """Guess the annotation format from the path."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        if (p / "filter_cap.json").exists():
            return "cc_sbu_align"
        if any(p.glob("*.tar")):
            return "webdataset"
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonlines")):
        return "jsonl"
    if name.endswith(".tar") or "{" in name:
        return "webdataset"
    if name.endswith(".json"):
        return "coco"
    raise DataError(f"cannot tell the annotation format of {path}",
                    f"set data.format to one of: {', '.join(FORMATS[1:])}")


def read_records(path: str | Path, fmt: str = "auto", *, task: str = "auto", image_root: str | Path | None = None,
                 bad: BadSamples | None = None) -> list[dict[str, Any]]:
    """Read any supported annotation format into records."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "jsonl":
        return read_jsonl(path, task=task, image_root=image_root, bad=bad)
    if fmt == "coco":
        return read_coco(path, image_root=image_root, task=task, bad=bad)
    if fmt == "cc_sbu_align":
        return read_cc_sbu_align(path, task=task, bad=bad)
    if fmt == "webdataset":
        return read_webdataset(path, task=task, bad=bad)
    raise DataError(f"unknown data format '{fmt}'", f"use one of: {', '.join(FORMATS)}")


class ImageReader:
    """Reads image bytes of records (files or tar members, in memory) and decodes them to RGB."""

    def __init__(self) -> None:
        self._tars: dict[str, tarfile.TarFile] = {}

    def read_bytes(self, record: dict[str, Any]) -> bytes:
        """Raw bytes of a record's image."""
        archive = record.get("archive")
        if archive:
            name = record["image"]
            if not safe_member_name(name):
                raise DataError(f"{record.get('where', archive)}: unsafe member path {name!r}",
                                "rebuild the shard with relative member names")
            tar = self._tars.get(archive)
            if tar is None:
                tar = self._tars[archive] = tarfile.open(archive)
            try:
                member = tar.getmember(name)
                fh = tar.extractfile(member)
            except (KeyError, tarfile.TarError):
                fh = None
            if fh is None:
                raise DataError(f"image {name!r} not found in {archive}", "re-create the shard")
            return fh.read()
        path = Path(record["image"])
        if not path.is_file():
            raise DataError(f"image not found: {path} ({record.get('where', '')})",
                            "check the image root, or pass --skip-bad-samples")
        return path.read_bytes()

    def decode(self, record: dict[str, Any], data: bytes | None = None) -> Any:
        """8-bit RGB PIL image of a record."""
        from ..images import decode_image, open_image

        if not record.get("archive"):
            return open_image(record["image"])
        data = self.read_bytes(record) if data is None else data
        where = f"{record['archive']}:{record['image']}"
        if not data:
            raise DataError(f"image is empty (0 bytes): {where}", "re-create the shard or pass --skip-bad-samples")
        return decode_image(io.BytesIO(data), where, "pass --skip-bad-samples")

    def close(self) -> None:
        """Close open tar files."""
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()

