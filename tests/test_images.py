import base64
import http.server
import io
import json
import os
import pickle
import random
import socket
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageCms
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from shardkit.errors import ConfigError, RecordError
from shardkit.images import (
    Grid,
    ImageRoot,
    SourceImage,
    decode_image,
    encode_jpeg,
    image_label,
    smart_resize,
    to_rgb,
)
from shardkit.schema import InlineImage
from shardkit.synthetic import _png_declaring, photo_like
from tests.helpers import IMAGE_BACKENDS, conversation, image_processor_class, write_image, write_jsonl


def test_smart_resize_matches_transformers_on_many_sizes():
    rng = random.Random(0)
    sizes = [(h, w) for h in (1, 13, 27, 28, 29, 56, 100, 1000) for w in (28, 200, 999, 5000)]
    sizes += [(rng.randint(10, 6000), rng.randint(10, 6000)) for _ in range(500)]
    for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (32, 65536, 32 * 32 * 1280), (28, 200704, 401408)]:
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)


def test_grid_sizes_are_stable_under_the_processor_rule():
    rng = random.Random(1)
    for factor, lo, hi, wide in [(28, 3136, 1003520, True), (32, 65536, 1310720, True), (28, 100000, 120000, False)]:
        grid = Grid(factor, lo, hi)
        refused = 0
        for _ in range(400):
            h, w = rng.randint(5, 5000), rng.randint(5, 5000)
            if max(h, w) > 150 * min(h, w):
                continue
            for cap in (None, lo, (lo + hi) // 2):
                try:
                    sh, sw = grid.size(h, w, cap)
                except RecordError as exc:  # only a narrow band of areas can leave no grid size
                    assert not wide and exc.code == "image_aspect"
                    refused += 1
                    continue
                assert sh % factor == 0 and sw % factor == 0
                assert lo <= sh * sw <= hi
                assert smart_resize(sh, sw, factor, lo, hi) == (sh, sw)
                processor_choice = smart_resize(h, w, factor, lo, hi)
                if cap is None and lo <= processor_choice[0] * processor_choice[1] <= hi:
                    assert (sh, sw) == processor_choice  # the size the processor itself would pick
        assert refused < 200


@pytest.mark.parametrize(
    "lo, hi, message", [(10, 5, "larger than max_pixels"), (1, 100, "below one grid cell"), (0, 100, "positive")]
)
def test_bad_pixel_bounds_are_config_errors(lo, hi, message):
    with pytest.raises(ConfigError, match=message):
        Grid(28, lo, hi)


def test_plan_lowers_a_shared_cap_until_the_budget_fits():
    grid = Grid(28, 3136, 1003520)
    sizes = [(2000, 3000), (600, 800), (300, 300)]
    full = grid.plan(sizes)
    full_tokens = sum(grid.tokens(h, w) for h, w in full)
    assert full_tokens > 1500
    fitted = grid.plan(sizes, 1500)
    tokens = [grid.tokens(h, w) for h, w in fitted]
    assert sum(tokens) <= 1500
    assert sum(tokens) > 1500 * 0.8  # not lowered more than needed
    assert fitted[2] == full[2]  # the small image keeps its size: the big ones shrink first
    assert grid.plan(sizes, 5) is None  # impossible even at min_pixels


@pytest.mark.parametrize("backend", IMAGE_BACKENDS)
def test_qwen2_vl_processor_leaves_stored_images_unchanged(backend):
    processor = image_processor_class(backend)()
    grid = Grid(28, processor.size["shortest_edge"], processor.size["longest_edge"])
    rng = np.random.default_rng(0)
    for h, w in [(37, 1500), (480, 640), (2000, 1000), (29, 29), (3000, 4000)]:
        sh, sw = grid.size(h, w)
        image = Image.open(
            io.BytesIO(encode_jpeg(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), (sh, sw), 90))
        )
        out = processor(images=[image], return_tensors="np")
        assert out["image_grid_thw"].tolist() == [[1, sh // 14, sw // 14]]
        assert out["pixel_values"].shape[0] // 4 == grid.tokens(sh, sw)


@pytest.mark.parametrize(
    "mode, fmt, save",
    [
        ("RGBA", "PNG", {}),
        ("LA", "PNG", {}),
        ("P", "PNG", {"transparency": 0}),
        ("P", "GIF", {}),
        ("CMYK", "JPEG", {}),
        ("L", "JPEG", {}),
        ("I;16", "PNG", {}),
        ("1", "PNG", {}),
        ("RGB", "WEBP", {}),
    ],
)
def test_any_mode_becomes_rgb(tmp_path, mode, fmt, save):
    path = write_image(tmp_path / f"x.{fmt.lower()}", 64, 48, mode=mode, fmt=fmt, **save)
    image = decode_image(path.read_bytes(), path.name, max_pixels=10**8)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_transparency_is_composited_on_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert to_rgb(Image.open(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grey_keeps_its_range():
    array = np.full((4, 4), 65535, dtype=np.uint16)
    array[0, 0] = 32768
    source = Image.fromarray(array)
    assert source.mode == "I;16"
    image = to_rgb(source)
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert decode_image((tmp_path / "rotated.jpg").read_bytes(), "rotated.jpg", max_pixels=10**8).size == (20, 60)


def test_image_problems_are_record_errors(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "empty.jpg").write_bytes(b"")
    good = write_image(images / "good.jpg", 200, 150).read_bytes()
    (images / "cut.jpg").write_bytes(good[: len(good) // 2])
    (images / "text.jpg").write_text("hello")
    write_image(images / "big.png", 300, 200, fmt="PNG")
    write_image(images / "thin.png", 2010, 10, fmt="PNG")
    (images / "folder.jpg").mkdir()
    root = ImageRoot(tmp_path)
    cases = {
        "missing.jpg": "image_missing",
        "folder.jpg": "image_not_file",
        "empty.jpg": "image_empty",
        "cut.jpg": "image_corrupt",
        "text.jpg": "image_not_image",
        "big.png": "image_too_large",
        "thin.png": "image_aspect",
    }
    for name, code in cases.items():
        ref = f"images/{name}"
        with pytest.raises(RecordError) as info:
            decode_image(root.read(ref), ref, max_pixels=50_000)
        assert info.value.code == code, name
        assert ref in info.value.reason
        assert info.value.detail == {"image": ref}


def test_paths_that_leave_the_root_are_refused(tmp_path):
    root = tmp_path / "data"
    write_image(root / "images" / "a.jpg", 32, 32)
    write_image(tmp_path / "outside.jpg", 32, 32)
    os.symlink(tmp_path / "outside.jpg", root / "images" / "link_out.jpg")
    os.symlink(root / "images" / "a.jpg", root / "images" / "link_in.jpg")
    images = ImageRoot(root)
    target = str((root / "images" / "a.jpg").resolve())
    assert images.resolve("images/a.jpg") == target
    assert images.resolve("images/link_in.jpg") == target
    assert images.resolve(str(root / "images" / "a.jpg")) == target
    for ref, code in [
        ("../outside.jpg", "image_outside_root"),
        ("images/../../outside.jpg", "image_outside_root"),
        (str(tmp_path / "outside.jpg"), "image_outside_root"),
        ("images/link_out.jpg", "image_outside_root"),
    ]:
        with pytest.raises(RecordError) as info:
            images.read(ref)
        assert info.value.code == code, ref
    with pytest.raises(RecordError) as info:  # no network unless the user opts in
        images.read("https://example.com/a.jpg")
    assert info.value.code == "image_remote" and "--allow-remote" in info.value.reason


@pytest.mark.parametrize("mode, orientation", [("RGB", None), ("RGB", 6), ("L", None), ("CMYK", 8)])
def test_large_jpegs_decode_reduced_but_never_below_the_target(tmp_path, mode, orientation):
    image = photo_like(1600, 1200, np.random.default_rng(0)).convert(mode)
    save = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save["exif"] = exif.tobytes()
    path = tmp_path / "big.jpg"
    image.save(path, **save)
    source = SourceImage(path.read_bytes(), "big.jpg", max_pixels=10**8)
    expected = (1600, 1200) if orientation in (6, 8) else (1200, 1600)
    assert (source.height, source.width) == expected
    reduced = source.decode((expected[0] // 3, expected[1] // 3))
    assert reduced.mode == "RGB"
    assert reduced.height >= expected[0] // 3 and reduced.width >= expected[1] // 3
    assert reduced.width * reduced.height < expected[0] * expected[1] / 2  # decoded at a reduced scale
    assert (reduced.height > reduced.width) == (expected[0] > expected[1])  # still oriented
    full = SourceImage(path.read_bytes(), "big.jpg", max_pixels=10**8).decode()
    assert (full.height, full.width) == expected


def test_a_bomb_is_refused_from_its_header_without_decoding(tmp_path):
    import resource

    from shardkit.synthetic import _png_declaring

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for declared in (20_000, 60_000):  # 400 MP and 3.6 GP, in a few hundred bytes
        with pytest.raises(RecordError) as info:
            SourceImage(_png_declaring(declared, declared), "bomb.png", max_pixels=100_000_000)
        assert info.value.code == "image_too_large" and f"{declared}x{declared}" in info.value.reason
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing was decoded


def test_the_pixel_limit_can_go_above_pillows_own():
    from shardkit.synthetic import _png_declaring

    header = _png_declaring(15_000, 13_000)  # 195 MP, over Pillow's own 179 MP guard
    assert SourceImage(header, "wide.png", max_pixels=300_000_000).width == 15_000
    with pytest.raises(RecordError, match="over the limit of 100"):
        SourceImage(header, "wide.png", max_pixels=100_000_000)


# -- what is opened, and how much of it --------------------------------------------------------------


def _read_in_thread(root: ImageRoot, ref: str, seconds: float = 5.0) -> BaseException | bytes:
    """``root.read(ref)`` in a daemon thread, so that a read which hangs fails the test instead of hanging it."""
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            outcome.append(root.read(ref))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"reading {ref} hung"
    return outcome[0]


def test_only_regular_files_are_opened(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    os.mkfifo(images / "pipe.jpg")
    (images / "folder.jpg").mkdir()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(images / "socket.jpg"))
    root = ImageRoot(tmp_path)
    for name, kind in [("pipe.jpg", "FIFO"), ("folder.jpg", "folder"), ("socket.jpg", "socket")]:
        error = _read_in_thread(root, f"images/{name}")
        assert isinstance(error, RecordError), name
        assert error.code == "image_not_file" and f"images/{name}" in error.reason and kind in error.reason
    server.close()


def test_a_device_inside_the_root_is_not_read():
    error = _read_in_thread(ImageRoot("/", max_image_bytes=1000), "dev/zero")  # a root that holds devices
    assert isinstance(error, RecordError) and error.code == "image_not_file" and "device" in error.reason


def test_image_files_over_the_byte_cap_are_refused_before_reading(tmp_path):
    import resource

    with open(tmp_path / "huge.png", "wb") as f:
        f.write(_png_declaring(100, 100))
        f.truncate(8 * 1024**3)  # 8 GB, sparse: no disk used
    write_image(tmp_path / "small.jpg", 64, 64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = _read_in_thread(ImageRoot(tmp_path), "huge.png")
    assert isinstance(error, RecordError) and error.code == "image_too_large"
    assert "huge.png" in error.reason and "--max-image-bytes" in error.reason and "8589934592" in error.reason
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB: it was not read
    size = (tmp_path / "small.jpg").stat().st_size
    assert len(ImageRoot(tmp_path, max_image_bytes=size).read("small.jpg")) == size
    with pytest.raises(RecordError, match="over --max-image-bytes") as info:
        ImageRoot(tmp_path, max_image_bytes=size - 1).read("small.jpg")
    assert info.value.code == "image_too_large"


def test_inline_images_over_the_byte_cap_are_refused_before_decoding(tmp_path):
    jpeg = write_image(tmp_path / "a.jpg", 64, 64).read_bytes()
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    assert ImageRoot(tmp_path, max_image_bytes=len(jpeg)).read(uri) == jpeg
    with pytest.raises(RecordError, match="over --max-image-bytes") as info:
        ImageRoot(tmp_path, max_image_bytes=len(jpeg) - 1).read(uri)
    assert info.value.code == "image_too_large"


def test_inline_image_bytes_are_read_as_they_are_and_checked(tmp_path):
    jpeg = write_image(tmp_path / "a.jpg", 64, 64).read_bytes()
    inline = InlineImage("inline image 1 of row 7 (a.jpg)", jpeg)
    root = ImageRoot(tmp_path, max_image_bytes=len(jpeg))
    assert root.read(inline) is jpeg and not root.names_file(inline)
    assert root.names_file("a.jpg") and not root.names_file("data:,") and not root.names_file("https://x/a.jpg")
    assert image_label(inline) == "inline image 1 of row 7 (a.jpg)" and type(image_label(inline)) is str
    copy = pickle.loads(pickle.dumps(inline))  # records and their errors cross process boundaries
    assert copy == inline and copy.data == jpeg
    with pytest.raises(RecordError, match=r"over --max-image-bytes .*: inline image 1 of row 7") as info:
        ImageRoot(tmp_path, max_image_bytes=len(jpeg) - 1).read(inline)
    assert info.value.code == "image_too_large" and info.value.detail == {"image": "inline image 1 of row 7 (a.jpg)"}
    with pytest.raises(RecordError, match="inline image 2 of row 7 is empty") as info:
        root.read(InlineImage("inline image 2 of row 7", b""))
    assert info.value.code == "image_empty"
    with pytest.raises(RecordError, match="not an image .*: inline image 3 of row 7") as info:
        SourceImage(b"not an image", InlineImage("inline image 3 of row 7", b"not an image"), max_pixels=10**6)
    assert type(info.value.detail["image"]) is str  # the label, not the bytes again


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("images/a\0.jpg", "nul byte"),
        ("images/loop.jpg", "symbolic link loop"),
        ("images/" + "x" * 300 + ".jpg", "name too long"),
        ("images/" + "x/" * 3000 + "a.jpg", "name too long"),
    ],
)
def test_unusable_paths_are_record_errors_naming_the_path(tmp_path, ref, fragment):
    (tmp_path / "images").mkdir()
    os.symlink("loop.jpg", tmp_path / "images" / "loop.jpg")
    with pytest.raises(RecordError) as info:
        ImageRoot(tmp_path).read(ref)
    assert info.value.code in ("image_path_invalid", "image_unreadable")
    assert fragment in info.value.reason.lower() and repr(ref)[1:40].replace("\\\\", "\\") in info.value.reason
    assert info.value.detail == {"image": ref}


def test_leaving_the_root_names_the_link_and_the_option(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    write_image(tmp_path / "shared" / "a.jpg", 32, 32)
    os.symlink(tmp_path / "shared", root / "images" / "shared")
    with pytest.raises(RecordError) as info:
        ImageRoot(root).read("images/shared/a.jpg")
    reason = info.value.reason
    assert info.value.code == "image_outside_root"
    assert "symbolic link 'images/shared'" in reason and str(tmp_path / "shared") in reason and "--image-root" in reason
    with pytest.raises(RecordError, match=r"'\.\./shared/a\.jpg' leaves the dataset root .*--image-root"):
        ImageRoot(root).read("../shared/a.jpg")
    assert len(ImageRoot(tmp_path).read("data/images/shared/a.jpg")) > 0  # a wider root holds it


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF"])
def test_the_pixel_limit_is_applied_per_open_not_by_pillows_global(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a process that keeps a tight guard of its own
    data = write_image(tmp_path / f"a.{fmt.lower()}", 100, 80, fmt=fmt).read_bytes()
    assert decode_image(data, "a", max_pixels=10_000).size == (100, 80)  # 8000 px: over Pillow's, under ours
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(RecordError) as info:
        decode_image(data, "a", max_pixels=7_999)
    assert info.value.code == "image_too_large" and "100x80" in info.value.reason
    with pytest.raises(Image.DecompressionBombError):  # the guard still holds for everything else
        Image.open(io.BytesIO(data))


def test_max_image_bytes_reaches_validate_and_build(tmp_path, capsys):
    from shardkit.cli import main

    size = write_image(tmp_path / "images" / "a.jpg", 64, 64).stat().st_size
    data = write_jsonl(tmp_path / "in.jsonl", [conversation("images/a.jpg")])
    assert main(["validate", str(data), "--max-image-bytes", str(size)]) == 0
    assert main(["validate", str(data), "--max-image-bytes", str(size - 1)]) == 1
    assert f"over --max-image-bytes {size - 1}" in capsys.readouterr().out
    out = tmp_path / "out"
    # the only record is rejected: a build with no samples exits 1
    assert main(["build", str(data), "--out", str(out), "--max-image-bytes", str(size - 1), "--no-progress"]) == 1
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert reject["code"] == "image_too_large" and "images/a.jpg" in reject["reason"]


@pytest.fixture
def drip_server():
    """A real HTTP server on 127.0.0.1 that promises 30 bytes and sends one a second."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "30")
            self.end_headers()
            try:
                for _ in range(30):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(1)
            except OSError:  # the client gave up
                pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/drip.jpg"
    server.shutdown()
    server.server_close()


def test_a_dripping_server_is_cut_off_at_the_total_deadline(tmp_path, drip_server):
    root = ImageRoot(tmp_path, allow_remote=True, timeout=1.5, retries=3)
    start = time.monotonic()
    with pytest.raises(RecordError) as info:
        root.read(drip_server)
    elapsed = time.monotonic() - start
    assert 1.4 < elapsed < 2.5, elapsed
    assert info.value.code == "image_timeout"
    assert "1.5 s" in info.value.reason and "--remote-timeout" in info.value.reason and drip_server in info.value.reason


# -- colour ------------------------------------------------------------------------------------------

ADOBE_RGB = [(0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457)]  # D50
SRGB_D50 = [(0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)]


def icc_profile(colorants, gamma: float, description: str) -> bytes:
    """A real ICC v2 matrix/TRC display profile (the kind Adobe RGB and Display P3 are), written field by field."""

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    text = description.encode() + b"\0"
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))
    tags = [
        (b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + bytes(12 + 67)),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(*colorants[0])),
        (b"gXYZ", xyz(*colorants[1])),
        (b"bXYZ", xyz(*colorants[2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0none\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table = body = b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = struct.pack(">I4xI", offset + len(body), 0x02100000) + b"mntrRGB XYZ " + bytes(12) + b"acsp" + bytes(28)
    header += s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48)
    return header + struct.pack(">I", len(tags)) + table + body


def adobe_to_srgb(rgb: tuple[int, int, int]) -> np.ndarray:
    """The colour math done independently: Adobe RGB -> linear -> XYZ (D50) -> linear sRGB -> sRGB."""
    linear = (np.array(rgb) / 255) ** (563 / 256)
    srgb = np.clip(np.linalg.solve(np.array(SRGB_D50).T, np.array(ADOBE_RGB).T @ linear), 0, 1)
    return 255 * np.where(srgb <= 0.0031308, 12.92 * srgb, 1.055 * srgb ** (1 / 2.4) - 0.055)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_an_icc_profile_is_converted_to_srgb(tmp_path, fmt):
    icc = icc_profile(ADOBE_RGB, 563 / 256, "Adobe RGB (1998) compatible")
    colours = [(200, 50, 50), (40, 160, 60), (128, 128, 128)]
    source = Image.new("RGB", (48, 16))
    for i, colour in enumerate(colours):
        source.paste(colour, (16 * i, 0, 16 * i + 16, 16))
    path = tmp_path / f"adobe.{fmt.lower()}"
    source.save(path, format=fmt, icc_profile=icc, **({"quality": 100} if fmt == "JPEG" else {}))
    image = decode_image(path.read_bytes(), path.name, max_pixels=10**8)
    tolerance = 3 if fmt == "JPEG" else 1
    for i, colour in enumerate(colours):
        got = np.array(image.getpixel((16 * i + 8, 8)))
        assert np.abs(got - adobe_to_srgb(colour)).max() <= tolerance, (colour, got)
    naive = np.array(image.getpixel((8, 8))) - np.array(colours[0])
    assert naive[0] > 25  # the saturated red is redder in sRGB numbers than the profile-less reading says


def test_transparency_survives_the_profile_and_srgb_profiles_change_nothing(tmp_path):
    icc = icc_profile(ADOBE_RGB, 563 / 256, "Adobe RGB (1998) compatible")
    source = Image.new("RGBA", (4, 1), (200, 50, 50, 255))
    source.putpixel((0, 0), (200, 50, 50, 0))
    source.save(tmp_path / "a.png", icc_profile=icc)
    image = decode_image((tmp_path / "a.png").read_bytes(), "a.png", max_pixels=10**8)
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert np.abs(np.array(image.getpixel((1, 0))) - adobe_to_srgb((200, 50, 50))).max() <= 1
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 1), (200, 50, 50)).save(tmp_path / "s.png", icc_profile=srgb)
    assert decode_image((tmp_path / "s.png").read_bytes(), "s.png", max_pixels=10**8).getpixel((0, 0)) == (200, 50, 50)


def test_a_profile_that_cannot_be_applied_is_a_reject(tmp_path):
    icc = icc_profile(ADOBE_RGB, 563 / 256, "Adobe RGB (1998) compatible")
    Image.new("L", (4, 4), 100).save(tmp_path / "grey.png", icc_profile=icc)  # an RGB profile on grey pixels
    Image.new("RGB", (4, 4), 100).save(tmp_path / "broken.png", icc_profile=icc[:100])
    for name, fragment in [("grey.png", "for RGB data, its pixels are L"), ("broken.png", "broken.png")]:
        with pytest.raises(RecordError) as info:
            decode_image((tmp_path / name).read_bytes(), name, max_pixels=10**8)
        assert info.value.code == "image_colour" and fragment in info.value.reason and "sRGB" in info.value.reason


def _grey_tiff(tmp_path, array: np.ndarray, mode: str) -> Image.Image:
    Image.fromarray(array).save(tmp_path / "a.tiff")
    opened = Image.open(tmp_path / "a.tiff")
    assert opened.mode == mode  # a real TIFF of that sample type
    return decode_image((tmp_path / "a.tiff").read_bytes(), "a.tiff", max_pixels=10**8)


@pytest.mark.parametrize(
    "values, mode, expected",
    [
        ([0.0, 0.25, 0.5, 1.0], "F", [0, 64, 128, 255]),  # floats within 0-1: times 255
        ([0.0, 250.0, 500.0, 1000.0], "F", [0, 64, 128, 255]),  # other floats: minimum to maximum
        ([-1.0, 0.0, 1.0, float("nan")], "F", [0, 128, 255, 128]),  # NaN counts as 0
        ([0, 16448, 32896, 65535], "I;16", [0, 64, 128, 255]),  # unsigned 16-bit: times 255/65535
        ([0, 64, 128, 255], "I", [0, 64, 128, 255]),  # 32-bit integers within 0-255: as they are
        ([0, 16448, 32896, 65535], "I", [0, 64, 128, 255]),  # within 0-65535: as 16-bit
        ([-1000, 0, 1000, 3000], "I", [0, 64, 128, 255]),  # otherwise minimum to maximum
    ],
)
def test_wide_samples_are_scaled_by_the_documented_rule(tmp_path, values, mode, expected):
    dtype = {"F": np.float32, "I;16": np.uint16, "I": np.int32}[mode]
    image = _grey_tiff(tmp_path, np.array([values], dtype=dtype), mode)
    assert [image.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in expected]


def test_a_remote_filesystem_root_checks_type_and_size_before_reading():
    import fsspec

    fs = fsspec.filesystem("memory")
    jpeg = photo_like(32, 32, np.random.default_rng(0))
    buffer = io.BytesIO()
    jpeg.save(buffer, format="JPEG")
    fs.pipe("/images-root/a.jpg", buffer.getvalue())
    fs.pipe("/images-root/folder/b.jpg", buffer.getvalue())
    try:
        root = ImageRoot("memory://images-root", max_image_bytes=len(buffer.getvalue()))
        assert root.read("a.jpg") == buffer.getvalue()
        cases = [("folder", "image_not_file"), ("missing.jpg", "image_missing"), ("../x.jpg", "image_outside_root")]
        for ref, code in cases:
            with pytest.raises(RecordError) as info:
                root.read(ref)
            assert info.value.code == code and ref in info.value.reason
        with pytest.raises(RecordError, match="over --max-image-bytes") as info:
            ImageRoot("memory://images-root", max_image_bytes=100).read("a.jpg")
        assert info.value.code == "image_too_large"
    finally:
        fs.rm("/images-root", recursive=True)
