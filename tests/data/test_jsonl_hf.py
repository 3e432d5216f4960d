"""The jsonl: and hf: sources on files written in the test (the hub is never used)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorashelf.data import load_task
from lorashelf.errors import LorashelfError

datasets = pytest.importorskip("datasets")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_generative_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"input": "2+2 =", "target": "4"},
            "",
            {"input": "Capital of NL:", "target": ["Amsterdam", "The Hague"]},
            {"input": "Say hi: ", "target": "hi"},
            {"input": "Line\n", "target": "x"},
        ],
    )
    task = load_task(f"jsonl:{path}", home=tmp_path)
    assert task.kind == "gen" and task.id == f"jsonl:{path}"
    ex = task.examples
    assert (ex[0].prompt, ex[0].targets) == ("2+2 =", (" 4",))
    assert ex[1].targets == (" Amsterdam", " The Hague")
    assert (ex[2].prompt, ex[2].target) == ("Say hi:", " hi")  # trailing space moved
    assert (ex[3].prompt, ex[3].target) == ("Line\n", "x")  # whitespace at the seam already
    assert all(e.prompt + e.target == r for e, r in zip(ex, ["2+2 = 4", "Capital of NL: Amsterdam", "Say hi: hi", "Line\nx"]))  # fmt: skip


def test_jsonl_splits_follow_the_content_not_the_path(tmp_path: Path) -> None:
    """A JSONL task's id is its path; its split, subset and shots are keyed on its
    content, so the same file moved (the demo writes one per output directory) trains
    the same expert, and another file splits differently."""
    from lorashelf.compose.shots import draw_shots

    rows = [{"input": f"q{i}", "target": f"a{i}"} for i in range(40)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = load_task(
        f"jsonl:{write_jsonl(tmp_path / 'a' / 't.jsonl', rows)}", home=tmp_path, max_examples=30
    )
    two = load_task(
        f"jsonl:{write_jsonl(tmp_path / 'b' / 't.jsonl', rows)}", home=tmp_path, max_examples=30
    )
    assert one.id != two.id and one.examples == two.examples
    assert one.splits(seed=0) == two.splits(seed=0)
    assert [e.prompt for e in draw_shots(one, 5, 1)] == [e.prompt for e in draw_shots(two, 5, 1)]
    other = load_task(f"jsonl:{write_jsonl(tmp_path / 'c.jsonl', rows[:-1])}", home=tmp_path)
    assert other.key != one.key
    assert one.splits(seed=0) != one.splits(seed=1)


def test_jsonl_multiple_choice_and_sep(tmp_path: Path) -> None:
    rows = [
        {"input": "Sky?", "options": ["blue", "red"], "answer": 0},
        {"input": "Blood?", "options": ["blue", "red"], "answer": "red"},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    task = load_task(f"jsonl:{path}", home=tmp_path)
    assert task.kind == "mc"
    assert task.examples[1].options == (" blue", " red") and task.examples[1].answer == 1
    nl = load_task(f"jsonl:{path}?sep=%0A", home=tmp_path)
    assert nl.examples[0].options == ("\nblue", "\nred")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"input": "a", "target": "b"}', "{oops"], r"t\.jsonl:2: not valid JSON"),
        (['{"input": "a", "target": "b"}', "", '{"input": "c"}'], r"t\.jsonl:3: needs a target"),
        (['{"input": "a", "options": ["x", "y"], "answer": 2}'], r"t\.jsonl:1: answer must be"),
        (['{"input": "a", "options": ["x", "y"], "answer": "z"}'], r"t\.jsonl:1: answer must be"),
        (['{"input": "a", "options": ["x"], "answer": 0}'], "at least two strings"),
        (['["input", "target"]'], r"t\.jsonl:1: each line must be an object"),
        (['{"input": 3, "target": "b"}'], r"t\.jsonl:1: the input must be a string"),
        (
            ['{"input": "a", "target": "b"}', '{"input": "a", "options": ["x", "y"], "answer": 0}'],
            "1 of 2 examples have options",
        ),
        ([""], "has no examples"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LorashelfError, match=message):
        load_task(f"jsonl:{path}", home=tmp_path)


def test_jsonl_missing_file_and_unknown_option(tmp_path: Path) -> None:
    with pytest.raises(LorashelfError, match="no file"):
        load_task(f"jsonl:{tmp_path}/nope.jsonl", home=tmp_path)
    path = write_jsonl(tmp_path / "t.jsonl", [{"input": "a", "target": "b"}])
    with pytest.raises(LorashelfError, match="unknown option 'spe'.*did you mean: sep"):
        load_task(f"jsonl:{path}?spe=x", home=tmp_path)


@pytest.fixture
def flan(tmp_path: Path) -> Path:
    """A FLAN-style table: many tasks in one file, source/target/task_name columns."""
    rows = {
        "source": [f"cola sentence {i} acceptable?" for i in range(6)]
        + [f"translate {i}:" for i in range(4)],
        "target": ["yes", "no"] * 3 + [f"t{i}" for i in range(4)],
        "task_name": ["cola"] * 6 + ["wmt"] * 4,
    }
    path = tmp_path / "flan.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return path


def test_hf_parquet_with_task_filter_and_mapping(tmp_path: Path, flan: Path) -> None:
    task = load_task(f"hf:{flan}?input=source&task_name=cola", home=tmp_path)
    assert task.kind == "gen" and len(task.examples) == 6
    assert task.examples[1].prompt == "cola sentence 1 acceptable?"
    assert task.examples[1].target == " no"
    wmt = load_task(f"hf:{flan}?input=source&task_name=wmt&sep=%0A", home=tmp_path)
    assert [e.target for e in wmt.examples] == ["\nt0", "\nt1", "\nt2", "\nt3"]
    assert (tmp_path / "data" / "hf").is_dir()  # datasets' cache stays under home
    sub = load_task(f"hf:{flan}?input=source&task_name=cola", home=tmp_path, max_examples=3)
    again = load_task(f"hf:{flan}?input=source&task_name=cola", home=tmp_path, max_examples=3)
    assert sub.examples == again.examples and set(sub.examples) <= set(task.examples)


def test_hf_json_multiple_choice(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mc.json",
        [
            {"q": "Sky?", "choices": ["blue", "red"], "label": 0},
            {"q": "Blood?", "choices": ["blue", "red"], "label": 1},
        ],
    )
    task = load_task(f"hf:{path}?input=q&options=choices&answer=label", home=tmp_path)
    assert task.kind == "mc"
    assert [e.answer for e in task.examples] == [0, 1]
    assert task.examples[0].options == (" blue", " red")


def test_hf_errors(tmp_path: Path, flan: Path) -> None:
    with pytest.raises(LorashelfError, match="no column 'input'.*columns: source, target"):
        load_task(f"hf:{flan}", home=tmp_path)
    with pytest.raises(LorashelfError, match="no column 'sorce'.*did you mean: source"):
        load_task(f"hf:{flan}?input=sorce", home=tmp_path)
    with pytest.raises(LorashelfError, match="no rows with task_name == 'coal'.*cola"):
        load_task(f"hf:{flan}?input=source&task_name=coal", home=tmp_path)
    with pytest.raises(LorashelfError, match="unknown option 'inputs'"):
        load_task(f"hf:{flan}?inputs=source", home=tmp_path)
    bad = tmp_path / "x.txt"
    bad.write_text("hi")
    with pytest.raises(LorashelfError, match="unknown file type '.txt'"):
        load_task(f"hf:{bad}", home=tmp_path)


def test_task_id_errors(tmp_path: Path) -> None:
    with pytest.raises(LorashelfError, match="has no source; write SOURCE:NAME"):
        load_task("sports_understanding", home=tmp_path)
    with pytest.raises(LorashelfError, match="unknown task source 'bigbnech'.*bigbench"):
        load_task("bigbnech:x", home=tmp_path)
