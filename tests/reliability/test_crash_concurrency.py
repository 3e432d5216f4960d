"""Writers killed with SIGKILL at random points, and several writers at once.

After every kill a *reader* (which never writes) must see only complete experts, each
byte-identical to its source, and the library must verify clean once the next writer
has repaired it; concurrent writers must all land. Writers are forked, so they start
at once with everything imported; the adapters are large enough that kills land mid-write.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

from lorashelf.library import Library

FORK = multiprocessing.get_context("fork")


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
