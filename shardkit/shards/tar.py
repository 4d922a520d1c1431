"""WebDataset tar shards, readable by plain ``webdataset`` without shardkit.

Per sample: ``KEY.json``, ``KEY.input_ids.npy``, ``KEY.weights.npy`` and
``KEY.img0.jpg``, ``KEY.img1.jpg``, ..., and video ``k``'s frames as
``KEY.vid{k}.0000.jpg``, ``KEY.vid{k}.0001.jpg``, ... Members carry a fixed mtime, owner and
mode, so the same samples give byte-identical tars. A sample's checksum covers
the bytes of its members, headers included: ``[offset, offset + size)``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Any

from shardkit.shards.base import (
    ChecksumMismatch,
    OpenShard,
    Sample,
    ShardFile,
    ShardReader,
    ShardWriter,
    checksum_of,
    npy_bytes,
    npy_load,
)

_IMAGE = re.compile(r"img(\d+)\.jpg")
_FRAME = re.compile(r"vid(\d+)\.(\d+)\.jpg")


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member as ``tarfile`` writes it (POSIX pax format): header, data, zero padding to a block."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    padding = -len(data) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data + tarfile.NUL * padding


class TarArchive(ShardFile):
    """A tar file written a sample's members at a time, ended as ``tarfile`` ends an archive."""

    def _append(self, data: bytes, checksum: int, tokens: int) -> None:
        """Append one sample's members (``data``, whole tar blocks) with its checksum and token count."""
        self._record(self._hashed.bytes, len(data), checksum, tokens)
        self._hashed.write(data)

    def _finish(self) -> None:
        """The end-of-archive blocks, then zeros to a whole tar record, as ``tarfile`` closes an archive."""
        end = self._hashed.bytes + 2 * tarfile.BLOCKSIZE
        self._hashed.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))


class TarShardWriter(TarArchive, ShardWriter):
    format = "tar"
    suffix = ".tar"

    def write(self, sample: Sample) -> None:
        members: dict[str, bytes] = {
            "json": sample.info_json,
            "input_ids.npy": npy_bytes(sample.input_ids),
            "weights.npy": npy_bytes(sample.weights),
        }
        for i, image in enumerate(sample.images):
            members[f"img{i}.jpg"] = image
        for k, frames in enumerate(sample.videos):
            for j, frame in enumerate(frames):
                members[f"vid{k}.{j:04d}.jpg"] = frame
        data = b"".join(tar_member(f"{sample.key}.{name}", members[name]) for name in sorted(members))
        self._append(data, checksum_of(data), len(sample.input_ids))


def read_range(f: Any, offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of an open file (a sample's recorded location); :class:`EOFError` if short."""
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"{size - len(data)} bytes missing at offset {offset}")
    return data


class TarShardReader(ShardReader):
    format = "tar"
    magic = (257, b"ustar")

    def open(self, f: Any) -> OpenShard:
        return _OpenTar(f)


class _OpenTar(OpenShard):
    def __init__(self, f: Any):
        self.f = f

    def read_at(self, offset: int, size: int, checksum: int | None = None) -> Sample:
        data = read_range(self.f, offset, size)
        if checksum is not None and checksum_of(data) != checksum:
            raise ChecksumMismatch(_first_key(data))
        group: dict[str, Any] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as members:
            for member in members:
                key, _, suffix = member.name.partition(".")
                group["__key__"] = key
                group[suffix] = members.extractfile(member).read()
        return _to_sample(group)


def _first_key(data: bytes) -> str | None:
    """The sample key in the first member's name, as far as it can be read (for error messages)."""
    name = data[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    return name.partition(".")[0] or None


def _to_sample(group: dict[str, Any]) -> Sample:
    info = json.loads(group["json"])
    found = {int(m.group(1)): value for name, value in group.items() if (m := _IMAGE.fullmatch(name))}
    frames: dict[int, dict[int, bytes]] = {}
    for name, value in group.items():
        if m := _FRAME.fullmatch(name):
            frames.setdefault(int(m.group(1)), {})[int(m.group(2))] = value
    return Sample(
        key=group["__key__"],
        info=info,
        input_ids=npy_load(group["input_ids.npy"]),
        weights=npy_load(group["weights.npy"]),
        images=[found[i] for i in sorted(found)],
        videos=[[frames[k][j] for j in sorted(frames[k])] for k in sorted(frames)],
    )
