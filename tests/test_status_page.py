"""The status page in a real browser: headless Chromium loads a running cluster's page.

Three `mirror run` nodes, a real registry, pulls through two nodes and a pin (harness
status_demo.py); Debian's `chromium` loads node 1's page from its metrics address, runs its
script (the page fetches `mirror/v1/status` and renders it), and the test reads the rendered
DOM: the peers, the images held, pulls from a peer and from upstream, the pin. A screenshot
is taken as a laptop screen shows it and checked to be a real image; `scripts/status-screenshot`
writes the one docs/ shows. Then the measure form is filled in and sent in the browser (over
the DevTools protocol) and its table read: every step of a pull served by a peer.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from harness.chromium import DevToolsPage, dump_dom, png_size, screenshot
from harness.images import TestImages
from harness.mirror_node import MirrorNode
from harness.registry import Registry
from harness.status_demo import measure_script, start_status_demo


class _Texts(HTMLParser):
    """The text inside each element that has an id, nested elements' text included."""

    VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, list[str]] = {}
        self._open: list[str | None] = []  # the id of each open element (None: none)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            return
        element_id = dict(attrs).get("id")
        if element_id:
            self.texts[element_id] = []
        self._open.append(element_id)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            if element_id:
                self.texts[element_id].append(data)


def sections(dom: str) -> dict[str, str]:
    """Element id -> its rendered text, words separated by single spaces."""
    parser = _Texts()
    parser.feed(dom)
    return {key: " ".join(" ".join(parts).split()) for key, parts in parser.texts.items()}


def test_the_page_shows_the_cluster_in_a_real_browser(
    tmp_path: Path,
    mirror_factory: Callable[..., MirrorNode],
    registry: Registry,
    test_images: TestImages,
) -> None:
    demo = start_status_demo(tmp_path, mirror_factory, registry, test_images)
    first, shown, third = demo.nodes
    dom = dump_dom(demo.page_url(1), tmp_path)
    assert re.search(r'<body[^>]*data-state="live"', dom), dom[:2000]
    text = sections(dom)

    node = text["node"]
    assert shown.address in node and "cache" in node
    peers = text["peers"]
    # Both other nodes, by their DHT address; node 0 also by its registry address (fetched from).
    assert f"{first.host}:" in peers and f"{third.host}:" in peers
    assert first.address in peers
    assert "ms" in peers  # a round trip was measured
    images = text["images"]
    assert demo.app in images and demo.pinned in images
    assert "MiB" in images  # the 64 MiB image, with its size
    pulls = text["pulls"]
    assert "GET blob" in pulls and "GET manifest" in pulls
    assert " peer " in pulls and first.address in pulls  # from node 0, named
    assert " upstream " in pulls
    upstream = text["upstream"]
    assert registry.host in upstream and "ok" in upstream
    pins = text["pins"]
    assert demo.pinned in pins and "held" in pins

    picture = tmp_path / "status-page.png"
    screenshot(demo.page_url(1), picture, tmp_path)
    assert png_size(picture) == (1440, 1800)
    assert picture.stat().st_size > 30_000  # a rendered page, not a blank one

    rows, note = asyncio.run(measure_in_the_page(demo.page_url(1), demo.multi, tmp_path))
    steps = [row.split("\t") for row in rows]
    assert [step[0] for step in steps] == ["index", "manifest", "config", "layer", "total"], note
    # Held by node 0 only: the tag is resolved upstream, every part comes from the peer.
    assert [step[3] for step in steps[1:4]] == ["peer", "peer", "peer"], rows
    assert steps[0][3] in ("peer", "upstream") and all(step[4].endswith("ms") for step in steps)
    assert demo.multi in note and "linux/amd64" in note
    assert demo.multi in sections(dump_dom(demo.page_url(1), tmp_path))["images"]  # kept

    for mirror in demo.nodes:
        log = mirror.process.log_text()
        assert "Traceback" not in log, log[-3000:]


async def measure_in_the_page(url: str, ref: str, workdir: Path) -> tuple[list[str], str]:
    """Fill in the page's measure form with `ref`, press Measure, read the result table."""
    async with DevToolsPage(workdir) as page:
        await page.open(url, 'document.body.dataset.state === "live"')
        answer = await page.run(measure_script(ref))
    return answer["rows"], answer["note"]
