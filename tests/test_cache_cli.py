"""`kvstudio run --prompt-cache DIR` and `kvstudio cache save|load|list|show|rm`, as a user types them."""

from __future__ import annotations

import json

import pytest

from .helpers import run_cli

DOCUMENT = "A long document about caches. " * 2  # 60 bytes: 60 tokens of the byte tokenizer
RUN = ["run", "--model", "tiny-llama", "--policy", "h2o", "--budget", "16", "--chunk-size", "8",
       "--max-new-tokens", "5", "--no-history"]


cli = run_cli


def _run(capsys, tmp_path, prompt, name, *extra):
    path = tmp_path / f"{name}.json"
    code, out, err = cli(capsys, *RUN, "--prompt", prompt, "--json", str(path), *extra)
    assert code == 0, err
    return json.loads(path.read_text()), out, err


def _logprobs(data):
    return [s["logprob"] for s in data["steps"] if s["token_id"] is not None]


def test_prompt_cache_saves_restores_and_reuses_a_prefix(capsys, tmp_path):
    folder = tmp_path / "prompts"
    first, out, _ = _run(capsys, tmp_path, DOCUMENT + "Q: one?", "first", "--prompt-cache", str(folder))
    assert first["prompt_cache"] == "saved" and "prompt cache: saved" in out
    again, _, err = _run(capsys, tmp_path, DOCUMENT + "Q: one?", "again", "--prompt-cache", str(folder))
    assert again["prompt_cache"] == "restored" and "tokens restored in" in err
    assert again["token_ids"] == first["token_ids"] and _logprobs(again) == _logprobs(first)
    follow, _, _ = _run(capsys, tmp_path, DOCUMENT + "Q: other?", "follow", "--prompt-cache", str(folder))
    plain, _, _ = _run(capsys, tmp_path, DOCUMENT + "Q: other?", "plain")
    assert follow["prompt_cache"] == "prefix 64"  # 67 and 69 tokens share their first 8 chunks of 8
    assert follow["token_ids"] == plain["token_ids"] and _logprobs(follow) == _logprobs(plain)
    assert follow["kept_per_layer"] == plain["kept_per_layer"]
    code, out, _ = cli(capsys, "cache", "list", str(folder))
    assert code == 0 and out.count("h2o(budget=16, recent=8)") == 3 and "A long document" in out


def test_measuring_attention_loss_runs_the_prompt_from_its_text_past_a_saved_one(capsys, tmp_path):
    """A saved prompt keeps only what its policy kept; --measure-loss needs every key: the run says it
    does not use the prompt cache and measures, instead of restoring and then failing."""
    folder = tmp_path / "prompts"
    _run(capsys, tmp_path, DOCUMENT + "Q: one?", "first", "--prompt-cache", str(folder))
    measured, _, err = _run(capsys, tmp_path, DOCUMENT + "Q: one?", "measured", "--prompt-cache", str(folder),
                            "--measure-loss")
    assert "--prompt-cache is off for this run: --measure-loss needs every key" in err
    assert "tokens restored" not in err and "prompt_cache" not in measured
    plain, _, _ = _run(capsys, tmp_path, DOCUMENT + "Q: one?", "plain", "--measure-loss")
    assert measured["attention_loss"] == plain["attention_loss"] is not None


def test_a_bad_saved_prompt_is_refused_and_computed_again(capsys, tmp_path):
    folder = tmp_path / "prompts"
    first, _, _ = _run(capsys, tmp_path, "short prompt", "first", "--prompt-cache", str(folder))
    files = list(folder.glob("*.kvcache"))
    assert len(files) == 2  # the whole prompt (13 tokens) and its first chunk of 8
    for saved in files:
        saved.write_bytes(saved.read_bytes()[:-10])
    again, _, err = _run(capsys, tmp_path, "short prompt", "again", "--prompt-cache", str(folder))
    assert "warning: prompt cache: refused" in err and "is truncated" in err
    assert again["prompt_cache"] == "saved" and again["token_ids"] == first["token_ids"]
    third, _, _ = _run(capsys, tmp_path, "short prompt", "third", "--prompt-cache", str(folder))
    assert third["prompt_cache"] == "restored"  # the bad file was replaced by a good one


