"""``hfbridge score``: rewards of texts from a reward model (``hfbridge finetune --method reward``).

Each record is scored as the reward model was trained: a prompt and a completion, rendered and tokenized by
:mod:`hfbridge.data.preference`. Accepted records: ``prompt``/``completion`` (strings or a conversation prompt
with one assistant message), ``messages`` (the last assistant turn is the completion), or preference pairs
(``prompt``/``chosen``/``rejected``: both are scored and the pair counts towards the accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

from hfbridge.console import say


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score texts with a reward model (rewards per record, pair accuracy)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a reward-model run folder (its model/) or model folder")
    p.add_argument("--data", required=True, help="records to score: .jsonl, .csv, .parquet or a datasets folder")
    p.add_argument("--output", help="write the records with their rewards here (.jsonl)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None, help="cut completions at this many tokens")
    p.add_argument("--trust-remote-code", action="store_true")


def _examples(rows: list[tuple[str, dict]]):
    from hfbridge.data.formats import DataFormatError, check_record, last_assistant_turn
    from hfbridge.data.preference import PreferenceExample, parse_preference_record

    out = []
    for where, record in rows:
        if "chosen" in record or "rejected" in record:
            out.append(parse_preference_record(record, "preference", where))
        elif "messages" in record:
            check_record(record, "messages", where)
            messages = record["messages"]
            last = last_assistant_turn(messages)
            out.append(PreferenceExample(messages[:last], (messages[last],), None, where))
        elif "prompt" in record and "completion" in record:
            out.append(parse_preference_record({**record, "label": True}, "kto", where))
        else:
            raise DataFormatError(f"{where}: a record to score needs prompt and completion, messages, or "
                                  f"prompt/chosen/rejected; got fields {sorted(record)}")
    return out


def _model_folder(path: str) -> Path:
    from hfbridge.models.loading import run_folder_model

    folder = run_folder_model(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"--model {path}: not a model folder (no config.json) nor a run folder (no model/)")
    return folder


def score_records(model, tokenizer, examples, batch_size: int = 16, max_length: int | None = None) -> list[list[float]]:
    """One reward per completion of each example (two for a pair)."""
    import torch

    from hfbridge.data.collators import PaddedCollator
    from hfbridge.data.formats import pad_id
    from hfbridge.data.preference import tokenize_preference_example
    from hfbridge.models.preference import reward_scores

    collate = PaddedCollator(pad_id(tokenizer))
    device = next(model.parameters()).device
    rewards: list[list[float]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        samples = [tokenize_preference_example(tokenizer, e, max_length) for e in chunk]
        sequences = [seq for s in samples for seq in s.sequences]
        batch = {k: v.to(device) for k, v in collate(sequences).items() if torch.is_tensor(v)}
        with torch.no_grad():
            values = reward_scores(model, batch).tolist()
        at = 0
        for s in samples:
            rewards.append(values[at : at + len(s.sequences)])
            at += len(s.sequences)
    return rewards


def cmd_score(args) -> int:
    from transformers import AutoModelForSequenceClassification

    from hfbridge.data.datamodule import record_rows
    from hfbridge.io import check_output_file, write_text_atomic
    from hfbridge.models.loading import load_tokenizer

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    rows = record_rows(args.data)
    examples = _examples(rows)  # every record checked before the model loads
    if args.output:
        check_output_file(args.output)
    folder = _model_folder(args.model)
    config = json.loads((folder / "config.json").read_text())
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise ValueError(f"--model {args.model}: {config.get('architectures')} is not a reward model (a sequence-"
                         "classification model, as `hfbridge finetune --method reward` writes)")
    tokenizer = load_tokenizer(folder, args.trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=args.trust_remote_code)
    model.eval()
    rewards = score_records(model, tokenizer, examples, args.batch_size, args.max_length)
    lines, pairs, wins = [], 0, 0
    for (where, record), values in zip(rows, rewards):
        if len(values) == 2:
            pairs += 1
            wins += values[0] > values[1]
            lines.append({**record, "reward_chosen": values[0], "reward_rejected": values[1]})
            print(f"{where}: chosen {values[0]:+.4f}  rejected {values[1]:+.4f}")
        else:
            lines.append({**record, "reward": values[0]})
            print(f"{where}: {values[0]:+.4f}")
    if pairs:
        say(f"the reward model prefers the chosen completion in {wins} of {pairs} pairs ({wins / pairs:.1%})")
    if args.output:
        write_text_atomic(args.output, "".join(json.dumps(line) + "\n" for line in lines))
        say(f"wrote {len(lines)} scored records to {args.output}")
    return 0


COMMANDS = {"score": cmd_score}
