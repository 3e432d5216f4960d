"""``lorashelf cluster`` (group a library's experts) and ``lorashelf build`` (one expert
per cluster, trained on the union of its tasks): the MBC pipeline of arXiv 2405.11157."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="cluster a library's experts (MBC, random, embedding)")
    p.add_argument("dir", type=Path, help="library directory")
    p.add_argument("--k", type=int, required=True, help="number of clusters")
    p.add_argument("--method", default="mbc", help="mbc (default), random or embedding")
    p.add_argument("--seed", type=int, default=0, help="k-means / random seed")
    p.add_argument(
        "--sparsity", type=float, default=0.5, help="mbc: zero this fraction of smallest weights"
    )
    p.add_argument("--svd-dim", type=int, default=64, help="mbc: truncated SVD dim (0: none)")
    p.add_argument("--n-init", type=int, default=10, help="k-means restarts")
    p.add_argument("--max-iter", type=int, default=300, help="k-means iterations per restart")
    p.add_argument(
        "--sizes-from",
        type=Path,
        default=None,
        help="random: use the cluster sizes of this clusters.json (default: balanced)",
    )
    p.add_argument("--model", default=None, help="embedding: base model (default: library's)")
    p.add_argument("--max-prompts", type=int, default=32, help="embedding: prompts per expert")
    p.add_argument("--dtype", default="auto", help="embedding: auto, bf16, fp16, fp32")
    p.add_argument(
        "--allow-mixed-init",
        action="store_true",
        help="cluster experts trained from different LoRA init seeds anyway",
    )
    p.add_argument("--block-size", type=int, default=None, help="experts per similarity block")
    p.add_argument("--block-mb", type=int, default=512, help="memory for similarity blocks")
    p.add_argument("--out", type=Path, required=True, help="clusters.json to write")
    p.add_argument("--plot", type=Path, default=None, help="similarity heatmap PNG to write")
    p.set_defaults(func=cmd_cluster)

    b = sub.add_parser("build", help="train one expert per cluster of a clusters.json (MBC)")
    b.add_argument("--from", dest="source", type=Path, required=True, help="clustered library")
    b.add_argument("--clusters", type=Path, required=True, help="clusters.json to build")
    b.add_argument("--library", type=Path, required=True, help="output library directory")
    b.add_argument("--model", default=None, help="base model (default: the source library's)")
    b.add_argument("--dtype", default="auto", help="auto, bf16, fp16, fp32")
    b.add_argument("--prefix", default="cluster", help="built experts are PREFIX_ID")
    b.add_argument(
        "--train-config", type=Path, default=None, help="JSON of training options (TrainConfig)"
    )
    b.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one training option, e.g. --set epochs=3 --set lr=3e-4 (repeatable)",
    )
    b.set_defaults(func=cmd_build)


def cmd_cluster(args: argparse.Namespace) -> int:
    from lorashelf.cluster.methods import ClusterConfig
    from lorashelf.cluster.report import load_clusters
    from lorashelf.cluster.run import cluster_library
    from lorashelf.runtime import resolve_dtype

    sizes = load_clusters(args.sizes_from).sizes if args.sizes_from else None
    cfg = ClusterConfig(
        method=args.method,
        k=args.k,
        seed=args.seed,
        sparsity=args.sparsity,
        svd_dim=args.svd_dim or None,
        n_init=args.n_init,
        max_iter=args.max_iter,
        sizes=sizes,
        max_prompts=args.max_prompts,
        text_model=args.model,
        allow_mixed_init=args.allow_mixed_init,
    )
    clustering, doc = cluster_library(
        args.dir,
        cfg,
        out=args.out,
        plot=args.plot,
        home=args.home,
        device=args.device,
        dtype=resolve_dtype(args.dtype, args.device),
        block_size=args.block_size,
        block_mb=args.block_mb,
        progress=True,
    )
    print_clusters(doc)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def parse_overrides(pairs: list[str]) -> dict:
    """``["epochs=3", "lr=3e-4", "tag=x"]`` -> {"epochs": 3, "lr": 0.0003, "tag": "x"}."""
    import json

    from lorashelf.errors import LorashelfError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LorashelfError(f"--set {pair!r} is not KEY=VALUE; e.g. --set epochs=3")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def override(options: dict, changes: dict) -> dict:
    """``options`` updated by ``changes``; a new ``steps`` clears ``epochs`` and vice versa."""
    out = {**options, **changes}
    for key, other in (("steps", "epochs"), ("epochs", "steps")):
        if changes.get(key) is not None and other not in changes:
            out[other] = None
    return out


def cmd_build(args: argparse.Namespace) -> int:
    import json

    from lorashelf.cluster.build import build_library, make_trainer, training_from_cards
    from lorashelf.cluster.report import load_clusters
    from lorashelf.config import from_dict
    from lorashelf.errors import LorashelfError
    from lorashelf.library import Library
    from lorashelf.runtime import resolve_dtype
    from lorashelf.train.config import TrainConfig

    source = Library.open(args.source)
    cards = {n: dict(source.get(n).card) for n in source.names()}
    options = training_from_cards(cards)  # train cluster experts like the private ones
    if args.train_config:
        try:
            options = override(options, json.loads(args.train_config.read_text()))
        except (OSError, ValueError) as e:
            raise LorashelfError(
                f"--train-config {args.train_config}: {e}; pass a JSON object file"
            ) from None
    train_cfg = from_dict(TrainConfig, override(options, parse_overrides(args.overrides)))
    base = args.model or source.base_model
    out = Library.open(args.library, create=True, base_model=base)
    trainer = make_trainer(
        base,
        train_cfg,
        home=args.home,
        device=args.device,
        dtype=resolve_dtype(args.dtype, args.device),
    )
    built = build_library(args.clusters, source, out, trainer, prefix=args.prefix, progress=True)
    total = len(load_clusters(args.clusters).clusters)
    print(f"built {len(built)} of {total} cluster expert(s) into {args.library}")
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_clusters(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    st = doc["stats"]
    table = Table(
        title=f"{doc['method']}: {doc['source']['n_experts']} experts -> {doc['k']} clusters",
        caption=f"mean {doc['similarity']} cosine: intra-cluster {_fmt(st['mean_intra_cosine'])}, "
        f"inter-cluster {_fmt(st['mean_inter_cosine'])}",
    )
    for col in ("cluster", "size", "intra cos", "experts", "tasks"):
        table.add_column(
            col, justify="right" if col in ("cluster", "size", "intra cos") else "left"
        )
    for c in doc["clusters"]:
        experts = ", ".join(c["experts"][:4]) + (" ..." if len(c["experts"]) > 4 else "")
        table.add_row(
            str(c["id"]),
            str(c["size"]),
            _fmt(c["mean_intra_cosine"]),
            experts,
            str(len(c["tasks"])),
        )
    Console().print(table)