def test_an_unusable_cache_folder_warns_and_the_run_goes_on(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data, out, err = _run(capsys, tmp_path, "short prompt", "run", "--prompt-cache", str(blocker / "prompts"))
    assert data["prompt_cache"] == "miss" and "prompt cache: miss" in out
    assert "warning: prompt cache: cannot create" in err and "the run went on" in err
    assert len(data["token_ids"]) == 5


def test_cache_save_load_show_and_rm(capsys, tmp_path):
    path = tmp_path / "doc.kvcache"
    code, out, err = cli(capsys, "cache", "save", str(path), "--model", "tiny-llama", "--policy", "streaming_llm",
                         "--budget", "16", "--sink", "2", "--chunk-size", "8", "--prompt", DOCUMENT,
                         "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "3")
    assert code == 0, err
    assert "saved 60 prompt + 4 generated tokens under streaming_llm(budget=16, sink=2, window=14)" in out
    code, out, err = cli(capsys, "cache", "load", str(path), "--max-new-tokens", "6", "--json",
                         str(tmp_path / "continued.json"))
    assert code == 0, err
    assert "restored 63 tokens" in err  # 60 prompt + 3 of the 4 generated (the 4th was not fed yet)
    continued = json.loads((tmp_path / "continued.json").read_text())
    whole, _, _ = _run(capsys, tmp_path, DOCUMENT, "whole", "--policy", "streaming_llm", "--sink", "2",
                       "--max-new-tokens", "10", "--temperature", "0.8", "--seed", "3")
    assert whole["token_ids"][4:] == continued["token_ids"]
    assert _logprobs(whole)[4:] == _logprobs(continued)
    code, out, _ = cli(capsys, "cache", "show", str(path))
    shown = json.loads(out)
    assert code == 0 and shown["checksum"] == "ok" and shown["codec"] == "fp" and shown["tokens"]["fed"] == 63
    code, out, err = cli(capsys, "cache", "load", str(path), "--then", "more text")
    assert code == 0, err
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    code, out, err = cli(capsys, "cache", "rm", str(path), str(other))
    assert code == 2 and "removed" in out and "not removed: " in err and "is not a KV Studio saved cache" in err
    assert not path.exists() and other.exists()
    code, _, err = cli(capsys, "cache", "load", str(path))
    assert code == 2 and err.count("\n") == 1 and "cannot read" in err


def test_a_quantized_prompt_cache_is_saved_restored_and_keyed_on_its_storage(capsys, tmp_path):
    """Under int4 the prompt cache saves the codes and restores them; an int8 or fp run never finds them."""
    folder = tmp_path / "prompts"
    int4 = ["--prompt-cache", str(folder), "--codec", "int4", "--group-size", "16"]
    first, _, err = _run(capsys, tmp_path, DOCUMENT, "int4", *int4)
    assert first["prompt_cache"] == "saved" and "is off" not in err
    again, _, _ = _run(capsys, tmp_path, DOCUMENT, "again", *int4)
    assert again["prompt_cache"] == "restored"
    assert again["token_ids"] == first["token_ids"] and _logprobs(again) == _logprobs(first)
    saved = set(folder.iterdir())
    other, _, err = _run(capsys, tmp_path, DOCUMENT, "int8", "--prompt-cache", str(folder), "--codec", "int8",
                         "--group-size", "16")
    assert other["prompt_cache"] == "saved" and "refused" not in err  # a miss, then its own files
    fp, _, _ = _run(capsys, tmp_path, DOCUMENT, "fp", "--prompt-cache", str(folder))
    assert fp["prompt_cache"] == "saved" and saved < set(folder.iterdir())


def test_cache_save_and_load_an_int4_host_tier_cache(capsys, tmp_path):
    path = tmp_path / "int4.kvcache"
    storage = ["--tier", "host", "--recall", "1", "--block-size", "4", "--group-size", "16"]
    code, out, err = cli(capsys, "cache", "save", str(path), "--model", "tiny-llama", "--policy", "h2o-int4",
                         "--budget", "16", "--chunk-size", "8", "--prompt", DOCUMENT, "--max-new-tokens", "2", *storage)
    assert code == 0, err
    code, out, _ = cli(capsys, "cache", "show", str(path))
    shown = json.loads(out)
    assert shown["codec"] == "int4" and shown["storage"]["tier"] == "host" and shown["storage"]["recall"] == 1
    code, _, err = cli(capsys, "cache", "load", str(path), "--max-new-tokens", "4", "--json",
                       str(tmp_path / "continued.json"))
    assert code == 0, err
    continued = json.loads((tmp_path / "continued.json").read_text())
    whole, _, _ = _run(capsys, tmp_path, DOCUMENT, "whole", "--policy", "h2o-int4", "--max-new-tokens", "6", *storage)
    assert whole["token_ids"][2:] == continued["token_ids"] and _logprobs(whole)[2:] == _logprobs(continued)
    assert continued["storage"]["recalled"] == whole["storage"]["recalled"] > 0
    code, _, err = cli(capsys, "cache", "save", str(tmp_path / "bnb.kvcache"), "--model", "tiny-llama",
                       "--policy", "h2o-bnb-int4", "--prompt", DOCUMENT)
    assert code == 2 and "nothing saved: caches stored with codec 'bnb-int4' are not saved" in err
    assert err.count("\n") == 1 and not (tmp_path / "bnb.kvcache").exists()


def _flip_a_byte(path, at=-40):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_cache_list_shows_usable_names_whole_policy_and_storage_and_marks_bad_files(capsys, tmp_path):
    folder = tmp_path / "caches"
    folder.mkdir()
    code, _, err = cli(capsys, "cache", "save", str(folder / "merged.kvcache"), "--model", "tiny-llama",
                       "--policy", "h2o", "--budget", "32", "--chunk-size", "8", "--prompt", DOCUMENT,
                       "--merge", "minicache", "--merge-from", "1", "--merge-threshold", "2")
    assert code == 0, err
    _run(capsys, tmp_path, "short prompt", "run", "--prompt-cache", str(folder))
    for name, damage in (("corrupt", _flip_a_byte), ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-10]))):
        (folder / f"{name}.kvcache").write_bytes((folder / "merged.kvcache").read_bytes())
        damage(folder / f"{name}.kvcache")
    code, out, _ = cli(capsys, "cache", "list", str(folder))
    assert code == 0
    good = [p for p in folder.glob("*.kvcache") if p.stem not in ("corrupt", "truncated")]
    assert len(good) == 3
    for path in good:  # each name whole, and `cache show` takes what the list shows
        assert f"\n{path.name} " in out
        code, shown, err = cli(capsys, "cache", "show", str(folder / path.name))
        assert code == 0, err
    assert "h2o+minicache(budget=32, recent=16, merge_from=1, merge_threshold=2)" in out
    assert "fp, minicache from layer 1 (threshold 2, t 0.6) on the device tier" in out
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("corrupt.kvcache")][0].split()[1:3] == ["UNREADABLE:", "corrupt"]
    assert [line for line in lines if line.startswith("truncated.kvcache")][0].split()[1:3] == ["UNREADABLE:",
                                                                                                "truncated"]


