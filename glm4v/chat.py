"""``glm4v chat``: ask about an image from the terminal, once or in a conversation.

    glm4v chat --image photo.jpg "Describe it"          one answer, streamed to stdout
    echo "Describe it" | glm4v chat --image photo.jpg   the prompt from stdin
    glm4v chat --image photo.jpg                        interactive (/image, /clear, /system, /exit)

The conversation keeps its image for every turn (the official demo drops it after the first), and
a follow-up only prefills its new tokens (``Pipeline.prefix_cache``). Ctrl-C stops the answer
being written and returns to the prompt; Ctrl-D or /exit leaves.

Input bytes that are not UTF-8 become U+FFFD rather than a crash; an answer printed to a terminal
has its control characters made visible, so model output cannot send escape sequences to it.
"""

from __future__ import annotations

import os
import sys

from glm4v.engine import add_model_arguments
from glm4v.errors import Glm4vError, InputError
from glm4v.generate import GenerationConfig
from glm4v.image import load_image

# C0 controls but tab and newline, DEL and the C1 range: printed raw, they would drive the terminal
# (retitle it, move the cursor over earlier text, or write the clipboard with OSC 52)
TERMINAL_SAFE = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0))}

HELP = """commands:
  /image PATH    start a new conversation about another image
  /clear         forget the conversation (keeps the image and system prompt)
  /system TEXT   set the system prompt (empty TEXT removes it)
  /exit          leave (or Ctrl-D); Ctrl-C stops an answer"""


def add_arguments(parser) -> None:
    parser.add_argument("prompt", nargs="?", help="the question; without it: interactive, or read from stdin when piped")
    parser.add_argument("--image", help="image file to talk about")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("-i", "--interactive", action="store_true",
                        help="stay in the conversation after the first answer, even when stdin is not a terminal")
    add_model_arguments(parser)
    gen = parser.add_argument_group("generation (defaults: the model folder's generation_config.json)")
    gen.add_argument("--max-new-tokens", type=int, default=None, help="longest answer in tokens (default 1024)")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (deterministic)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same answer)")


def generation_settings(args, defaults: dict) -> dict:
    """Keyword arguments for ``Pipeline.stream_chat``: folder defaults, overridden by the flags."""
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
    gen = {k: defaults[k] for k in keys if k in defaults}
    gen.setdefault("max_new_tokens", 1024)
    for name in ("max_new_tokens", "top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(args, name, None) is not None:
            gen[name] = getattr(args, name)
    if args.temperature is not None:
        gen["do_sample"] = args.temperature > 0
        if args.temperature > 0:
            gen["temperature"] = args.temperature
        else:
            gen.pop("temperature", None)
    GenerationConfig.from_kwargs(**gen)
    return gen


class ChatSession:
    """A conversation about (at most) one image; ``ask`` streams an answer to ``out``."""

    def __init__(self, pipe, gen: dict, image=None, system: str | None = None, out=None):
        self.pipe = pipe
        self.gen = gen
        self.out = out or sys.stdout
        self.terminal = bool(getattr(self.out, "isatty", lambda: False)())
        self.system = system or None
        self.image = None
        self.history: list[dict] = []
        if image is not None:
            self.set_image(image)

    def set_image(self, path) -> None:
        self.image = load_image(path)  # fail now, with the reason, rather than at the next question
        self.history = []

    def conversation(self, question: str) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        turns = self.history + [{"role": "user", "content": question}]
        if self.image is not None:
            turns[0] = {**turns[0], "image": self.image}
        return messages + turns

    def ask(self, question: str) -> tuple[str, bool]:
        """Stream the answer; returns (answer, completed). Ctrl-C ends it early and keeps what was said."""
        pieces, completed = [], False
        try:
            for piece in self.pipe.stream_chat(self.conversation(question), **self.gen):
                if not pieces and piece.startswith("\n"):
                    piece = piece[1:]  # the template's newline after <|assistant|>
                pieces.append(piece)
                self.out.write(piece.translate(TERMINAL_SAFE) if self.terminal else piece)
                self.out.flush()
            completed = True
        except KeyboardInterrupt:
            self.out.write(" [stopped]")
        self.out.write("\n")
        self.out.flush()
        answer = "".join(pieces)
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return answer, completed

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/clear":
            self.history = []
            print("(conversation cleared)", file=self.out)
        elif name == "/image":
            if not arg:
                print("usage: /image PATH", file=self.out)
            else:
                self.set_image(arg)
                print(f"(new conversation about {arg})", file=self.out)
        elif name == "/system":
            self.system = arg or None
            print(f"(system prompt {'set' if arg else 'removed'})", file=self.out)
        else:
            print(HELP, file=self.out)
        return True


def interactive(session: ChatSession, stdin=None) -> int:
    stdin = stdin or sys.stdin
    tty = stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        print("glm4v chat: /help for commands, Ctrl-C stops an answer, Ctrl-D leaves", file=sys.stderr)
    while True:
        try:
            line = input(">>> ") if tty and stdin is sys.stdin else stdin.readline()
            if not tty and not line:
                return 0
        except EOFError:
            print(file=session.out)
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit or Ctrl-D to leave)", file=session.out)
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    return 0
            else:
                session.ask(line)
        except Glm4vError as e:
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # between two answers, e.g. while an image loads
            print("\n(interrupted)", file=session.out)


def run(args) -> int:
    from glm4v.engine import load_from_args

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a stray non-UTF-8 byte must not end the session
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty() and not args.interactive:
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise InputError("no prompt: give it as an argument, pipe it on stdin, or run without one in a terminal")
    generation_settings(args, {})  # a bad flag is reported before a large model loads
    pipe = load_from_args(args, progress=sys.stderr.isatty())
    session = ChatSession(pipe, generation_settings(args, pipe.generation_defaults), image=args.image, system=args.system)
    try:
        if prompt is not None:
            _, completed = session.ask(prompt)
            if not args.interactive:
                return 0 if completed else 130
        return interactive(session)
    except BrokenPipeError:  # the reader went away (`glm4v chat ... | head -1`): not an error
        sys.stdout = open(os.devnull, "w")
        return 0
