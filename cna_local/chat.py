"""A terminal chat on a SteeredLlama: streams replies, keeps the conversation in the model's chat template,
and changes the steering between turns with slash commands. Reads lines from any text stream, so a pipe
or a test can drive it.

    /multiplier X   the mask's strength from the next reply on (0 ablates, 1 is off, -1 inverts)
    /off            the unsteered model (the same as /multiplier 1)
    /gate on|off    steer only the messages the mask's gate fires on, or every message
    /compare        the last message answered again, unsteered and steered, side by side
    /reset          forget the conversation
    /help           this list
    /quit           leave (so does end of input)
"""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass, field
from typing import TextIO

from .errors import CnaLocalError
from .multipliers import MultiplierError, check_multiplier

HELP = __doc__.split("\n\n", 1)[1].rstrip()


@dataclass
class ChatSession:
    llm: object  # a SteeredLlama
    out: TextIO
    max_tokens: int = 512
    temperature: float = 0.7
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)

    # -- steering

    @property
    def has_mask(self) -> bool:
        return bool(self.llm.steering.masks)

    def strength(self) -> str:
        if not self.has_mask:
            return "no mask"
        m = self.llm.steering.multipliers
        if all(v == 1.0 for v in m):
            return "off (multiplier 1)"
        gated = ", gated (only prompts the gate fires on)" if self.llm.steering.gate is not None else ""
        return "multiplier " + ", ".join(f"{v:g}" for v in m) + gated

    def _set(self, value: float) -> None:
        self.llm.steering.set_multipliers([value] * len(self.llm.steering.masks))

    # -- one reply

    def _reply(self, messages: list[dict], echo: bool = True) -> str:
        chunks = self.llm.create_chat_completion(messages=messages, stream=True, max_tokens=self.max_tokens,
                                                 temperature=self.temperature, seed=self.seed)
        text = []
        for chunk in chunks:
            piece = chunk["choices"][0]["delta"].get("content") or ""
            if piece:
                text.append(piece)
                if echo:
                    self.out.write(piece)
                    self.out.flush()
        if echo:
            self.out.write("\n")
            decided = self.llm.last_gate if self.llm.steering.gate is not None else None
            if decided is not None and not all(v == 1.0 for v in self.llm.steering.multipliers):
                self.out.write("  (gate fired: steered)\n" if decided.fired else "  (gate closed: unsteered)\n")
        return "".join(text)

    def say(self, content: str) -> str:
        self.messages.append({"role": "user", "content": content})
        self.out.write("assistant> ")
        try:
            answer = self._reply(self.messages)
        except ValueError as exc:  # llama-cpp-python: "Requested tokens (...) exceed context window of ..."
            self.messages.pop()
            if "context window" not in str(exc):
                raise
            self.out.write(f"\nthe conversation no longer fits in the context ({exc}). /reset starts over; "
                           "--n-ctx makes room for longer ones.\n")
            return ""
        self.messages.append({"role": "assistant", "content": answer})
        return answer

    def compare(self) -> None:
        """The last user message answered unsteered and at the current strength, in two columns."""
        if not self.messages:
            self.out.write("nothing to compare yet: send a message first.\n")
            return
        if not self.has_mask:
            self.out.write("no mask is set: start the chat with --mask to compare.\n")
            return
        last_user = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        history = self.messages[: last_user + 1]
        state = self.llm.steering.state
        steered = self._reply(history, echo=False)
        try:
            self._set(1.0)
            plain = self._reply(history, echo=False)
        finally:
            self.llm.steering.restore(state)
        width = max(20, (shutil.get_terminal_size((100, 20)).columns - 3) // 2)
        left = ["unsteered (multiplier 1)"] + textwrap.wrap(" ".join(plain.split()), width)
        right = [self.strength()] + textwrap.wrap(" ".join(steered.split()), width)
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            self.out.write(f"{a:<{width}} | {b}\n")

    # -- commands

    def command(self, line: str) -> bool:
        """Run a slash command; False to leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.out.write(HELP + "\n")
        elif name == "reset":
            self.messages.clear()
            self.out.write("conversation cleared.\n")
        elif name == "off":
            if self.has_mask:
                self._set(1.0)
            self.out.write(f"steering: {self.strength()}\n")
        elif name == "multiplier":
            if not self.has_mask:
                self.out.write("no mask is set: start the chat with --mask MASK.gguf.\n")
            elif not arg:
                self.out.write(f"steering: {self.strength()}. Usage: /multiplier -1.5\n")
            else:
                try:
                    self._set(check_multiplier(arg, what="/multiplier"))
                    self.out.write(f"steering: {self.strength()}\n")
                except MultiplierError as exc:
                    self.out.write(f"{exc}\n")
        elif name == "gate":
            if not self.has_mask:
                self.out.write("no mask is set: start the chat with --mask MASK.gguf.\n")
            elif arg not in ("on", "off"):
                now = "on" if self.llm.steering.gate is not None else "off"
                self.out.write(f"gate: {now}. Usage: /gate on, /gate off\n")
            else:
                try:
                    self.llm.steering.set_gate(arg == "on")
                    self.out.write(f"steering: {self.strength()}\n")
                except CnaLocalError as exc:
                    self.out.write(f"{exc}\n")
        elif name == "compare":
            self.compare()
        else:
            self.out.write(f"unknown command /{name}; /help lists them.\n")
        return True

    def run(self, lines: TextIO, prompt: bool = True) -> None:
        """Read lines until /quit or the end of input."""
        self.out.write(f"chatting with {self.llm.model_path} ({self.strength()}). /help lists the commands.\n")
        while True:
            if prompt:
                self.out.write("you> ")
                self.out.flush()
            line = lines.readline()
            if not line:
                if prompt:
                    self.out.write("\n")
                return
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.say(line)
            except CnaLocalError as exc:
                self.out.write(f"error: {exc}\n")
