"""How many batch shapes a run sees when packed to a multiple (``TrainConfig.pack_multiple_of``), and what the fill costs.

CUDA graphs record one graph per shape; each new shape costs a recording (and its memory). For a finished
examples directory, the first ``--steps`` global batches of a run (seed 0, one rank), as the training loop
collates them, packed to each multiple: distinct (packed tokens, predicted positions, padded length) shapes,
how many first appear after ``--timed-from`` (what would fall into benchmarks/gpu.py's timed steps), and the
mean share of fill tokens and fill positions. Prints JSON.

    python benchmarks/pack_shapes.py --examples EXAMPLES --batch 256 --multiples 256,512,1024,2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bert.pretrain.data import Collator, DataPosition, RankBatches, open_split  # noqa: E402
from bert.pretrain.engine import host_inputs  # noqa: E402


def shapes(examples: str, batch: int, multiple_of: int, steps: int, timed_from: int) -> dict:
    train = open_split(examples, "train")
    if train is None:
        raise SystemExit(f"{examples} has no train examples")
    collator = Collator(train.metadata, seed=0)
    batches = RankBatches(train, 0, 0, 1, batch, 1, 0, DataPosition())
    seen, token_fill, position_fill = [], [], []
    for _ in range(steps):
        epoch, micro = batches.next()
        inputs = host_inputs(collator(train, micro[0], epoch), multiple_of)
        tokens, positions = int(inputs["attention_mask"].sum()), int((inputs["labels"] != -100).sum())
        seen.append(
            (len(inputs["unpad_indices"]), len(inputs["mlm_positions"]), inputs["input_ids"].shape[1])
        )
        token_fill.append(seen[-1][0] / tokens - 1)
        position_fill.append(seen[-1][1] / max(1, positions) - 1)
    return {
        "multiple_of": multiple_of,
        "distinct_shapes": len(set(seen)),
        "new_shapes_from_step": len(set(seen[timed_from:]) - set(seen[:timed_from])),
        "mean_token_fill": round(statistics.mean(token_fill), 5),
        "mean_position_fill": round(statistics.mean(position_fill), 5),
        "mean_tokens": round(statistics.mean(s[0] for s in seen) / (1 + statistics.mean(token_fill))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", required=True, help="a finished `bertpipe examples` directory")
    parser.add_argument("--batch", type=int, default=256, help="global batch (one rank)")
    parser.add_argument("--multiples", default="0,256,512,1024,2048")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--timed-from", type=int, default=30, help="steps before this are the warm-up")
    args = parser.parse_args()
    results = [shapes(args.examples, args.batch, int(m), args.steps, args.timed_from)
               for m in args.multiples.split(",")]  # fmt: skip
    print(json.dumps({"examples": args.examples, "batch": args.batch, "steps": args.steps,
                      "timed_from": args.timed_from, "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
