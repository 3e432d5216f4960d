"""The corruption matrix: each kind of library file x flipped byte / truncated / garbage /
missing, and what ``library verify``, ``library ls`` and an Arrow ``eval`` then do.

The rule every cell checks: nothing prints a traceback; ``verify`` exits 1 naming the
damage (0 only when the damage is harmless, and then eval's scores are the intact
ones); ``ls`` lists the experts or exits 2 with one line; ``eval`` gives exactly the
intact library's scores or exits 2 with one line; never a wrong score. Damage that
lorashelf can read around (the index, the Arrow cache) never stops eval. (lorashelf has
no ``serve`` verb yet, so the issue's serve column has nothing to run.)
"""

from __future__ import annotations

import json
import shutil

import pytest

from lorashelf.library import Library

FILES = {
    "library.json": "library.json",
    "index": "index.sqlite",
    "card": "experts/e0/card.json",
    "config": "experts/e0/adapter_config.json",
    "weights": "experts/e0/adapter_model.safetensors",
    "arrow-cache": "cache/arrow_prototypes.safetensors",
    "gates": "derived/phatgoose/*.safetensors",
}
DAMAGE = ("flip", "truncate", "garbage", "missing")
READ_AROUND = {"index", "arrow-cache", "gates"}  # eval --method arrow still scores right
ALWAYS_FOUND = {"card", "config", "weights", "arrow-cache", "gates"}  # verify exits 1
_INTACT: dict[str, dict] = {}


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes([data[mid] ^ 0x40]) + data[mid + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x8f garbage \x00" * 64)
    else:
        path.unlink()


@pytest.fixture(scope="module")
def intact(tmp_path_factory, tiny_model_dir, tiny_model, adapter_writer):
    """A library with two experts, PHATGOOSE gates for e0 and an Arrow cache; a task."""
    import torch

    from lorashelf.library import Library
    from lorashelf.route.gate_store import adapter_checksum, gates_dir, save_gates

    root = tmp_path_factory.mktemp("corruption")
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in tiny_model.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    }
    lib = Library.open(root / "lib", create=True, base_model=str(tiny_model_dir))
    for i in range(2):
        src = adapter_writer(root / f"src{i}", shapes, seed=i, base=str(tiny_model_dir))
        lib.add(src, f"e{i}", {"tasks": [f"t{i}"]})
    gates = {m: torch.randn(d_in) for m, (d_in, _) in shapes.items()}
    save_gates(gates_dir(lib.path), adapter_checksum(lib.get("e0")), gates, {"steps": 1})
    lib.close()
    task = root / "mc.jsonl"
    rows = [{"input": f"Q{i}:", "options": [" a", " b"], "answer": i % 2} for i in range(4)]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "lib", f"jsonl:{task}"


def arrow_eval(run, lib, task, out):
    """(exit code, {task: (accuracy, nll)} or None) of an Arrow eval over ``lib``."""
    argv = ["eval", "--library", lib, "--method", "arrow", "--tasks", task, "--split", "all"]
    rc, _, _ = run(*argv, "--dtype", "fp32", "--json", out)
    if rc != 0:
        return rc, None
    data = json.loads(out.read_text())
    return rc, {t: (r["accuracy"], r["nll"]) for t, r in data["tasks"].items()}


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("kind", list(FILES))
def test_corruption_matrix(kind, how, intact, tmp_path, capsys, cli_runner):
    def run(*argv):
        return cli_runner(capsys, tmp_path / "home", *argv)

    src, task = intact
    if not _INTACT:  # the intact scores, and the Arrow cache the cells damage
        rc, scores = arrow_eval(run, src, task, tmp_path / "intact.json")
        assert rc == 0 and run("library", "verify", src)[0] == 0
        _INTACT["scores"] = scores
    lib = tmp_path / "lib"
    shutil.copytree(src, lib)
    Library.open(lib).repair()  # a copy has new inodes: index them, as its first write does
    (target,) = lib.glob(FILES[kind])
    damage(target, how)

    rc_verify, out, _ = run("library", "verify", lib)
    rc_ls, _, _ = run("library", "ls", lib)
    rc_eval, scores = arrow_eval(run, lib, task, tmp_path / "res.json")

    assert rc_verify in (0, 1, 2) and rc_ls in (0, 2) and rc_eval in (0, 2)
    derived_missing = kind in ("arrow-cache", "gates") and how == "missing"  # not trained yet
    if (kind in ALWAYS_FOUND and not derived_missing) or (kind == "index" and how != "flip"):
        assert rc_verify == 1 and "problem" in out, out
    if kind != "library.json":
        assert rc_ls == 0
    if kind in READ_AROUND:
        assert rc_eval == 0
    if kind in ("config", "weights"):
        assert rc_eval == 2  # a corrupt expert is refused, never scored
    if rc_eval == 0:
        assert scores == _INTACT["scores"], "a damaged library gave different scores"
    if rc_verify == 0:
        assert rc_eval == 0  # damage verify calls harmless really is harmless
    if kind in READ_AROUND and how != "missing":  # --repair clears what it can rebuild
        assert run("library", "verify", lib, "--repair")[0] == 0


def test_invalid_expert_dir_is_skipped_loudly(intact, tmp_path, capsys, cli_runner, caplog):
    """A copied library (every inode new) with a broken expert dir: readers list the
    valid experts, log why the other is not one, and verify exits 1 naming it."""
    src, _ = intact
    lib = tmp_path / "lib"
    shutil.copytree(src, lib)
    (lib / "experts/e0/adapter_model.safetensors").unlink()
    assert Library.open(lib).names() == ["e1"]
    assert "experts/e0 is not a valid expert" in caplog.text
    rc, out, _ = cli_runner(capsys, tmp_path / "home", "library", "verify", lib)
    assert rc == 1 and "problem (invalid): e0" in out
