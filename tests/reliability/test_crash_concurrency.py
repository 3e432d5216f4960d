"""Writers killed with SIGKILL at random points, and several writers at once.

After every kill a *reader* (which never writes) must see only complete experts, each
byte-identical to its source, and the library must verify clean once the next writer
has repaired it; concurrent writers must all land. Writers are forked, so they start
at once with everything imported; the adapters are large enough that kills land mid-write.
A ``lorashelf train`` killed mid-training (a real process, with its own TMPDIR) must
leave nothing in the system temp dir, and its staging dir must go at the next write.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorashelf.library import Library

FORK = multiprocessing.get_context("fork")
ROOT = Path(__file__).resolve().parents[2]


def add_forever(root: str, sources: list[str], prefix: str) -> None:
    lib = Library.open(root)
    for i in range(10_000):
        lib.add(sources[i % len(sources)], f"{prefix}{i:04d}", overwrite=i % 3 == 2)


def add_some(root: str, source: str, prefix: str, n: int) -> None:
    lib = Library.open(root)
    for i in range(n):
        lib.add(source, f"{prefix}{i:02d}")


def assert_complete(lib: Library, sources: list) -> None:
    weights = {(s / "adapter_model.safetensors").read_bytes() for s in sources}
    for expert in lib:
        assert expert.read_file("adapter_model.safetensors") in weights


def test_random_kills_never_leave_a_half_expert(tmp_path, adapter, tiny_model_dir):
    wide = {f"model.layers.{i}.self_attn.q_proj": (512, 512) for i in range(8)}
    sources = [adapter(f"s{i}", wide, seed=i, base="org/m", scale=0.01) for i in range(2)]
    root = tmp_path / "lib"
    Library.open(root, create=True, base_model="org/m").close()
    rng = random.Random(0)
    seen = 0
    for kill in range(6):
        proc = FORK.Process(
            target=add_forever, args=(str(root), list(map(str, sources)), f"k{kill}_")
        )
        proc.start()
        time.sleep(rng.uniform(0.2, 0.8))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        reader = Library.open(root)
        assert_complete(reader, sources)  # before any repair: a reader's view is whole
        assert len(reader) >= seen  # nothing committed is ever lost
        writer = Library.open(root)
        writer.repair()
        assert writer.verify() == [] and list((root / ".tmp").iterdir()) == []
        assert writer.names() == reader.names()
        seen = len(writer)
    assert seen >= 6


def test_concurrent_writer_processes_all_land(tmp_path, adapter):
    src = adapter("c", base="org/m")
    root = tmp_path / "lib"
    Library.open(root, create=True, base_model="org/m").close()
    procs = [
        FORK.Process(target=add_some, args=(str(root), str(src), f"w{w}_", 6)) for w in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lib = Library.open(root)
    assert len(lib) == 18 and lib.verify() == []


def test_killed_training_leaves_nothing_in_tmp(tmp_path, tiny_model_dir, capsys, cli_runner):
    task = tmp_path / "t.jsonl"
    rows = [{"input": f"Q{i}:", "target": f" {i % 3}"} for i in range(16)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lib, tmpdir, home = tmp_path / "lib", tmp_path / "tmp", tmp_path / "home"
    tmpdir.mkdir()
    train = ["train", lib, "--tasks", f"jsonl:{task}", "--model", tiny_model_dir, "--quiet",
             "--target-modules", "q_proj,v_proj", "--batch-size", "2", "--name", "t"]  # fmt: skip
    env = os.environ | {"TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lorashelf", "--home", home, "--device", "cpu", "--threads", "1"]
    proc = subprocess.Popen([*map(str, cmd + train), "--steps", "100000"], env=env)
    try:
        deadline = time.monotonic() + 120
        staged = [lib / ".tmp", tmpdir]  # where a job's work dir may appear
        while not any(any(d.glob("*job*")) for d in staged if d.is_dir()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the training never started"
            time.sleep(0.2)
        time.sleep(1.0)  # mid-training: the job's work dir exists, its adapter not yet
        assert proc.poll() is None, "the training ended before it was killed"
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("lorashelf")] == []
    assert Library.open(lib).names() == [] and len(list((lib / ".tmp").iterdir())) == 1
    rc, _, _ = cli_runner(capsys, home, *train, "--steps", "2")  # the next write cleans up
    reader = Library.open(lib)
    assert rc == 0 and reader.names() == ["t"] and reader.verify() == []
    assert list((lib / ".tmp").iterdir()) == []
