"""One test per item of the reliability issue (#16): each failure a hostile but realistic
user found, asserting the fixed behaviour end to end through the CLI where it was found."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3

import pytest
import torch

from lorashelf.errors import LorashelfError
from lorashelf.library import Library


def snapshot(root) -> dict[str, bytes]:
    """Every file of a library but SQLite's transient -wal/-shm, with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    }


# -- 1. no command destroys a library ------------------------------------------------
@pytest.mark.parametrize("target", ["library.json", "experts/e0/x.json", "index.sqlite", "."])
def test_outputs_refuse_to_land_inside_a_library(cli, rlib, target, tmp_path, mc_task):
    before = snapshot(rlib)
    rc, _, err = cli("cluster", rlib, "--k", "2", "--out", rlib / target)
    assert rc == 2 and "inside the library" in err
    rc, _, err = cli("eval", "--tasks", mc_task, "--json", rlib / target)
    assert rc == 2 and "inside the library" in err
    assert snapshot(rlib) == before


# -- 2. wrong results are never reported as right ---------------------------------------
def test_nan_scores_raise_and_are_never_correct():
    from lorashelf.evaluate.metrics import NonFiniteScoreError, mc_correct, per_token_nll
    from lorashelf.evaluate.scoring import Scored

    nan = [Scored(float("nan"), 1), Scored(float("nan"), 1)]
    with pytest.raises(NonFiniteScoreError, match="non-finite"):
        mc_correct(nan, 0, (1.0, 0.0))
    with pytest.raises(NonFiniteScoreError):
        per_token_nll(Scored(float("inf"), 2))
    assert mc_correct([Scored(-1.0, 1), Scored(-2.0, 1)], 0) is True


def test_huge_alpha_is_refused_at_import(cli, rlib, adapter):
    rc, _, err = cli("library", "import", rlib, adapter("big", alpha=1e30), "--name", "big")
    assert rc == 2 and "lora_alpha" in err and "big" not in Library.open(rlib)


def test_nan_model_eval_exits_2_and_writes_no_json(
    cli, tmp_path, tiny_model, tiny_tokenizer, mc_task
):
    import copy

    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        broken.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan-model")
    tiny_tokenizer.save_pretrained(tmp_path / "nan-model")
    out = tmp_path / "res.json"
    argv = ["eval", "--model", tmp_path / "nan-model", "--tasks", mc_task, "--split", "all"]
    rc, _, err = cli(*argv, "--dtype", "fp32", "--json", out)
    assert rc == 2 and "non-finite log-probability" in err and not out.exists()


def test_json_never_holds_nan(tmp_path):
    from lorashelf.config import write_json_atomic

    with pytest.raises(LorashelfError, match="NaN or inf"):
        write_json_atomic(tmp_path / "r.json", {"nll": math.nan})
    assert not list(tmp_path.iterdir())


def test_nan_arrow_cache_is_detected_and_rebuilt(cli, rlib, tmp_path, mc_task):
    from safetensors.torch import load_file, save_file

    from lorashelf.library.derived import tensors_sha256

    argv = ["eval", "--library", rlib, "--method", "arrow", "--tasks", mc_task, "--split", "all"]
    good = tmp_path / "good.json"
    assert cli(*argv, "--dtype", "fp32", "--json", good)[0] == 0
    cache = rlib / "cache" / "arrow_prototypes.safetensors"
    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(cache).items()}
    meta = {"format": "lorashelf-arrow-prototypes/1", "tensors_sha256": tensors_sha256(tensors)}
    save_file(tensors, cache, metadata=meta)  # NaN, with a matching checksum
    rc, out, _ = cli("library", "verify", rlib)
    assert rc == 1 and "problem (derived)" in out and "NaN" in out
    again = tmp_path / "again.json"
    assert cli(*argv, "--dtype", "fp32", "--json", again)[0] == 0
    scores = [
        {t: (r["accuracy"], r["nll"]) for t, r in json.loads(p.read_text())["tasks"].items()}
        for p in (good, again)
    ]
    assert scores[0] == scores[1]
    assert cli("library", "verify", rlib)[0] == 0  # the eval rewrote a sound cache


