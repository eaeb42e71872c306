"""Generation tasks: each sample is a prompt of token ids, what a right answer contains, and a scorer.

  passkey   a 5-digit pass key in prose at a grid of context lengths x depths (Mohtashami & Jaggi 2023)
  needle    a "special magic number" for a named thing, the same grid (KVCache-Factory's heatmap)
  ruler     RULER-style synthetic tasks (Hsieh et al. 2024, arXiv:2404.06654), generated from a seed:
            niah_single, niah_multikey, niah_multivalue, niah_multiquery, variable_tracking,
            common_words, at configurable lengths
  qa        a local JSONL/Parquet file read with `datasets` (LongBench's context/input/answers by
            default), scored by token F1 (and exact match)

Every sample is a function of (task, options, seed): the same seed gives the same prompts, keys and
depths on every machine. Nothing is downloaded.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate import metrics
from kvstudio.core.evaluate.haystack import Needle, build_context, encode_piece, prose_paragraphs

GENERATION_TASKS = ("passkey", "needle", "ruler", "qa")
LANGUAGE_TASKS = ("perplexity", "kl")
TASKS = GENERATION_TASKS + LANGUAGE_TASKS
RULER_SUBTASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
                  "common_words")


class TaskError(KVStudioError):
    """A task was asked for with options it cannot work with."""


@dataclass
class TaskOptions:
    """What a task is generated from. Only the fields a task uses matter to it."""

    lengths: tuple[int, ...] = (1024, 2048)  # context tokens (passkey, needle, ruler)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle depths (passkey, needle)
    samples: int = 1  # per grid point (passkey, needle, ruler); the first N records (qa; 0 = all)
    seed: int = 0
    subtasks: tuple[str, ...] = RULER_SUBTASKS  # ruler
    qa_file: str | None = None  # qa
    context_field: str = "context"
    question_field: str = "input"
    answers_field: str = "answers"
    max_context_tokens: int = 3500  # qa: longer contexts lose their middle (LongBench's truncation)

    def validate(self, task: str) -> None:
        if task not in TASKS:
            raise TaskError(f"unknown task '{task}': choose one of {', '.join(TASKS)}")
        if task in ("passkey", "needle", "ruler"):
            if not self.lengths or any(length < 64 for length in self.lengths):
                raise TaskError(f"--lengths must be token counts of at least 64, got {list(self.lengths)}")
        if task in ("passkey", "needle") and (not self.depths or any(not 0 <= d <= 1 for d in self.depths)):
            raise TaskError(f"--depths must be fractions between 0 and 1, got {list(self.depths)}")
        if self.samples < 0 or (self.samples == 0 and task != "qa"):
            raise TaskError(f"--samples must be at least 1 (0 means all only for qa), got {self.samples}")
        unknown = sorted(set(self.subtasks) - set(RULER_SUBTASKS))
        if task == "ruler" and (unknown or not self.subtasks):
            raise TaskError(f"unknown RULER subtask {', '.join(unknown) or '(none given)'}: choose from "
                            f"{', '.join(RULER_SUBTASKS)}")
        if task == "qa":
            if not self.qa_file:
                raise TaskError("the qa task needs --file PATH (a .jsonl, .json or .parquet file)")
            path = Path(self.qa_file).expanduser()
            if not path.is_file():
                raise TaskError(f"QA file not found: {path}")
            if _qa_format(path) is None:
                raise TaskError(f"{path}: a QA file is .jsonl, .json or .parquet, not '{path.suffix}'")
            if self.max_context_tokens < 16:
                raise TaskError(f"--max-context-tokens must be at least 16, got {self.max_context_tokens}")


@dataclass
class Sample:
    """One prompt of a generation task and how to score what comes back."""

    task: str
    ids: list[int]
    expected: list[str]  # the strings a right answer contains (digit tasks: the key)
    max_new_tokens: int
    scorer: str  # digits | strings | qa
    context_tokens: int = 0
    depth: float | None = None  # where the (first) needle really is, as a fraction of the haystack
    sample: int = 0
    subtask: str | None = None
    extra: dict = field(default_factory=dict)
    question_start: int | None = None  # where the question begins in `ids` (the protocols split there)

    def grid_key(self) -> dict:
        """What identifies the sample inside its task (with the policy and budget: a sweep cell)."""
        return {"subtask": self.subtask, "context_tokens": self.context_tokens, "asked_depth": self.extra.get(
            "asked_depth"), "sample": self.sample}

    def score(self, generated: str) -> dict:
        """{"score": headline in [0, 1], plus the task's other figures}."""
        if self.scorer == "digits":
            key = self.expected[0]
            return {"score": float(key in generated), "partial_score": metrics.partial_digits(generated, key)}
        if self.scorer == "strings":
            return {"score": metrics.string_matches(generated, self.expected)}
        answer = generated.strip().split("\n")[0]
        return {"score": metrics.token_f1(answer, self.expected),
                "exact_match": metrics.exact_match(answer, self.expected)}


def generation_samples(task: str, tokenizer, options: TaskOptions) -> list[Sample]:
    options.validate(task)
    if task in ("passkey", "needle"):
        return [_retrieval_sample(task, tokenizer, length, depth, index, options.seed)
                for length in options.lengths for depth in options.depths for index in range(options.samples)]
    if task == "ruler":
        return [RULER_BUILDERS[subtask](tokenizer, length, index, options.seed)
                for subtask in options.subtasks for length in options.lengths for index in range(options.samples)]
    if task == "qa":
        return qa_samples(tokenizer, options)
    raise TaskError(f"'{task}' is not a generation task")


# --- pass key and needle ------------------------------------------------------------------------


def _rng(*parts) -> random.Random:
    """A generator seeded by the parts: string seeds are hashed the same way on every run."""
    return random.Random("/".join(map(str, parts)))


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """Plain lower-case words of the prose, for needle names and RULER's word lists."""
    found = set()
    for paragraph in prose_paragraphs():
        found.update(w for w in re.findall(r"\b[a-z]{5,10}\b", paragraph))
    return tuple(sorted(found))


def _retrieval_sample(task: str, tokenizer, length: int, depth: float, index: int, seed: int) -> Sample:
    rng = _rng(seed, task, length, depth, index)
    key = str(rng.randrange(10_000, 100_000))
    if task == "passkey":
        instruction = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                       "I will quiz you about the pass key.\n\n")
        needle = Needle(depth, f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = "\n\nWhat is the pass key? The pass key is"
    else:
        name = rng.choice(_words())
        instruction = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                       "them. I will quiz you about the numbers afterwards.\n\n")
        needle = Needle(depth, f" One of the special magic numbers for {name} is: {key}.")
        question = (f"\n\nWhat is the special magic number for {name} mentioned in the provided text? "
                    f"The special magic number for {name} mentioned in the provided text is")
    context = build_context(tokenizer, length, instruction, [needle], question, seed=rng.randrange(2**31))
    prefix = len(tokenizer(instruction, add_special_tokens=True)["input_ids"])
    return Sample(task, context.ids, [key], max_new_tokens=10, scorer="digits", context_tokens=length,
                  depth=round(context.depth_of(0, prefix), 4), sample=index,
                  extra={"asked_depth": depth, "needle_position": context.needle_positions[0]},
                  question_start=context.question_start)


