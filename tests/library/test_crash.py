"""Real processes: writers killed with SIGKILL mid-write, and concurrent writers.

Adapters here are synthetic PEFT dirs (valid LoRA layout, random values) so their size
can be chosen: big ones make a kill land mid-write often, small ones keep 200 adds fast.
Every write uses the real fsync path. Writers are forked from the test process, so
they start at once instead of importing torch anew.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorashelf.library import Library

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def writer(root: str, sources: list[str], prefix: str, count: int, log: str) -> None:
    """Add (and, with prefix "k...", overwrite and remove) experts; log each step."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def say(*words: str) -> None:
        os.write(fd, (" ".join(words) + "\n").encode())  # unbuffered: survives SIGKILL

    lib = Library.open(root)
    churn = prefix.startswith("k")
    for i in range(count):
        src = sources[i % len(sources)]
        if churn and i % 4 == 3:
            name = f"{prefix}{i - 3:04d}"
            say("start", "overwrite", name, src)
            lib.add(src, name, {"extra": {"src": src}}, overwrite=True)
        elif churn and i % 4 == 2 and i >= 6:
            name = f"{prefix}{i - 5:04d}"
            say("start", "remove", name, "-")
            lib.remove(name)
        else:
            name = f"{prefix}{i:04d}"
            say("start", "add", name, src)
            lib.add(src, name, {"extra": {"src": src}})
        say("done")


def start_writer(root: Path, sources: list[Path], prefix: str, count: int, log: Path):
    """A real process (forked, so it starts at once with everything imported)."""
    ctx = multiprocessing.get_context("fork")
    args = (str(root), [str(s) for s in sources], prefix, count, str(log))
    proc = ctx.Process(target=writer, args=args)
    proc.start()
    return proc


def synthetic_adapter(path: Path, *, layers: int, d: int, r: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        sd[f"{key}.lora_A.weight"] = torch.randn(r, d, generator=g)
        sd[f"{key}.lora_B.weight"] = torch.randn(d, r, generator=g)
    path.mkdir(parents=True)
    save_file(sd, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    cfg["base_model_name_or_path"] = HUB_BASE
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def assert_all_complete(lib: Library) -> None:
    """verify passes and every expert's bytes are exactly one of the source adapters';
    a repair (what the next write does) leaves the same experts and an empty ``.tmp``."""
    assert lib.verify() == []
    before = {e.name: e.card for e in lib}
    lib.repair()
    assert {e.name: e.card for e in lib} == before and lib.verify() == []
    assert list((lib.path / ".tmp").iterdir()) == []
    for expert in lib:
        src = Path(expert.card["extra"]["src"])
        for fn in ("adapter_config.json", "adapter_model.safetensors"):
            assert expert.read_file(fn) == (src / fn).read_bytes()


def apply(state: dict[str, str], op: list[str]) -> dict[str, str]:
    kind, name, src = op
    state = dict(state)
    if kind == "remove":
        state.pop(name, None)
    else:
        state[name] = src
    return state


def test_sigkill_mid_write_never_leaves_a_half_expert(tmp_path):
    sources = [
        synthetic_adapter(tmp_path / f"src{i}", layers=8, d=4096, r=16, seed=i) for i in range(3)
    ]
    root = tmp_path / "lib"
    Library.open(root, create=True, base_model="smollm2-135m").close()
    rng = random.Random(0)
    state: dict[str, str] = {}  # what every completed operation says the library holds
    interrupted = 0
    for round_ in range(6):
        log = tmp_path / f"log{round_}"
        proc = start_writer(root, sources, f"k{round_}_", 1000, log)
        deadline = time.time() + 60
        while "done" not in (log.read_text() if log.exists() else ""):  # past one write
            assert time.time() < deadline and proc.is_alive()
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        pending = None
        for line in log.read_text().splitlines():
            if line.startswith("start"):
                pending = line.split()[1:]
            elif line == "done":
                state, pending = apply(state, pending), None
        interrupted += pending is not None
        lib = Library.open(root)
        have = {e.name: e.card["extra"]["src"] for e in lib}
        allowed = [state] + ([apply(state, pending)] if pending else [])
        assert have in allowed, f"round {round_}: lost or half-done writes"
        state = have
        assert_all_complete(lib)
        lib.close()
    assert interrupted >= 3 and len(state) >= 6


def test_concurrent_writers_all_succeed(tmp_path):
    writers, per_writer = 4, 50
    sources = [
        synthetic_adapter(tmp_path / f"src{i}", layers=2, d=16, r=2, seed=i) for i in range(3)
    ]
    root = tmp_path / "lib"
    Library.open(root, create=True, base_model=HUB_BASE).close()
    logs = [tmp_path / f"log{p}" for p in range(writers)]
    procs = [start_writer(root, sources, f"w{p}_", per_writer, logs[p]) for p in range(writers)]
    for proc, log in zip(procs, logs):
        proc.join(timeout=300)
        assert proc.exitcode == 0
        assert log.read_text().count("done") == per_writer
    lib = Library.open(root)
    want = {f"w{p}_{i:04d}" for p in range(writers) for i in range(per_writer)}
    assert set(lib.names()) == want and len(lib) == writers * per_writer
    assert_all_complete(lib)


def crash_at(root: str, op: str, src: str, renames_done: int) -> None:
    """Run ``op`` on expert "x" and die (os._exit, like SIGKILL) at rename number
    ``renames_done``, or right before the index write if every rename is done."""
    from lorashelf.library.index import Index

    lib = Library.open(root)
    real_rename, count = os.rename, [0]

    def rename(a, b):
        if count[0] == renames_done:
            os._exit(0)
        real_rename(a, b)
        count[0] += 1

    def index_write(*args, **kwargs):
        if count[0] == renames_done:
            os._exit(0)
        raise AssertionError("the index write comes after every rename")

    os.rename = rename
    Index.upsert = Index.delete = index_write
    if op == "remove":
        lib.remove("x")
    else:
        lib.add(src, "x", {"extra": {"src": src}}, overwrite=op == "overwrite")
    os._exit(3)  # not reached: the crash point is inside the operation


CRASH_POINTS = [  # (operation, renames done before the crash, what x must be after)
    ("add", 0, None),
    ("add", 1, "new"),
    ("overwrite", 0, "old"),
    ("overwrite", 1, "old"),  # old moved out, new not in yet: old is put back
    ("overwrite", 2, "new"),
    ("remove", 0, "old"),
    ("remove", 1, None),
]


@pytest.mark.parametrize("op,renames_done,expect", CRASH_POINTS)
def test_crash_at_each_step_leaves_old_or_new(tmp_path, op, renames_done, expect):
    old, new = (synthetic_adapter(tmp_path / n, layers=1, d=8, r=2, seed=i) for i, n in enumerate(("old", "new")))  # fmt: skip
    root = tmp_path / "lib"
    lib = Library.open(root, create=True, base_model=HUB_BASE)
    if op != "add":
        lib.add(old, "x", {"extra": {"src": str(old)}})
    lib.add(old, "y", {"extra": {"src": str(old)}})  # a bystander
    proc = multiprocessing.get_context("fork").Process(
        target=crash_at, args=(str(root), op, str(new), renames_done)
    )
    proc.start()
    proc.join()
    assert proc.exitcode == 0
    lib = Library.open(root)
    want = {"y": str(old)} | ({"x": str({"old": old, "new": new}[expect])} if expect else {})
    assert {e.name: e.card["extra"]["src"] for e in lib} == want
    assert_all_complete(lib)