# -- 3. import lets through nothing that later crashes ---------------------------------
def test_import_checks_shapes_dtypes_and_the_full_base(cli, rlib, adapter, tiny_shapes):
    wide = {m: (d_in * 2, d_out * 2) for m, (d_in, d_out) in tiny_shapes.items()}
    extra = {**tiny_shapes, "model.layers.7.self_attn.q_proj": (64, 64)}
    cases = {
        "wide": (adapter("wide", wide), "another model size"),
        "extra": (adapter("extra", extra), "does not have"),
        "int": (adapter("int", dtype=torch.int32, scale=10.0), "floating point"),
        "base": (adapter("base", base="HuggingFaceTB/SmolLM2-135M"), "--allow-base"),
        "evil": (adapter("evil", base="evilorg/tiny-llama"), "--allow-base"),
    }
    for name, (src, needle) in cases.items():
        rc, _, err = cli("library", "import", rlib, src, "--name", name)
        assert rc == 2 and needle in err, (name, err)
    assert Library.open(rlib).names() == ["e0", "e1"]
    # --allow-base vouches for the base, never for the shapes
    rc, _, _ = cli("library", "import", rlib, cases["evil"][0], "--name", "evil", "--allow-base")
    assert rc == 0
    rc, _, err = cli("library", "import", rlib, cases["wide"][0], "--name", "w", "--allow-base")
    assert rc == 2 and "another model size" in err


def test_full_base_id_is_compared():
    from lorashelf.models import same_base

    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert same_base("smollm2-135m", hub) and same_base("/cache/models/smollm2-135m", hub)
    assert not same_base("HuggingFaceTB/SmolLM2-135M", hub)
    assert not same_base("evilorg/smollm2-135m", hub)


def test_first_expert_defines_shapes_without_a_local_base(tmp_path, adapter, tiny_shapes):
    lib = Library.open(tmp_path / "hub-lib", create=True, base_model="org/tiny")
    lib.add(adapter("a", base="org/tiny"), "a")
    deeper = {**tiny_shapes, "model.layers.9.self_attn.q_proj": (64, 64)}
    wide = {m: (2 * i, 2 * o) for m, (i, o) in tiny_shapes.items()}
    for name, shapes, needle in (("deep", deeper, "no layer 9"), ("wide", wide, "model size")):
        with pytest.raises(LorashelfError, match=needle):
            lib.add(adapter(name, shapes, base="org/tiny"), name)