# --- RULER-style tasks --------------------------------------------------------------------------


def _magic_number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))  # 7 digits, as in RULER


def _distinct_words(rng: random.Random, count: int) -> list[str]:
    return rng.sample(_words(), count)


NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                    "them. I will quiz you about the numbers afterwards.\n\n")


def _niah(tokenizer, length, index, seed, subtask, n_keys, n_values, n_queries) -> Sample:
    rng = _rng(seed, "ruler", subtask, length, index)
    names = _distinct_words(rng, n_keys)
    values = {name: [_magic_number(rng) for _ in range(n_values if name == names[0] else 1)] for name in names}
    needles = [Needle(rng.random(), f" One of the special magic numbers for {name} is: {value}.")
               for name in names for value in values[name]]
    asked = names[:n_queries] if n_queries > 1 else [names[0]]
    if n_queries > 1:
        listed = ", ".join(asked[:-1]) + f", and {asked[-1]}"
        question = (f"\n\nWhat are all the special magic numbers for {listed} mentioned in the provided text? "
                    f"The special magic numbers for {listed} mentioned in the provided text are")
    elif n_values > 1:
        question = (f"\n\nWhat are all the special magic numbers for {asked[0]} mentioned in the provided text? "
                    f"The special magic numbers for {asked[0]} mentioned in the provided text are")
    else:
        question = (f"\n\nWhat is the special magic number for {asked[0]} mentioned in the provided text? "
                    f"The special magic number for {asked[0]} mentioned in the provided text is")
    context = build_context(tokenizer, length, NIAH_INSTRUCTION, needles, question, seed=rng.randrange(2**31))
    expected = [value for name in asked for value in values[name]]
    prefix = len(tokenizer(NIAH_INSTRUCTION, add_special_tokens=True)["input_ids"])
    return Sample("ruler", context.ids, expected, max_new_tokens=12 * len(expected) + 4, scorer="strings",
                  context_tokens=length, depth=round(context.depth_of(0, prefix), 4), sample=index, subtask=subtask,
                  extra={"needle_positions": context.needle_positions}, question_start=context.question_start)


