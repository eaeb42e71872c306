"""Training data for fine-tune sessions: every source becomes a list of `Example`s.

An example is token ids plus a mask saying which tokens are *targets* (the loss counts the
prediction of token t only where mask[t] is true). Sources:

- documents (the studio's list, or text files): language modelling on all tokens, cut into
  windows of `seq_len` tokens;
- a local file read with `datasets` (json, jsonl, csv, parquet, txt), never downloaded: a text
  field (language modelling, windowed) or prompt and answer fields (loss on the answer only);
- `synthetic-passkey`: pass-key retrieval built from a seed, the loss on the answer's tokens.

A held-out validation split is taken from the same source (`split`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from kvstudio.core.errors import KVStudioError

SYNTHETIC_PASSKEY = "synthetic-passkey"
FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
              ".md": "text"}
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


class DataError(KVStudioError):
    """Training data that cannot be used; the message says which and what to do."""


@dataclass
class Example:
    ids: list[int]
    targets: list[bool]  # targets[t]: the prediction of ids[t] (from ids[:t]) counts in the loss

    def __post_init__(self):
        if len(self.ids) != len(self.targets):
            raise ValueError("ids and targets differ in length")

    @property
    def target_count(self) -> int:
        return sum(self.targets[1:])  # the first token has nothing before it to predict it from


def window(ids: list[int], seq_len: int) -> list[Example]:
    """Non-overlapping windows of `seq_len` tokens, all tokens targets; a short tail is kept
    when it holds at least half a window (shorter ones would weigh little and cost a step)."""
    out = []
    for start in range(0, len(ids), seq_len):
        piece = ids[start:start + seq_len]
        if len(piece) == seq_len or (len(piece) >= seq_len // 2 and len(piece) >= 2):
            out.append(Example(piece, [True] * len(piece)))
    return out


def from_texts(texts: list[str], tokenizer, seq_len: int, source: str = "the documents") -> list[Example]:
    """Language modelling on texts: concatenated (end-of-text between them) and windowed."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    examples = window(ids, seq_len)
    if not examples:
        raise DataError(f"{source} hold {len(ids)} tokens, fewer than half of --seq-len {seq_len}: "
                        "add text or lower --seq-len")
    return examples


def from_prompt_answer(pairs: list[tuple[str, str]], tokenizer, seq_len: int) -> list[Example]:
    """One example per pair, the loss on the answer's tokens; cut to seq_len from the left
    (the answer stays whole)."""
    examples = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not answer_ids:
            continue
        ids = (prompt_ids + answer_ids)[-seq_len:]
        n_answer = min(len(answer_ids), len(ids) - 1)
        examples.append(Example(ids, [False] * (len(ids) - n_answer) + [True] * n_answer))
    return examples


# -- local files --------------------------------------------------------------------------------------