def test_a_corrupt_file_is_explained_in_the_words_of_each_command(capsys, tmp_path):
    folder = tmp_path / "prompts"
    _run(capsys, tmp_path, "short prompt", "first", "--prompt-cache", str(folder))
    files = sorted(folder.glob("*.kvcache"))
    for saved in files:
        _flip_a_byte(saved)
    again, _, err = _run(capsys, tmp_path, "short prompt", "again", "--prompt-cache", str(folder))
    warnings = [line for line in err.splitlines() if "warning: prompt cache: refused" in line]
    assert len(warnings) == 2  # the whole prompt (13 tokens) and its first chunk of 8: both saved again
    for warning in warnings:
        assert "is corrupt" in warning and "this run saves its own cache in its place" in warning
        assert "delete it" not in warning and "computed again" not in warning
    assert err.count("(in place of the refused file)") == 2
    _flip_a_byte(files[0])
    _flip_a_byte(files[1])
    # 22 tokens save at 22 and 16: the corrupt file of the first chunk (8) is not replaced, so it stays
    _, _, err = _run(capsys, tmp_path, "short prompt and more", "longer", "--prompt-cache", str(folder))
    warning = [line for line in err.splitlines() if "warning: prompt cache: refused" in line][0]
    assert "the file stays (this run saves other prefixes): delete it with `kvstudio cache rm" in warning
    for command in ("show", "load"):
        code, _, err = cli(capsys, "cache", command, str(files[0]))
        assert code == 2 and err.count("kvstudio: error:") == 1 and "computed again" not in err
        assert f"it cannot be used: delete it (kvstudio cache rm {files[0]}) and save the cache again" in err
    assert again["prompt_cache"] == "saved"


def test_a_restored_prefill_is_reported_as_restored_not_as_a_rate(capsys, tmp_path):
    folder = tmp_path / "prompts"
    _, out, _ = _run(capsys, tmp_path, DOCUMENT + "Q: one?", "first", "--prompt-cache", str(folder))
    assert "prefilled" not in out and "restored" not in out and "tokens/s)" in out
    data, out, _ = _run(capsys, tmp_path, DOCUMENT + "Q: one?", "again", "--prompt-cache", str(folder))
    prompt_line = [line for line in out.splitlines() if line.startswith("prompt ")][0]
    assert "prefill restored from the cache in" in prompt_line and "tokens/s" not in prompt_line
    assert data["prefill_tokens_per_second"] == 0.0 and data["restored_tokens"] == data["prompt_tokens"]
    data, out, _ = _run(capsys, tmp_path, DOCUMENT + "Q: other?", "follow", "--prompt-cache", str(folder))
    assert "prompt 69 tokens: 64 restored from the cache, 5 prefilled in" in out
    assert data["prefill_tokens_per_second"] == pytest.approx(5 / data["prefill_seconds"])
    path = tmp_path / "doc.kvcache"
    cli(capsys, "cache", "save", str(path), "--model", "tiny-llama", "--chunk-size", "8", "--prompt", DOCUMENT)
    code, out, err = cli(capsys, "cache", "load", str(path), "--max-new-tokens", "3")
    assert code == 0, err
    assert "prompt 60 tokens, prefill restored from the cache in" in out and "tokens/s)" not in out