def _variable_tracking(tokenizer, length, index, seed, hops: int = 4) -> Sample:
    rng = _rng(seed, "ruler", "variable_tracking", length, index)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = str(rng.randrange(10_000, 100_000))
    statements = [f" VAR {names[0]} = {value}."] + [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in statements)  # the chain reads in order through the text
    instruction = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                f"variables are assigned the value {value}, they are:")
    context = build_context(tokenizer, length, instruction, [Needle(d, s) for d, s in zip(depths, statements)],
                            question, seed=rng.randrange(2**31))
    return Sample("ruler", context.ids, names, max_new_tokens=8 * len(names), scorer="strings",
                  context_tokens=length, sample=index, subtask="variable_tracking",
                  extra={"needle_positions": context.needle_positions}, question_start=context.question_start)


def _common_words(tokenizer, length, index, seed, n_common: int = 10) -> Sample:
    """A numbered list of words where `n_common` words come far more often than the rest (each
    common word about 1/20 of the list, each other word once); asked: the most common ones."""
    rng = _rng(seed, "ruler", "common_words", length, index)
    instruction = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.\n")
    question = (f"\nQuestion: What are the {n_common} most common words in the above list? "
                f"Answer: The top {n_common} words that appear most often in the list are:")
    room = length - len(tokenizer(instruction, add_special_tokens=True)["input_ids"]) - len(
        encode_piece(tokenizer, question))
    vocabulary = list(_words())
    rng.shuffle(vocabulary)
    common, rare = vocabulary[:n_common], vocabulary[n_common:]
    probe = [len(encode_piece(tokenizer, f" {100 + i}. {word}")) for i, word in enumerate(rare[:50])]
    items = max(int(room / (sum(probe) / len(probe))), 3 * n_common)
    repeats = max(3, items // (2 * n_common))
    words = [w for w in common for _ in range(repeats)] + rare[:max(items - repeats * n_common, 0)]
    rng.shuffle(words)

    def numbered(words):
        return [encode_piece(tokenizer, f" {number}. {word}") for number, word in enumerate(words, 1)]

    pieces = numbered(words)
    while sum(map(len, pieces)) > room:  # the estimate was long: drop rare words, never common ones
        last_rare = next((i for i in range(len(words) - 1, -1, -1) if words[i] not in common), None)
        if last_rare is None:
            raise TaskError(f"a context of {length} tokens is too short for common_words; ask for a longer length")
        del words[last_rare]
        pieces = numbered(words)
    used = set(words)
    spare = (word for word in rare if word not in used)
    while True:  # the estimate was short: more rare words while one still fits
        word = next(spare)
        piece = encode_piece(tokenizer, f" {len(words) + 1}. {word}")
        if sum(map(len, pieces)) + len(piece) > room:
            break
        words.append(word)
        pieces.append(piece)
    ids = [token for piece in pieces for token in piece]
    context = build_context(tokenizer, length, instruction, [], question, seed=0, haystack_ids=ids +
                            encode_piece(tokenizer, " ") * max(room - len(ids), 0))
    return Sample("ruler", context.ids, common, max_new_tokens=60, scorer="strings", context_tokens=length,
                  sample=index, subtask="common_words", extra={"repeats": repeats},
                  question_start=context.question_start)


RULER_BUILDERS = {
    "niah_single": lambda t, n, i, s: _niah(t, n, i, s, "niah_single", n_keys=1, n_values=1, n_queries=1),
    "niah_multikey": lambda t, n, i, s: _niah(t, n, i, s, "niah_multikey", n_keys=4, n_values=1, n_queries=1),
    "niah_multivalue": lambda t, n, i, s: _niah(t, n, i, s, "niah_multivalue", n_keys=1, n_values=4, n_queries=1),
    "niah_multiquery": lambda t, n, i, s: _niah(t, n, i, s, "niah_multiquery", n_keys=4, n_values=1, n_queries=4),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
}


# --- QA files -----------------------------------------------------------------------------------

QA_PROMPT = ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the question based on the "
             "text above. Answer with only a few words.\n\nQuestion: {question}\nAnswer:")


