"""Evaluation: task generators, metrics, perplexity/KL, resumable sweeps, exports and `kvstudio eval`.

Everything here runs on tiny-llama (byte-level tokenizer: one token per byte), in seconds. The
default-model checks (a pass key found with the full cache and lost under StreamingLLM) are in
test_evaluate_default_model.py.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from kvstudio.core.runtime.engine import CancelToken
from kvstudio.core.errors import KVStudioError
from kvstudio.core.evaluate import metrics
from kvstudio.core.evaluate.figures import save_figure
from kvstudio.core.evaluate.haystack import SENTENCE_SEARCH_TOKENS, encode_piece, prose_paragraphs
from kvstudio.core.evaluate.language import LanguageOptions, evaluate_language, text_ids
from kvstudio.core.evaluate.results import export_cells, format_summary, needle_grid, pareto_front
from kvstudio.core.evaluate.sweep import Sweep, SweepSpec
from kvstudio.core.evaluate.tasks import RULER_SUBTASKS, TaskError, TaskOptions, generation_samples
from kvstudio.core.persist.history import RunHistory
from kvstudio.core.models.loading import load_model
from kvstudio.core.spec import create_policy

from .conftest import engine_for
from .helpers import run_cli

QA_FILE = Path(__file__).resolve().parents[1] / "resources" / "qa_sample.jsonl"


@pytest.fixture
def tokenizer():
    return engine_for("tiny-llama").tokenizer


# --- task generators ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_needle_grid_is_deterministic_exact_in_length_and_places_the_needle_at_its_depth(tokenizer, task):
    options = TaskOptions(lengths=(700, 1000), depths=(0.0, 0.3, 0.5, 1.0), seed=7)
    samples = generation_samples(task, tokenizer, options)
    again = generation_samples(task, tokenizer, options)
    assert [s.ids for s in samples] == [s.ids for s in again]
    assert [s.ids for s in samples] != [s.ids for s in generation_samples(task, tokenizer, TaskOptions(
        lengths=(700, 1000), depths=(0.0, 0.3, 0.5, 1.0), seed=8))]
    assert len(samples) == 8
    for sample in samples:
        assert len(sample.ids) == sample.context_tokens
        key = sample.expected[0]
        text = tokenizer.decode(sample.ids)
        assert len(key) == 5 and key.isdigit() and text.count(key) >= 1
        # The needle's tokens start exactly at the reported position...
        start = sample.extra["needle_position"]
        needle = (f" The pass key is {key}." if task == "passkey" else " One of the special magic numbers for ")
        assert sample.ids[start:start + len(encode_piece(tokenizer, needle))] == encode_piece(tokenizer, needle)
        # ...within a sentence's reach of the asked depth (it moves to the nearest sentence end).
        haystack = sample.context_tokens - 300  # instruction, needle and question: about 300 bytes here
        assert abs(sample.depth - sample.extra["asked_depth"]) * haystack <= SENTENCE_SEARCH_TOKENS + 1
    # Depth 0 is right after the instruction; depth 1 right before the question.
    first, last = samples[0], samples[3]
    assert tokenizer.decode(first.ids[:first.extra["needle_position"]]).endswith("\n\n")
    after_needle = tokenizer.decode(last.ids[last.extra["needle_position"]:])
    assert after_needle.startswith(" The pass key is" if task == "passkey" else " One of the special magic")
    assert after_needle.split(".")[-1].startswith((" Remember", "\n\nWhat", " Remember it"))
    assert tokenizer.decode(last.ids).endswith("The pass key is" if task == "passkey" else
                                               "mentioned in the provided text is")


def test_haystack_is_real_prose_not_a_repeated_sentence(tokenizer):
    paragraphs = prose_paragraphs()
    assert len(paragraphs) > 100 and len(set(paragraphs)) == len(paragraphs)
    sample = generation_samples("needle", tokenizer, TaskOptions(lengths=(2000,), depths=(0.5,)))[0]
    sentences = [s for s in tokenizer.decode(sample.ids).split(". ") if len(s) > 20]
    assert len(set(sentences)) > 0.9 * len(sentences)


@pytest.mark.parametrize("subtask", RULER_SUBTASKS)
def test_ruler_tasks_are_deterministic_exact_and_hold_their_answers(tokenizer, subtask):
    options = TaskOptions(lengths=(900, 1500), samples=2, seed=3, subtasks=(subtask,))
    samples = generation_samples("ruler", tokenizer, options)
    assert [s.ids for s in samples] == [s.ids for s in generation_samples("ruler", tokenizer, options)]
    assert len(samples) == 4 and len({tuple(s.ids) for s in samples}) == 4
    for sample in samples:
        assert len(sample.ids) == sample.context_tokens and sample.subtask == subtask
        text = tokenizer.decode(sample.ids)
        assert all(answer in text for answer in sample.expected)
        if subtask == "common_words":
            listed = text.split("\n")[1]
            counts = {word: listed.count(f". {word} ") + listed.endswith(f". {word}") for word in sample.expected}
            assert len(sample.expected) == 10 and min(counts.values()) >= 3
        for start in sample.extra.get("needle_positions", []):
            assert tokenizer.decode(sample.ids[start:start + 4]).startswith((" One", " VAR"))


def test_task_options_are_checked_with_clear_errors(tokenizer):
    with pytest.raises(TaskError, match="depths must be fractions"):
        generation_samples("needle", tokenizer, TaskOptions(depths=(1.5,)))
    with pytest.raises(KVStudioError, match="too short"):
        generation_samples("needle", tokenizer, TaskOptions(lengths=(100,), depths=(0.5,)))
    with pytest.raises(TaskError, match="unknown RULER subtask nope"):
        generation_samples("ruler", tokenizer, TaskOptions(subtasks=("nope",)))
    with pytest.raises(TaskError, match="needs --file"):
        generation_samples("qa", tokenizer, TaskOptions())


# --- metrics ------------------------------------------------------------------------------------


def test_answer_metrics_against_hand_computed_cases():
    assert metrics.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert metrics.exact_match("Eiffel", ["eiffel tower"]) == 0.0
    # "cat sat" vs "cat sat down": precision 2/2, recall 2/3 -> F1 0.8; the best answer counts.
    assert metrics.token_f1("the cat sat", ["a dog", "cat sat down"]) == pytest.approx(0.8)
    assert metrics.token_f1("nothing shared", ["cat"]) == 0.0
    assert metrics.partial_digits("the key is 57324.", "57314") == pytest.approx(0.8)
    assert metrics.partial_digits("57314", "57314") == 1.0 and metrics.partial_digits("no digits", "57314") == 0.0
    assert metrics.string_matches("ABC and xyz", ["abc", "XYZ", "qqq", "zzz"]) == 0.5


def test_kl_and_perplexity_against_hand_computed_cases():
    p = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
    assert metrics.kl_divergence(p, p).tolist() == [0.0, 0.0]
    q = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert metrics.kl_divergence(p, q)[0].item() == pytest.approx(expected)
    assert metrics.perplexity([math.log(1 / 50)] * 10) == pytest.approx(50)


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity_and_no_kl():
    """A real model whose output layer is zeroed predicts the uniform distribution everywhere."""
    from kvstudio.core.runtime.engine import Engine

    engine = Engine(load_model("tiny-llama", device="cpu"))  # its own copy: the weights are changed
    with torch.no_grad():
        engine.model.lm_head.weight.zero_()
    options = LanguageOptions(tokens=200, prefix_tokens=50)
    result = evaluate_language(engine, text_ids(engine, options), create_policy("window", budget=16), options)
    vocabulary = engine.model.config.vocab_size
    assert result.perplexity == pytest.approx(vocabulary, rel=1e-4)
    assert max(result.kl) < 1e-9


# --- perplexity and KL --------------------------------------------------------------------------


def test_language_evaluation_scores_every_position_and_full_matches_the_reference():
    engine = engine_for("tiny-llama")
    options = LanguageOptions(tokens=300, prefix_tokens=100)
    ids = text_ids(engine, options)
    assert len(ids) == 300
    full = evaluate_language(engine, ids, create_policy("full"), options)
    assert full.positions == list(range(100, 300))
    assert len(full.true_logprobs) == len(full.kl) == 200
    assert full.mean_kl < 1e-5  # the same computation as the reference, up to float rounding
    window = evaluate_language(engine, ids, create_policy("window", budget=16), options)
    assert window.mean_kl > 100 * max(full.mean_kl, 1e-8)
    assert window.peak_cache_bytes < full.peak_cache_bytes
    # Token by token and 10 tokens a step score the same positions; under full they agree.
    strided = evaluate_language(engine, ids, create_policy("full"), LanguageOptions(300, 100, stride=10))
    assert strided.positions == full.positions
    assert strided.perplexity == pytest.approx(full.perplexity, rel=1e-4)


# --- sweeps -------------------------------------------------------------------------------------


def _needle_spec(**changes) -> SweepSpec:
    spec = SweepSpec("needle", "tiny-llama", ("full", "streaming_llm"), (32, 64),
                     TaskOptions(lengths=(400,), depths=(0.0, 1.0)), chunk_size=64)
    for name, value in changes.items():
        setattr(spec, name, value)
    return spec


def test_an_interrupted_sweep_resumes_without_recomputing(tmp_path):
    engine = engine_for("tiny-llama")
    store = tmp_path / "sweep.jsonl"
    cancel = CancelToken()
    first = Sweep(engine, _needle_spec(), store, cancel=cancel)
    assert len(first.cells) == 6  # 2 depths x (full once + streaming_llm at 2 budgets)

    def stop_after_three(record):
        if len(first.store.cells) == 3:
            cancel.cancel()

    outcome = first.run(on_cell=stop_after_three)
    assert outcome.cancelled and outcome.computed == 3
    done = {json.dumps(r, sort_keys=True) for r in first.stored()}

    computed = []
    second = Sweep(engine, _needle_spec(), store)
    second.engine = _CountingEngine(engine, computed)
    resumed = second.run()
    assert not resumed.cancelled and resumed.reused == 3 and resumed.computed == 3 and len(computed) == 3
    assert done <= {json.dumps(r, sort_keys=True) for r in resumed.records}
    # A crash mid-write leaves half a line: it is ignored and its cell computed again.
    with open(store, "a") as stream:
        stream.write('{"kind": "cell", "key": "half')
    third = Sweep(engine, _needle_spec(), store)
    assert len(third.stored()) == 6
    # Growing the sweep by a budget computes only the new cells.
    grown = Sweep(engine, _needle_spec(budgets=(32, 64, 128)), store)
    assert len(grown.cells) == 8 and len(grown.stored()) == 6


class _CountingEngine:
    """The real engine; counts the generations it is asked for (to prove reused cells are not rerun)."""

    def __init__(self, engine, calls):
        self._engine, self._calls = engine, calls

    def generate(self, *args, **kwargs):
        self._calls.append(1)
        return self._engine.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_a_store_of_another_sweep_is_refused(tmp_path):
    engine = engine_for("tiny-llama")
    store = tmp_path / "sweep.jsonl"
    Sweep(engine, _needle_spec(), store)
    with pytest.raises(KVStudioError, match="holds another sweep"):
        Sweep(engine, _needle_spec(chunk_size=32), store)


def test_bad_sweep_options_are_refused_before_any_cell():
    engine = engine_for("tiny-llama")
    with pytest.raises(KVStudioError, match="variant option shading does not apply to policy 'full'"):
        Sweep(engine, _needle_spec(variants=({"shading": "int8"},)), "/dev/null/never")
    with pytest.raises(KVStudioError, match="unknown codec 'int3'"):  # storage settings are checked too
        Sweep(engine, _needle_spec(variants=({"codec": "int3"},)), "/dev/null/never")
    with pytest.raises(KVStudioError, match="--nonsense applies to none of the policies"):
        Sweep(engine, _needle_spec(policy_options={"nonsense": 1}), "/dev/null/never")
    with pytest.raises(KVStudioError, match="unknown policy"):
        Sweep(engine, _needle_spec(policies=("full", "nope")), "/dev/null/never")


def test_sweep_cells_are_runs_in_the_history_with_their_views(tmp_path):
    engine = engine_for("tiny-llama")
    history = RunHistory(tmp_path / "history.sqlite3")
    outcome = Sweep(engine, _needle_spec(policies=("streaming_llm",), budgets=(32,)), tmp_path / "s.jsonl",
                    history=history).run()
    assert len(outcome.records) == 2
    for record in outcome.records:
        stored = history.get(record["run_id"])
        assert stored.status == "finished" and stored.policy == "streaming_llm"
        assert stored.output == record["output"] and stored.settings["evaluation"]["task"] == "needle"
        assert history.events(record["run_id"]) is not None


def test_a_variant_cells_run_in_the_history_names_its_storage(tmp_path):
    engine = engine_for("tiny-llama")
    history = RunHistory(tmp_path / "history.sqlite3")
    spec = _needle_spec(policies=("streaming_llm",), budgets=(32,), variants=({}, {"codec": "int8"}))
    spec.task_options = TaskOptions(lengths=(400,), depths=(0.0,))
    outcome = Sweep(engine, spec, tmp_path / "s.jsonl", history=history).run()
    stored = {json.dumps(r["variant"]): history.get(r["run_id"]) for r in outcome.records}
    assert {k: (v.policy, v.cache) for k, v in stored.items()} == {"{}": ("streaming_llm", "streaming_llm"),
                                                                   '{"codec": "int8"}': ("streaming_llm",
                                                                                         "streaming_llm-int8")}
    assert stored['{"codec": "int8"}'].parameters["storage"] == {"codec": "int8"}


def test_qa_file_is_read_with_datasets_and_scored(tmp_path):
    engine = engine_for("tiny-llama")
    spec = SweepSpec("qa", "tiny-llama", ("full",), (), TaskOptions(qa_file=str(QA_FILE), samples=2,
                                                                     max_context_tokens=300), chunk_size=128)
    outcome = Sweep(engine, spec, tmp_path / "qa.jsonl").run()
    assert len(outcome.records) == 2
    assert outcome.records[0]["expected"] == ["Margit Severin"]
    for record in outcome.records:
        assert record["score"] == metrics.token_f1(record["output"].strip().split("\n")[0], record["expected"])
        assert record["context_tokens"] <= 300 + 220  # the context was cut to 300 tokens; the prompt adds ~210
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "context": "c", "answers": ["a"]}\n')
    with pytest.raises(TaskError, match="no field 'input'.*--question-field"):
        Sweep(engine, SweepSpec("qa", "tiny-llama", ("full",), (), TaskOptions(qa_file=str(bad))), tmp_path / "b")
    renamed = SweepSpec("qa", "tiny-llama", ("full",), (), TaskOptions(qa_file=str(bad), question_field="question"))
    assert len(Sweep(engine, renamed, tmp_path / "c.jsonl").cells) == 1


# --- results and files --------------------------------------------------------------------------


def _cells(**common):
    base = {"task": "needle", "variant": {}, "subtask": None, "sample": 0, "seconds": 1.0}
    return [{**base, "policy": p, "budget": b, "context_tokens": n, "depth": d, "score": s, "partial_score": s,
             "peak_cache_bytes": bytes_, **common}
            for p, b, n, d, s, bytes_ in [("full", None, 1024, 0.0, 1.0, 4000), ("full", None, 2048, 0.0, 1.0, 8000),
                                          ("full", None, 1024, 0.5, 1.0, 4000), ("h2o", 64, 1024, 0.0, 0.0, 500),
                                          ("h2o", 64, 2048, 0.0, 1.0, 500), ("h2o", 128, 1024, 0.0, 1.0, 900)]]


def test_grids_tables_and_pareto_front():
    lengths, depths, grid = needle_grid(_cells(), "h2o @ 64")
    assert lengths == [1024, 2048] and depths == [0.0]
    assert grid.tolist() == [[0.0, 1.0]]
    _, _, full = needle_grid(_cells(), "full")
    assert full.shape == (2, 2) and math.isnan(full[1, 1])
    text = format_summary(_cells())
    assert "h2o" in text and "0.500" in text and "7.8 KiB" in text
    assert pareto_front([(500, 0.5), (900, 1.0), (4000, 1.0), (600, 0.2)]) == [(500, 0.5), (900, 1.0)]
    assert pareto_front([(1, 9.0), (2, 5.0), (3, 7.0)], higher_is_better=False) == [(1, 9.0), (2, 5.0)]


def test_exports_csv_json_png_svg(tmp_path):
    cells = _cells()
    export_cells(cells, tmp_path / "cells.json")
    assert json.loads((tmp_path / "cells.json").read_text()) == cells
    export_cells(cells, tmp_path / "cells.csv")
    rows = (tmp_path / "cells.csv").read_text().splitlines()
    assert rows[0].startswith("task,subtask,policy,budget") and len(rows) == 7
    save_figure(cells, tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    save_figure(cells, tmp_path / "budget.svg", kind="budget")
    assert "<svg" in (tmp_path / "budget.svg").read_text()[:400]
    with pytest.raises(KVStudioError, match="png or .svg"):
        save_figure(cells, tmp_path / "heat.gif")
    with pytest.raises(KVStudioError, match="use a .json or .csv"):
        export_cells(cells, tmp_path / "cells.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget.svg", "cells.csv", "cells.json", "heat.png"]


# --- the command --------------------------------------------------------------------------------


_cli = run_cli  # tests/helpers.py


def test_eval_command_writes_records_table_and_figure_then_resumes(capsys, tmp_path):
    argv = ["eval", "needle", "--model", "tiny-llama", "--policies", "full,streaming_llm", "--budgets", "32",
            "--lengths", "400", "--depths", "0,1", "--chunk-size", "64", "--store", str(tmp_path / "s.jsonl"),
            "--json", str(tmp_path / "cells.json"), "--csv", str(tmp_path / "cells.csv"),
            "--plot", str(tmp_path / "heat.png"), "--no-history", "--option", "sink=2"]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    records = json.loads((tmp_path / "cells.json").read_text())
    assert len(records) == 4
    for record in records:
        assert {"task", "policy", "budget", "context_tokens", "depth", "score", "peak_cache_bytes",
                "seconds"} <= set(record)
    assert records[1]["policy_description"] == "streaming_llm(budget=32, sink=2, window=30)"
    assert "mean score" in out and "streaming_llm" in out
    assert "about" in err and "left" in err  # the time-left estimate
    assert (tmp_path / "heat.png").stat().st_size > 1000
    code, out, err = _cli(capsys, *argv)
    assert code == 0 and "4 already stored" in err and "0 cells computed, 4 reused" in err


def test_a_variant_runs_beside_the_plain_cells_and_a_store_of_variants_alone_resumes(capsys, tmp_path):
    """--variant adds cells: the plain ones (the baseline) run too, unless --no-baseline; a sweep stored
    without them computes only them when run with them."""
    store, csv_path = tmp_path / "s.jsonl", tmp_path / "cells.csv"
    argv = ["eval", "needle", "--model", "tiny-llama", "--policies", "full,h2o", "--budgets", "32", "--lengths",
            "400", "--depths", "0.5", "--chunk-size", "64", "--store", str(store), "--no-history",
            "--variant", "merge=minicache,merge_from=1", "--csv", str(csv_path)]
    code, out, err = _cli(capsys, *argv, "--no-baseline")
    assert code == 0, err
    assert "2 cells computed, 0 reused" in err and "plain" not in out  # variants only: no plain row
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    assert "4 cells (2 already stored" in err and "2 cells computed, 2 reused" in err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0][:3] == ["policy", "budget", "variant"]
    assert sorted((row[0], row[2]) for row in rows[1:]) == [("full", "merge=minicache"), ("full", "plain"),
                                                          ("h2o", "merge=minicache"), ("h2o", "plain")]
    with open(csv_path, newline="") as stream:
        variants = sorted((row["policy"], row["variant"] if row["variant"] == "{}" else json.loads(row["variant"])["merge"])
                          for row in csv.DictReader(stream))
    assert variants == [("full", "minicache"), ("full", "{}"), ("h2o", "minicache"), ("h2o", "{}")]
    code, _, err = _cli(capsys, "eval", "needle", "--model", "tiny-llama", "--no-history", "--no-baseline")
    assert code == 2 and "--no-baseline leaves nothing to run: give a --variant" in err


@pytest.mark.parametrize("argv, message", [
    (["--depths", "0,2"], "--depths must be fractions between 0 and 1"),
    (["--budgets", "0"], "--budgets must be positive"),
    (["--option", "sink"], "--option 'sink' is not NAME=VALUE"),
    (["--option", "sink=x"], "--option sink=x: --sink takes an int"),
    (["--plot", "x.gif"], "a figure is a .png or .svg file"),
    (["--policies", "full,bogus"], "unknown policy 'bogus'"),
])
def test_eval_bad_input_is_one_line_and_nonzero(capsys, argv, message):
    code, out, err = _cli(capsys, "eval", "needle", "--model", "tiny-llama", "--no-history", *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_eval_qa_needs_an_existing_file(capsys, tmp_path):
    code, _, err = _cli(capsys, "eval", "qa", "--model", "tiny-llama", "--file", str(tmp_path / "none.jsonl"))
    assert code == 2 and "QA file not found" in err


def test_figures_render_without_loading_qt(tmp_path):
    """The core's figures use matplotlib's Agg canvas only: no GUI toolkit is imported."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from kvstudio.core.evaluate.figures import save_figure\n"
            "cells = [{'task': 'kl', 'policy': 'h2o', 'budget': 8, 'variant': {}, 'score': 0.1, 'kl_mean': 0.1,"
            " 'perplexity': 2.0, 'peak_cache_bytes': 10, 'seconds': 1, 'positions': [1, 2], 'kl': [0.1, 0.2],"
            " 'true_logprobs': [-1.0, -2.0], 'context_tokens': 3}]\n"
            f"save_figure(cells, {str(tmp_path / 'kl.png')!r})\n"
            "save_figure(cells, " + repr(str(tmp_path / 'kl.svg')) + ", kind='budget')\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('PySide6', 'PyQt5', 'PyQt6', 'shiboken6')])\n")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
    assert (tmp_path / "kl.png").stat().st_size > 1000 and (tmp_path / "kl.svg").stat().st_size > 1000
