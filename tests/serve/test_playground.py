"""The playground page in headless Chromium against a running ``lorashelf serve``.

The page is opened with ``?model=lib:arrow&prompt=...&run=1``, which fills the form
and generates. Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4, no extra
package): navigate, wait until the answer's ``data-state`` is ``done``, read the page.
It must list the models of ``/v1/models`` and show the same streamed answer the API
gives, token by token, each token tagged (``data-expert``) and coloured by its top
expert, with a legend. Skips when no Chromium is installed (``apt-get install
chromium``). ``Browser.screenshot`` is also how docs/playground.png was taken.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
    pytest.mark.timeout(300),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]  # fmt: skip

READ_PAGE = """JSON.stringify({
  state: document.getElementById("answer").dataset.state || null,
  status: document.getElementById("status").textContent,
  options: [...document.querySelectorAll("#model option")].map(o => o.value),
  tokens: [...document.querySelectorAll("#answer span.tok")].map(s =>
    [s.textContent, s.dataset.expert || null, s.style.background]),
  legend: [...document.querySelectorAll("#legend span")].map(s => s.dataset.expert),
})"""


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools pipe."""

    def __init__(self, profile: Path, size: tuple[int, int] = (1000, 760)) -> None:
        to_chrome, self._send = os.pipe()
        self._recv, from_chrome = os.pipe()

        def fds() -> None:  # the child reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)

        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
               f"--window-size={size[0]},{size[1]}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._send, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._recv, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def open(self, url: str) -> None:
        self.page("Page.navigate", url=url)

    def read(self, timeout: float = 120.0) -> dict:
        """The page's state once the answer is done (or failed, or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.page("Runtime.evaluate", expression=READ_PAGE, returnByValue=True)
            value = got["result"].get("value")  # none while the page is still loading
            state = json.loads(value) if value else {"state": None}
            if state["state"] in ("done", "error") or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        data = self.page("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        os.close(self._send)
        os.close(self._recv)


def playground_url(url: str, model: str, prompt: str, max_tokens: int) -> str:
    return f"{url}/?" + urlencode({"model": model, "prompt": prompt, "max": max_tokens, "run": 1})


def test_playground_lists_models_and_colours_routed_tokens(served, serve_kit, tmp_path):
    proc, url = serve_kit.start_server(
        served.library.path, tmp_path / "server.log", "--watch-s", "0"
    )
    browser = None
    try:
        ids = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        messages = [{"role": "user", "content": "hello"}]
        want = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "lib:arrow", "messages": messages, "max_tokens": 12, "temperature": 0,
        }).json()["choices"][0]["message"]["content"]  # fmt: skip
        browser = Browser(tmp_path / "chromium-profile")
        browser.open(playground_url(url, "lib:arrow", "hello", 12))
        page = browser.read()
    finally:
        if browser is not None:
            browser.close()
        serve_kit.stop_server(proc)
    assert page["state"] == "done", page
    assert page["options"] == ids
    assert "".join(t for t, _, _ in page["tokens"]) == want
    experts = {e for _, e, _ in page["tokens"]}
    assert experts and all(e and e.startswith("lib/") for e in experts), page["tokens"]
    assert all(background for _, _, background in page["tokens"])
    assert sorted(page["legend"]) == sorted(experts)
