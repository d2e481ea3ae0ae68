"""Pure rendering helpers for the TUI (no Textual import, so they are cheap to test)."""

from __future__ import annotations

import dataclasses

from rich.text import Text

MASK_CELL = "░░░"


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    mode: str
    steps: int | None
    threshold: float
    trade: str


PRESETS = {
    "battery": Preset("battery", "diffusion", 2, 0.7,
                      "diffusion, 2 steps/block: fewest passes per token (least energy); text may be rougher"),
    "balanced": Preset("balanced", "diffusion", 4, 0.9,
                       "diffusion, 4 steps/block: about half the passes of AR, close to its text"),
    "quality": Preset("quality", "linear-spec", None, 0.9,
                      "linear-spec: exactly AR's text, still several tokens per verify pass"),
}


class LineBreaks:
    """Model text -> Markdown that shows its lines as written, fed in pieces as they stream.

    Outside code fences a newline becomes a hard break (Markdown would join the lines into one
    paragraph) and a line's leading spaces become no-break spaces (Markdown would make an indented
    line a code block, which cannot wrap on a narrow terminal). Inside ``` fences text is left as is.
    The state carries over between pieces, so feeding a text in any split gives the same result.
    """

    def __init__(self) -> None:
        self.fenced = False
        self.line = ""  # the current line so far, as the model wrote it

    def feed(self, text: str) -> str:
        out = []
        for ch in text:
            if ch == "\n":
                out.append("\n" if self.fenced or not self.line.strip() else "  \n")
                if self.line.lstrip().startswith("```"):
                    self.fenced = not self.fenced
                self.line = ""
                continue
            at_start = not self.line.strip(" ")
            self.line += ch
            out.append("\u00a0" if ch == " " and at_start and not self.fenced else ch)
        return "".join(out)


def token_label(text: str, width: int = 3) -> str:
    """A token as a fixed-width cell: whitespace made visible, long tokens cut."""
    text = text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")
    return (text[:width] if len(text) >= width else text.ljust(width)) or " " * width


def render_block(labels: list[str], masked: list[bool], fresh: set[int] | None = None,
                 accepted: int | None = None) -> Text:
    """The block being denoised / drafted, one cell per position.

    Masked cells are shaded; cells filled by the last pass are bold yellow; for a speculative draft,
    the first `accepted` cells are green and the rejected rest red and struck through.
    """
    out = Text()
    fresh = fresh or set()
    for i, (label, m) in enumerate(zip(labels, masked)):
        if m:
            out.append(MASK_CELL, style="grey42")
        elif accepted is not None:
            out.append(token_label(label), style="bold green" if i < accepted else "red strike")
        elif i in fresh:
            out.append(token_label(label), style="bold yellow")
        else:
            out.append(token_label(label), style="white")
        out.append(" ")
    return out


def status_line(*, mode: str, tokens_per_s: float | None = None, tpf: float | None = None,
                nfe: int | None = None, mean_accepted: float | None = None, device: str = "",
                dtype: str = "", memory_mb: float | None = None) -> str:
    parts = [mode]
    parts.append(f"{tokens_per_s:.1f} tok/s" if tokens_per_s is not None else "- tok/s")
    parts.append(f"TPF {tpf:.2f}" if tpf is not None else "TPF -")
    parts.append(f"NFE {nfe}" if nfe is not None else "NFE -")
    if mean_accepted is not None:
        parts.append(f"acc {mean_accepted:.2f}")
    parts.append(f"{device} {dtype}".strip())
    if memory_mb is not None:
        parts.append(f"{memory_mb:.0f} MB")
    return " │ ".join(parts)


def power_line(*, watts: float | None, why: str = "", joules_per_token: float | None = None,
               supply: str = "n/a", budget: float | None = None, preset: str | None = None) -> str:
    """The chat's power line: W now, J/token of the last answer, AC/battery, the budget."""
    why = why.split(" (")[0].split(": ")[0]  # the reason's head; the details are in `edge-dlm doctor`
    why = why if len(why) <= 30 else why[:29] + "…"
    now = f"{watts:.1f} W now" if watts is not None else f"W n/a ({why})" if why else "W n/a"
    jpt = f"{joules_per_token:.3f} J/token last answer" if joules_per_token is not None else "J/token n/a"
    where = (supply if supply != "n/a" else "supply n/a") + (f" ({preset} preset)" if preset else "")
    return " │ ".join(["⚡ " + now, jpt, where, f"budget {budget:g} W" if budget is not None else "no budget"])
