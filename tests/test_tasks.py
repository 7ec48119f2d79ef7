"""Task readers, the standard-dataset path and featurisation (no model needed)."""

import json
import random

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from bert.finetune.features import encode_squad, encode_tagged, load_tokenizer
from bert.finetune.readers import (
    QAExample,
    TaggedSentence,
    label_list,
    load_examples,
    read_conll,
    read_squad,
    read_table,
)
from bert.finetune.tasks import TaskDataError, get_task

WORDS = [
    "the",
    "denver",
    "broncos",
    "won",
    "game",
    "in",
    "santa",
    "clara",
    "after",
    "a",
    "long",
    "night",
    "who",
    "where",
    "did",
]


@pytest.fixture
def tokenizer(tmp_path):
    """A BERT WordPiece tokenizer over a few words, loaded from a bare vocab.txt (lowercase)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", ",", *WORDS, "##s", "bron", "##co"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return load_tokenizer(tmp_path)


def test_real_glue_files(shared_data):
    cola = load_examples(get_task("cola"), shared_data / "cola/dev.tsv", "validation")
    assert len(cola) == 527 and {e.label for e in cola} == {"0", "1"}
    assert cola[0].texts == ("The sailors rode the breeze clear of the rocks.",)
    mrpc = load_examples(get_task("mrpc"), shared_data / "glue/MRPC/dev.tsv", "validation")
    assert len(mrpc) == 408 and len(mrpc[0].texts) == 2  # the header's byte-order mark is not in the name
    assert mrpc[0].where.endswith("dev.tsv:2")
    stsb = load_examples(get_task("stsb"), shared_data / "glue/STS-B/dev.tsv", "validation")
    assert len(stsb) == 1500 and stsb[0].label == 5.0
    rte = load_examples(get_task("rte"), shared_data / "glue/RTE/dev.tsv", "validation")
    assert {e.label for e in rte} == {"entailment", "not_entailment"}


def test_real_conll(shared_data):
    sentences = read_conll(shared_data / "conll2003/valid.txt")
    assert len(sentences) == 3250
    assert sentences[0].words[:3] == ["CRICKET", "-", "LEICESTERSHIRE"] and sentences[0].tags[2] == "B-ORG"
    labels = label_list(get_task("ner"), sentences)
    assert labels == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_custom_table_formats(tmp_path):
    task = get_task("classification", ["premise", "hypothesis"], "gold")
    (tmp_path / "a.csv").write_text('premise,hypothesis,gold\n"A, quoted",b,yes\nc,d,no\n')
    (tmp_path / "a.jsonl").write_text(
        '{"premise": "x", "hypothesis": "y", "gold": 1}\n\n{"premise": "z", "hypothesis": "w", "gold": 0}\n'
    )
    csv_rows = read_table(tmp_path / "a.csv", task)
    assert csv_rows[0].texts == ("A, quoted", "b") and csv_rows[1].label == "no"
    jsonl_rows = read_table(tmp_path / "a.jsonl", task)
    assert [e.label for e in jsonl_rows] == ["1", "0"] and jsonl_rows[1].where.endswith("a.jsonl:3")
    assert label_list(task, csv_rows) == ["no", "yes"]
    with pytest.raises(ValueError, match="--text-columns"):
        get_task("classification")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("glue")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("cola.tsv", "s\t1\t\tok\ns\t2\t\tbad\n", r"cola.tsv:2: label '2' is not one of"),
        ("cola.tsv", "", r"cola.tsv: no examples"),
        ("cola.tsv", "s\t1\n", r"cola.tsv:1: 2 fields, but column '3' needs 4"),
    ],
)
def test_table_errors_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(TaskDataError, match=message):
        load_examples(get_task("cola"), tmp_path / name, "train")


def test_missing_column_and_bad_number(tmp_path):
    (tmp_path / "s.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\t0.5\n")
    with pytest.raises(TaskDataError, match=r"s.tsv:1: no column 'score'"):
        load_examples(get_task("stsb"), tmp_path / "s.tsv", "train")
    (tmp_path / "t.tsv").write_text("sentence1\tsentence2\tscore\na\tb\tfive\n")
    with pytest.raises(TaskDataError, match=r"t.tsv:2: label 'five' is not a number"):
        load_examples(get_task("stsb"), tmp_path / "t.tsv", "train")


def test_conll_errors(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP\n")
    with pytest.raises(TaskDataError, match=r"x.txt:4: 3 fields where the file has 4"):
        read_conll(path)
    path.write_text("EU NNP B-NP B-ORG\nrejects VBZ B-VP X-ORG\n")
    with pytest.raises(TaskDataError, match=r"x.txt:2: tag 'X-ORG' is not IOB2"):
        read_conll(path)
    path.write_text("EU NNP B-NP B-ORG\n\nParis NNP B-NP B-LOC\n")
    with pytest.raises(TaskDataError, match=r"x.txt:3: tag 'B-LOC' is not among the training tags"):
        read_conll(path, labels=["O", "B-ORG", "I-ORG"])
    path.write_text("\n\n")
    with pytest.raises(TaskDataError, match="no sentences"):
        read_conll(path)


def squad_file(path, answer_start=4, impossible=False):
    context = "The Denver Broncos won the game in Santa Clara."
    qas = [
        {
            "id": "q1",
            "question": "Who won?",
            "answers": [{"text": "Denver Broncos", "answer_start": answer_start}],
        }
    ]
    if impossible:
        qas.append({"id": "q2", "question": "Who lost?", "answers": [], "is_impossible": True})
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    path.write_text(json.dumps(data, indent=1))
    return path


def test_squad_reader_checks_offsets(tmp_path):
    examples = read_squad(squad_file(tmp_path / "ok.json"), version_2=False)
    assert examples[0].answers == [("Denver Broncos", 4)]
    with pytest.raises(
        TaskDataError, match=r"bad.json:\d+: question q1: answer 'Denver Broncos' is not at offset 5"
    ):
        read_squad(squad_file(tmp_path / "bad.json", answer_start=5), version_2=False)
    v2 = squad_file(tmp_path / "v2.json", impossible=True)
    with pytest.raises(TaskDataError, match="unanswerable; use --task squad_v2"):
        read_squad(v2, version_2=False)
    assert read_squad(v2, version_2=True)[1].answers == []
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(TaskDataError, match="empty"):
        read_squad(tmp_path / "empty.json", version_2=False)


def reference_read_squad(path, version_2):
    """The obvious reader: per question, the line of the first occurrence of its quoted id in the raw text."""
    raw = path.read_text(encoding="utf-8-sig")
    examples = []
    for article in json.loads(raw)["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph["context"]
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id"))
                at = raw.find(json.dumps(qid))
                where = f"{path}:{raw.count(chr(10), 0, at) + 1 if at >= 0 else 0}"
                answers = [(a["text"], a["answer_start"]) for a in qa.get("answers", [])]
                for text, start in answers:
                    if context[start : start + len(text)] != text:
                        raise TaskDataError(
                            f"{where}: question {qid}: answer {text!r} is not at offset {start} of its "
                            f"context (found {context[start : start + len(text)]!r})"
                        )
                impossible = bool(qa.get("is_impossible", False))
                if impossible and not version_2:
                    raise TaskDataError(f"{where}: question {qid} is unanswerable; use --task squad_v2")
                examples.append(QAExample(qid, qa["question"], context, [] if impossible else answers, where))
    return examples


def synthetic_squad(num_paragraphs, version_2, seed=0):
    """SQuAD JSON with repeated contexts, questions and ids, and ids that also occur (quoted) elsewhere."""
    rng = random.Random(seed)
    # A context ending in '"q1' holds '"q1"' in the raw JSON (escaped quote, closing quote), so some ids'
    # first occurrence is in an earlier context; ", " and ": " occur between tokens; "idé" may not occur.
    endings = [' "q1', ' "q"1', ' "q2-0', ' "5', " id5", ' a "b" \\ c']
    contexts = [" ".join(rng.choices(WORDS, k=30)) + endings[i % len(endings)] for i in range(40)]
    odd_ids = ["q1", 5, None, 'q"1', 'say "hi", \\ok', "idé", "q1", ", ", ": ", "article 3", "Where?"]
    articles = []
    for a in range(num_paragraphs // 10):
        paragraphs = []
        for p in range(10):
            context = rng.choice(contexts)
            qas = []
            for q in range(rng.randint(1, 4)):
                n = len(articles) * 10 + p
                qid = rng.choice(odd_ids) if rng.random() < 0.1 else f"q{n}-{q}"
                word = rng.choice(context.split())
                start = context.index(word)
                qa = {"id": qid, "question": rng.choice(["Who won?", "Where?", "When did it end?"])}
                if version_2 and rng.random() < 0.3:
                    qa.update(answers=[], is_impossible=True)
                else:
                    qa["answers"] = [{"text": word, "answer_start": start}] * rng.randint(1, 3)
                qas.append(qa)
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    return {"version": "2.0" if version_2 else "1.1", "data": articles}


@pytest.mark.parametrize("version_2", [False, True])
@pytest.mark.parametrize("layout", [{"indent": 1}, {}, {"indent": 2, "ensure_ascii": False}])
def test_squad_reader_matches_per_question_search(tmp_path, version_2, layout):
    data = synthetic_squad(300, version_2)
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data, **layout), encoding="utf-8")
    examples = read_squad(path, version_2)
    assert len(examples) > 600 and len({e.context for e in examples}) <= 40
    assert examples == reference_read_squad(path, version_2)
    # A wrong offset late in the file: the same error, naming the same line.
    data["data"][-1]["paragraphs"][-1]["qas"][-1] = {
        "id": "late",
        "question": "?",
        "answers": [{"text": "zzz", "answer_start": 3}],
    }
    path.write_text(json.dumps(data, **layout), encoding="utf-8")
    with pytest.raises(TaskDataError) as expected:
        reference_read_squad(path, version_2)
    with pytest.raises(TaskDataError) as got:
        read_squad(path, version_2)
    assert str(got.value) == str(expected.value)


def test_encode_squad_windows_and_offsets(tokenizer):
    context = "The Denver Broncos won the game in Santa Clara after a long night."
    example = QAExample("q", "who won?", context, [("Santa Clara", context.index("Santa"))])
    features = encode_squad(tokenizer, [example], max_seq_length=12, doc_stride=3, max_query_length=8)
    assert len(features) > 1  # the context needs several windows
    found = 0
    for f in features:
        assert len(f["input_ids"]) <= 12 and len(f["offsets"]) == len(f["input_ids"])
        assert f["token_type_ids"][:5] == [0] * 5 and f["token_type_ids"][-1] == 1
        s, e = f["start_positions"], f["end_positions"]
        if (s, e) != (0, 0):  # the window holds the answer: its offsets give back the answer text
            found += 1
            assert context[f["offsets"][s][0] : f["offsets"][e][1]] == "Santa Clara"
    assert found >= 1
    # every context token appears in some window
    covered = {o for f in features for o in f["offsets"] if o is not None}
    assert len(covered) == len(tokenizer.encode(context, add_special_tokens=False).ids)


def test_encode_tagged_labels_first_piece(tokenizer):
    sentence = TaggedSentence(["Bronco", "won"], ["B-ORG", "O"])
    (f,) = encode_tagged(tokenizer, [sentence], 16, ["O", "B-ORG", "I-ORG"])
    pieces = [tokenizer.id_to_token(i) for i in f["input_ids"]]
    assert pieces == ["[CLS]", "bron", "##co", "won", "[SEP]"]
    assert f["labels"] == [-100, 1, -100, 0, -100]
    assert f["word_index"] == [-1, 0, -1, 1, -1]


def test_tokenizer_json_and_vocab_txt_agree(tmp_path, tokenizer):
    vocab = tokenizer.get_vocab()
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.enable_padding(length=40)  # saved padding must be switched off by load_tokenizer
    (tmp_path / "j").mkdir()
    tok.save(str(tmp_path / "j" / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / "j")
    text = ("Who won the game?", "The Broncos.")
    assert loaded.encode(*text).ids == tokenizer.encode(*text).ids
    assert loaded.encode(*text).ids[0] == vocab["[CLS]"]  # a post-processor was added


def test_standard_dataset_path(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"sentence": ["a b", "c d", "e f"], "label": [0, 1, 1], "idx": [0, 1, 2]}
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]),
         "idx": datasets.Value("int32")}
    )  # fmt: skip
    calls = []

    def fake_load_dataset(*args, split=None, **kwargs):
        calls.append((args, split))
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples(get_task("cola"), None, "train")
    assert calls == [(("glue", "cola"), "train")]
    assert [e.label for e in examples] == ["0", "1", "1"] and examples[1].texts == ("c d",)

    # a save_to_disk directory (a DatasetDict) of CoNLL-style rows, tags as ClassLabel ids
    tags = datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))
    conll = datasets.Dataset.from_dict(
        {"tokens": [["John", "Smith", "ran"]], "ner_tags": [[1, 2, 0]]},
        features=datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")), "ner_tags": tags}),
    )
    datasets.DatasetDict({"train": conll, "validation": conll}).save_to_disk(str(tmp_path / "conll"))
    sentences = load_examples(get_task("ner"), tmp_path / "conll", "validation")
    assert sentences[0].tags == ["B-PER", "I-PER", "O"]
    with pytest.raises(TaskDataError, match="no split 'test'"):
        load_examples(get_task("ner"), tmp_path / "conll", "test")
