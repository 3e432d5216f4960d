"""``lorashelf generate``: streams the same text the engine produces; routing legend;
user errors are one line and exit 2."""

from __future__ import annotations

from lorashelf.cli import main


def _generate(lib, *extra):
    return main(["--device", "cpu", "generate", str(lib.path), "--dtype", "fp32",
                 "--max-new-tokens", "6", *extra])  # fmt: skip


def test_generate_streams_the_engines_answer(served, serve_kit, capsys):
    comp = serve_kit.Composition("lib", "expert", ("beta",))
    (events,) = serve_kit.complete(
        served.engine, [("hello", comp, serve_kit.SamplingParams(max_tokens=6))]
    )
    assert _generate(served.library, "--method", "expert:beta", "--prompt", "hello") == 0
    assert capsys.readouterr().out == serve_kit.text(events) + "\n"


def test_generate_show_routing_prints_a_legend(served, capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The library of experts says")
    rc = _generate(served.library, "--method", "arrow", "--top-k", "2", "--prompt-file",
                   str(prompt), "--show-routing")  # fmt: skip
    assert rc == 0
    legend = capsys.readouterr().out.strip().splitlines()[-1]
    assert legend.startswith("top expert per token:") and "lib/" in legend


def test_generate_unknown_expert_is_one_line(served, capsys):
    assert _generate(served.library, "--method", "expert:bta", "--prompt", "x") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bar
    assert err.startswith("lorashelf: error:") and "did you mean: lib/beta" in err
