"""Headless Chromium (the Debian package) driven through the DevTools protocol over
--remote-debugging-pipe (NUL-separated JSON on fds 3 and 4: no websocket library, no port).

``inspect_page`` opens a file, waits for the load, and returns what a layout test needs:
console messages and exceptions, failed or outside requests, the screenshot's PNG size and
the boxes of the elements asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import require_program

TIMEOUT = 60.0


@dataclass
class PageReport:
    console: list[dict[str, Any]] = field(default_factory=list)  #: console API calls and log entries
    exceptions: list[dict[str, Any]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  #: every URL the page asked for
    failed: list[str] = field(default_factory=list)
    screenshot: bytes = b""
    boxes: dict[str, list[dict[str, float]]] = field(default_factory=dict)  #: selector -> boxes
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def screenshot_size(self) -> tuple[int, int]:
        assert self.screenshot[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", self.screenshot[16:24])
        return w, h

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.console if m.get("level") in ("error", "warning")] + self.exceptions


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], out_fd: int, in_fd: int) -> None:
        self.proc, self.out, self.inp = proc, out_fd, in_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            m = self.read(deadline - time.monotonic())
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def read(self, timeout: float) -> dict[str, Any]:
        import select
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.inp], [], [], max(0.0, timeout))
            if not ready:
                raise TimeoutError("no message from chromium")
            chunk = os.read(self.inp, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return json.loads(raw)

    def wait_event(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for m in self.events:
            if m.get("method") == name:
                return m
        while time.monotonic() < deadline:
            m = self.read(deadline - time.monotonic())
            self.events.append(m)
            if m.get("method") == name:
                return m
        raise TimeoutError(name)


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    return require_program("chromium")


def inspect_page(path: Path, selectors: list[str], width: int = 1280, height: int = 900) -> PageReport:
    """Load ``path`` in headless Chromium; console errors, requests, a full-page screenshot,
    and the rendered boxes of every element matching each selector."""
    exe = chromium()
    profile = tempfile.mkdtemp(prefix="s8-chromium-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def fds() -> None:  # the child's fds 3 and 4 are the pipe ends (--remote-debugging-pipe)
        a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # first out of the way of 3 and 4
        os.dup2(a, 3)
        os.dup2(b, 4)

    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            "--disable-default-apps", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-pipe",
            f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=fds, pass_fds=(3, 4))  # kept open after preexec_fn's dup2
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    report = PageReport()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired")
        time.sleep(0.3)  # images decode after load: let the layout settle
        expr = ("(() => { const out = {}; for (const s of %s) { out[s] = [...document.querySelectorAll(s)].map(e => {"
                " const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height,"
                " complete: e.complete === undefined ? null : e.complete,"
                " natural: e.naturalWidth === undefined ? null : e.naturalWidth}; }); } return JSON.stringify(out); })()"
                % json.dumps(selectors))
        res = pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
        report.boxes = json.loads(res["result"]["value"])
        metrics = pipe.send("Page.getLayoutMetrics", session=session)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
            "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=session)
        import base64
        report.screenshot = base64.b64decode(shot["data"])
        for m in pipe.events:
            p = m.get("params", {})
            if m.get("method") == "Runtime.consoleAPICalled":
                report.console.append({"level": p.get("type"), "text": [a.get("value") for a in p.get("args", [])]})
            elif m.get("method") == "Log.entryAdded":
                e = p.get("entry", {})
                report.console.append({"level": e.get("level"), "text": e.get("text"), "url": e.get("url")})
            elif m.get("method") == "Runtime.exceptionThrown":
                report.exceptions.append(p.get("exceptionDetails", {}))
            elif m.get("method") == "Network.requestWillBeSent":
                report.requests.append(p.get("request", {}).get("url", ""))
            elif m.get("method") == "Network.loadingFailed":
                report.failed.append(p.get("errorText", ""))
        try:
            pipe.send("Browser.close")
        except (RuntimeError, TimeoutError):
            pass
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
    return report
