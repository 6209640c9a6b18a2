"""Headless Chromium (Debian's `chromium`) loading a page, for the status page tests.

Each run gets its own profile directory and its own process group, stopped whole if it
overruns. `--virtual-time-budget` lets the page's script run (and its requests to the node
finish) for that much virtual time before the DOM is dumped or the screenshot taken, so the
test waits for the rendering without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_BINARY = "chromium"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium_path() -> str:
    """The binary; fails (never skips) when missing, naming the package and the setup step."""
    path = shutil.which(CHROMIUM_BINARY)
    if path is None:
        pytest.fail(
            "chromium is not on PATH: run bin/setup-env --system (Debian package chromium); "
            "the status page must be tested in a real browser, never skipped",
            pytrace=False,
        )
    return path


def run_chromium(
    url: str, workdir: Path, *args: str, budget_ms: int = 5000, timeout: float = 120.0
) -> str:
    """Load `url` headless with `args` (`--dump-dom`, `--screenshot=...`); its stdout."""
    profile = workdir / f"chromium-profile-{len(list(workdir.glob('chromium-profile-*')))}"
    argv = [
        chromium_path(),
        "--headless",
        "--no-sandbox",  # root here; the page is our own
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}",
        *args,
        url,
    ]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if process.returncode != 0:
        raise RuntimeError(
            f"chromium exited {process.returncode} on {url}:\n{err.decode(errors='replace')}"
        )
    return out.decode(errors="replace")


def dump_dom(url: str, workdir: Path, *, budget_ms: int = 5000) -> str:
    """The DOM once the page's script ran for `budget_ms` of virtual time, serialized."""
    return run_chromium(url, workdir, "--dump-dom", budget_ms=budget_ms)


def screenshot(
    url: str, path: Path, workdir: Path, *, size: tuple[int, int] = (1440, 1800)
) -> None:
    """A PNG of the page as a laptop-sized window shows it, rendered like `dump_dom`'s."""
    run_chromium(
        url,
        workdir,
        f"--screenshot={path}",
        f"--window-size={size[0]},{size[1]}",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    )
    if not path.read_bytes().startswith(_PNG_SIGNATURE):
        raise RuntimeError(f"chromium wrote no PNG to {path}")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR", "not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


class DevToolsPage:
    """A page in headless Chromium driven over the DevTools protocol (its remote debugging
    port), for what a command line cannot do: fill in a form, press a button, and wait in the
    page itself (a promise) until the answer is rendered.

    Use as `async with DevToolsPage(workdir) as page: await page.open(url); await page.run(js)`.
    """

    def __init__(self, workdir: Path, *, timeout: float = 120.0) -> None:
        self._workdir = workdir
        self._timeout = timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._session: Any = None
        self._socket: Any = None
        self._next_id = 0
        self._events: list[str] = []  # methods of the events received, in order

    async def __aenter__(self) -> DevToolsPage:
        import aiohttp

        from .net import free_port

        port = free_port("127.0.0.1")
        profile = self._workdir / "chromium-devtools-profile"
        self._process = subprocess.Popen(
            [
                chromium_path(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--disable-background-networking",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={port}",
                "--remote-debugging-address=127.0.0.1",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self._workdir / "chromium-devtools.log").open("ab"),
            start_new_session=True,
        )
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        targets = await self._targets(f"http://127.0.0.1:{port}/json/list")
        page = next(target for target in targets if target.get("type") == "page")
        self._socket = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def _targets(self, url: str) -> list[dict[str, Any]]:
        """The browser's targets, once its debugging port answers (polled to a deadline)."""
        import aiohttp

        deadline = time.monotonic() + self._timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited {self._process.returncode}")
            try:
                async with self._session.get(url) as response:
                    targets: list[dict[str, Any]] = await response.json()
                    if any(target.get("type") == "page" for target in targets):
                        return targets
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromium's debugging port did not answer")
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._session is not None:
            await self._session.close()
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
        shutil.rmtree(self._workdir / "chromium-devtools-profile", ignore_errors=True)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events meanwhile are noted, see `event`)."""
        self._next_id += 1
        wanted = self._next_id
        await self._socket.send_json({"id": wanted, "method": method, "params": params})
        while True:
            message = await self._socket.receive_json(timeout=self._timeout)
            if "method" in message:
                self._events.append(message["method"])
            if message.get("id") != wanted:
                continue
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            result: dict[str, Any] = message.get("result", {})
            return result

    async def event(self, method: str) -> None:
        """Until the event `method` has arrived (once: it is consumed)."""
        while method not in self._events:
            message = await self._socket.receive_json(timeout=self._timeout)
            if "method" in message:
                self._events.append(message["method"])
        self._events.remove(method)

    async def open(self, url: str, ready: str) -> None:
        """Navigate to `url`, wait for its load event and then until the expression `ready`
        is true in the page."""
        await self.call("Page.enable")
        self._events.clear()
        await self.call("Page.navigate", url=url)
        await self.event("Page.loadEventFired")
        await self.run(
            "new Promise(resolve => { const check = () => (" + ready + ") ? resolve(true) : "
            "setTimeout(check, 20); check(); })"
        )

    async def run(self, expression: str) -> Any:
        """The value of `expression` in the page (a promise is awaited); page errors raise."""
        answer = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression[:80]}: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")
