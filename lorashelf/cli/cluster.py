"""``lorashelf cluster`` (group a library's experts) and ``lorashelf build`` (one expert
per cluster, trained on the union of its tasks): the MBC pipeline of arXiv 2405.11157."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorashelf.cli.args import fraction, nonneg_int, output_path, positive_int
from lorashelf.cli.convention import add_library_arg, deprecated, library_of
from lorashelf.cli.options import parse_sets


def _similarity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sparsity", type=fraction, default=0.5, help="mbc: zero this fraction of smallest weights"
    )
    p.add_argument(
        "--svd-dim", type=nonneg_int, default=64, help="mbc: truncated SVD dim (0: none)"
    )
    p.add_argument(
        "--center",
        action="store_true",
        help="mbc: subtract the mean expert first (removes the shared LoRA A init)",
    )
    p.add_argument("--n-init", type=positive_int, default=10, help="k-means restarts")
    p.add_argument(
        "--max-iter", type=positive_int, default=300, help="k-means iterations per restart"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="cluster a library's experts (MBC, random, embedding)")
    p.add_argument("dir", type=Path, help="library directory")
    p.add_argument("--k", type=positive_int, required=True, help="number of clusters")
    p.add_argument("--method", default="mbc", help="mbc (default), random or embedding")
    p.add_argument("--seed", type=int, default=0, help="k-means / random seed")
    _similarity_options(p)
    p.add_argument(
        "--sizes-from",
        type=Path,
        default=None,
        help="random: use the cluster sizes of this clusters.json (default: balanced)",
    )
    p.add_argument("--model", default=None, help="embedding: base model (default: library's)")
    p.add_argument(
        "--max-prompts", type=positive_int, default=32, help="embedding: prompts per expert"
    )
    p.add_argument("--dtype", default="auto", help="embedding: auto, bf16, fp16, fp32")
    p.add_argument(
        "--allow-mixed-init",
        action="store_true",
        help="cluster experts trained from different LoRA init seeds anyway",
    )
    p.add_argument(
        "--block-size", type=positive_int, default=None, help="experts per similarity block"
    )
    p.add_argument(
        "--block-mb", type=positive_int, default=512, help="memory for similarity blocks"
    )
    p.add_argument("--out", type=output_path, required=True, help="clusters.json to write")
    p.add_argument("--plot", type=Path, default=None, help="similarity heatmap PNG to write")
    p.set_defaults(func=cmd_cluster)

    c = sub.add_parser(
        "cluster-check",
        help="how well each clustering method recovers known task families (ARI, over seeds)",
    )
    c.add_argument("dir", type=Path, help="library directory")
    c.add_argument(
        "--families",
        type=Path,
        required=True,
        help='JSON {"family": [task ids]} or a suite file with a "families" key; '
        "experts of unlisted tasks are families of their own",
    )
    c.add_argument(
        "--k", type=positive_int, default=None, help="clusters (default: number of families)"
    )
    c.add_argument("--methods", default="mbc,embedding,random", help="comma-separated")
    c.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1")
    _similarity_options(c)
    c.add_argument("--model", default=None, help="embedding: base model (default: library's)")
    c.add_argument(
        "--max-prompts", type=positive_int, default=32, help="embedding: prompts per expert"
    )
    c.add_argument("--dtype", default="auto", help="embedding: auto, bf16, fp16, fp32")
    c.add_argument("--allow-mixed-init", action="store_true", help="as for cluster")
    c.add_argument("--json", type=Path, default=None, help="write every run's result here")
    c.set_defaults(func=cmd_cluster_check)

    b = sub.add_parser("build", help="train one expert per cluster of a clusters.json (MBC)")
    add_library_arg(b, old="--from")  # the clustered library (--from DIR: deprecated)
    b.add_argument("--clusters", type=Path, required=True, help="clusters.json to build")
    b.add_argument("--out", type=Path, default=None, help="output library directory")
    b.add_argument("--library", type=Path, default=None, help=argparse.SUPPRESS)  # deprecated
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
        center=args.center,
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


def cmd_cluster_check(args: argparse.Namespace) -> int:
    import json

    from lorashelf.cluster.agreement import summarise
    from lorashelf.cluster.methods import ClusterConfig
    from lorashelf.cluster.run import check_library
    from lorashelf.config import write_json_atomic
    from lorashelf.errors import LorashelfError
    from lorashelf.library import Library
    from lorashelf.runtime import resolve_dtype

    try:
        doc = json.loads(args.families.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LorashelfError(f"cannot read the families file {args.families}: {e}") from None
    families = doc.get("families", doc) if isinstance(doc, dict) else None
    if not isinstance(families, dict):
        raise LorashelfError(
            f'{args.families} must hold {{"family": [task ids]}} or a suite with "families"'
        )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.seeds < 1:
        raise LorashelfError(f"--seeds {args.seeds}: run at least one seed")
    lib = Library.open(args.dir)
    k = args.k or None
    if k is None:  # one cluster per family; unlisted experts each count as one
        from lorashelf.cluster.agreement import family_truth

        names = list(lib.names())
        k = len(family_truth(names, {n: lib.get(n).card for n in names}, families).families)
    cfg = ClusterConfig(
        k=k, sparsity=args.sparsity, svd_dim=args.svd_dim or None, center=args.center,
        n_init=args.n_init, max_iter=args.max_iter, max_prompts=args.max_prompts,
        text_model=args.model, allow_mixed_init=args.allow_mixed_init,
    )  # fmt: skip
    truth, rows = check_library(
        lib, families, cfg, methods, range(args.seeds), home=args.home, device=args.device,
        dtype=resolve_dtype(args.dtype, args.device), progress=True,
    )  # fmt: skip
    summary = summarise(rows)
    print_agreement(truth, rows, summary, k)
    if args.json:
        write_json_atomic(args.json, {
            "library": str(args.dir.resolve()), "k": k, "experts": truth.names,
            "family_labels": truth.labels, "families": truth.families,
            "singletons": truth.singletons, "config": {
                "sparsity": cfg.sparsity, "svd_dim": cfg.svd_dim, "center": cfg.center,
                "n_init": cfg.n_init, "max_iter": cfg.max_iter,
            },
            "summary": summary, "runs": rows,
        })  # fmt: skip
        print(f"wrote {args.json}")
    return 0


def print_agreement(truth, rows: list[dict], summary: list[dict], k: int) -> None:
    from rich.console import Console
    from rich.table import Table

    n_fam = len(truth.families)
    table = Table(
        title=f"{len(truth.names)} experts, {n_fam} families "
        f"({len(truth.singletons)} unrelated), k={k}: adjusted Rand index vs families",
        caption="ARI: 1 = the families exactly, 0 = chance. Cosines are in the similarity each method clusters by (parameters; embedding: text).",
    )
    seeds = sorted({r["seed"] for r in rows})
    for col in ("method", "mean", "std", *(f"s{s}" for s in seeds), "intra cos", "inter cos"):
        table.add_column(col, justify="left" if col == "method" else "right")
    best = max(s["ari_mean"] for s in summary)
    for s in summary:
        mine = [r for r in rows if r["method"] == s["method"]]
        per = {r["seed"]: r["ari"] for r in mine}
        intra = [r["mean_intra_cosine"] for r in mine if r["mean_intra_cosine"] is not None]
        inter = [r["mean_inter_cosine"] for r in mine if r["mean_inter_cosine"] is not None]
        mean = f"{s['ari_mean']:.3f}"
        table.add_row(
            s["method"],
            f"[bold]{mean}[/bold]" if s["ari_mean"] == best else mean,
            f"{s['ari_std']:.3f}",
            *(f"{per[sd]:.2f}" for sd in seeds),
            _fmt(sum(intra) / len(intra) if intra else None),
            _fmt(sum(inter) / len(inter) if inter else None),
        )
    Console().print(table)


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

    source = Library.open(library_of(args))
    out_dir = args.out
    if args.library is not None:
        deprecated("build --library OUT", "build LIB --out OUT")
        out_dir = out_dir or args.library
    if out_dir is None:
        raise LorashelfError("pass the output library with --out DIR")
    cards = {n: dict(source.get(n).card) for n in source.names()}
    options = training_from_cards(cards)  # train cluster experts like the private ones
    if args.train_config:
        try:
            options = override(options, json.loads(args.train_config.read_text()))
        except (OSError, ValueError) as e:
            raise LorashelfError(
                f"--train-config {args.train_config}: {e}; pass a JSON object file"
            ) from None
    train_cfg = from_dict(TrainConfig, override(options, parse_sets(args.overrides)))
    base = args.model or source.base_model
    out = Library.open(out_dir, create=True, base_model=base)
    trainer = make_trainer(
        base,
        train_cfg,
        home=args.home,
        device=args.device,
        dtype=resolve_dtype(args.dtype, args.device),
    )
    built = build_library(args.clusters, source, out, trainer, prefix=args.prefix, progress=True)
    total = len(load_clusters(args.clusters).clusters)
    print(f"built {len(built)} of {total} cluster expert(s) into {out_dir}")
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
