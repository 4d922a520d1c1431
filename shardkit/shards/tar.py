"""WebDataset tar shards, readable by plain ``webdataset`` without shardkit.

Per sample: ``KEY.json``, ``KEY.input_ids.npy``, ``KEY.weights.npy`` and
``KEY.img0.jpg``, ``KEY.img1.jpg``, ... Members carry a fixed mtime, owner and
mode, so the same samples give byte-identical tars.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

from shardkit.shards.base import OpenShard, Sample, ShardReader, ShardWriter, npy_bytes, npy_load

_IMAGE = re.compile(r"img(\d+)\.jpg")


class TarShardWriter(ShardWriter):
    format = "tar"
    suffix = ".tar"

    def __init__(self, fs: Any, path: str):
        import webdataset

        super().__init__(fs, path)
        self._tar = webdataset.TarWriter(self._hashed, user="", group="", mode=0o644, mtime=0, encoder=False)

    def write(self, sample: Sample) -> None:
        members: dict[str, Any] = {
            "__key__": sample.key,
            "json": sample.info_json,
            "input_ids.npy": npy_bytes(sample.input_ids),
            "weights.npy": npy_bytes(sample.weights),
        }
        for i, image in enumerate(sample.images):
            members[f"img{i}.jpg"] = image
        start = self._tar.tarstream.offset
        self._tar.write(members)
        self.locations.append((start, self._tar.tarstream.offset - start))

    def _finish(self) -> None:
        self._tar.close()


class TarShardReader(ShardReader):
    format = "tar"

    def samples(self, f: Any, *, images: bool = True) -> Iterator[Sample]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        def wanted(name: str) -> bool:
            return images or not name.endswith(".jpg")

        files = ({**item, "__url__": None} for item in tar_file_iterator(f, select_files=wanted))
        for group in group_by_keys(files, lcase=False):
            yield _to_sample(group)

    def open(self, f: Any) -> OpenShard:
        return _OpenTar(f)


class _OpenTar(OpenShard):
    def __init__(self, f: Any):
        self.f = f

    def read_at(self, offset: int, size: int) -> Sample:
        import tarfile

        self.f.seek(offset)
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError(f"{size - len(data)} bytes missing at offset {offset}")
        group: dict[str, Any] = {}
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as members:
            for member in members:
                key, _, suffix = member.name.partition(".")
                group["__key__"] = key
                group[suffix] = members.extractfile(member).read()
        return _to_sample(group)


def _to_sample(group: dict[str, Any]) -> Sample:
    info = json.loads(group["json"])
    found = {int(m.group(1)): value for name, value in group.items() if (m := _IMAGE.fullmatch(name))}
    return Sample(
        key=group["__key__"],
        info=info,
        input_ids=npy_load(group["input_ids.npy"]),
        weights=npy_load(group["weights.npy"]),
        images=[found[i] for i in sorted(found)],
    )
