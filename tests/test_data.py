"""Data pipeline: loading, format detection, completion-only labels, truncation, packing, splitting, bad-data errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from peft_trainer import models
from peft_trainer.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataCollatorForCausalLM,
    detect_format,
    load_records,
    make_collator,
    tokenize_dataset,
    train_eval_split,
)

CHAT = [
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid, of course."},
        ]
    },
]
PAIRS = [
    {"prompt": "Translate to French: cat", "completion": " chat"},
    {"prompt": "2 + 2 =", "completion": " 4"},
    {"prompt": "Say hello.", "completion": "Hello there, friend!"},
]


pytestmark = pytest.mark.usefixtures("embedded_cache")


@pytest.fixture(scope="module")
def tok() -> Any:
    """SmolLM2's tokenizer (ChatML template, eos == pad == <|im_end|>)."""
    return models.load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def plain_tok(tok: Any) -> Any:
    """The same tokenizer without a chat template."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


@pytest.fixture(scope="module")
def bert_tok() -> Any:
    return models.load_tokenizer("minilm-l6")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def trained_text(tokenizer: Any, row: dict[str, Any]) -> str:
    return tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])


# ---------------------------------------------------------------------------------------------------------------------
# Loading and detection


def test_load_every_file_type(tmp_path: Path) -> None:
    rows = [{"text": "good movie", "label": 1}, {"text": "bad movie", "label": 0}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("text,label\ngood movie,1\nbad movie,0\n")
    (tmp_path / "e.tsv").write_text("text\tlabel\ngood movie\t1\nbad movie\t0\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "f.parquet"))
    for name in ("a.jsonl", "b.json", "c.json", "d.csv", "e.tsv", "f.parquet"):
        ds = load_records(tmp_path / name)
        assert ds.to_list() == rows, name
        assert detect_format(ds) == "classification"
        assert ds.info.dataset_name == str(tmp_path / name)


def test_detect_format() -> None:
    def fmt(**columns: list[Any]) -> str:
        return detect_format(datasets.Dataset.from_dict(columns))

    assert fmt(messages=[CHAT[0]["messages"]]) == "messages"
    assert fmt(prompt=["a"], completion=["b"]) == "prompt_completion"
    assert fmt(text=["a"], label=[0]) == "classification"
    assert fmt(text=["a"]) == "text"
    with pytest.raises(ValueError, match="missing column 'completion'"):
        fmt(prompt=["a"])
    with pytest.raises(ValueError, match="found columns 'question'"):
        fmt(question=["a"])


def test_rows_with_different_keys(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d", "id": 7}]
    )
    ds = load_records(path)
    assert ds.column_names == ["prompt", "completion", "id"] and ds[0]["id"] is None


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------------------------
# Causal-LM formats


def test_messages_loss_only_on_assistant_turns(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT)
    ds, stats = tokenize_dataset(load_records(path), tok, max_length=256)
    assert stats.fmt == "messages" and stats.rows == stats.examples == 2 and stats.truncated == 0
    assert trained_text(tok, ds[0]) == "Paris.<|im_end|>"
    assert trained_text(tok, ds[1]) == "Rome.<|im_end|>Madrid, of course.<|im_end|>"
    # The inputs are exactly the chat template's rendering, tokenized.
    rendered = tok.apply_chat_template(CHAT[1]["messages"], tokenize=False)
    assert ds[1]["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    for row in ds:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["attention_mask"])
        assert set(row["attention_mask"]) == {1}
        kept = [i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX]
        assert all(row["labels"][i] == row["input_ids"][i] for i in kept)
    assert stats.trainable_tokens == sum(t != IGNORE_INDEX for row in ds for t in row["labels"])


def test_messages_full_loss(tok: Any) -> None:
    ds, _ = tokenize_dataset(datasets.Dataset.from_list(CHAT), tok, max_length=256, completion_only_loss=False)
    assert ds[0]["labels"] == ds[0]["input_ids"]


def test_messages_without_template(plain_tok: Any) -> None:
    ds, _ = tokenize_dataset(datasets.Dataset.from_list(CHAT), plain_tok, max_length=256)
    assert trained_text(plain_tok, ds[0]) == "Paris.<|im_end|>"
    assert trained_text(plain_tok, ds[1]) == "Rome.<|im_end|>Madrid, of course.<|im_end|>"
    rendered = plain_tok.apply_chat_template(CHAT[0]["messages"], chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False)
    assert rendered == "user:\nCapital of France?\nassistant:\nParis.<|im_end|>\n"
    assert plain_tok.decode(ds[0]["input_ids"]) == rendered


def test_prompt_completion_with_template(tmp_path: Path, tok: Any) -> None:
    ds, stats = tokenize_dataset(load_records(write_jsonl(tmp_path / "pc.jsonl", PAIRS)), tok, max_length=256)
    assert stats.fmt == "prompt_completion"
    for row, pair in zip(ds, PAIRS):
        assert trained_text(tok, row) == pair["completion"] + "<|im_end|>"
        assert f"<|im_start|>user\n{pair['prompt']}<|im_end|>" in tok.decode(row["input_ids"])


def test_prompt_completion_without_template(plain_tok: Any) -> None:
    ds, _ = tokenize_dataset(datasets.Dataset.from_list(PAIRS), plain_tok, max_length=256)
    for row, pair in zip(ds, PAIRS):
        assert trained_text(plain_tok, row) == pair["completion"] + plain_tok.eos_token
        assert (
            plain_tok.decode(row["input_ids"])
            == f"user:\n{pair['prompt']}\nassistant:\n{pair['completion']}<|im_end|>\n"
        )
    full, _ = tokenize_dataset(
        datasets.Dataset.from_list(PAIRS), plain_tok, max_length=256, completion_only_loss=False
    )
    assert full[0]["labels"] == full[0]["input_ids"]


@pytest.mark.parametrize("template", ["own", "none"])
def test_training_scoring_and_serving_render_a_prompt_alike(tok: Any, plain_tok: Any, template: str) -> None:
    """The tokens before a completion in training are the tokens behaviour scoring and the Space generate from."""
    from peft_trainer.prompts import encode_prompts

    tokenizer = tok if template == "own" else plain_tok
    ds, _ = tokenize_dataset(datasets.Dataset.from_list(PAIRS), tokenizer, max_length=256)
    for row, pair in zip(ds, PAIRS):
        prompt_ids = encode_prompts(tokenizer, [pair["prompt"]])["input_ids"][0]
        first_label = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        assert row["input_ids"][:first_label] == prompt_ids


def test_text_format(tok: Any) -> None:
    ds, stats = tokenize_dataset(
        datasets.Dataset.from_dict({"text": ["Once upon a time", "The end"]}), tok, fmt="text"
    )
    assert stats.fmt == "text"
    assert ds[0]["labels"] == ds[0]["input_ids"] and ds[0]["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ds[1]["input_ids"]) == "The end<|im_end|>"


def test_truncation_counts_and_drops(tok: Any) -> None:
    long_answer = "word " * 200
    rows = [
        {"prompt": "short", "completion": "ok"},
        {"prompt": "short", "completion": long_answer},  # cut, still has completion tokens
        {"prompt": "question " * 200, "completion": "lost"},  # completion cut away entirely: dropped
    ]
    ds, stats = tokenize_dataset(datasets.Dataset.from_list(rows), tok, max_length=64)
    assert stats.truncated == 2 and stats.dropped == 1 and stats.examples == 2
    assert max(len(r) for r in ds["input_ids"]) == 64
    assert trained_text(tok, ds[0]) == "ok<|im_end|>"


def test_packing(tok: Any) -> None:
    texts = [f"Document number {i} says something {'long ' * i}." for i in range(12)]
    dataset = datasets.Dataset.from_dict({"text": texts})
    flat, _ = tokenize_dataset(dataset, tok, max_length=32)
    packed, stats = tokenize_dataset(dataset, tok, max_length=32, packing=True)
    rows = list(flat["input_ids"])
    assert stats.packed and stats.examples == len(packed) < len(rows) and "attention_mask" not in packed.column_names
    assert all(len(r) <= 32 for r in packed["input_ids"])
    assert [t for row in packed["input_ids"] for t in row] == [t for row in rows for t in row]  # order kept
    # Positions restart at each row, and no row learns its first token from the row before it.
    starts = [i for block in packed["position_ids"] for i, p in enumerate(block) if p == 0]
    assert len(starts) == len(rows)
    assert all(block_labels[i] == IGNORE_INDEX for block_labels, block in zip(packed["labels"], packed["position_ids"])
               for i, p in enumerate(block) if p == 0)  # fmt: skip
    # Completion-only masks survive packing.
    pc, _ = tokenize_dataset(datasets.Dataset.from_list(PAIRS * 3), tok, max_length=64, packing=True)
    labels = [t for row in pc["labels"] for t in row]
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "".join(
        p["completion"] + "<|im_end|>" for p in PAIRS * 3
    )
    # Rows longer than max_length are cut, as without packing.
    long_rows = datasets.Dataset.from_dict({"text": ["word " * 80]})
    _, long_stats = tokenize_dataset(long_rows, tok, max_length=32, packing=True)
    assert long_stats.truncated == 1


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_batch_gives_each_row_its_own_logits(tok: Any, padding_side: str) -> None:
    """A packed, padded batch: every row inside it gets the logits and loss terms it gets alone (no attention
    across rows, positions restart), as TRL's padding-free packing promises."""
    texts = [f"Row {i}: {'some words ' * (i % 4 + 1)}end." for i in range(9)]
    dataset = datasets.Dataset.from_dict({"text": texts})
    alone, _ = tokenize_dataset(dataset, tok, max_length=48)
    packed, _ = tokenize_dataset(dataset, tok, max_length=48, packing=True)
    assert any(len([p for p in block if p == 0]) > 1 for block in packed["position_ids"])
    batch = make_collator(tok, "text").__class__(tok.pad_token_id, padding_side=padding_side)(list(packed))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    model, _ = models.load_model("tiny-llama")
    with torch.no_grad():
        # No KV cache, as in training (the Trainer sets use_cache=False): transformers reads packed rows from
        # restarting positions only when there is no cache and no attention mask.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        expected = [model(input_ids=torch.tensor([ids])).logits[0] for ids in alone["input_ids"]]
    found = []
    for b, positions in enumerate(packed["position_ids"]):  # each packed row, where it lies in the padded batch
        offset = batch["input_ids"].shape[1] - len(positions) if padding_side == "left" else 0
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        found += [logits[b, offset + a : offset + z] for a, z in zip(starts, starts[1:])]
    assert len(found) == len(expected)
    for got, want in zip(found, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_classification(tmp_path: Path, bert_tok: Any) -> None:
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "great", "label": 2}, {"text": "awful " * 50, "label": 0}])
    ds, stats = tokenize_dataset(load_records(path), bert_tok, max_length=16)
    assert stats.fmt == "classification" and stats.num_labels == 3 and stats.label_names is None
    assert list(ds["label"]) == [2, 0] and stats.truncated == 1 and len(ds[1]["input_ids"]) == 16
    assert ds[1]["input_ids"][-1] == bert_tok.sep_token_id  # the tokenizer truncates, keeping [SEP]

    named = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    ds, stats = tokenize_dataset(named, bert_tok, max_length=16)
    assert stats.label_names == ["neg", "pos"] and list(ds["label"]) == [1, 0, 1]
    ds, stats = tokenize_dataset(named, bert_tok, max_length=16, label_names=["pos", "neg"])
    assert list(ds["label"]) == [0, 1, 0] and stats.num_labels == 2

    class_label = named.cast_column("label", datasets.ClassLabel(names=["pos", "neg"]))
    ds, stats = tokenize_dataset(class_label, bert_tok, max_length=16)
    assert stats.label_names == ["pos", "neg"] and list(ds["label"]) == [0, 1, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Splitting and collating


def test_train_eval_split() -> None:
    ds = datasets.Dataset.from_dict({"x": list(range(20))})
    train, evals = train_eval_split(ds, 0.25, seed=1)
    assert len(train) == 15 and len(evals) == 5
    assert sorted(list(train["x"]) + list(evals["x"])) == list(range(20))
    assert list(train_eval_split(ds, 0.25, seed=1)[1]["x"]) == list(evals["x"])  # deterministic
    assert train_eval_split(ds, 0.0) == (ds, None)
    assert len(train_eval_split(ds.select(range(3)), 0.01)[1]) == 1  # at least one eval row
    with pytest.raises(ValueError, match="eval_ratio"):
        train_eval_split(ds, 1.5)
    with pytest.raises(ValueError, match="cannot be split"):
        train_eval_split(ds.select([0]), 0.5)


def test_collator_pads_and_model_trains_on_batch(tok: Any) -> None:
    ds, _ = tokenize_dataset(datasets.Dataset.from_list(PAIRS), tok, max_length=64)
    collator = make_collator(tok, "prompt_completion")
    assert isinstance(collator, DataCollatorForCausalLM)
    batch = collator([ds[i] for i in range(len(ds))])
    lengths = [len(r) for r in ds["input_ids"]]
    assert batch["input_ids"].shape == batch["labels"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].sum() == n
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
    assert DataCollatorForCausalLM(0, pad_to_multiple_of=8)([{"input_ids": [5] * 9}])["input_ids"].shape == (1, 16)
    left = DataCollatorForCausalLM(0, padding_side="left")([{"input_ids": [5]}, {"input_ids": [5, 6]}])
    assert left["input_ids"].tolist() == [[0, 5], [5, 6]] and left["labels"].tolist() == [[IGNORE_INDEX, 5], [5, 6]]

    model, _ = models.load_model("tiny-llama")
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_classification_collator(bert_tok: Any) -> None:
    ds, _ = tokenize_dataset(
        datasets.Dataset.from_dict({"text": ["a b c", "d"], "label": [0, 1]}), bert_tok, max_length=8
    )
    batch = make_collator(bert_tok, "classification")([ds[0], ds[1]])
    assert batch["labels"].tolist() == [0, 1] and batch["input_ids"].shape == (2, 5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad data: every error names the file, the row and the column


def _msg(role: Any = "user", content: Any = "hi") -> dict[str, Any]:
    return {"role": role, "content": content}


BAD_ROWS = {
    # name: (rows, row number, column, words in the message)
    "messages not a list": ([{"messages": "hello"}], 1, "messages", "list of {role, content} dicts"),
    "messages mixed types": ([{"messages": [_msg()]}, {"messages": "hello"}], 2, "messages", "list of"),
    "message not a dict": ([{"messages": [_msg(), "hi"]}], 1, "messages", "message 2"),
    "message without content": (
        [{"messages": [_msg(), {"role": "assistant"}]}],
        1,
        "messages",
        "'content' is missing",
    ),
    "content not a string": ([{"messages": [_msg(), _msg("assistant", 42)]}], 1, "messages", "must be a string"),
    "no assistant turn": (
        [{"messages": [_msg(), _msg("assistant", "x")]}, {"messages": [_msg()]}],
        2,
        "messages",
        "no assistant",
    ),
    "completion not a string": ([{"prompt": "a", "completion": 1}], 1, "completion", "expected a string"),
    "completion mixed types": (
        [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}],
        2,
        "completion",
        "expected a string",
    ),
    "completion missing in a row": (
        [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
        2,
        "completion",
        "missing value",
    ),
    "text missing": ([{"text": "a"}, {"text": None}], 2, "text", "missing value"),
    "label not an int": ([{"text": "a", "label": 1}, {"text": "b", "label": 1.5}], 2, "label", "int class id"),
    "label mixes ids and names": (
        [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}],
        2,
        "label",
        "expected a string like row 1",
    ),
    "label negative": ([{"text": "a", "label": 1}, {"text": "b", "label": -1}], 2, "label", "out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_column(case: str, tmp_path: Path, tok: Any) -> None:
    rows, row, column, words = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError) as info:
        tokenize_dataset(load_records(path), tok, max_length=64)
    message = str(info.value)
    assert str(path) in message and f"row {row}," in message and f"column '{column}'" in message, message
    assert words in message, message


def test_unknown_class_name(tmp_path: Path, bert_tok: Any) -> None:
    path = write_jsonl(tmp_path / "labels.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(ValueError, match=r"labels\.jsonl: row 2, column 'label': unknown class name 'meh'"):
        tokenize_dataset(load_records(path), bert_tok, max_length=8, label_names=["neg", "pos"])
    with pytest.raises(ValueError, match=r"row 2, column 'label': class id 5 out of range for 2 classes"):
        tokenize_dataset(
            datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 5]}),
            bert_tok,
            max_length=8,
            label_names=["n", "p"],
        )


