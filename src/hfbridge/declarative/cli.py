"""Command-line face of declarative configs: ``hfbridge train | predict | evaluate | llm-data``.

    hfbridge train --config c.yaml --data d.csv    [--output runs/llm]      fine-tune (or zero/few-shot) and score
    hfbridge predict --model runs/llm --data d.csv [--output p.csv]       predictions for every record
    hfbridge evaluate --model runs/llm --data d.csv [--split test]        a metrics table, and JSON on disk
    hfbridge llm-data --task dates|tickets --output d.csv                    the example data sets

``--config`` instead of ``--model`` uses the config's base model as it is (zero- or few-shot). ``hfbridge serve``
(:mod:`hfbridge.serving`, wired in :mod:`hfbridge.cli`) serves a declarative run folder too, with ``/predict``.
"""

from __future__ import annotations

import argparse

SPLITS = ("all", "train", "validation", "test")


def _model_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="a folder written by hfbridge train (or LLM.save)")
    group.add_argument("--config", help="a config whose base model is used as it is (zero- or few-shot)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run code shipped with the model (a saved folder's own setting is never obeyed)")


def add_parsers(sub) -> None:
    """Add the declarative commands to the ``hfbridge`` subparsers."""
    p = sub.add_parser("train", help="train (or zero/few-shot score) an LLM described by a YAML config")
    p.add_argument("--config", required=True, help="the YAML config (see docs/declarative.md)")
    p.add_argument("--data", "--dataset", dest="dataset", required=True,
                   help=".csv, .jsonl, .parquet or a datasets folder (--dataset: the same)")
    p.add_argument("--output", default="runs/llm", help="run folder (refused if not empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty run folder")
    p.add_argument("--seed", "--random-seed", dest="random_seed", type=int, default=42,
                   help="split, few-shot and training seed (--random-seed: the same)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the GPU when there is one)")
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    p.add_argument("--nproc-per-node", dest="nproc_per_node", type=int, default=None,
                   help="train on this many processes, started with torchrun (the recipe's parallel.nproc_per_node)")
    p.add_argument("--sharding-axis-dims", dest="sharding_axis_dims", default=None,
                   help="mesh sizes dp,fsdp,tp,sp; one -1 is inferred from the world size (1,-1,1,1: FSDP2 over "
                        "all processes; see docs/distributed.md)")

    p = sub.add_parser("predict", help="predict with a trained declarative LLM")
    _model_args(p)
    p.add_argument("--data", "--dataset", dest="dataset", required=True, help="(--dataset: the same)")
    p.add_argument("--split", default="all", choices=SPLITS, help="which split of the data (default: all rows)")
    p.add_argument("--output", default="predictions.csv", help=".csv, .jsonl or .parquet")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("evaluate", help="score a declarative LLM: a table on screen, JSON on disk")
    _model_args(p)
    p.add_argument("--data", "--dataset", dest="dataset", required=True, help="(--dataset: the same)")
    p.add_argument("--split", default="all", choices=SPLITS, help="which split of the data (default: all rows)")
    p.add_argument("--output", default="evaluation.json", help="the metrics JSON (a confusion matrix PNG beside)")

    p = sub.add_parser("llm-data", help="write an example data set (dates: text output; tickets: category)")
    p.add_argument("--task", required=True, choices=["dates", "tickets"])
    p.add_argument("--output", required=True, help=".csv, .jsonl or .parquet")
    p.add_argument("--train-size", type=int, default=None, help="default: 400 dates, 240 tickets")
    p.add_argument("--test-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args) -> int:
    from hfbridge.declarative.run import train_job

    parallel = {"nproc_per_node": args.nproc_per_node, "sharding_axis_dims": args.sharding_axis_dims}
    result = train_job(args.config, args.dataset, args.output, args.overwrite, args.random_seed, args.device,
                       args.progress_bar, parallel, getattr(args, "_argv", None))
    return result.exit_code


def cmd_predict(args) -> int:
    from hfbridge.declarative.run import predict_job

    predict_job(args.model, args.config, args.dataset, args.output, args.split, args.device, args.overwrite,
                args.trust_remote_code)
    return 0


def cmd_evaluate(args) -> int:
    from hfbridge.declarative.run import evaluate_job

    evaluate_job(args.model, args.config, args.dataset, args.output, args.split, args.device,
                 args.trust_remote_code)
    return 0


def cmd_llm_data(args) -> int:
    from hfbridge.declarative.examples import write_example_data

    n_train = args.train_size or (400 if args.task == "dates" else 240)
    path = write_example_data(args.task, args.output, n_train, args.test_size, args.seed)
    print(f"wrote {path} ({n_train} train, {args.test_size} test rows, column 'split')")
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "evaluate": cmd_evaluate, "llm-data": cmd_llm_data}
