import json
import re

import pytest
import torch

from rlgaf_fast.rlgaf.data import ExampleSampler, load_examples, synthetic_examples


def word_tokenizer():
    """A word-level tokenizer built in memory (no download): pad 0, eos 1, unk 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "hello", "world", "say", "it", "again"]
    model = models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def test_jsonl_text_loads_and_tokenises(tmp_path):
    path = tmp_path / "demos.jsonl"
    rows = [
        {"prompt": "say hello", "response": "hello world"},
        {"prompt": "say it again", "response": "again"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = load_examples(path, word_tokenizer())
    assert dataset["prompt_ids"] == [[5, 3], [5, 6, 7]]
    assert dataset["response_ids"] == [[3, 4, 1], [7, 1]]


def test_prompts_only_and_missing_columns(tmp_path):
    prompts = load_examples([{"prompt_ids": [3, 4]}])
    assert prompts["response_ids"] == [[]]
    with pytest.raises(ValueError, match="prompt"):
        load_examples([{"text": "x"}])
    with pytest.raises(ValueError, match="tokenizer"):
        load_examples([{"prompt": "x", "response": "y"}])


def test_bad_files_are_named_with_the_line(tmp_path):
    good = json.dumps({"prompt_ids": [2], "response_ids": [3, 1]})
    cases = (
        ("missing.jsonl", None, "does not exist"),
        ("empty.jsonl", "\n", "is empty"),
        ("broken.jsonl", f"{good}\n{good}\n{good[:-1]}\n", "line 3: malformed JSON Lines"),
        ("list.jsonl", f"{good}\n[1, 2]\n", "line 2: expected a JSON object, got list"),
        ("broken.json", '[\n  {"prompt_ids": [2]},\n  {"prompt_ids": [3]]\n]', "line 3"),
        ("lines.json", f"{good}\n{{]\n", "line 2: malformed JSON Lines"),
    )
    for name, text, match in cases:
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        error = FileNotFoundError if text is None else ValueError
        with pytest.raises(error, match=f"{re.escape(str(path))}.*{match}"):
            load_examples(path)
    # a JSON document and JSON Lines under a .json name both load
    (tmp_path / "doc.json").write_text(json.dumps([json.loads(good)] * 2))
    (tmp_path / "rows.json").write_text(f"{good}\n{good}\n")
    for name in ("doc.json", "rows.json"):
        assert load_examples(tmp_path / name)["prompt_ids"] == [[2], [2]]


def test_sampler_pads_and_is_reproducible():
    sampler = ExampleSampler(
        load_examples(synthetic_examples(20, 16)), pad_id=0, max_response_len=4
    )
    a, b = sampler.batch(6, seed=7), sampler.batch(6, seed=7)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.response_ids, b.response_ids)
    assert a.response_ids.shape == (6, 4)
    assert (a.prompt_mask[:, -1] == 1).all()  # prompts are left-padded
    assert (a.response_mask[:, 0] == 1).all()  # responses right-padded
    assert not torch.equal(sampler.batch(6, seed=8).prompt_ids, a.prompt_ids)


def test_sampler_keeps_the_last_prompt_tokens():
    rows = [
        {"prompt_ids": [5, 6, 7, 8, 9], "response_ids": [3, 1]},
        {"prompt_ids": [4], "response_ids": [2, 1]},
    ]
    sampler = ExampleSampler(load_examples(rows), pad_id=0, max_response_len=4, max_prompt_len=3)
    batch = sampler.take([0, 1])
    assert batch.prompt_ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert sampler.longest_prompt == 3


def test_a_tokenizer_that_closes_texts_with_eos_leaves_prompts_open():
    from tokenizers import processors

    tokenizer = word_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )  # as T5's tokenizer does
    assert tokenizer("say hello")["input_ids"] == [5, 3, 1]
    dataset = load_examples([{"prompt": "say hello", "response": "hello world"}], tokenizer)
    assert dataset["prompt_ids"] == [[5, 3]]
    assert dataset["response_ids"] == [[3, 4, 1]]