def _qa_format(path: Path) -> str | None:
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())


def read_qa_records(options: TaskOptions) -> list[dict]:
    """The file's records through `datasets` (offline), each with the three named fields checked."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path = Path(options.qa_file).expanduser()
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(_qa_format(path), data_files=str(path), split="train")
    except Exception as error:  # datasets raises many kinds for a malformed file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TaskError(f"cannot read {path} as a QA file: {message}") from None
    fields = (options.context_field, options.question_field, options.answers_field)
    missing = [name for name in fields if name not in dataset.column_names]
    if missing:
        raise TaskError(f"{path} has no field {', '.join(map(repr, missing))} (its fields: "
                        f"{', '.join(dataset.column_names)}); name them with --context-field, --question-field "
                        "and --answers-field")
    records = dataset.select(range(min(options.samples, len(dataset)))) if options.samples else dataset
    return [dict(record) for record in records]


def qa_samples(tokenizer, options: TaskOptions) -> list[Sample]:
    samples = []
    for index, record in enumerate(read_qa_records(options)):
        answers = record[options.answers_field]
        answers = [answers] if isinstance(answers, str) else [str(a) for a in (answers or [])]
        if not answers:
            raise TaskError(f"{options.qa_file}: record {index} has no answer in '{options.answers_field}'")
        context = _truncate_middle(tokenizer, str(record[options.context_field]), options.max_context_tokens)
        prompt = QA_PROMPT.format(context=context, question=record[options.question_field])
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        samples.append(Sample("qa", ids, answers, max_new_tokens=24, scorer="qa", context_tokens=len(ids),
                              sample=index, extra={"question": str(record[options.question_field])},
                              question_start=_qa_question_start(tokenizer, prompt, context, ids)))
    return samples


def _qa_question_start(tokenizer, prompt: str, context: str, ids: list[int]) -> int:
    """Where the question part of a QA prompt begins in its ids: after the longest run of tokens the
    prompt shares with its instruction and context alone (the prompt is tokenized whole, as before,
    so the boundary is a token boundary of the same ids)."""
    head = prompt[:prompt.index(context) + len(context)]
    head_ids = tokenizer(head, add_special_tokens=True)["input_ids"]
    shared = 0
    while shared < min(len(head_ids), len(ids)) and head_ids[shared] == ids[shared]:
        shared += 1
    return max(shared, 1)


def _truncate_middle(tokenizer, text: str, max_tokens: int) -> str:
    """LongBench's truncation: a context over the limit keeps its first and last halves."""
    ids = encode_piece(tokenizer, text)
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(ids[:half]) + tokenizer.decode(ids[-half:])
