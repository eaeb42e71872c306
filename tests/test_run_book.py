"""RunBook: one way a run's history row is started and ended, whoever runs it."""

from __future__ import annotations

import sqlite3

import pytest

from kvstudio.cli.dispatch import main
from kvstudio.core.evaluate.language import LanguageOptions
from kvstudio.core.evaluate.sweep import Sweep, SweepSpec
from kvstudio.core.persist.history import RunHistory
from kvstudio.core.persist.run_book import RunBook
from kvstudio.core.recording.events import Recorder
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.spec import CacheSpec
from kvstudio.core.train import records

from .conftest import engine_for


@pytest.fixture
def history(tmp_path):
    store = RunHistory(tmp_path / "history.sqlite3")
    yield store
    store.close()


def test_ctrl_c_inside_the_book_is_stored_as_cancelled_with_what_the_run_made(history, llama_engine):
    recorder, pieces = Recorder(), []

    def interrupt_after_three(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    cache = CacheSpec.parse("h2o-int8", {"budget": 8})
    with pytest.raises(KeyboardInterrupt):
        with RunBook(history, model=llama_engine.loaded.identity, cache=cache, prompt="count to ten",
                     settings=GenerationSettings(max_new_tokens=20).record(), recorder=recorder) as book:
            llama_engine.generate("count to ten", cache.build(), GenerationSettings(max_new_tokens=20),
                                  recorder=recorder, on_text=interrupt_after_three)
    record = history.get(book.run_id)
    assert record.status == "cancelled" and "Ctrl-C" in record.error
    assert record.output == "".join(pieces) and record.output
    assert record.cache == "h2o-int8" and record.model == "tiny-llama"
    assert history.events(book.run_id) is not None  # its views can be reopened


def test_a_failure_keeps_its_message_and_a_finished_run_its_result(history, llama_engine):
    cache = CacheSpec.parse("window", {"budget": 8})
    with pytest.raises(ValueError):
        with RunBook(history, model="tiny-llama", cache=cache, prompt="p") as failed:
            raise ValueError("the tokenizer broke")
    assert (history.get(failed.run_id).status, history.get(failed.run_id).error) == ("failed", "the tokenizer broke")

    settings = GenerationSettings(max_new_tokens=4)
    with RunBook(history, model="tiny-llama", cache=cache, prompt="p", settings=settings.record()) as book:
        book.finish(llama_engine.generate("p", cache.build(), settings))
    record = history.get(book.run_id)
    assert record.status == "finished" and record.figures["generated_tokens"] == 4
    assert record.settings["stop_strings"] == []


def test_an_unwritable_history_turns_the_book_off_with_one_warning(history):
    blocker = sqlite3.connect(history.path)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past the history's timeout
    warnings = []
    book = RunBook(history, model="m", cache=CacheSpec("full"), prompt="p", on_warning=warnings.append)
    try:
        assert book.start() is None
        assert book.history is None and len(warnings) == 1 and "run history" in warnings[0]
        book.fail("later")  # nothing left to write, nothing raised
        assert len(warnings) == 1
    finally:
        blocker.rollback()
        blocker.close()


def test_fine_tune_rows_keep_the_storage(history):
    book = records.book(history, "tiny-llama", CacheSpec.parse("h2o-int4", {"budget": 16}), "synthetic passkey",
                        {"steps": 2}, "/tmp/out")
    book.start()
    book.finish_session("finished", "/tmp/out/step-000002", {"steps_done": 2}, [], [])
    record = history.get(book.run_id)
    assert (record.kind, record.cache, record.status) == ("finetune", "h2o-int4", "finished")
    assert record.parameters["budget"] == 16 and record.settings["out_dir"] == "/tmp/out"


def test_cli_runs_are_found_by_the_spec_they_were_loaded_from(capsys):
    # The loaded model's display name says "(2 KV groups)"; the history names the spec, as the studio does.
    assert main(["run", "--model", "tiny-llama", "--kv-groups", "1", "--policy", "window", "--budget", "8",
                 "--max-new-tokens", "2", "--prompt", "spec naming check 7f3a"]) == 0
    found = RunHistory().list(model="tiny-llama+kv1", text="spec naming check 7f3a")
    assert [r.model for r in found] == ["tiny-llama+kv1"]


def test_a_sweep_names_the_model_as_runs_do(history, tmp_path):
    engine = engine_for("tiny-llama+kv1")  # a sweep's spec says "tiny-llama": its rows name what was loaded
    spec = SweepSpec("perplexity", "tiny-llama", ("window",), (8,), language_options=LanguageOptions(48, 16),
                     chunk_size=16)
    Sweep(engine, spec, store_path=tmp_path / "store.jsonl", history=history).run()
    assert [r.model for r in history.list()] == ["tiny-llama+kv1"]
