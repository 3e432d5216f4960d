"""``lorashelf export`` end to end: what it writes, its one-line errors, and that a
failure or a refused overwrite leaves every path as it was."""

from __future__ import annotations

import json

import pytest

from lorashelf.cli import main


def run(capsys, *argv):
    rc = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_export_ties_with_rank_writes_a_peft_dir_and_its_record(library, tmp_path, capsys):
    out = tmp_path / "ties"
    rc, text, _ = run(capsys, library.path, "--method", "ties", "--rank", "4", "--format",
                      "peft", "--out", out, "--json", tmp_path / "s.json")  # fmt: skip
    assert rc == 0 and "wrote" in text
    record = json.loads((out / "export.json").read_text())
    assert record["method"] == "ties" and record["experts"] == ["a", "b", "c"]
    assert record["config"] == {"density": 0.2, "rank": 4}
    assert 0 < record["relative_truncation_error"] < 1
    assert json.loads((tmp_path / "s.json").read_text())["rank"] == 4
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(
    "argv, fix",
    [
        (["--method", "arrow", "--format", "gguf"], "lorashelf serve"),
        (["--method", "phatgoose", "--format", "peft"], "lorashelf serve"),
        (["--method", "ties", "--format", "peft"], "pass --rank K"),
        (["--method", "expert:nope", "--format", "peft"], "no expert 'nope'"),
        (["--method", "weights:a=x", "--format", "peft"], "weights:NAME=0.7"),
        (["--method", "unifrom", "--format", "peft"], "did you mean: uniform"),
        (["--method", "expert:a", "--format", "gguf", "--base", "/no/such.gguf"], "does not exist"),
        (
            ["--method", "expert:a", "--format", "gguf", "--target", "vllm"],
            "applies to --format peft",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_fix_and_writes_nothing(
    library, tmp_path, capsys, argv, fix
):
    out = tmp_path / "out"
    before = listing(tmp_path)
    rc, _, err = run(capsys, library.path, *argv, "--out", out)
    assert rc == 2 and fix in err and len(err.strip().splitlines()) == 1
    assert listing(tmp_path) == before


def test_a_failure_mid_write_leaves_nothing_at_out(library, tmp_path, capsys, monkeypatch):
    import lorashelf.export.run as run_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(run_mod, "write_json_atomic", boom)
    before = listing(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        run(capsys, library.path, "--method", "expert:a", "--format", "peft", "--out",
            tmp_path / "out")  # fmt: skip
    assert listing(tmp_path) == before


def test_overwrite_replaces_only_an_earlier_export(library, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    base = ["--format", "gguf", "--base", library.path.parent / "src-a"]
    # src-a is a PEFT dir, not a base model: the error names what to pass
    rc, _, err = run(capsys, library.path, "--method", "expert:a", *base, "--out", out)
    assert rc == 2 and "config.json" in err
    peft = tmp_path / "p"
    assert (
        run(capsys, library.path, "--method", "expert:a", "--format", "peft", "--out", peft)[0] == 0
    )
    rc, _, err = run(
        capsys, library.path, "--method", "expert:b", "--format", "peft", "--out", peft
    )
    assert rc == 2 and "--overwrite" in err
    args = [library.path, "--method", "expert:b", "--format", "peft", "--overwrite", "--out"]
    assert run(capsys, *args, peft)[0] == 0
    assert json.loads((peft / "export.json").read_text())["experts"] == ["b"]
    # an unrelated directory or the library itself is never replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, *args, other)
    assert rc == 2 and "not a peft export" in err and (other / "keep.txt").read_text() == "mine"
    lib_files = listing(library.path)
    for target in (library.path, library.path / "experts"):
        rc, _, err = run(capsys, *args, target)
        assert rc == 2 and "library" in err
    assert listing(library.path) == lib_files


def test_an_expert_of_another_base_model_is_refused(library, tmp_path, capsys, monkeypatch):
    from lorashelf.library.expert import Expert

    real_card = Expert.card

    def card(self):
        c = real_card.fget(self)
        return c | {"base_model": "gpt2"} if self.name == "b" else c

    monkeypatch.setattr(Expert, "card", property(card))
    rc, _, err = run(capsys, library.path, "--method", "uniform", "--format", "peft", "--out",
                     tmp_path / "u")  # fmt: skip
    assert rc == 2 and "expert 'b' was trained on gpt2" in err and not (tmp_path / "u").exists()