# -- 4. a damaged index is no dead end; reading never writes ----------------------------
def damage_pages(index_path) -> None:
    """Keep the 100-byte header valid and overwrite every page after the first."""
    con = sqlite3.connect(index_path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray(index_path.read_bytes())
    data[page:] = b"\xa5" * (len(data) - page)
    index_path.write_bytes(bytes(data))


def test_damaged_index_is_read_around_and_repaired(cli, rlib, mc_task):
    damage_pages(rlib / "index.sqlite")
    rc, out, _ = cli("library", "ls", rlib, "--json")
    assert rc == 0 and [r["name"] for r in json.loads(out)] == ["e0", "e1"]
    rc, out, _ = cli("library", "verify", rlib)
    assert rc == 1 and "problem (index)" in out and "--repair" in out
    rc, out, _ = cli("library", "verify", rlib, "--repair")
    assert rc == 0 and "ok: 2 experts" in out
    assert cli("library", "verify", rlib)[0] == 0


def test_read_only_library_works_and_is_not_written(rlib, cli, monkeypatch):
    lib = Library.open(rlib)
    lib.add(lib.get("e0").path, "e2", {"tasks": ["t2"]})
    lib.close()
    (rlib / "index.sqlite").unlink()  # readers must cope without writing a new one
    for p in [rlib, *rlib.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    real_access = os.access  # root ignores modes: make the library read-only for it too

    def access(path, mode, **kw):
        inside = str(os.path.abspath(path)).startswith(str(rlib))
        return False if inside and mode & os.W_OK else real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    before = snapshot(rlib)
    try:
        rc, out, _ = cli("library", "ls", rlib, "--json")
        assert rc == 0 and [r["name"] for r in json.loads(out)] == ["e0", "e1", "e2"]
        rc, out, _ = cli("library", "show", rlib, "e2", "--json")
        assert rc == 0 and json.loads(out)["tasks"] == ["t2"]
        assert cli("library", "verify", rlib)[0] == 1  # the missing index is reported
        rc, _, err = cli("library", "rm", rlib, "e2")
        assert rc == 2 and "read-only" in err
        assert snapshot(rlib) == before
    finally:
        for p in [rlib, *rlib.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)


# -- 5. and 6. bounded work and one-line errors for every argument ---------------------
BAD_ARGS = [
    ("--limit", "-3"),
    ("--limit", "0"),
    ("--batch-size", "0"),
    ("--batch-size", "-1"),
    ("--max-length", "0"),
]


@pytest.mark.parametrize("flag,value", BAD_ARGS)
def test_bad_eval_numbers_exit_2(cli, mc_task, flag, value):
    rc, _, err = cli("eval", "--tasks", mc_task, flag, value)
    assert rc == 2 and flag in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["compose", "L", "--task", "t", "--shots", "10000"], "--shots"),
        (["--threads", "-1", "library", "ls", "L"], "--threads"),
        (["cluster", "L", "--k", "2", "--method", "embedding", "--max-prompts", "0"], "prompts"),
        (["library", "init", "L", "--base", "x", "--rank", "-4"], "--rank"),
        (["library", "import", "L", "src", "--name", ""], "--name"),
        (["train", "--tasks", "t", "--library", "L", "--lr", "nan"], "--lr"),
        (["--device", "tpu", "library", "ls", "L"], "--device"),
        (["serve", "L", "--port", "70000"], "--port"),
        (["serve", "L", "--max-batch", "0"], "--max-batch"),
        (["generate", "L", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", "L", "--prompt", "x", "--method", "arrow", "--top-k", "0"], "--top-k"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(cli, argv, needle):
    rc, _, err = cli(*argv)
    assert rc == 2 and needle in err


@pytest.mark.parametrize(
    "method, pair, needle",
    [
        ("ties", "density=nan", "density must be a number, got 'nan'"),  # not JSON: a string
        ("arrow", "top_k=2.5", "top_k must be an integer"),
        ("arrow", "top_k=true", "top_k must be an integer"),
    ],
)
def test_set_values_of_the_wrong_type_are_one_line(cli, rlib, mc_task, method, pair, needle):
    rc, _, err = cli("eval", rlib, "--tasks", mc_task, "--method", method, "--set", pair)
    assert rc == 2 and needle in err


def test_serve_on_a_taken_port_is_one_line(cli, rlib):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc, _, err = cli("serve", rlib, "--port", s.getsockname()[1])
    assert rc == 2 and "cannot listen on 127.0.0.1" in err and "--port" in err


def test_missing_device_is_one_line(cli, mc_task, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    rc, _, err = cli("--device", "mps", "eval", "--tasks", mc_task)
    assert rc == 2 and "MPS is not available" in err
    if not torch.cuda.is_available():
        rc, _, err = cli("--device", "cuda", "eval", "--tasks", mc_task)
        assert rc == 2 and "CUDA is not available" in err


def test_rank_validated_in_the_api(tmp_path):
    with pytest.raises(LorashelfError, match="positive integer"):
        Library.open(tmp_path / "l", create=True, base_model="org/m", rank=-4)
    with pytest.raises(LorashelfError, match="limit must be"):
        from lorashelf.evaluate.runner import EvalConfig

        EvalConfig(limit=-3)


def test_non_utf8_jsonl_and_bad_adapter_configs_are_one_line(cli, tmp_path, rlib, adapter):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"input": "caf\xe9", "target": "x"}\n')
    rc, _, err = cli("eval", "--tasks", f"jsonl:{bad}")
    assert rc == 2 and "not UTF-8" in err and ":1:" in err
    for i, text in enumerate(["[]", "null", '{"peft_type": "LORA", "r": "four"}', "\xff"]):
        src = adapter(f"cfg{i}")
        (src / "adapter_config.json").write_bytes(text.encode("latin-1"))
        rc, _, err = cli("library", "import", rlib, src, "--name", f"cfg{i}")
        assert rc == 2 and "adapter_config.json" in err, text


def test_diverged_training_says_so(cli, rlib, tmp_path, tiny_model_dir):
    """``--lr 1e6`` keeps the (clipped) loss finite but blows the weights up: the run
    says "training diverged" and names --lr; nothing lands, no staging dir is left."""
    from lorashelf.library.schema import check_caller_card

    with pytest.raises(LorashelfError, match="training diverged.*--lr"):
        check_caller_card({"valid_loss": math.nan})
    task = tmp_path / "t.jsonl"
    task.write_text(
        "".join(json.dumps({"input": f"Q{i}:", "target": " a"}) + "\n" for i in range(8))
    )
    rc, _, err = cli("train", rlib, "--tasks", f"jsonl:{task}", "--name", "div", "--lr", "1e6",
                     "--steps", "3", "--model", tiny_model_dir, "--quiet", "--target-modules", "q_proj,v_proj")  # fmt: skip
    assert rc == 2 and "training diverged" in err and "--lr 1e+06" in err, err
    assert Library.open(rlib).names() == ["e0", "e1"] and list((rlib / ".tmp").iterdir()) == []


def test_killed_writer_leaves_no_staging_dir(rlib):
    import multiprocessing

    ready = multiprocessing.get_context("fork").Event()

    def hold() -> None:
        with Library.open(rlib).staging_dir("train--") as d:
            (d / "half.bin").write_bytes(b"x" * 1000)
            ready.set()
            signal.pause()

    proc = multiprocessing.get_context("fork").Process(target=hold)
    proc.start()
    assert ready.wait(30)
    lib = Library.open(rlib)
    lib.repair()
    assert len(list((rlib / ".tmp").iterdir())) == 1  # alive: left alone
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert len(list((rlib / ".tmp").iterdir())) == 1  # reading never deletes
    Library.open(rlib).remove("e1")  # the next writer cleans up after the dead one
    assert list((rlib / ".tmp").iterdir()) == []
