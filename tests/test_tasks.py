"""Task loaders: hub tasks through local fixtures shaped like hub rows, and the embedded tweets."""

import json
from collections import Counter
from pathlib import Path

import pytest

from meerkat_ray.errors import ConfigError
from meerkat_ray.tasks import TASKS, TaskData, load_task

FIXTURES = Path(__file__).parent / "fixtures" / "hub"
HUB_TASKS = ["sst2", "ag_news", "yelp_polarity", "boolq", "rte", "wsc", "wic"]
HELD_OUT = {"ag_news": "test", "yelp_polarity": "test"}  # the others: validation


def fixture_rows(task: str, split: str) -> list[dict]:
    with open(FIXTURES / task / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


def load_hub(task: str, seed: int = 0, num_train: int = 0, num_test: int = 6) -> TaskData:
    return load_task(task, seed=seed, num_train=num_train, num_test=num_test,
                     source=str(FIXTURES / task))


# ----------------------------------------------------------------------------- hub tasks

@pytest.mark.parametrize("task", HUB_TASKS)
def test_hub_task_loads_fixture_rows_with_their_labels(task):
    spec = TASKS[task]
    data = load_hub(task, num_test=6)
    assert data.spec is spec and data.num_classes == len(spec.label_words)
    train = {spec.prompt(r): r["label"] for r in fixture_rows(task, "train")}
    held_out_rows = fixture_rows(task, HELD_OUT.get(task, "validation"))
    held_out = {spec.prompt(r): r["label"] for r in held_out_rows}
    assert 0 < len(data.test_texts) <= 6
    assert len(data.train_texts) == len(data.train_labels) > 0
    for text, label in zip(data.train_texts, data.train_labels):
        assert train[text] == label
    for text, label in zip(data.test_texts, data.test_labels):
        assert held_out[text] == label
    assert not set(data.train_texts) & set(data.test_texts)
    assert all(not t.endswith(" ") for t in data.train_texts + data.test_texts)


@pytest.mark.parametrize("task", HUB_TASKS)
def test_hub_split_is_deterministic_and_capped(task):
    a = load_hub(task, seed=3, num_train=5, num_test=4)
    b = load_hub(task, seed=3, num_train=5, num_test=4)
    assert (a.train_texts, a.train_labels, a.test_texts) == \
        (b.train_texts, b.train_labels, b.test_texts)
    assert len(a.train_texts) == 5 and len(a.test_texts) == 4
    c = load_hub(task, seed=4, num_train=5, num_test=4)
    assert (c.train_texts, c.test_texts) != (a.train_texts, a.test_texts)


EXPECTED_PROMPTS = {
    "sst2": ("a remarkable achievement ", "a remarkable achievement It was"),
    "rte": ("The river flows north into the Arctic Ocean.",
            'The river flows north into the Arctic Ocean.\nDoes this mean that "The river ends '
            'in the Arctic Ocean." is true? Yes or No?\n'),
    "boolq": ("The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions.",
              "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions. "
              "is the pacific the largest ocean?"),
    "wsc": ("The trophy doesn't fit into the brown suitcase because it is too large.",
            "The trophy doesn't fit into the brown suitcase because it is too large.\nIn the "
            'previous sentence, does the pronoun "it" refer to The trophy? Yes or No?\n'),
    "wic": ("He sat on the bank of the river.",
            'Does the word "bank" have the same meaning in these two sentences? Yes, No?\n'
            "He sat on the bank of the river.\nShe deposited cash at the bank.\n"),
    "ag_news": ("Wal-Mart #39;s Sales Rise",
                "Wal-Mart's Sales Rise (Reuters) Reuters - Wal-Mart Stores Inc. said August sales "
                "rose 2.2 percent.\nTopic:"),
    "yelp_polarity": ("Waited an hour",
                      "Waited an hour for cold food. Never again. It was"),
}


@pytest.mark.parametrize("task", HUB_TASKS)
def test_prompt_templates(task):
    marker, expected = EXPECTED_PROMPTS[task]
    rows = fixture_rows(task, "train") + fixture_rows(task, HELD_OUT.get(task, "validation"))
    row = next(r for r in rows if any(marker in str(value) for value in r.values()))
    assert TASKS[task].prompt(row) == expected


def test_sentence_in_both_hub_splits_stays_in_test_only():
    shared = "a charming and often affecting journey It was"
    data = load_hub("sst2", num_test=100)  # the whole validation split, which holds `shared`
    assert shared in data.test_texts and shared not in data.train_texts
    assert len(data.train_texts) == len(fixture_rows("sst2", "train")) - 1


def test_long_passages_are_cut_and_scraping_artefacts_removed():
    boolq = load_hub("boolq", num_test=100)
    assert max(map(len, boolq.train_texts + boolq.test_texts)) < 1100
    yelp = load_hub("yelp_polarity", num_test=100)
    assert max(map(len, yelp.train_texts)) < 1100
    tail = "Sadly the food was awful and the bill was wrong. It was"
    assert any(t.endswith(tail) for t in yelp.train_texts)
    news = load_hub("ag_news", num_test=100)
    for text in yelp.train_texts + yelp.test_texts + news.train_texts + news.test_texts:
        assert "\\" not in text and "#39;" not in text and "#36;" not in text


def test_unknown_task():
    with pytest.raises(ConfigError, match=r"^data\.task: unknown task 'foo'.*sst2"):
        load_task("foo", seed=0, num_train=0, num_test=10)


def test_missing_source_folder_or_split_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.source: .*nope"):
        load_task("sst2", seed=0, num_train=0, num_test=10, source=str(tmp_path / "nope"))
    (tmp_path / "train.jsonl").write_text((FIXTURES / "rte" / "train.jsonl").read_text())
    with pytest.raises(ConfigError, match=r"^data\.source: .*validation\.jsonl"):
        load_task("rte", seed=0, num_train=0, num_test=10, source=str(tmp_path))


def test_source_with_wrong_columns(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text('{"text": "x", "label": 0}\n')
    with pytest.raises(ConfigError, match=r"^data\.source: .*premise"):
        load_task("rte", seed=0, num_train=0, num_test=10, source=str(tmp_path))


def test_hub_unavailable_is_a_config_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/sst2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"^data\.task: .*not available offline.*data\.source"):
        load_task("sst2", seed=0, num_train=0, num_test=10)


@pytest.mark.parametrize("bad", [dict(num_train=-1), dict(num_test=0)])
def test_bad_sizes(bad):
    kwargs = {"seed": 0, "num_train": 0, "num_test": 10} | bad
    with pytest.raises(ConfigError, match=r"^data\.num_"):
        load_task("sst2", source=str(FIXTURES / "sst2"), **kwargs)


@pytest.mark.parametrize("spec", TASKS.values(), ids=list(TASKS))
def test_label_words_are_distinct_leading_space_words(spec):
    # Each word is one BPE token with a leading space under Llama/GPT-2 style tokenizers
    # (checked against SmolLM2's tokenizer); distinct first words mean distinct first tokens.
    words = spec.label_words
    assert len(words) >= 2 and all(w.startswith(" ") and w.strip() for w in words)
    assert len({w.split()[0] for w in words}) == len(words)


# ----------------------------------------------------------------------------- embedded tweets

@pytest.fixture(scope="module")
def tweets():
    return load_task("tweets", seed=0, num_train=0, num_test=300)


def test_tweets_balanced_disjoint_and_capped(tweets):
    assert tweets.num_classes == 3
    assert Counter(tweets.test_labels) == {0: 100, 1: 100, 2: 100}
    train_counts = Counter(tweets.train_labels)
    assert len(set(train_counts.values())) == 1 and len(train_counts) == 3
    assert len(tweets.train_texts) > 15_000  # ~6.7k of each class after dedup and balancing
    assert not set(tweets.train_texts) & set(tweets.test_texts)
    assert len(set(tweets.train_texts)) == len(tweets.train_texts)
    assert all(t.startswith("Tweet: ") and t.endswith("\nSentiment:") for t in tweets.test_texts)


def test_tweets_deterministic(tweets):
    again = load_task("tweets", seed=0, num_train=0, num_test=300)
    assert (again.train_texts, again.test_texts, again.test_labels) == \
        (tweets.train_texts, tweets.test_texts, tweets.test_labels)
    other = load_task("tweets", seed=1, num_train=0, num_test=300)
    assert other.test_texts != tweets.test_texts


def test_tweets2_and_confidence_filter():
    data = load_task("tweets2", seed=0, num_train=101, num_test=51, min_confidence=0.9)
    assert data.num_classes == 2
    assert Counter(data.test_labels) == {0: 25, 1: 25}  # num_test // 2 of each
    counts = Counter(data.train_labels)
    assert sum(counts.values()) == 101 and abs(counts[0] - counts[1]) <= 1
    assert not set(data.train_texts) & set(data.test_texts)
    everything = load_task("tweets2", seed=0, num_train=0, num_test=50, min_confidence=0.9)
    loose = load_task("tweets2", seed=0, num_train=0, num_test=50)
    assert len(everything.train_texts) < len(loose.train_texts)


def test_tweets_test_set_needs_every_class():
    with pytest.raises(ConfigError, match=r"^data\.num_test"):
        load_task("tweets", seed=0, num_train=0, num_test=2)
