"""Fine-tune sessions (core/train): data sources and their bad input, cancel mid-step, resume,
adapters applied to generation (and refused for another model), the history row, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from kvstudio.cli.dispatch import main
from kvstudio.core.runtime.engine import CancelToken
from kvstudio.core.persist.history import RunHistory
from kvstudio.core.spec import create_policy
from kvstudio.core.train import lora
from kvstudio.core.train.data import DataError, load_data, read_file
from kvstudio.core.train.log import PhaseMark, TrainingLog
from kvstudio.core.train.session import FinetuneSession, FinetuneSettings

from .conftest import engine_for

SEQ_LEN, CHUNK = 128, 32


def passkey_data(engine, count=4):
    return load_data("synthetic-passkey", engine.tokenizer, SEQ_LEN, seed=3, synthetic_count=count,
                     synthetic_validation=1)


def settings(**overrides) -> FinetuneSettings:
    values = dict(steps=3, chunk_size=CHUNK, eval_every=0, save_every=1, learning_rate=1e-2, memory_sample_hz=0)
    return FinetuneSettings(**(values | overrides))


# -- data --------------------------------------------------------------------------------------------


def test_passkey_examples_put_the_loss_on_the_answer(llama_engine):
    data = passkey_data(llama_engine)
    example = data.train[0]
    assert len(example.ids) <= SEQ_LEN and example.targets[-1] and not example.targets[0]
    answer = llama_engine.tokenizer.decode([i for i, t in zip(example.ids, example.targets) if t])
    assert answer.strip().isdigit() and len(answer.strip()) == 5
    assert answer.strip() in llama_engine.tokenizer.decode(example.ids[:-len(answer)])  # the key is in the text
    again = passkey_data(llama_engine)
    assert [e.ids for e in again.train] == [e.ids for e in data.train]  # the seed decides
    assert not {tuple(e.ids) for e in data.validation} & {tuple(e.ids) for e in data.train}


def test_files_through_datasets(tmp_path, llama_engine):
    tokenizer = llama_engine.tokenizer
    jsonl = tmp_path / "notes.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"note {i} " * 30, "n": i}) for i in range(4)))
    examples = read_file(jsonl, tokenizer, 64, text_field="body")
    assert examples and all(len(e.ids) <= 64 and all(e.targets) for e in examples)
    qa = tmp_path / "qa.csv"
    qa.write_text("question,answer\nwhat is two and two?,four\nthe sky?,blue\n")
    pairs = read_file(qa, tokenizer, 64, prompt_field="question", answer_field="answer")
    assert len(pairs) == 2
    assert tokenizer.decode([i for i, t in zip(pairs[0].ids, pairs[0].targets) if t]) == "four"
    text = tmp_path / "book.txt"
    text.write_text("Once upon a time. " * 40)
    assert len(read_file(text, tokenizer, 64)) >= 4


@pytest.mark.parametrize("name, content, options, expected", [
    ("empty.jsonl", "", {}, "is empty"),
    ("broken.json", "{not json", {}, "cannot read broken.json"),
    ("fields.jsonl", '{"body": "x"}\n', {"text_field": "text"}, "has no field 'text'.*its fields: body"),
    ("fields.jsonl", '{"body": "x"}\n', {}, "no 'text' field"),
    ("qa.jsonl", '{"q": "x", "a": "y"}\n', {"prompt_field": "q", "answer_field": "answer"}, "no field 'answer'"),
    ("data.xlsx", "x", {}, "unsupported data file type"),
])
def test_bad_data_files_are_refused_with_the_reason(tmp_path, llama_engine, name, content, options, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        read_file(path, llama_engine.tokenizer, 64, **options)
    with pytest.raises(DataError, match="not found"):
        read_file(tmp_path / "missing.jsonl", llama_engine.tokenizer, 64)


def test_sequences_shorter_than_one_chunk_are_refused(tmp_path, llama_engine):
    data = passkey_data(llama_engine)
    with pytest.raises(DataError, match="fits in one chunk"):
        FinetuneSession(llama_engine, create_policy("window", budget=16), data, settings(chunk_size=SEQ_LEN),
                        tmp_path / "out")


# -- sessions -----------------------------------------------------------------------------------------


def test_resume_continues_the_loss_curve(tmp_path, llama_engine):
    data, policy = passkey_data(llama_engine), create_policy("window", budget=16)
    straight = FinetuneSession(llama_engine, policy, data, settings(steps=2), tmp_path / "straight").run()
    first = FinetuneSession(llama_engine, policy, data, settings(steps=1), tmp_path / "resumed").run()
    assert first.status == "finished" and first.adapter.endswith("step-000001")
    resumed = FinetuneSession(llama_engine, policy, data, settings(steps=2), tmp_path / "resumed",
                              resume=True).run()
    assert resumed.resumed_from_step == 1 and [s.step for s in resumed.steps] == [1, 2]
    # Same data order, seeds, learning rate and optimizer moments: the curve goes on as if never stopped.
    assert [s.loss for s in resumed.steps] == pytest.approx([s.loss for s in straight.steps], rel=1e-5)
    assert straight.steps[1].loss != straight.steps[0].loss
    assert resumed.final_val_loss_policy == pytest.approx(straight.final_val_loss_policy, rel=1e-5)
    assert lora.attached(llama_engine.loaded) is None  # the session took its adapter out again
    with pytest.raises(Exception, match="already ran 2 steps"):
        FinetuneSession(llama_engine, policy, data, settings(steps=2), tmp_path / "resumed", resume=True).run()


def test_stop_mid_backward_drops_the_step_and_keeps_the_last_adapter(tmp_path, llama_engine):
    data, cancel = passkey_data(llama_engine), CancelToken()
    out = tmp_path / "out"

    def stop_in_the_second_backward(event):  # what the Stop button does, from the session's own report
        if isinstance(event, PhaseMark) and event.phase == "backward" and event.step == 1:
            cancel.cancel()

    session = FinetuneSession(llama_engine, create_policy("window", budget=16), data, settings(steps=4), out,
                              cancel=cancel, log=TrainingLog(listener=stop_in_the_second_backward))
    result = session.run()
    assert result.status == "cancelled"
    assert "stopped during step 2; the adapter saved at step 1 is intact" in session.log.all("status")[-1].message
    assert [s.step for s in result.steps] == [1]  # step 2 was dropped mid-backward
    assert json.loads((out / "latest.json").read_text())["step"] == 1
    saved = lora.resolve(out)
    assert saved.name == "step-000001" and (saved / "adapter_model.safetensors").is_file()
    assert not list(out.glob(".*tmp"))  # no half-written checkpoint
    assert lora.attached(llama_engine.loaded) is None
    assert all(p.grad is None for p in llama_engine.model.parameters())


def test_an_adapter_loads_for_generation_and_is_refused_by_another_model(tmp_path, llama_engine):
    out = tmp_path / "out"
    FinetuneSession(llama_engine, create_policy("full"), passkey_data(llama_engine), settings(steps=1), out).run()
    ids = list(range(5, 60))
    policy = create_policy("window", budget=16)
    base = llama_engine.prompt_logits(ids, policy, 16)
    lora.load_adapter(llama_engine.loaded, out)
    try:
        adapted = llama_engine.prompt_logits(ids, policy, 16)
    finally:
        lora.detach(llama_engine.loaded)
    assert not torch.allclose(base, adapted, atol=1e-4)
    assert torch.equal(llama_engine.prompt_logits(ids, policy, 16), base)  # detached: the base model again
    with pytest.raises(lora.AdapterError, match="trained on tiny-llama, not tiny-qwen2"):
        lora.load_adapter(engine_for("tiny-qwen2").loaded, out)


def test_qlora_on_cpu_says_it_needs_cuda(llama_engine):
    with pytest.raises(lora.AdapterError, match="QLoRA needs CUDA"):
        lora.attach(llama_engine.loaded, lora.LoraSettings(qlora=True))


# -- the CLI ------------------------------------------------------------------------------------------


def test_cli_streams_steps_writes_json_and_stores_the_session(tmp_path, capsys):
    report = tmp_path / "session.json"
    code = main(["finetune", "--model", "tiny-llama", "--policy", "h2o", "--budget", "16", "--data",
                 "synthetic-passkey", "--seq-len", str(SEQ_LEN), "--examples", "8", "--steps", "2",
                 "--chunk-size", str(CHUNK), "--eval-every", "1", "--out", str(tmp_path / "out"),
                 "--json", str(report), "--memory-sample-hz", "0"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["1/2", "2/2"]
    assert sum(line.startswith("val @") for line in lines) == 3  # before, after step 1, at the end
    data = json.loads(report.read_text())
    assert {"step", "loss", "grad_norm", "lr", "seconds", "peak_bytes"} <= set(data["steps"][0])
    assert {"step", "loss_policy", "loss_full"} <= set(data["val"][0])
    assert data["adapter"].endswith("step-000002") and data["initial_val_loss_policy"] > 0
    assert data["final_val_loss_policy"] == data["val"][-1]["loss_policy"]
    record = RunHistory().list(limit=1)[0]
    assert record.kind == "finetune" and record.status == "finished" and record.policy == "h2o"
    stored = RunHistory().get(record.id)
    assert len(stored.steps) == 2 and len(stored.figures["val"]) == 3
    assert main(["runs", "export", str(record.id), str(tmp_path / "steps.csv")]) == 0
    assert (tmp_path / "steps.csv").read_text().splitlines()[0].startswith("step,loss,grad_norm,lr,seconds,peak_bytes")
    # The adapter applies to a generation run under the same policy, named in its record.
    generated = tmp_path / "run.json"
    assert main(["run", "--model", "tiny-llama", "--policy", "h2o", "--budget", "16", "--prompt", "hello",
                 "--max-new-tokens", "2", "--adapter", str(tmp_path / "out"), "--json", str(generated)]) == 0
    assert json.loads(generated.read_text())["model"] == "tiny-llama+lora:out/step-000002"


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "some text"}\n')
    assert main(["finetune", "--model", "tiny-llama", "--data", str(rows), "--steps", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("kvstudio: error: rows.jsonl has no 'text'")
    assert main(["finetune", "--model", "tiny-llama", "--data", "synthetic-passkey", "--steps", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert main(["finetune", "--model", "tiny-llama", "--data", "synthetic-passkey", "--steps", "1", "--qlora",
                 "--out", str(tmp_path / "o")]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    assert main(["run", "--model", "tiny-llama", "--prompt", "hi", "--adapter", str(tmp_path)]) == 2
    assert "holds no adapter" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA (bitsandbytes 4-bit) needs CUDA")
def test_qlora_session_on_cuda(tmp_path, capsys):
    report = tmp_path / "qlora.json"
    assert main(["finetune", "--model", "default", "--device", "cuda", "--qlora", "--policy", "h2o", "--budget",
                 "64", "--data", "synthetic-passkey", "--seq-len", "256", "--examples", "4", "--steps", "2",
                 "--chunk-size", "64", "--out", str(tmp_path / "out"), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert len(data["steps"]) == 2 and all(s["peak_bytes"] > 0 for s in data["steps"])
    assert (tmp_path / "out" / "step-000002" / "adapter_model.safetensors").is_file()
