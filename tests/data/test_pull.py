"""pull_bigbench from tiny local sdists and a local PEP 691 index (no internet)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lorashelf.data import list_tasks, load_task, pull_bigbench
from lorashelf.data.download import wait_while_growing
from lorashelf.errors import LorashelfError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bigbench" / "benchmark_tasks"
PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def bb(home: Path) -> Path:
    return home / "data" / "bigbench"


def pulled(home: Path) -> set[str]:
    root = bb(home) / "benchmark_tasks"
    return {p.parent.relative_to(root).as_posix() for p in root.rglob("task.json")}


def test_full_pull_copies_task_json_verbatim_and_indexes(tmp_path, make_sdist) -> None:
    home = tmp_path / "home"
    out = pull_bigbench(home, sdist=make_sdist(), progress=False)
    assert out == bb(home)
    names = {p.parent.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("task.json")}
    assert pulled(home) == names
    for name in names:  # byte for byte, canaries included
        rel = f"{name}/task.json"
        assert (bb(home) / "benchmark_tasks" / rel).read_bytes() == (FIXTURES / rel).read_bytes()
    assert not (bb(home) / "benchmark_tasks" / "colors" / "README.md").exists()
    index = json.loads((bb(home) / "index.json").read_text())
    rows = {t["name"]: t for t in index["tasks"]}
    assert set(rows) == {"colors", "plausible", "capitals", "deduction", "deduction/three",
                         "deduction/four"}  # fmt: skip
    assert rows["deduction"]["n_examples"] == 5 and rows["deduction"]["kind"] == "mc"
    assert rows["colors"]["keywords"] == ["multiple choice", "test fixture"]
    assert set(index["errors"]) == {"broken", "empty"}
    assert index["programmatic"] == ["prog"]
    assert not [p for p in bb(home).iterdir() if p.name.startswith(".pull-")]


def test_only_patterns_accumulate_across_pulls(tmp_path, make_sdist) -> None:
    home, sdist = tmp_path / "home", make_sdist()
    pull_bigbench(home, sdist=sdist, only=["colors"], progress=False)
    assert pulled(home) == {"colors"}
    pull_bigbench(home, sdist=sdist, only=["deduction"], progress=False)
    assert pulled(home) == {"colors", "deduction", "deduction/three", "deduction/four"}
    assert {t.id for t in list_tasks(home)} == {
        "bigbench:colors", "bigbench:deduction", "bigbench:deduction/three",
        "bigbench:deduction/four",
    }  # fmt: skip
    pull_bigbench(home, sdist=sdist, only=["cap*", "deduction/t*"], progress=False)
    assert "capitals" in pulled(home) and len(list_tasks(home)) == 5
    assert load_task("bigbench:colors", home=home).kind == "mc"


def test_unmatched_pattern_errors_and_changes_nothing(tmp_path, make_sdist) -> None:
    home, sdist = tmp_path / "home", make_sdist()
    pull_bigbench(home, sdist=sdist, only=["colors"], progress=False)
    with pytest.raises(LorashelfError, match="did you mean: capitals"):
        pull_bigbench(home, sdist=sdist, only=["capitols"], progress=False)
    assert pulled(home) == {"colors"}
    assert not [p for p in bb(home).iterdir() if p.name.startswith(".pull-")]


def test_programmatic_task_error(tmp_path, make_sdist) -> None:
    home = tmp_path / "home"
    pull_bigbench(home, sdist=make_sdist(), only=["colors"], progress=False)
    with pytest.raises(LorashelfError, match="prog is a programmatic BIG-bench task"):
        load_task("bigbench:prog", home=home)


def test_truncated_sdist_leaves_nothing_half_extracted(tmp_path, make_sdist) -> None:
    good = make_sdist()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    home = tmp_path / "home"
    with pytest.raises(LorashelfError, match="not a readable tar.gz"):
        pull_bigbench(home, sdist=bad, progress=False)
    assert not (bb(home) / "benchmark_tasks").exists()
    assert list(bb(home).iterdir()) == []


def test_path_traversal_member_is_refused(tmp_path, make_sdist) -> None:
    evil = {PREFIX + "../../../../escaped/task.json": b'{"examples": []}'}
    home = tmp_path / "home"
    with pytest.raises(LorashelfError, match="bad BIG-bench task name"):
        pull_bigbench(home, sdist=make_sdist(extra=evil), progress=False)
    assert not list(tmp_path.rglob("escaped"))
    assert not (bb(home) / "benchmark_tasks").exists()


def test_missing_local_sdist(tmp_path) -> None:
    with pytest.raises(LorashelfError, match="does not exist"):
        pull_bigbench(tmp_path, sdist=tmp_path / "nope.tar.gz", progress=False)


class Index:
    """A local PEP 691 index serving one sdist, with range requests; logs requests."""

    def __init__(self, payload: bytes, sha256: str | None = None) -> None:
        self.payload, self.log = payload, []
        self.sha256 = sha256 or hashlib.sha256(payload).hexdigest()
        index = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                index.log.append((self.path, dict(self.headers)))
                if self.path == "/simple/bigbench/":
                    body = json.dumps({"files": [{
                        "filename": "bigbench-1.0.0.tar.gz", "url": "../../files/bb.tar.gz",
                        "hashes": {"sha256": index.sha256}, "size": len(index.payload),
                    }]}).encode()  # fmt: skip
                    return self.reply(200, body, "application/vnd.pypi.simple.v1+json")
                if self.path != "/files/bb.tar.gz":
                    return self.reply(404, b"", "text/plain")
                start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-"))
                self.reply(206 if start else 200, index.payload[start:], "application/gzip")

            def reply(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/simple"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def file_requests(self) -> list[dict]:
        return [h for p, h in self.log if p.startswith("/files/")]


@pytest.fixture
def serve() -> Iterator[Callable[..., Index]]:
    servers: list[Index] = []

    def start(payload: bytes, sha256: str | None = None) -> Index:
        servers.append(Index(payload, sha256))
        return servers[-1]

    yield start
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def test_download_via_json_api_then_reuse(tmp_path, make_sdist, serve) -> None:
    payload = make_sdist().read_bytes()
    index, home = serve(payload), tmp_path / "home"
    pull_bigbench(home, index_url=index.url, only=["colors"], progress=False)
    assert (home / "downloads" / "bigbench-1.0.0.tar.gz").read_bytes() == payload
    assert index.log[0][1]["Accept"] == "application/vnd.pypi.simple.v1+json"
    assert pulled(home) == {"colors"} and len(index.file_requests()) == 1
    pull_bigbench(home, index_url=index.url, only=["capitals"], progress=False)
    assert len(index.file_requests()) == 1  # the verified copy is reused
    assert pulled(home) == {"colors", "capitals"}


def test_download_resumes_a_stale_part_file(tmp_path, make_sdist, serve) -> None:
    payload = make_sdist().read_bytes()
    index, home = serve(payload), tmp_path / "home"
    part = home / "downloads" / "bigbench-1.0.0.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(payload[:1000])
    os.utime(part, (time.time() - 3600, time.time() - 3600))  # nobody is writing it
    pull_bigbench(home, index_url=index.url, only=["colors"], progress=False)
    assert index.file_requests()[0]["Range"] == "bytes=1000-"
    assert (home / "downloads" / "bigbench-1.0.0.tar.gz").read_bytes() == payload
    assert not part.exists()


def test_sha_mismatch_is_an_error_and_extracts_nothing(tmp_path, make_sdist, serve) -> None:
    index, home = serve(make_sdist().read_bytes(), sha256="0" * 64), tmp_path / "home"
    with pytest.raises(LorashelfError, match="does not match the index"):
        pull_bigbench(home, index_url=index.url, progress=False)
    assert not list((home / "downloads").iterdir())
    assert not bb(home).exists()


def test_unreachable_index_names_the_offline_fix(tmp_path) -> None:
    with pytest.raises(LorashelfError, match="--sdist PATH"):
        pull_bigbench(tmp_path, index_url="http://127.0.0.1:9/simple", progress=False)


def test_waits_while_another_process_grows_the_part_file(tmp_path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"a")

    def grow() -> None:
        for _ in range(4):
            time.sleep(0.05)
            with open(part, "ab") as f:
                f.write(b"b")

    writer = threading.Thread(target=grow)
    writer.start()
    wait_while_growing(part, quiet=0.3, poll=0.02)
    writer.join()
    assert part.read_bytes() == b"abbbb"


def test_failed_swap_puts_the_previous_tree_back(tmp_path, make_sdist, monkeypatch) -> None:
    home, sdist = tmp_path / "home", make_sdist()
    pull_bigbench(home, sdist=sdist, only=["colors"], progress=False)
    real_replace = os.replace

    def flaky(src, dst) -> None:
        if Path(src).name == "benchmark_tasks" and Path(src).parent.name.startswith(".pull-"):
            raise OSError("disk trouble")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk trouble"):
        pull_bigbench(home, sdist=sdist, only=["capitals"], progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert pulled(home) == {"colors"}
    assert not [p for p in bb(home).iterdir() if p.name.startswith(".pull-")]
