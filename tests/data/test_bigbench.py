"""BIG-bench JSON parsing against hand-written expectations (json_task.py semantics)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lorashelf.data import list_tasks, load_task
from lorashelf.errors import LorashelfError

CHOICE = "\n  choice: "


def shown(name: str, text: str, choices: list[str]) -> str:
    """The documented display order: sorted choices shuffled by Random(name|input)."""
    order = sorted(choices)
    random.Random(f"{name}|{text}").shuffle(order)
    return CHOICE + CHOICE.join(order)


def write_task(home: Path, name: str, data: dict) -> None:
    path = home / "data" / "bigbench" / "benchmark_tasks" / name / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_mc_default_prefixes_task_prefix_and_appended_choices(bb_home: Path) -> None:
    task = load_task("bigbench:colors", home=bb_home)
    assert task.kind == "mc"
    assert task.canary.endswith("canary GUID lorashelf-test-colors")
    assert len(task.examples) == 5  # the duplicate "grass" example is dropped
    ex = task.examples[0]
    q = "What color is the sky?"
    full = "Answer with a color.\n" + "\nQ: " + q + shown("colors", q, ["blue", "green", "red"])
    assert ex.prompt == full + "\nA:"
    assert ex.options == (" blue", " green", " red")  # target_scores order, space moved
    assert ex.answer == 0 and ex.target == " blue"
    assert ex.prompt + ex.options[1] == full + "\nA: green"
    assert [e.answer for e in task.examples[:3]] == [0, 1, 2]


def test_mc_ties_for_top_score_keep_every_credit(bb_home: Path) -> None:
    ex = load_task("bigbench:colors", home=bb_home).examples[3]
    assert ex.options == (" 2", " 3", " three", " 4")
    assert ex.answer == 1  # the first top-scored choice
    assert ex.scores == (0.0, 1.0, 1.0, 0.0)


def test_mc_with_target_too_still_scores_target_scores(bb_home: Path) -> None:
    ex = load_task("bigbench:colors", home=bb_home).examples[4]
    assert ex.options == (" white", " black") and ex.answer == 0


def test_choice_order_is_per_example_not_per_position(bb_home: Path) -> None:
    full = load_task("bigbench:colors", home=bb_home)
    again = load_task("bigbench:colors", home=bb_home, max_examples=2)
    assert set(again.examples) <= set(full.examples)


def test_append_choices_false_and_custom_prefixes(bb_home: Path) -> None:
    task = load_task("bigbench:plausible", home=bb_home)
    ex = task.examples[0]
    assert ex.prompt == (
        "Determine whether the statement is plausible:\nStatement: The goalie scored a "
        "touchdown\nPlausible/implausible?"
    )
    assert ex.options == (" plausible", " implausible") and ex.answer == 1
    assert all("choice:" not in e.prompt for e in task.examples)
    assert not any(e.prompt.endswith(" ") for e in task.examples)


def test_generative_str_and_list_targets(bb_home: Path) -> None:
    task = load_task("bigbench:capitals", home=bb_home)
    assert task.kind == "gen" and len(task.examples) == 5
    ex = task.examples[1]
    assert ex.prompt == "\nQ: What is the capital of the Netherlands?\nA:"
    assert ex.targets == (" Amsterdam", " The Hague") and ex.target == " Amsterdam"
    assert task.examples[0].targets == (" Paris",) and not task.examples[0].is_mc


def test_container_concatenates_sorted_subtasks(bb_home: Path) -> None:
    task = load_task("bigbench:deduction", home=bb_home)
    four = load_task("bigbench:deduction/four", home=bb_home)
    three = load_task("bigbench:deduction/three", home=bb_home)
    assert task.kind == "mc"
    assert task.examples == four.examples + three.examples
    assert task.canary.endswith("lorashelf-test-deduction")
    assert three.examples[0].prompt == "Three objects in a row.\n\nA is left of B. B is left of C."
    assert three.examples[0].options[0] == " A is leftmost."


def test_container_max_examples_splits_evenly(bb_home: Path) -> None:
    assert len(load_task("bigbench:deduction", home=bb_home, max_examples=3).examples) == 2
    with pytest.raises(LorashelfError, match="at least 2"):
        load_task("bigbench:deduction", home=bb_home, max_examples=1)


def test_container_mixing_kinds_is_an_error(bb_home: Path) -> None:
    write_task(bb_home, "mixed", {"name": "mixed", "canary": "c"})
    write_task(bb_home, "mixed/a", {"examples": [{"input": "x", "target": "y"}]})
    write_task(bb_home, "mixed/b", {"examples": [{"input": "x", "target_scores": {"y": 1}}]})
    with pytest.raises(
        LorashelfError, match=r"mixes .*: bigbench:mixed/a \(gen\), bigbench:mixed/b \(mc\)"
    ):
        load_task("bigbench:mixed", home=bb_home)
    assert load_task("bigbench:mixed/a", home=bb_home).kind == "gen"


def test_no_winner_falls_back_on_target_else_errors(bb_home: Path) -> None:
    ex = {"input": "q", "target_scores": {"a": 0, "b": 0}, "target": "b"}
    write_task(bb_home, "tie", {"metrics": ["multiple_choice_grade"], "examples": [ex]})
    got = load_task("bigbench:tie", home=bb_home).examples[0]
    assert got.answer == 1 and got.scores == ()
    del ex["target"]
    write_task(bb_home, "tie", {"metrics": ["multiple_choice_grade"], "examples": [ex]})
    with pytest.raises(LorashelfError, match="example 0: no choice scores higher"):
        load_task("bigbench:tie", home=bb_home)


def test_malformed_json_names_file_and_fix(bb_home: Path) -> None:
    with pytest.raises(
        LorashelfError, match=r"broken/task\.json is not valid JSON.*--only broken`"
    ):
        load_task("bigbench:broken", home=bb_home)


def test_empty_examples_is_an_error(bb_home: Path) -> None:
    with pytest.raises(LorashelfError, match=r"empty/task\.json: task has no examples"):
        load_task("bigbench:empty", home=bb_home)


def test_example_without_target_is_an_error(bb_home: Path) -> None:
    write_task(bb_home, "bad", {"examples": [{"input": "q"}]})
    with pytest.raises(LorashelfError, match="either 'target' or 'target_scores'"):
        load_task("bigbench:bad", home=bb_home)


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [("colours", "colors"), ("three", "deduction/three"), ("capital", "capitals")],
)
def test_unknown_task_suggests_known_names(bb_home: Path, name: str, suggestion: str) -> None:
    with pytest.raises(LorashelfError, match=f"did you mean: [^)]*{suggestion}") as err:
        load_task(f"bigbench:{name}", home=bb_home)
    assert f"--only {name}" in str(err.value)


def test_not_pulled_says_how_to_pull(tmp_path: Path) -> None:
    with pytest.raises(LorashelfError, match="lorashelf data pull bigbench --only colors"):
        load_task("bigbench:colors", home=tmp_path)
    assert list_tasks(tmp_path) == []


@pytest.mark.parametrize("name", ["../colors", "/etc", "colors/../capitals", "a//b"])
def test_unsafe_names_are_rejected(bb_home: Path, name: str) -> None:
    with pytest.raises(LorashelfError, match="bad BIG-bench task name"):
        load_task(f"bigbench:{name}", home=bb_home)


def test_max_examples_is_a_deterministic_ordered_subset(bb_home: Path) -> None:
    full = load_task("bigbench:capitals", home=bb_home).examples
    a = load_task("bigbench:capitals", home=bb_home, max_examples=3).examples
    b = load_task("bigbench:capitals", home=bb_home, max_examples=3).examples
    assert a == b and len(a) == 3
    positions = [full.index(e) for e in a]
    assert positions == sorted(positions)
    with pytest.raises(LorashelfError, match="max_examples must be >= 1"):
        load_task("bigbench:capitals", home=bb_home, max_examples=0)


def test_splits_are_deterministic_and_partition(bb_home: Path) -> None:
    task = load_task("bigbench:colors", home=bb_home)
    s0, again, s1 = (
        task.splits(seed=0),
        load_task("bigbench:colors", home=bb_home).splits(0),
        task.splits(seed=1),
    )
    assert s0 == again
    assert sorted(map(repr, s0.get("all"))) == sorted(map(repr, task.examples))
    assert len(s0.test) == 1 and len(s0.valid) == 1 and len(s0.train) == 3
    orders = {tuple(task.splits(seed=s).get("all")) for s in range(6)}
    assert len(orders) > 1  # the seed matters
    assert s1 == task.splits(seed=1)


def test_ls_builds_a_missing_index(bb_home: Path) -> None:
    rows = {t.id: t for t in list_tasks(bb_home, source="bigbench")}
    assert rows["bigbench:colors"].n_examples == 5
    assert rows["bigbench:deduction"].n_examples == 5
    assert "bigbench:broken" not in rows and "bigbench:empty" not in rows
    assert (bb_home / "data" / "bigbench" / "index.json").is_file()
    assert {t.id for t in list_tasks(bb_home, kind="gen")} == {"bigbench:capitals"}
    with pytest.raises(LorashelfError, match="use mc or gen"):
        list_tasks(bb_home, kind="chat")


def test_malformed_subtask_names_its_full_name(bb_home: Path) -> None:
    bad = bb_home / "data" / "bigbench" / "benchmark_tasks" / "deduction" / "four" / "task.json"
    bad.write_text("{")
    with pytest.raises(LorashelfError, match="--only deduction/four`"):
        load_task("bigbench:deduction", home=bb_home)


def test_json_that_is_not_a_task_object(bb_home: Path) -> None:
    write_task(bb_home, "listy", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(LorashelfError, match="not a BIG-bench task"):
        load_task("bigbench:listy", home=bb_home)
