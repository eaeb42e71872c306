"""Records written before a parameter existed read back with the value their run had."""

from __future__ import annotations

from kvstudio.core.persist.history import RunHistory
from kvstudio.core.persist.provenance import command_of_record
from kvstudio.core.policies import completed_record
from kvstudio.core.spec import CacheSpec


def test_a_pyramidkv_row_without_a_schedule_reruns_the_even_schedule(tmp_path):
    history = RunHistory(tmp_path / "history.sqlite3")
    old = {"budget": 40, "observation_window": 8, "beta": 20}  # as rows before the schedule was a parameter
    run_id = history.start("tiny-llama", "pyramidkv", old, "a prompt")
    record = history.get(run_id)
    assert record.parameters == old  # the row shows what it stored
    policy = CacheSpec.from_record(record.policy, record.parameters).build()
    assert policy.config.schedule == "even" and policy.budget_for(0, 4) == 70  # 71 with the drift kept
    assert policy.config.gqa_aggregation == "mean"
    command, _ = command_of_record(record)
    assert "--schedule even" in command  # its rerun runs what it ran
    new = history.get(history.start("tiny-llama", "pyramidkv", {"budget": 64, "schedule": "kvcache-factory"}, "p"))
    assert CacheSpec.from_record(new.policy, new.parameters).build().config.schedule == "kvcache-factory"


def test_records_of_policies_without_former_values_are_unchanged():
    assert completed_record("window", {"budget": 8}) == {"budget": 8}
    assert completed_record("not-a-policy", {"budget": 8}) == {"budget": 8}
    assert completed_record("h2o", {"budget": 8}) == {"budget": 8, "gqa_aggregation": "mean"}
