"""Streaming one summary to the terminal while it is generated: its first line only."""

from __future__ import annotations

from typing import Any, TextIO


class FirstLineStreamer:
    """Writes generated text as it comes, up to the end of the first line (what the summary keeps)."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def on_finalized_text(inner, text: str, stream_end: bool = False) -> None:  # noqa: N805
                self.write(text, stream_end)

        self._inner = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out
        self.started = False  # leading spaces of the summary are not shown
        self.done = False  # the first line has ended
        self.finished = False  # the closing newline is written

    def put(self, value: Any) -> None:
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()

    def write(self, text: str, stream_end: bool) -> None:
        if not self.done:
            if not self.started:
                text = text.lstrip()
            if "\n" in text:
                text, self.done = text.split("\n", 1)[0], True
            if text:
                self.started = True
                self.out.write(text)
                self.out.flush()
        if (stream_end or self.done) and not self.finished:
            self.out.write("\n")
            self.out.flush()
            self.finished = True
