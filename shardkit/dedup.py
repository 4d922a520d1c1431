"""Finding duplicate records (``--dedup``): the same text, image and video bytes as an earlier record."""

from __future__ import annotations

import hashlib
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from shardkit.errors import RecordError
from shardkit.images import ImageRoot
from shardkit.inputs import InputFormat, RawItem
from shardkit.schema import ImagePart, InlineImage, VideoPart

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DuplicateScan:
    """What the dedup pass found: ``{number: first number}`` of the records repeating an earlier one, and how
    many records it looked at."""

    duplicates: dict[int, int]
    records: int


def find_duplicates(source: InputFormat, images: ImageRoot, threads: int = 8) -> DuplicateScan:
    """The records whose text, image and video bytes repeat an earlier record's, in one pass over the input.

    Images and videos are read, not decoded, and each distinct file is read once.
    A record that is itself invalid (it does not parse, an image cannot be
    read) is left for the build to reject; any other error propagates.
    """
    image_digests: dict[str, bytes] = {}

    def image_digest(ref: str) -> bytes:
        if isinstance(ref, InlineImage) or ref.startswith("data:"):  # holds its bytes: not kept in the cache
            return hashlib.sha256(images.read(ref)).digest()
        if ref not in image_digests:
            image_digests[ref] = hashlib.sha256(images.read(ref)).digest()
        return image_digests[ref]

    def key(item: RawItem) -> tuple[int, bytes | None]:
        try:
            record = source.record(item)
            digest = hashlib.sha256()
            for message in record.messages:
                digest.update(message.role.encode() + b"\0")
                for part in message.content:
                    if isinstance(part, ImagePart):
                        content = image_digest(part.image)
                    elif isinstance(part, VideoPart):  # a clip's bytes, or its frame images' (and their rate)
                        refs = [part.video] if part.frames is None else part.frames
                        content = b"video" + b"".join(image_digest(ref) for ref in refs) + str(part.fps).encode()
                    else:
                        content = part.text.encode()
                    digest.update(content + b"\0")
            return item.number, digest.digest()
        except (RecordError, RecursionError, OSError, ValueError):  # the record's own fault: the build rejects it
            return item.number, None

    first: dict[bytes, int] = {}
    duplicates: dict[int, int] = {}
    records = 0
    with ThreadPoolExecutor(threads) as pool:
        items = source.items()
        while chunk := list(itertools.islice(items, 256)):
            records += len(chunk)
            for line, digest in pool.map(key, chunk):
                if digest is None:
                    continue
                if digest in first:
                    duplicates[line] = first[digest]
                else:
                    first[digest] = line
    logger.info("%d duplicate records found", len(duplicates))
    return DuplicateScan(duplicates, records)
