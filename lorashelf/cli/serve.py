"""``lorashelf generate`` (stream one answer to the terminal) and ``lorashelf serve``
(the OpenAI-compatible HTTP server); parsing only, the work is in lorashelf.serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorashelf.cli.args import float_range, int_range, nonneg_int, positive_float, positive_int
from lorashelf.cli.options import add_set_flag, parse_sets

PALETTE = ("red", "green", "blue", "magenta", "cyan", "yellow", "bright_red", "bright_green",
           "bright_blue", "bright_magenta", "bright_cyan", "orange3")  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with a library method, streamed")
    g.add_argument("library", type=Path)
    g.add_argument(
        "--method",
        default="base",
        help="base, expert:NAME, weights:NAME=0.7,NAME=0.3, any merge (uniform, ties, dare-ties, ...), arrow, phatgoose, retrieval",
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="the prompt text")
    src.add_argument("--prompt-file", type=Path, default=None, help="read the prompt from a file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=nonneg_int, default=64)
    g.add_argument("--temperature", type=float_range(0.0), default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float_range(0.0, 1.0, low_open=True), default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _method_options(g)
    g.add_argument(
        "--show-routing", action="store_true", help="colour each token by its top expert"
    )
    _model_options(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve libraries over an OpenAI-compatible HTTP API")
    s.add_argument("library", type=Path, nargs="+")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int_range(1, 65535), default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--max-batch", type=positive_int, default=16, help="requests per forward pass")
    s.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 503")
    s.add_argument(
        "--batch-window-ms", type=float_range(0.0), default=10.0, help="wait this long for more"
    )
    s.add_argument(
        "--watch-s", type=float_range(0.0), default=2.0, help="poll the library index (0: off)"
    )
    _model_options(s)
    s.set_defaults(func=cmd_serve)


def _method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experts", default=None, help="comma-separated subset (merges, routing)")
    p.add_argument(
        "--top-k", type=positive_int, default=None, help="arrow/phatgoose: experts per token"
    )
    p.add_argument(
        "--router-temperature", type=positive_float, default=None, help="arrow: softmax temp."
    )
    p.add_argument(
        "--density",
        type=float_range(0.0, 1.0, low_open=True),
        default=None,
        help="ties: fraction of entries kept",
    )
    add_set_flag(p)


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model (default: the library's)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    p.add_argument(
        "--lora-dtype", default="model", choices=["model", "fp32"],
        help="precision of the LoRA branch: the model's (fastest) or fp32 (PEFT's numerics "
        "on a bf16 model)",
    )  # fmt: skip


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from lorashelf.errors import LorashelfError
    from lorashelf.serve.compositions import parse_method, with_options
    from lorashelf.serve.engine import Engine, Request
    from lorashelf.serve.loading import load_bank, open_libraries
    from lorashelf.serve.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        seed=args.seed, stop=tuple(args.stop),
    )  # fmt: skip
    name = next(iter(open_libraries([args.library])))
    options = {
        "experts": args.experts.split(",") if args.experts else None, "top_k": args.top_k,
        "temperature": args.router_temperature, "density": args.density,
        "settings": parse_sets(args.set_options) or None,
    }  # fmt: skip
    comp = with_options(parse_method(name, args.method), options)
    text = args.prompt if args.prompt is not None else _read(args.prompt_file)
    bank, tokenizer = load_bank([args.library], home=args.home, device=args.device,
                                dtype=args.dtype, model=args.model,
                                lora_dtype=args.lora_dtype)  # fmt: skip
    bank.resolve(comp)  # unknown experts fail here, before any generation
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LorashelfError("this model's tokenizer has no chat template; run without --chat")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    engine = Engine(bank, tokenizer, max_batch=1)
    console = Console(highlight=False)
    colours: dict[str, str] = {}
    failure: list[str] = []
    last: list = [None]  # the routing of the latest token (its text may come later)

    def on_event(ev) -> None:
        if ev.kind == "error":
            failure.append(ev.text)
            return
        last[0] = ev.routing or last[0]
        if ev.kind in ("token", "done") and ev.text:
            style = None
            if args.show_routing and last[0]:
                top = last[0][0][0]
                style = colours.setdefault(top, PALETTE[len(colours) % len(PALETTE)])
            console.print(Text(ev.text, style=style), end="", soft_wrap=True)

    ids = tokenizer(text)["input_ids"]
    req = Request(ids, comp, params, on_event, return_routing=args.show_routing)
    engine.check(ids, params)
    engine.run_batch([req])
    console.print()
    if failure:
        raise LorashelfError(failure[0])
    if args.show_routing:
        if colours:
            legend = Text("top expert per token: ")
            for expert, colour in colours.items():
                legend.append(f"■ {expert}  ", style=colour)
            console.print(legend)
        else:
            console.print("(no routing: the base model uses no expert)")
    bank.close()
    return 0


def _read(path: Path) -> str:
    from lorashelf.errors import LorashelfError

    try:
        return path.read_text()
    except OSError as e:
        raise LorashelfError(f"cannot read --prompt-file {path}: {e.strerror}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from lorashelf.serve.app import ServeConfig, run_server

    config = ServeConfig(
        libraries=tuple(args.library), host=args.host, port=args.port, api_key=args.api_key,
        max_batch=args.max_batch, max_queue=args.max_queue,
        window_s=args.batch_window_ms / 1000, watch_s=args.watch_s, model=args.model,
        dtype=args.dtype, lora_dtype=args.lora_dtype,
    )  # fmt: skip
    run_server(config, home=args.home, device=args.device)
    return 0
