"""The chat screen's widgets: a message, a one-line status, the reply while it streams, the saved-chat picker."""

from __future__ import annotations

import time

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Markdown, OptionList
from textual.widgets.option_list import Option
from rich.text import Text as RichText

from edge_dlm.tui.render import LineBreaks


def displayed(text: str) -> str:
    """Model text as Markdown that shows its lines as written (`render.LineBreaks`, all at once)."""
    return LineBreaks().feed(text)


class Message(Markdown):
    """One chat message."""

    DEFAULT_CSS = """
    Message { margin: 0 1 1 0; padding: 0 1; }
    Message.user { background: $primary 15%; border-left: thick $primary; }
    Message.assistant { border-left: thick $success; }
    """


class Line(Widget):
    """A one-line status: redrawn in place, without laying the screen out again (a layout pass costs
    ~20 ms of the interpreter the decoding thread needs)."""

    DEFAULT_CSS = "Line { height: 1; padding: 0 1; }"

    def __init__(self, text: str = "", **kw) -> None:
        super().__init__(**kw)
        self.text = text

    def update(self, text) -> None:
        self.text = text
        self.refresh()

    def render(self):
        return self.text


class LiveReply(Widget):
    """A reply while it streams: plain wrapped text, at most a screenful (its end, which is what a
    follower reads), so once it fills the view it redraws in place and the screen is never laid out
    again until the reply is done. The finished reply replaces it with a `Message` (Markdown), once."""

    DEFAULT_CSS = """
    LiveReply { height: auto; margin: 0 1 1 0; padding: 0 1; border-left: thick $success; }
    """

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.shown = RichText(text)
        self.rows = 1

    def update(self, text: str) -> None:
        width = max(self.content_size.width, 1)
        room = max((self.parent.size.height if self.parent else 0) - 1, 1)  # the view, less the margin
        tail = text[-room * width * 2:]  # enough for a screenful: a frame wraps what it shows, not the reply
        if len(tail) < len(text) and "\n" in tail:
            tail = tail[tail.index("\n") + 1:]  # start at a line's beginning, so it wraps as the whole would
        lines = RichText(tail).wrap(self.app.console, width)
        if len(lines) > room:
            lines = lines[len(lines) - room:]
        self.shown = RichText("\n").join(lines)
        rows, self.rows = self.rows, len(lines)
        self.refresh(layout=rows != self.rows)

    def get_content_height(self, container, viewport, width: int) -> int:
        return self.rows

    def render(self):
        return self.shown


class OpenChat(ModalScreen[int | None]):
    """Pick a saved conversation."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Close")]
    DEFAULT_CSS = "OpenChat { align: center middle; } OpenChat OptionList { width: 60; height: 16; }"

    def __init__(self, conversations: list[tuple[int, str, float]]) -> None:
        super().__init__()
        self.items = conversations

    def compose(self) -> ComposeResult:
        yield OptionList(*[Option(f"{time.strftime('%m-%d %H:%M', time.localtime(u))}  {t}", id=str(i))
                           for i, t, u in self.items] or [Option("(no saved chats)", id="none")])

    @on(OptionList.OptionSelected)
    def picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(None if event.option.id == "none" else int(event.option.id))
