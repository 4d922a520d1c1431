"""``shardkit show``: the page in a real headless Chromium, the terminal mode, sampling, escaping, rejects."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from shardkit.build import build
from shardkit.cli import main
from shardkit.config import BuildConfig
from shardkit.errors import ShardCorruptError
from shardkit.load.source import BuildSource
from shardkit.shards.base import SampleInfo
from shardkit.show import make_page, show_text, write_page
from shardkit.synthetic import make_clinical_dataset
from shardkit.tokenizer import _load, bundled_tokenizer_dir
from tests.helpers import write_image

HOSTILE_TEXT = "<img src=x onerror=\"console.error('escaped badly')\"> & </pre>"
HOSTILE_META = "</script><script>console.error('escaped badly')</script>"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def shown_build(tmp_path_factory, make_build):
    """A build of clinical cases, one record with hostile text and meta, and rejects (one with an openable image)."""
    root = tmp_path_factory.mktemp("show-data")
    data = make_clinical_dataset(root, cases=8, seed=5, megapixels=(0.01, 0.05), bad_lines=True)
    write_image(root / "images" / "very_wide.jpg", 2010, 10)  # opens, but over Qwen's 200:1: rejected
    hostile = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "images/case_01_01.jpg"},
                    {"type": "text", "text": HOSTILE_TEXT},
                ],
            },
            {"role": "assistant", "content": "Ünïcode ✓ 世界 " + HOSTILE_TEXT},
        ],
        "meta": {"diagnosis": HOSTILE_META},
    }
    wide = {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/very_wide.jpg"}]},
                         {"role": "assistant", "content": "wide"}]}  # fmt: skip
    with data.jsonl.open("a") as f:
        f.write(json.dumps(hostile) + "\n" + json.dumps(wide) + "\n")
    return make_build(data.jsonl, samples_per_shard=4), data


PWN = "document.title='pwned'"


@pytest.fixture(scope="module")
def forged_build(tmp_path_factory):
    """A build whose samples' JSON hold markup where numbers belong, its checksums valid (the build wrote them)."""
    from shardkit.convert import Converter

    convert = Converter.__call__

    def forged(self, raw, ledger=None):
        sample = convert(self, raw, ledger)
        sample.info["line"] = f"<script>{PWN}</script>"
        sample.info["images"][0]["width"] = f'1" onerror="{PWN}"'
        sample.info["images"][0]["grid_thw"] = [1, f'<img src=x onerror="{PWN}">', 2]
        del sample.__dict__["info_json"]  # the JSON written (and checksummed) is the forged one
        return sample

    root = tmp_path_factory.mktemp("forged")
    data = make_clinical_dataset(root / "data", cases=3, seed=5, megapixels=(0.01, 0.02), images_per_case=(1, 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Converter, "__call__", forged)
        build(BuildConfig.create(input=str(data.jsonl), out=str(root / "build")), progress=False, workers=1)
    return str(root / "build")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class Chromium:
    """A headless Chromium driven over the DevTools protocol (an aiohttp websocket), on 127.0.0.1."""

    def __init__(self, executable: str, profile: Path):
        self.profile = profile
        command = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                   "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1280,900",
                   f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        self.log = (profile.parent / "chromium.log").open("wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def port(self) -> int:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if port_file.exists() and (first := port_file.read_text().split("\n")[0]).isdigit():
                return int(first)
            assert self.process.poll() is None, "chromium exited at start; see chromium.log"
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port in 60 s")

    async def inspect(self, url: str, expression: str, *, before: str = "") -> tuple[object, list[str], bytes]:
        """Load ``url``; the value of ``expression`` (after ``before`` ran), the console errors, a screenshot."""
        import aiohttp

        errors: list[str] = []
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port()}/json/list") as response:
                target = next(t for t in await response.json() if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                calls = iter(range(1, 1_000_000))

                async def call(method: str, until: str | None = None, **params) -> dict:
                    number = next(calls)
                    await ws.send_json({"id": number, "method": method, "params": params})
                    answered, result = False, {}
                    while not answered or until:
                        message = json.loads((await ws.receive()).data)
                        if message.get("id") == number:
                            assert "error" not in message, message
                            answered, result = True, message["result"]
                        elif message.get("method") == until:
                            until = None
                        elif message.get("method") == "Runtime.exceptionThrown":
                            errors.append(json.dumps(message["params"]["exceptionDetails"])[:500])
                        elif message.get("method") == "Runtime.consoleAPICalled":
                            if message["params"]["type"] in ("error", "assert", "warning"):
                                errors.append(json.dumps(message["params"]["args"])[:500])
                        elif message.get("method") == "Log.entryAdded":
                            if message["params"]["entry"]["level"] in ("error", "warning"):
                                errors.append(message["params"]["entry"]["text"][:500])
                    return result

                for domain in ("Runtime", "Log", "Page"):
                    await call(f"{domain}.enable")
                await call(
                    "Emulation.setDeviceMetricsOverride", width=1280, height=1100, deviceScaleFactor=1, mobile=False
                )
                await call("Page.navigate", until="Page.loadEventFired", url=url)
                if before:
                    await call("Runtime.evaluate", expression=before)
                value = await call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
                assert "exceptionDetails" not in value, value
                shot = await call("Page.captureScreenshot", format="png")
                await call("Runtime.evaluate", expression="0")  # collect any late console message
        return value["result"]["value"], errors, base64.b64decode(shot["data"])

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def chromium(tmp_path):
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium not found (bin/test installs Debian's chromium package when apt-get is available)")
    pytest.importorskip("aiohttp")
    browser = Chromium(executable, tmp_path / "profile")
    yield browser
    browser.close()


PAGE_FACTS = """(async () => {
  await Promise.all(Array.from(document.images).map(image => image.decode().catch(() => null)));
  const cards = Array.from(document.querySelectorAll('.card')).map(card => ({
    key: card.dataset.key,
    highlighted: card.querySelectorAll('.toks span.w').length,
    chips: Array.from(card.querySelectorAll('.chip')).map(chip => ({
      grid: chip.dataset.grid.split(',').map(Number), tokens: Number(chip.dataset.tokens),
      trained: Number(chip.dataset.trained), text: chip.textContent})),
    images: Array.from(card.querySelectorAll('.images img')).map(i => [i.naturalWidth, i.naturalHeight]),
    visible: !card.hidden,
  }));
  const images = Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth}));
  const thumbnails = document.querySelectorAll('table.rejects img').length;
  return {cards, images, thumbnails, shown: document.getElementById('shown').textContent,
          rejectRows: document.querySelectorAll('table.rejects tr').length - 1,
          scripts: document.scripts.length};
})()"""


@pytest.mark.slow
def test_page_in_headless_chromium(chromium, shown_build, tmp_path):
    build_dir, data = shown_build
    page = tmp_path / "show.html"
    code = main(["-q", "show", build_dir, "--out", str(page), "--rejects", "--image-root", str(data.root)])
    assert code == 0
    facts, errors, screenshot = asyncio.run(chromium.inspect(page.as_uri(), PAGE_FACTS))

    assert errors == []  # no console errors, no failed load, no script the sample text smuggled in
    assert facts["scripts"] == 1
    source = BuildSource(build_dir)
    samples = {s.key: s for s in (source.get(i) for i in range(len(source)))}
    assert len(facts["cards"]) == len(samples) > 0
    merge = source.manifest.config.family.merge_size
    for card in facts["cards"]:
        sample = samples[card["key"]]
        trained = card["highlighted"] + sum(chip["trained"] for chip in card["chips"])
        assert trained == sample.info["num_trained_tokens"] == np.count_nonzero(sample.weights > 0) > 0
        images = sample.info["images"]
        assert [chip["grid"] for chip in card["chips"]] == [image["grid_thw"] for image in images]
        for number, (chip, image) in enumerate(zip(card["chips"], images, strict=True), 1):
            assert chip["tokens"] == np.prod(image["grid_thw"]) // merge**2
            assert chip["tokens"] == np.count_nonzero(
                sample.input_ids[image["token_start"] : image["token_start"] + chip["tokens"]] == 151655
            )
            assert chip["text"] == f"image {number} · {image['width']}×{image['height']} · {chip['tokens']} tokens"
        assert card["images"] == [[image["width"], image["height"]] for image in images]
    assert all(image["complete"] and image["width"] > 0 for image in facts["images"])
    assert facts["shown"] == f"{len(samples)} of {len(samples)} samples shown"
    assert facts["rejectRows"] == source.manifest.num_rejected == len(data.bad_lines) + 1
    assert facts["thumbnails"] == 1  # the very wide image; missing, broken and outside-root ones have none

    image = Image.open(io.BytesIO(screenshot))
    assert image.size[0] >= 800 and len(image.convert("RGB").getcolors(1 << 24)) > 50  # not blank
    (tmp_path / "show.png").write_bytes(screenshot)
    if target := os.environ.get("SHARDKIT_SHOW_SCREENSHOT"):  # how docs/show.png is made
        image.convert("RGB").quantize(64).save(target, optimize=True)


@pytest.mark.slow
def test_filter_box_in_chromium(chromium, shown_build, tmp_path):
    build_dir, _ = shown_build
    page = tmp_path / "show.html"
    write_page(build_dir, str(page), samples=50)
    source = BuildSource(build_dir)
    samples = [source.get(i) for i in range(len(source))]
    diagnosis = samples[0].info["meta"]["diagnosis"]
    expected = sorted(s.key for s in samples if s.info["meta"].get("diagnosis") == diagnosis)
    typed = f"box.value = {json.dumps(diagnosis.upper())}; box.dispatchEvent(new Event('input'));"
    facts, errors, _ = asyncio.run(chromium.inspect(page.as_uri(), PAGE_FACTS, before=typed))
    assert errors == []
    assert sorted(card["key"] for card in facts["cards"] if card["visible"]) == expected
    assert facts["shown"] == f"{len(expected)} of {len(samples)} samples shown"


def test_the_pages_policy_runs_its_own_script_and_no_other(chromium, builds, tmp_path):
    page = make_page(builds["tar"], samples=3).html
    injected = f'<script>{PWN}</script><img src=x onerror="{PWN}"><p onclick="{PWN}" id=p>x</p>'
    path = tmp_path / "show.html"
    path.write_text(page.replace('<main id="cards">', '<main id="cards">' + injected))  # markup escaping missed
    expression = "document.getElementById('p').click(), {title: document.title, shown: shown.textContent}"
    facts, errors, _ = asyncio.run(chromium.inspect(path.as_uri(), expression))
    assert facts == {"title": "shardkit show", "shown": "3 of 3 samples shown"}  # the page's own script ran
    assert errors and all("Content Security Policy" in error for error in errors)  # only the refusals


def test_a_sample_with_markup_where_numbers_belong_is_refused(forged_build, builds, tmp_path, capsys):
    assert main(["verify", forged_build]) == 0  # every checksum is valid
    capsys.readouterr()
    page = tmp_path / "show.html"
    for command in (["--out", str(page)], ["--text"]):
        assert main(["show", forged_build, *command]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1
        assert "shard-000000-000.tar: sample 0 (key '0000000001') is not valid: line: Input should be a valid " in (
            captured.err
        )
    assert not page.exists()
    with pytest.raises(ShardCorruptError, match=r"sample 0 .* line: Input should be a valid integer"):
        BuildSource(forged_build).get(0)  # every reader of a build gets typed fields, or this error
    info = BuildSource(builds["tar"]).get(0).info
    for field, value in (("width", "1"), ("grid_thw", [1, "2", 2]), ("num_tokens", 4.0), ("height", True)):
        with pytest.raises(ValidationError, match=f"images.0.{field}"):
            SampleInfo.model_validate({**info, "images": [{**info["images"][0], field: value}]})


def test_manifest_fields_are_typed_and_escaped(builds, tmp_path, capsys):
    folder = shutil.copytree(builds["tar"], tmp_path / "build")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["config"] |= {"train_on": HOSTILE_META, HOSTILE_TEXT: HOSTILE_META}
    manifest["rejects_by_code"] = {HOSTILE_META: 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    html = make_page(str(folder), samples=2).html
    assert html.count("<script") == 1 and "<img src=x" not in html
    assert "&lt;/script&gt;&lt;script&gt;console.error(&#x27;escaped badly&#x27;)" in html
    manifest["num_images"] = f"<script>{PWN}</script>"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["show", str(folder), "--out", str(tmp_path / "x.html")]) == 2
    assert "manifest.json is not a valid shardkit manifest: Input should be a valid integer" in capsys.readouterr().err


def test_page_escapes_sample_text_and_is_self_contained(shown_build):
    build_dir, _ = shown_build
    page = make_page(build_dir, samples=100, rejects=True)
    html = page.html
    assert page.samples == BuildSource(build_dir).manifest.num_samples and page.rejects > 0
    text = re.sub(r"</?span[^>]*>", "", html)  # the tokens' text, joined
    assert "<img src=x" not in html and "&lt;img src=x onerror=&quot;console.error(" in text
    assert html.count("<script>") == 1 and "&lt;/script&gt;&lt;script&gt;" in html
    assert "Ünïcode ✓ 世界" in text  # multi-byte characters decoded whole, across token boundaries
    assert "http://" not in html and "https://" not in html
    assert "pass --image-root" in html  # the manifest does not record the input's folder


def test_sampling_is_deterministic_and_tar_equals_parquet(builds):
    tar = make_page(builds["tar"], samples=10, seed=7).html
    again = make_page(builds["tar"], samples=10, seed=7).html
    other = make_page(builds["tar"], samples=10, seed=8).html
    parquet = make_page(builds["parquet"], samples=10, seed=7)
    assert parquet.samples == 10 and tar == again and tar != other
    parquet = parquet.html
    cards = tar.index('<main id="cards">')
    assert tar[cards:] == parquet[parquet.index('<main id="cards">') :]  # same samples, same rendering


def test_text_mode_marks_trained_tokens(builds, capsys):
    source = BuildSource(builds["parquet"])
    sample = source.get(3)
    assert main(["show", builds["parquet"], "--key", sample.key, "--text"]) == 0
    out = capsys.readouterr().out  # not a TTY: plain markers
    assert "\x1b[" not in out and out.startswith(f"== {sample.key} (source line {sample.info['line']})")
    marked = out.split("[[", 1)[1].split("]]", 1)[0]
    answer = sample.info["messages"][-1]["content"][0]["text"]
    assert marked == answer + "<|im_end|>"  # exactly the last assistant turn and its end token
    assert "<image 1 · " in out and "<|im_start|>user" in out
    colored = show_text(builds["parquet"], keys=[sample.key], color=True)
    assert "\x1b[1;30;43m" + answer in colored and "[[" not in colored


HIDDEN_ANSWER = "Diagnosis: malignant\rDiagnosis: benign"
HIDING_QUESTION = "Look.\x1b[1A\x1b[2K\x1b]52;c;cHduZWQ=\x07\u202eevil"  # up a line, erase it; clipboard; RTL


@pytest.fixture(scope="module")
def control_build(tmp_path_factory, make_build):
    """A build of one record whose text holds a carriage return, escape sequences and a right-to-left override."""
    root = tmp_path_factory.mktemp("controls")
    write_image(root / "a.jpg", 64, 64)
    record = {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.jpg"},
                                                        {"type": "text", "text": HIDING_QUESTION}]},
                           {"role": "assistant", "content": HIDDEN_ANSWER}]}  # fmt: skip
    (root / "data.jsonl").write_text(json.dumps(record) + "\n")
    return make_build(root / "data.jsonl")


def test_text_mode_shows_control_characters_in_a_real_terminal(control_build, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux not found")
    repo = Path(__file__).resolve().parents[1]
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]
    show = shlex.join([sys.executable, "-m", "shardkit.cli", "show", control_build, "--text"])
    command = f"cd {shlex.quote(str(repo))} && {show}; echo END; sleep 60"
    subprocess.run([*tmux, "new-session", "-d", "-x", "160", "-y", "40", command], check=True)
    try:
        deadline, screen = time.monotonic() + 120, ""
        while "END" not in screen and time.monotonic() < deadline:
            time.sleep(0.5)
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout
        buffers = subprocess.run([*tmux, "list-buffers"], capture_output=True, text=True).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    assert "END" in screen, screen
    assert "== 0000000001 (source line 1)" in screen  # not erased by the text's escape sequences
    assert "Diagnosis: malignant␍Diagnosis: benign" in screen  # what is trained is what is seen
    assert "Look.␛[1A␛[2K␛]52;c;cHduZWQ=␇\\u202eevil" in screen
    assert buffers == ""  # nothing was written to the clipboard


def test_page_shows_control_characters(control_build):
    html = make_page(control_build).html
    text = re.sub(r"</?span[^>]*>", "", html)
    assert "Diagnosis: malignant␍Diagnosis: benign" in text and "Look.␛[1A␛[2K␛]52;c;cHduZWQ=␇\\u202eevil" in text
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", html)


def test_unknown_key_and_missing_build_are_one_line_errors(builds, tmp_path, capsys):
    assert main(["show", builds["tar"], "--key", "nope", "--out", str(tmp_path / "x.html")]) == 2
    assert "no sample with key nope" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()
    assert main(["show", str(tmp_path / "absent"), "--out", str(tmp_path / "x.html")]) == 2
    assert "not a complete shardkit build" in capsys.readouterr().err
    other = shutil.copytree(builds["tar"], tmp_path / "other-tokenizer")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["tokenizer_fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["show", str(other), "--out", str(tmp_path / "x.html")]) == 2
    assert "not the one the build used" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def test_an_out_that_is_a_folder_is_a_one_line_error_leaving_nothing(builds, tmp_path, capsys):
    (tmp_path / "pages").mkdir()
    assert main(["show", builds["tar"], "--out", str(tmp_path / "pages"), "--samples", "2"]) == 2
    assert capsys.readouterr().err == f"shardkit: error: Is a directory: {tmp_path / 'pages'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pages"]  # no pages.partial left behind


def test_show_loads_the_builds_hub_tokenizer_from_this_machine_only(builds, tmp_path, monkeypatch, capsys):
    import socket
    import threading

    import huggingface_hub.constants

    hub = socket.create_server(("127.0.0.1", 0))  # a real server in the hub's place, counting who calls
    calls = []
    threading.Thread(target=lambda: calls.append(hub.accept()), daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    other = shutil.copytree(builds["tar"], tmp_path / "hub-tokenizer")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["config"]["tokenizer"] = "Qwen/Qwen2-VL-2B-Instruct"
    (other / "manifest.json").write_text(json.dumps(manifest))
    for mode in (["--out", str(tmp_path / "x.html")], ["--text"]):
        assert main(["show", str(other), *mode]) == 2
        assert capsys.readouterr().err == (
            "shardkit: error: tokenizer 'Qwen/Qwen2-VL-2B-Instruct' is not in the local Hugging Face cache, and "
            "nothing is downloaded here: fetch it first (huggingface-cli download Qwen/Qwen2-VL-2B-Instruct)\n"
        )
    cache = tmp_path / "hub-cache"  # the Hugging Face cache's layout, holding the build's tokenizer
    snapshot = cache / "models--Qwen--Qwen2-VL-2B-Instruct" / "snapshots" / "0123abc"
    shutil.copytree(bundled_tokenizer_dir(), snapshot)
    (cache / "models--Qwen--Qwen2-VL-2B-Instruct" / "refs").mkdir()
    (cache / "models--Qwen--Qwen2-VL-2B-Instruct" / "refs" / "main").write_text("0123abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    try:
        assert main(["show", str(other), "--text", "--samples", "1"]) == 0
    finally:
        _load.cache_clear()
    assert "<|im_start|>user" in capsys.readouterr().out
    time.sleep(0.5)
    hub.close()
    assert calls == []  # the hub was never asked


@pytest.mark.slow
def test_cli_writes_page_and_reports(builds, tmp_path):
    out = tmp_path / "page.html"
    command = [sys.executable, "-m", "shardkit.cli", "show", builds["tar"], "--out", str(out), "--samples", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"3 samples -> {out}" in result.stdout
    assert out.read_text().count('<section class="card"') == 3


def test_page_of_an_object_store_build(s3, builds):
    for path in Path(builds["parquet"]).iterdir():
        s3.put_file(str(path), f"bucket/build/{path.name}")
    assert main(["-q", "show", "s3://bucket/build", "--out", "s3://bucket/show.html", "--samples", "5"]) == 0
    remote = s3.cat_file("bucket/show.html").decode()
    local = make_page(builds["parquet"], samples=5).html
    assert remote.count('<section class="card"') == 5
    assert remote[remote.index('<main id="cards">') :] == local[local.index('<main id="cards">') :]


def test_tokens_decode_to_the_text_and_turns_keep_every_token(qwen3_build, tokenizer):
    from shardkit.show.data import build_decoder
    from shardkit.show.tokens import ImageSpan

    source = BuildSource(qwen3_build)
    decoder = build_decoder(source.manifest)
    for sample_id in range(0, len(source), 7):
        sample = source.get(sample_id)
        ids = [int(i) for i in sample.input_ids]
        assert "".join(decoder.texts(sample.input_ids)) == tokenizer.decode(ids, skip_special_tokens=False)
        turns = decoder.turns(sample)
        assert [t.role for t in turns][-2:] == ["user", "assistant"]
        items = [item for turn in turns for item in turn.items]
        assert sum(i.num_tokens if isinstance(i, ImageSpan) else 1 for i in items) == len(ids)
        weighted = [i.weight for i in items if not isinstance(i, ImageSpan) and i.weight > 0]
        assert len(weighted) == sample.info["num_trained_tokens"]


def test_truncated_and_fitted_samples_are_marked(small_dataset, tmp_path):
    out = tmp_path / "build"
    config = BuildConfig.create(input=str(small_dataset.jsonl), out=str(out), max_length=100, overlength="truncate")
    build(config, progress=False)
    source = BuildSource(str(out))
    truncated = [s for s in (source.get(i) for i in range(len(source))) if s.info["truncated_tokens"]]
    assert truncated
    html = make_page(str(out), keys=[truncated[0].key]).html
    assert f"truncated: {truncated[0].info['truncated_tokens']} tokens cut" in html
    assert html.count('class="w') == truncated[0].info["num_trained_tokens"]
