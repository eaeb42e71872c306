"""Fine-tune micro-batches (core/train/micro_batch.py): examples of different lengths fed together, each
its own cache and policy state, no padding. The micro-batch's loss and gradients equal the sum of the
single-example ones (`example_loss`), in float64 within 1e-10, for evicting policies and both gradient
modes; a fine-tune session with --micro-batch trains as without it."""

from __future__ import annotations

import json

import pytest
import torch

from kvstudio.cli.dispatch import main
from kvstudio.core.errors import KVStudioError
from kvstudio.core.spec import create_policy
from kvstudio.core.train.data import Example
from kvstudio.core.train.micro_batch import micro_batch_loss
from kvstudio.core.train.through_cache import example_loss

from .helpers import random_ids
from .test_finetune_gradients import engine64, take_gradients  # noqa: F401 (a fixture, and its helper)

TOLERANCE = 1e-10  # float64: the packed matrix products round in another order, nothing else differs
CHUNK = 8
# Different lengths: one chunk, several, an uneven last chunk; the loss on all tokens or on an answer only.
EXAMPLES = [(40, None), (13, None), (29, 6), (5, None)]


def examples() -> list[Example]:
    made = []
    for seed, (length, answer) in enumerate(EXAMPLES):
        targets = [True] * length if answer is None else [False] * (length - answer) + [True] * answer
        made.append(Example(random_ids(length, seed=10 + seed), targets))
    return made


def one_by_one(engine, batch, policy_name, parameters, mode):
    scale = 1 / len(batch)
    losses = [example_loss(engine, example, create_policy(policy_name, **parameters), CHUNK, mode, scale=scale)
              for example in batch]  # .grad accumulates over the calls, as a fine-tune step's does
    return losses, take_gradients(engine)


@pytest.mark.parametrize("mode", ["through", "truncated"])
@pytest.mark.parametrize("policy_name, parameters", [("full", {}), ("h2o", {"budget": 12}),
                                                     ("streaming_llm", {"budget": 12, "sink": 2}),
                                                     ("snapkv", {"budget": 14, "observation_window": 4})])
def test_a_micro_batch_has_the_summed_gradients_of_its_examples(engine64, policy_name, parameters, mode):
    batch = examples()
    singles, expected = one_by_one(engine64, batch, policy_name, parameters, mode)
    together = micro_batch_loss(engine64, batch, create_policy(policy_name, **parameters), CHUNK, mode,
                                scale=1 / len(batch))
    gradients = take_gradients(engine64)
    for single, packed in zip(singles, together.examples):
        assert abs(single.loss - packed.loss) < TOLERANCE
        assert (single.targets, single.tokens, single.evictions) == (packed.targets, packed.tokens, packed.evictions)
    if policy_name != "full":
        assert sum(single.evictions for single in singles) > 0  # the policy evicted: the rows' caches differ
    assert gradients.keys() == expected.keys() and len(gradients) == 32
    for name in gradients:
        assert expected[name].abs().max() > 1e-6, f"{name}: the single-example gradient is zero, the check is empty"
        assert torch.allclose(gradients[name], expected[name], rtol=0, atol=TOLERANCE), name


def test_the_check_can_fail_a_micro_batch_of_other_examples_differs(engine64):
    batch = examples()
    _, expected = one_by_one(engine64, batch, "h2o", {"budget": 12}, "through")
    other = batch[:3] + [Example(random_ids(5, seed=99), [True] * 5)]
    micro_batch_loss(engine64, other, create_policy("h2o", budget=12), CHUNK, "through", scale=1 / 4)
    gradients = take_gradients(engine64)
    assert any(not torch.allclose(gradients[n], expected[n], rtol=0, atol=TOLERANCE) for n in gradients)


def test_without_backward_the_losses_are_the_single_passes(engine64):
    batch = examples()
    policy = create_policy("window", budget=10)
    singles = [example_loss(engine64, example, policy, CHUNK, backward=False) for example in batch]
    packed = micro_batch_loss(engine64, batch, policy, CHUNK, backward=False).examples
    assert [abs(a.loss - b.loss) < TOLERANCE for a, b in zip(singles, packed)] == [True] * len(batch)
    assert all(parameter.grad is None for parameter in engine64.model.parameters())


def test_an_example_without_targets_is_refused_naming_it(engine64):
    batch = examples()[:2] + [Example([1, 2, 3], [False] * 3)]
    with pytest.raises(KVStudioError, match="example 3 of the micro-batch has no target tokens"):
        micro_batch_loss(engine64, batch, create_policy("full"), CHUNK)


def finetune(tmp_path, name, *options):
    """A short session on prompt/answer pairs of different lengths (the loss on the answers)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: " + "tell me more " * (2 + 3 * (i % 10)),
                                        "answer": " the answer is " + "yes " * (1 + i % 10)}) + "\n" for i in range(30)))
    report = tmp_path / f"{name}.json"
    assert main(["finetune", "--model", "tiny-llama", "--policy", "h2o", "--budget", "16", "--data", str(data),
                 "--prompt-field", "prompt", "--answer-field", "answer", "--seq-len", "128", "--steps", "2",
                 "--chunk-size", "16", "--grad-accumulation", "4", "--eval-every", "0", "--out", str(tmp_path / name),
                 "--json", str(report), "--memory-sample-hz", "0", *options]) == 0
    return json.loads(report.read_text())


def test_a_session_with_micro_batches_trains_as_one_without(tmp_path, monkeypatch):
    from kvstudio.core.train import session

    validated = []  # micro-batches fed without gradients: the validations'
    original = session.micro_batch_loss
    monkeypatch.setattr(session, "micro_batch_loss", lambda engine, examples, *args, backward=True, **kwargs: (
        validated.append(len(examples)) if not backward else None) or original(engine, examples, *args,
                                                                                backward=backward, **kwargs))
    alone, packed = finetune(tmp_path, "alone"), finetune(tmp_path, "packed", "--micro-batch", "4")
    assert validated and max(validated) == 3  # validation feeds its 3 examples together too
    assert packed["settings"]["micro_batch"] == 4 and alone["settings"]["micro_batch"] == 1
    for a, b in zip(alone["steps"], packed["steps"], strict=True):  # fp32: the same steps, to rounding
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["evictions"] == a["evictions"] > 0
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert packed["final_val_loss_policy"] == pytest.approx(alone["final_val_loss_policy"], rel=1e-4)


def test_a_micro_batch_larger_than_a_step_is_refused(tmp_path, capsys):
    assert main(["finetune", "--model", "tiny-llama", "--data", "synthetic-passkey", "--steps", "1",
                 "--micro-batch", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--micro-batch 3 is more than the 1 examples of one step" in capsys.readouterr().err
