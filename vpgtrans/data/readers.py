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


def _load_json(path: Path) -> Any:
    if not path.exists():
        raise DataError(f"annotation file not found: {path}", "check the data path in the recipe")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"annotation file is empty: {path}", "point the recipe at a non-empty annotation file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg})",
                        "fix that line of the annotation file") from None


def _need(row: Any, key: str, where: str) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}",
                        "each row must be an object like {\"image\": ..., \"caption\": ...}")
    if key not in row or row[key] in (None, ""):
        raise DataError(f"{where}: missing key '{key}'", f"add '{key}' to that row or pass --skip-bad-samples")
    return row[key]


def _text_fields(row: dict[str, Any], where: str, task: str) -> dict[str, Any]:
    """caption, or question + answer, depending on what the row has and the task asks for."""
    if task == "vqa" or (task == "auto" and "caption" not in row and "question" in row):
        return {"question": str(_need(row, "question", where)), "answer": _need(row, "answer", where)}
    caption = _need(row, "caption", where)
    if isinstance(caption, list):
        if not caption:
            raise DataError(f"{where}: empty caption list", "give at least one caption or remove the row")
        return {"caption": str(caption[0]), "captions": [str(c) for c in caption]}
    return {"caption": str(caption)}


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
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.add(DataError(f"{path} line {lineno}: malformed JSON ({exc.msg})",
                                  "fix that line or pass --skip-bad-samples"))
                continue
            try:
                image = str(_need(row, "image", where))
                records.append(_record(row, str(root / image), where, task))
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
                image = str(_need(row, "image", where))
                caps = row.get("caption")
                for cap in caps if isinstance(caps, list) else [caps]:
                    records.append(_record({**row, "caption": cap}, str(root / image), where, task))
            except DataError as exc:
                bad.add(exc)
        return records
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataError(f"{path}: not a COCO captions file (no 'annotations')",
                        "use format jsonl for one-object-per-line files")
    files = {}
    for i, img in enumerate(data.get("images", [])):
        try:
            files[_need(img, "id", f"{path.name} images[{i}]")] = _need(img, "file_name", f"{path.name} images[{i}]")
        except DataError as exc:
            bad.add(exc)
    for i, ann in enumerate(data["annotations"]):
        where = f"{path.name} annotations[{i}]"
        try:
            image_id = _need(ann, "image_id", where)
            name = files.get(image_id)
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
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataError(f"{folder / 'filter_cap.json'}: no 'annotations' list", "is this a cc_sbu_align folder?")
    records = []
    for i, ann in enumerate(data["annotations"]):
        where = f"filter_cap.json annotations[{i}]"
        try:
            image_id = _need(ann, "image_id", where)
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
                    try:
                        meta = json.loads(texts[(key, "json")])
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{where}.json line {exc.lineno}: malformed JSON ({exc.msg})",
                                        "fix the shard or pass --skip-bad-samples") from None
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
        from ..images import open_image, to_rgb

        if not record.get("archive"):
            return open_image(record["image"])
        from PIL import Image, UnidentifiedImageError

        data = self.read_bytes(record) if data is None else data
        where = f"{record['archive']}:{record['image']}"
        if not data:
            raise DataError(f"image is empty (0 bytes): {where}", "re-create the shard or pass --skip-bad-samples")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb(img)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"image is corrupt or not an image: {where} ({exc})",
                            "re-create the shard, or pass --skip-bad-samples") from None

    def close(self) -> None:
        """Close open tar files."""
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()

