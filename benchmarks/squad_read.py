"""Read time of `bert.finetune.readers.read_squad` on a synthetic SQuAD-v1.1-size file, against the reader it replaced.

The old reader searched the whole raw text for every question's id (to name its line in error messages), so
its time grew with questions x file size: about 28 minutes on SQuAD v1.1 train. The file here has the same
shape: ~19k paragraphs of ~700 characters in ~440 articles, ~88k questions with 24-hex ids and answers cut
from their contexts, written compactly on one line as the real file is (~30 MB). The old reader is timed on a
--fraction of it (the full file would take half an hour), the new one on both; json.loads alone is the floor.

    .venv/bin/python benchmarks/squad_read.py [--paragraphs 18896] [--questions 87599] [--fraction 0.05]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import tempfile
import time
from pathlib import Path

from bert.finetune.readers import QAExample, read_squad
from bert.finetune.tasks import TaskDataError


def synthetic_squad(num_paragraphs: int, num_questions: int, seed: int = 0) -> dict:
    """SQuAD v1.1-shaped data: ~43 paragraphs an article, ~700-character contexts, answers inside them."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 9))) for _ in range(5000)]
    articles, paragraphs = [], []
    for p in range(num_paragraphs):
        words = []
        while sum(map(len, words)) + len(words) < 700:
            words.append(rng.choice(vocabulary))
        context = " ".join(words)
        qas = []
        # Spread the questions evenly over the paragraphs (4.6 a paragraph for SQuAD v1.1 train).
        for _ in range((p + 1) * num_questions // num_paragraphs - p * num_questions // num_paragraphs):
            first = rng.randrange(len(words) - 3)
            text = " ".join(words[first : first + rng.randint(1, 3)])
            start = len(" ".join(words[:first])) + (first > 0)
            question = " ".join(rng.choices(vocabulary, k=rng.randint(6, 14))) + "?"
            qas.append(
                {
                    "answers": [{"answer_start": start, "text": text}],
                    "question": question,
                    "id": f"{rng.getrandbits(96):024x}",
                }
            )
        paragraphs.append({"context": context, "qas": qas})
        if len(paragraphs) == 43 or p == num_paragraphs - 1:
            articles.append({"title": f"Article_{len(articles)}", "paragraphs": paragraphs})
            paragraphs = []
    return {"data": articles, "version": "1.1"}


def quadratic_read_squad(path: str | Path, version_2: bool) -> list[QAExample]:
    """The reader before the fix, verbatim but for names: `raw.find` and `raw.count` from 0 per question."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8-sig")
    data = json.loads(raw)["data"]
    examples = []
    for article in data:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id"))
                at = raw.find(json.dumps(qid))
                where = f"{path}:{raw.count(chr(10), 0, at) + 1 if at >= 0 else 0}"
                answers = []
                for answer in qa.get("answers", []):
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise TaskDataError(
                            f"{where}: question {qid}: an answer lacks 'text' or 'answer_start'"
                        )
                    if context[start : start + len(text)] != text:
                        raise TaskDataError(
                            f"{where}: question {qid}: answer {text!r} is not at offset {start} of its "
                            f"context (found {context[start : start + len(text)]!r})"
                        )
                    answers.append((text, start))
                impossible = bool(qa.get("is_impossible", False))
                if impossible and not version_2:
                    raise TaskDataError(f"{where}: question {qid} is unanswerable; use --task squad_v2")
                if not answers and not impossible:
                    raise TaskDataError(
                        f"{where}: question {qid} has no answers and is not marked is_impossible"
                    )
                examples.append(QAExample(qid, qa["question"], context, [] if impossible else answers, where))
    return examples


def timed(read, path: Path, repeats: int) -> tuple[float, list]:
    """Best wall seconds of `repeats` reads (the machine is shared), and what the last returned."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        examples = read(path, False)
        best = min(best, time.perf_counter() - began)
    return best, examples


def main() -> None:
    """Write the files, time the readers, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paragraphs", type=int, default=18896)
    parser.add_argument("--questions", type=int, default=87599)
    parser.add_argument("--fraction", type=float, default=0.05, help="size of the file the old reader reads")
    parser.add_argument("--repeats", type=int, default=3, help="reads of each file; the best is kept")
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, scale in (("full", 1.0), ("small", args.fraction)):
            path = Path(tmp) / f"{name}.json"
            num_paragraphs = max(1, round(args.paragraphs * scale))
            path.write_text(json.dumps(synthetic_squad(num_paragraphs, round(args.questions * scale))))
            began = time.perf_counter()
            json.loads(path.read_text(encoding="utf-8-sig"))
            entry = {
                "paragraphs": num_paragraphs,
                "mbytes": round(path.stat().st_size / 1e6, 1),
                "json_loads_s": round(time.perf_counter() - began, 3),
            }
            new_s, new = timed(read_squad, path, args.repeats)
            entry.update(questions=len(new), new_reader_s=round(new_s, 3))
            if name == "small":
                old_s, old = timed(quadratic_read_squad, path, args.repeats)
                assert old == new, "the readers disagree"
                entry.update(old_reader_s=round(old_s, 3), old_over_new=round(old_s / new_s, 1))
            result[name] = entry
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
