"""`glm4v chat`: one-shot, stdin, the interactive loop and its commands, Ctrl-C."""

import io
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from glm4v import cli
from glm4v.chat import ChatSession, generation_settings, interactive
from glm4v.engine import Pipeline, load
from glm4v.errors import ImageError, InputError
from tests.conftest import TINY_DIR
from tests.serving import IMAGE_A, IMAGE_B

ROOT = Path(__file__).resolve().parents[1]
GLM4V = [sys.executable, "-m", "glm4v.cli", "chat", "--model", str(TINY_DIR)]


@pytest.fixture(scope="module")
def pipe():
    return load(TINY_DIR)


@pytest.fixture(scope="module")
def reference(pipe):
    return Pipeline(pipe.model, pipe.tokenizer, prefix_cache_bytes=0)


def expected(reference, question, image=IMAGE_A, max_new_tokens=10):
    conversation = [{"role": "user", "content": question, "image": str(image)}]
    return reference.chat(conversation, max_new_tokens=max_new_tokens).removeprefix("\n")


def run_cli(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(GLM4V + args, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, **kwargs)


def test_one_shot_streams_the_answer_and_reads_stdin_when_piped(reference):
    answer = expected(reference, "Describe it")
    flags = ["--image", str(IMAGE_A), "--temperature", "0", "--max-new-tokens", "10"]
    result = run_cli(flags + ["Describe it"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == answer + "\n"
    piped = run_cli(flags, input="Describe it\n")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == answer + "\n"


def test_ctrl_c_stops_the_answer_not_the_program():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(GLM4V + ["-i", "--image", str(IMAGE_A), "--temperature", "0", "--max-new-tokens", "8000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env,
                            # a test run started in the background (nohup ... &) hands SIGINT down ignored,
                            # and Python then installs no KeyboardInterrupt handler: give the child the default
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write(b"Tell a long story\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has started
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    # Usually the signal lands mid-answer; on a busy machine the tiny model can finish its answer
    # first, and then the signal lands at the prompt: either way the program must go on.
    assert b"[stopped]" in out or b"(use /exit or Ctrl-D to leave)" in out, out


def test_interactive_commands_and_history_keep_the_image(pipe, reference):
    out = io.StringIO()
    session = ChatSession(pipe, {"max_new_tokens": 8}, image=IMAGE_A, out=out)
    first, completed = session.ask("What is it?")
    assert completed and first == expected(reference, "What is it?", max_new_tokens=8)
    hits = pipe.prefix_cache.hit_tokens
    second, _ = session.ask("And the colour?")
    turn2 = session.conversation("third")
    assert turn2[0]["image"] is session.image and turn2[0]["content"] == "What is it?"  # the image stays
    assert [m["role"] for m in turn2] == ["user", "assistant", "user", "assistant", "user"]
    assert turn2[1]["content"] == first and turn2[3]["content"] == second
    assert pipe.prefix_cache.hit_tokens > hits  # turn 2 reused turn 1

    assert session.command("/system Be brief.") and session.conversation("q")[0] == {"role": "system", "content": "Be brief."}
    assert session.command("/system") and session.system is None
    assert session.command("/clear") and session.history == []
    session.ask("Again?")
    assert session.command(f"/image {IMAGE_B}") and session.history == []
    assert session.conversation("q")[0]["image"].size == (96, 80)
    with pytest.raises(ImageError):
        session.command("/image /no/such/file.png")
    assert session.command("/help") and "/image PATH" in out.getvalue()
    assert session.command("/exit") is False


def test_interactive_loop_reads_lines_until_exit(pipe):
    out = io.StringIO()
    session = ChatSession(pipe, {"max_new_tokens": 4}, out=out)
    stdin = io.StringIO("Hello there\n\n/image /missing.png\n/clear\nSecond\n/exit\nnot reached\n")
    assert interactive(session, stdin) == 0
    assert session.history == [{"role": "user", "content": "Second"}, {"role": "assistant", "content": session.history[1]["content"]}]
    assert interactive(ChatSession(pipe, {"max_new_tokens": 2}, out=out), io.StringIO("hi\n")) == 0  # EOF leaves


class _InterruptedPipe:
    def stream_chat(self, conversation, **gen):
        yield "\nHel"
        yield "lo"
        raise KeyboardInterrupt


def test_ctrl_c_keeps_the_partial_answer_in_the_history():
    out = io.StringIO()
    session = ChatSession(_InterruptedPipe(), {}, out=out)
    assert session.ask("Hi") == ("Hello", False)
    assert out.getvalue() == "Hello [stopped]\n"
    assert session.history[-1] == {"role": "assistant", "content": "Hello"}


def flags(**overrides):
    base = dict(max_new_tokens=None, temperature=None, top_p=None, top_k=None, repetition_penalty=None, seed=None)
    return Namespace(**{**base, **overrides})


def test_generation_defaults_come_from_the_folder_and_flags_override_them(pipe):
    defaults = pipe.generation_defaults
    assert generation_settings(flags(), defaults) == {**defaults, "max_new_tokens": 1024}
    greedy = generation_settings(flags(temperature=0, max_new_tokens=5, seed=3), defaults)
    assert greedy["do_sample"] is False and "temperature" not in greedy and greedy["max_new_tokens"] == 5
    assert generation_settings(flags(temperature=0.3), {})["do_sample"] is True
    with pytest.raises(InputError, match="top_p"):
        generation_settings(flags(top_p=1.5), defaults)


def test_bad_flags_images_and_prompts_exit_1_with_a_message(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert cli.main(["chat", "--model", str(TINY_DIR)]) == 1
    assert "no prompt" in capsys.readouterr().err
    assert cli.main(["chat", "--model", str(TINY_DIR), "--top-p", "2", "hi"]) == 1
    assert "top_p" in capsys.readouterr().err
    assert cli.main(["chat", "--model", str(TINY_DIR), "--image", "/no/such.png", "hi"]) == 1
    assert "not found" in capsys.readouterr().err


def test_quantize_flag_loads_an_int8_model():
    from glm4v.quant import QuantizedLinear

    parser = cli.build_parser()[0]
    args = parser.parse_args(["chat", "--model", str(TINY_DIR), "--quantize", "int8", "hi"])
    from glm4v.engine import load_from_args

    pipe = load_from_args(args)
    assert isinstance(pipe.model.transformer.encoder.layers[0].mlp.dense_h_to_4h, QuantizedLinear)
    result = run_cli(["--quantize", "int8", "--temperature", "0", "--max-new-tokens", "4", "hi"])
    assert result.returncode == 0, result.stderr