def read_file(path: str | Path, tokenizer, seq_len: int, text_field: str | None = None,
              prompt_field: str | None = None, answer_field: str | None = None) -> list[Example]:
    """Examples from a local file through `datasets`, offline. Raises DataError for a missing,
    empty or unreadable file and for a field the file does not have (naming the fields it has)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder: give a .json, .jsonl, .csv, .parquet or .txt file")
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path.name}: unsupported data file type '{path.suffix or 'none'}'; use "
                        f"{', '.join(sorted(FILE_KINDS))}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if bool(prompt_field) != bool(answer_field):
        raise DataError("give both --prompt-field and --answer-field (loss on the answer), or --text-field")
    rows = _load_rows(path, kind)
    if not rows:
        raise DataError(f"{path} holds no rows")
    fields = sorted(rows[0].keys())
    if kind == "text":
        return from_texts([r["text"] for r in rows], tokenizer, seq_len, source=str(path))
    if prompt_field:
        for name in (prompt_field, answer_field):
            if name not in rows[0]:
                raise DataError(f"{path.name} has no field '{name}' (its fields: {', '.join(fields)})")
        pairs = [(str(r[prompt_field] or ""), str(r[answer_field] or "")) for r in rows]
        examples = from_prompt_answer(pairs, tokenizer, seq_len)
        if not examples:
            raise DataError(f"every answer in {path.name} is empty")
        return examples
    field = text_field or ("text" if "text" in rows[0] else None)
    if field is None or field not in rows[0]:
        what = f"no field '{field}'" if field else "no 'text' field"
        raise DataError(f"{path.name} has {what}: name one with --text-field, or use --prompt-field and "
                        f"--answer-field (its fields: {', '.join(fields)})")
    texts = [str(r[field]) for r in rows if r[field] is not None and str(r[field]).strip()]
    if not texts:
        raise DataError(f"field '{field}' of {path.name} is empty in every row")
    return from_texts(texts, tokenizer, seq_len, source=str(path))


def _load_rows(path: Path, kind: str) -> list[dict]:
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # a local file only: never reach for the hub
    try:
        import datasets
    except ImportError as error:
        raise DataError("reading data files needs the `datasets` package: pip install datasets") from error
    datasets.disable_progress_bars()
    options = {"sample_by": "document"} if kind == "text" else {}
    try:
        # keep_in_memory: no cache files written beside the user's data or in their HF cache.
        loaded = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True, **options)
    except Exception as error:  # datasets raises many kinds for a malformed file; all mean "unreadable"
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot read {path.name} as {kind}: {first}") from error
    return loaded.to_list()


# -- synthetic pass key --------------------------------------------------------------------------------


def passkey_examples(tokenizer, seq_len: int, count: int, seed: int) -> list[Example]:
    """Pass-key retrieval (Mohtashami & Jaggi 2023): a 5-digit key at a random depth in filler of
    about `seq_len` tokens, asked for at the end; the loss is on the key's tokens only. The
    same seed gives the same examples."""
    rng = random.Random(seed)
    filler_ids = tokenizer(PASSKEY_FILLER, add_special_tokens=False)["input_ids"]
    head = tokenizer("A pass key is hidden in this text. ", add_special_tokens=True)["input_ids"]
    question = tokenizer("What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    examples = []
    for _ in range(count):
        key = f"{rng.randrange(10_000, 100_000)}"
        needle = tokenizer(f"The pass key is {key}. Remember it. ", add_special_tokens=False)["input_ids"]
        answer = tokenizer(f" {key}", add_special_tokens=False)["input_ids"]
        room = seq_len - len(head) - len(needle) - len(question) - len(answer)
        if room < 0:
            raise DataError(f"--seq-len {seq_len} is too short for a pass-key example "
                            f"(at least {seq_len - room} tokens)")
        repeats = room // len(filler_ids)
        before = rng.randint(0, repeats)
        ids = head + filler_ids * before + needle + filler_ids * (repeats - before) + question
        examples.append(Example(ids + answer, [False] * len(ids) + [True] * len(answer)))
    return examples


# -- splits ---------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    train: list[Example]
    validation: list[Example]
    description: str  # what the data was, for the history and the views

    @property
    def longest(self) -> int:
        return max(len(e.ids) for e in self.train + self.validation)


def split(examples: list[Example], validation_fraction: float, seed: int, description: str,
          max_validation: int = 8) -> Dataset:
    """Shuffle with the seed and hold out a validation part (at least one example, at most
    `max_validation`); one example alone is used for both (said in the description)."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    if len(order) == 1:
        return Dataset(order, order, description + " (one example: validation = training)")
    n_val = min(max(1, round(len(order) * validation_fraction)), max_validation, len(order) - 1)
    return Dataset(order[n_val:], order[:n_val], description)


def load_data(source: str, tokenizer, seq_len: int, seed: int = 0, text_field: str | None = None,
              prompt_field: str | None = None, answer_field: str | None = None,
              synthetic_count: int = 64, validation_fraction: float = 0.1,
              documents: list[str] | None = None, synthetic_validation: int | None = None) -> Dataset:
    """The dataset named by `source`: synthetic-passkey, "documents" (the given texts) or a file."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if source == SYNTHETIC_PASSKEY:
        # Separate seeds for training and validation: the validation keys are never trained on.
        train = passkey_examples(tokenizer, seq_len, synthetic_count, seed)
        n_val = synthetic_validation or max(1, min(8, synthetic_count // 8))
        validation = passkey_examples(tokenizer, seq_len, n_val, seed + 1_000_003)
        return Dataset(train, validation, f"synthetic pass key, {seq_len} tokens, seed {seed}")
    if source == "documents":
        texts = [t for t in (documents or []) if t.strip()]
        if not texts:
            raise DataError("no documents to train on: add or check documents in the list")
        return split(from_texts(texts, tokenizer, seq_len), validation_fraction, seed,
                     f"{len(texts)} document(s), windows of {seq_len} tokens")
    examples = read_file(source, tokenizer, seq_len, text_field, prompt_field, answer_field)
    return split(examples, validation_fraction, seed, f"{Path(source).name}, {len(examples)} example(s)")
