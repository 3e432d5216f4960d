"""The library store: round trips, PEFT interop, validation, corruption and index rebuilds."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorashelf.errors import LorashelfError
from lorashelf.library import Library, export_expert, safe_name
from lorashelf.library.recover import REMOVED, REPLACED, displaced_path

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TASK = "bigbench:logical_deduction/three_objects"
CARD = {
    "tasks": [TASK],
    "source": "train",
    "training": {"lr": 1e-3, "steps": 10},
    "data_fingerprint": "sha256:abc",
    "train_loss": 0.5,
    "valid_loss": 0.75,
    "init_seed": 3,
    "extra": {"note": "x"},
}


@pytest.fixture
def lib(tmp_path) -> Library:
    return Library.open(tmp_path / "lib", create=True, base_model="smollm2-135m")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_get_round_trip_loses_nothing(lib, make_adapter):
    src = make_adapter("t", seed=1)
    expert = lib.add(src, card=CARD)
    assert expert.name == "bigbench__logical_deduction__three_objects" == safe_name(TASK)
    files = sorted(p.name for p in expert.path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "card.json"]
    for fn in ("adapter_config.json", "adapter_model.safetensors"):
        assert (expert.path / fn).read_bytes() == (src / fn).read_bytes()
    card = json.loads((expert.path / "card.json").read_text())
    assert {k: card[k] for k in CARD} == CARD
    assert card["base_model"] == card["base_model_exact"] == HUB_BASE
    assert card["files"] == {fn: sha(src / fn) for fn in card["files"]}
    assert set(card["versions"]) == {"lorashelf", "torch", "transformers", "peft"}
    assert card["created"].endswith("Z") and card["name"] == expert.name
    meta = json.loads((lib.path / "library.json").read_text())
    assert meta["base_model"] == HUB_BASE and meta["target_modules"] == ["q_proj", "v_proj"]
    assert meta["rank_policy"] == {"rank": 4, "allow_mixed": False}
    # reopen: everything comes back the same
    again = Library.open(lib.path).get(expert.name)
    assert again.card == card and again.tasks == [TASK] and again.rank == 4
    assert again.peft_config == json.loads((src / "adapter_config.json").read_text())
    want = load_file(str(src / "adapter_model.safetensors"))
    got = again.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    half = again.state_dict(dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())
    factors = again.lora_factors()
    assert list(factors)[0] == "model.layers.0.self_attn.q_proj" and len(factors) == 4


def test_peft_loads_library_expert_with_same_logits(lib, make_adapter, tiny_model):
    from peft import PeftModel

    src = make_adapter("t", seed=2)
    expert = lib.add(src, "logic")
    ids = torch.arange(12).reshape(2, 6)

    def logits(adapter_dir: Path) -> torch.Tensor:
        model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(adapter_dir)).eval()
        with torch.no_grad():
            return model(ids).logits

    from_lib = logits(lib.path / "experts" / "logic")
    assert torch.equal(from_lib, logits(src))
    with torch.no_grad():
        assert not torch.allclose(from_lib, tiny_model(ids).logits)  # the adapter matters
    out = export_expert(expert, lib.path.parent / "exported")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "card.json",
    ]
    assert torch.equal(logits(out), from_lib)


def test_names_filter_len_iter(lib, make_adapter):
    lib.add(make_adapter("a", seed=1), "a1", {"tasks": ["t1", "t2"], "source": "train"})
    lib.add(make_adapter("a", seed=2), "a2", {"tasks": ["t2"], "init_seed": 3})
    lib.add(make_adapter("a", seed=3), "b1", {"source": "compose", "extra": {"w": [1, 2]}})
    assert lib.names() == ["a1", "a2", "b1"] and len(lib) == 3 and "a2" in lib
    assert [e.name for e in lib] == ["a1", "a2", "b1"]
    assert [e.name for e in lib.filter(task="t2")] == ["a1", "a2"]
    assert [e.name for e in lib.filter(task="t2", source="train")] == ["a1"]
    assert [e.name for e in lib.filter(source="import")] == ["a2"]  # the default source
    assert [e.name for e in lib.filter(init_seed=3)] == ["a2"]
    assert [e.name for e in lib.filter(init_seed=None)] == ["a1", "b1"]
    assert [e.name for e in lib.filter(extra={"w": [1, 2]})] == ["b1"]
    with pytest.raises(LorashelfError, match="did you mean: init_seed"):
        lib.filter(init_sed=3)
    with pytest.raises(LorashelfError, match="no expert 'a11'.*did you mean: a1"):
        lib.get("a11")


def test_remove_and_overwrite(lib, make_adapter):
    one, two = make_adapter("a", seed=1), make_adapter("a", seed=2)
    lib.add(one, "x")
    with pytest.raises(LorashelfError, match="already exists.*overwrite"):
        lib.add(two, "x")
    with pytest.raises(LorashelfError, match="differs only in case"):
        lib.add(two, "X")
    lib.add(two, "x", overwrite=True)
    assert lib.get("x").files["adapter_model.safetensors"] == sha(two / "adapter_model.safetensors")
    assert (lib.path / "experts/x/adapter_model.safetensors").read_bytes() == (
        two / "adapter_model.safetensors"
    ).read_bytes()
    lib.add(one, "y")
    lib.remove("x")
    assert lib.names() == ["y"] and not (lib.path / "experts/x").exists()
    assert list((lib.path / ".tmp").iterdir()) == []
    with pytest.raises(LorashelfError, match="did you mean: y"):
        lib.remove("yy")
    assert Library.open(lib.path).names() == ["y"] and lib.verify() == []


def nan_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "adapter_model.safetensors"))
    key = sorted(sd)[-1]
    sd[key][0, 0] = float("nan")
    save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


REFUSALS = {
    "other base": (
        lambda mk, ed, d: mk("o", base="meta-llama/Llama-3.2-1B"),
        "trained on 'meta-llama",
    ),
    "no base": (lambda mk, ed, d: mk("n", base=None), "does not name its base model"),
    "nan": (lambda mk, ed, d: nan_adapter(mk("a"), d / "nan"), "NaN or inf values"),
    "config vs weights": (
        lambda mk, ed, d: ed(mk("a"), d / "cw", target_modules=["q_proj", "k_proj", "v_proj"]),
        "do not belong together",
    ),
    "library targets": (
        lambda mk, ed, d: mk("qkv", target_modules=["q_proj", "k_proj", "v_proj"]),
        "targets k_proj,q_proj,v_proj but the library targets q_proj,v_proj; retrain or pass "
        "--allow-mixed",
    ),
    "library rank": (lambda mk, ed, d: mk("r8", r=8), "rank 8 but the library holds rank-4"),
    "rank pattern": (lambda mk, ed, d: mk("rp", rank_pattern={"q_proj": 2}), "ranks 2,4"),
    "dora": (lambda mk, ed, d: mk("dora", use_dora=True), "DoRA"),
    "not lora": (lambda mk, ed, d: ed(mk("a"), d / "ia3", peft_type="IA3"), "only LORA"),
    "pickle": (lambda mk, ed, d: pickle_only(mk("a"), d / "bin"), "pickled adapter_model.bin"),
}


def pickle_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").rename(dst / "adapter_model.bin")
    return dst


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_adapters_are_refused_and_nothing_is_written(
    case, lib, make_adapter, edit_config, snapshot, tmp_path
):
    lib.add(make_adapter("a", seed=9), "first")
    before = snapshot(lib.path)
    build, message = REFUSALS[case]
    bad = build(make_adapter, edit_config, tmp_path)
    with pytest.raises(LorashelfError, match=message.replace("(", r"\(")):
        lib.add(bad, "bad")
    assert snapshot(lib.path) == before
    assert lib.names() == ["first"] and lib.verify() == []


def test_allow_mixed_is_recorded(lib, make_adapter):
    lib.add(make_adapter("a"), "qv")
    lib.add(
        make_adapter("qkv", target_modules=["q_proj", "k_proj", "v_proj"]), "qkv", allow_mixed=True
    )
    meta = json.loads((lib.path / "library.json").read_text())
    assert meta["rank_policy"]["allow_mixed"] is True and meta["target_modules"] == [
        "q_proj",
        "v_proj",
    ]
    lib.add(make_adapter("r8", r=8), "r8")  # the library is mixed now
    assert lib.get("r8").rank == 8 and lib.get("qkv").target_modules == [
        "k_proj",
        "q_proj",
        "v_proj",
    ]


def test_flipped_byte_is_reported_and_refused(lib, make_adapter):
    lib.add(make_adapter("a", seed=1), "good")
    lib.add(make_adapter("a", seed=2), "bad")
    weights = lib.path / "experts/bad/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    problems = Library.open(lib.path).verify()
    assert [(p.kind, p.expert) for p in problems] == [("corrupt", "bad")]
    assert "experts/bad/adapter_model.safetensors" in str(problems[0])
    with pytest.raises(LorashelfError, match=r"bad/adapter_model.safetensors is corrupt"):
        lib.get("bad").state_dict()
    with pytest.raises(LorashelfError, match="corrupt"):
        lib.get("bad").lora_factors()
    assert lib.get("good").lora_factors()  # the others are unaffected
    (lib.path / "experts/good/adapter_config.json").unlink()
    kinds = sorted((p.kind, p.expert) for p in lib.verify())
    assert kinds == [("corrupt", "bad"), ("missing", "good")]
    with pytest.raises(LorashelfError, match="adapter_config.json is missing"):
        lib.get("good").peft_config  # noqa: B018


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_lost_or_corrupt_index_is_rebuilt(damage, lib, make_adapter, caplog):
    for i in range(3):
        lib.add(make_adapter("a", seed=i), f"e{i}", {"tasks": [f"t{i}"]})
    cards = {e.name: e.card for e in lib}
    lib.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{lib.path / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    if damage == "garbage":
        (lib.path / "index.sqlite").write_bytes(b"this is not a database" * 100)
    reopened = Library.open(lib.path)  # readers work from the expert dirs, writing nothing
    assert {e.name: e.card for e in reopened} == cards
    assert [e.name for e in reopened.filter(task="t1")] == ["e1"]
    assert [p.kind for p in reopened.verify()] == ["index"]
    assert ("damaged" in caplog.text) == (damage == "garbage")
    assert not list(lib.path.glob("index.sqlite.corrupt-*"))
    assert reopened.rebuild_index() == 3 and {e.name: e.card for e in reopened} == cards
    assert reopened.verify() == []
    assert bool(list(lib.path.glob("index.sqlite.corrupt-*"))) == (damage == "garbage")


def test_crash_leftovers_are_reconciled_on_open(lib, make_adapter):
    for name in ("a", "b", "c", "d", "e"):
        lib.add(make_adapter("a", seed=ord(name)), name)
    bytes_b = (lib.path / "experts/b/adapter_model.safetensors").read_bytes()
    # an overwrite of e committed, then e was removed, then the overwriter died
    shutil.copytree(lib.path / "experts/e", displaced_path(lib.path, REPLACED, "e"))
    lib.remove("e")
    lib.close()
    con = sqlite3.connect(lib.path / "index.sqlite")
    con.execute("DELETE FROM experts WHERE name = 'a'")  # killed after rename, before commit
    con.commit()
    con.close()
    tmp = lib.path / ".tmp"
    (tmp / "new--dead").mkdir()  # killed while staging
    (tmp / "new--dead/adapter_model.safetensors").write_bytes(b"half")
    os.rename(lib.path / "experts/b", displaced_path(lib.path, REPLACED, "b"))  # mid-overwrite
    os.rename(lib.path / "experts/c", displaced_path(lib.path, REMOVED, "c"))  # mid-remove
    shutil.copytree(lib.path / "experts/d", lib.path / "d2")  # dir replaced behind our back
    shutil.rmtree(lib.path / "experts/d")
    os.rename(lib.path / "d2", lib.path / "experts/d")
    again = Library.open(lib.path)  # a reader sees the reconciled state, changes nothing
    assert again.names() == ["a", "b", "d"] and len(list(tmp.iterdir())) == 4
    assert again.get("b").read_file("adapter_model.safetensors") == bytes_b
    again.repair()  # what the next write does
    assert again.names() == ["a", "b", "d"] and list(tmp.iterdir()) == []
    assert (lib.path / "experts/b/adapter_model.safetensors").read_bytes() == bytes_b
    assert again.verify() == []
    assert again.get("d")._row["inode"] == (lib.path / "experts/d").stat().st_ino


def test_live_staging_dir_is_left_alone(lib):
    from lorashelf.library.fsutil import make_staging_dir, unlock_dir

    staged, fd = make_staging_dir(lib.path / ".tmp")
    try:
        Library.open(lib.path).repair()
        assert staged.exists()  # a live writer holds it
    finally:
        unlock_dir(fd)
    Library.open(lib.path)
    assert staged.exists()  # readers never delete anything
    Library.open(lib.path).repair()
    assert not staged.exists()


def test_open_reads_no_expert_files(tmp_path, make_adapter, monkeypatch):
    root = tmp_path / "lib"
    lib = Library.open(root, create=True, base_model=HUB_BASE)
    for i in range(5):
        lib.add(make_adapter("a", seed=i), f"e{i}", {"tasks": [f"t{i}"]})
    lib.close()
    import builtins
    import io

    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    lib = Library.open(root)
    listing = [(e.name, e.tasks, e.rank, e.card["name"]) for e in lib]
    assert len(listing) == 5 and lib.filter(task="t3")[0].name == "e3"
    assert not [p for p in opened if "/experts/" in p]


def test_open_errors_name_the_fix(tmp_path):
    with pytest.raises(LorashelfError, match="library init"):
        Library.open(tmp_path / "nothing")
    with pytest.raises(LorashelfError, match="needs its base model"):
        Library.open(tmp_path / "x", create=True)
    Library.open(tmp_path / "lib", create=True, base_model="smollm2-135m")
    same = Library.open(tmp_path / "lib", create=True, base_model=HUB_BASE)  # alias-aware
    assert same.base_model == HUB_BASE
    with pytest.raises(LorashelfError, match="not 'gpt2'"):
        Library.open(tmp_path / "lib", base_model="gpt2")


def test_bad_names_and_cards(lib, make_adapter):
    src = make_adapter("a")
    with pytest.raises(LorashelfError, match="not a safe directory name.*'a__b'"):
        lib.add(src, "a/b")
    with pytest.raises(LorashelfError, match="unknown card field 'taks'.*did you mean: tasks"):
        lib.add(src, "ok", {"taks": ["x"]})
    with pytest.raises(LorashelfError, match="'train_loss' must be"):
        lib.add(src, "ok", {"train_loss": "low"})
    assert lib.names() == []