def test_missing_column_names_file_and_column(tmp_path: Path, tok: Any) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl: missing column 'completion'"):
        tokenize_dataset(load_records(path), tok, max_length=64)
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=r"texts\.jsonl: missing column 'messages' for format 'messages'"):
        tokenize_dataset(load_records(path), tok, fmt="messages", max_length=64)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.csv", "blank.jsonl"])
def test_empty_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_text("\n\n" if name.startswith("blank") else "")
    with pytest.raises(ValueError, match=rf"{name}: file is empty"):
        load_records(path)


def test_invalid_json_line_and_non_object_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_records(path)
    path.write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: row 2: expected an object"):
        load_records(path)


def test_csv_missing_value(tmp_path: Path, bert_tok: Any) -> None:
    path = tmp_path / "cls.csv"
    path.write_text("text,label\ngood,1\n,0\n")
    with pytest.raises(ValueError, match=r"cls\.csv: row 2, column 'text': missing value"):
        tokenize_dataset(load_records(path), bert_tok, max_length=8)


class _SlowView:
    """A tokenizer seen as slow (no offset mapping), to cover the segment-by-segment labelling path."""

    is_fast = False

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(text, **kwargs)


def test_slow_tokenizer_path_masks_the_same(tok: Any) -> None:
    fast, _ = tokenize_dataset(datasets.Dataset.from_list(CHAT), tok, max_length=256)
    slow, _ = tokenize_dataset(datasets.Dataset.from_list(CHAT), _SlowView(tok), max_length=256)
    assert trained_text(tok, slow[1]) == "Rome.<|im_end|>Madrid, of course.<|im_end|>"
    assert slow.to_list() == fast.to_list()
