"""The Ollama Modelfile written beside a GGUF export: `ollama create NAME -f Modelfile` is the one step.

Ollama formats a chat with a Go template (`TEMPLATE`), not the checkpoint's Jinja one, so the Jinja
template is converted, and only where the conversion is exact: the template is rendered with marker
contents to find, per role, the text before and after a message's content, the text before the first
message and the generation prompt; the template is *linear* when every conversation renders as

    head + sum(before[role] + content + after[role]) + generation prompt,

which is checked on a set of conversations (system first, multi-turn, empty and multi-line contents,
an assistant turn last). A linear template becomes a Go template of `range .Messages` whose literal
text is written as Go string literals (exact whitespace, no `{{` in text to escape). A template that is
not linear (one that merges the system message into the first user turn, say) gets no TEMPLATE line:
the Modelfile says so, and Ollama falls back to its own reading of the GGUF's template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MARK = "\u2063edge-dlm-content\u2063"  # an invisible separator: no template writes it


@dataclass(frozen=True)
class Pieces:
    head: str
    before: dict[str, str]
    after: dict[str, str]
    generation: str

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        out = [self.head]
        for m in messages:
            out += [self.before[m["role"]], m["content"], self.after[m["role"]]]
        return "".join(out) + (self.generation if add_generation_prompt else "")


def probes() -> list[list[dict]]:
    """Conversations a linear template must render as its pieces compose them."""
    u, a, s = ("user", "assistant", "system")
    m = lambda role, text: {"role": role, "content": text}  # noqa: E731
    return [[m(u, "hi")], [m(s, "be brief"), m(u, "hi")], [m(u, "one"), m(a, "two"), m(u, "three")],
            [m(s, "rules"), m(u, "q1"), m(a, "a1"), m(u, "q2"), m(a, "a2")], [m(u, "")], [m(s, ""), m(u, "x")],
            [m(u, "line 1\nline 2\n"), m(a, "  spaced  ")], [m(u, "q"), m(a, "partial")],
            [m(u, "a"), m(u, "b")], [m(a, "first"), m(u, "then")]]


def pieces(render) -> tuple[Pieces | None, str]:
    """The linear pieces of a chat template, or (None, why not). `render(messages, add_generation_prompt)`
    renders the checkpoint's template (edge-dlm's sandboxed renderer)."""
    try:
        head = render([], False)
    except Exception:  # a template may refuse an empty conversation; then the first message carries the head
        head = None
    before, after = {}, {}
    for role in ROLES:
        try:
            text = render([{"role": role, "content": MARK}], False)
        except Exception as exc:
            return None, f"the template cannot render a lone {role} message ({str(exc)[:80]})"
        if text.count(MARK) != 1:
            return None, f"the template writes a {role} message's content {text.count(MARK)} times"
        pre, post = text.split(MARK)
        if head is None:
            head = ""
        if not pre.startswith(head):
            return None, "the text before the first message depends on its role"
        before[role], after[role] = pre[len(head):], post
    try:
        gen_text = render([{"role": "user", "content": MARK}], True)
    except Exception as exc:
        return None, f"the template cannot add a generation prompt ({str(exc)[:80]})"
    plain = render([{"role": "user", "content": MARK}], False)
    if not gen_text.startswith(plain):
        return None, "the generation prompt changes the text before it"
    p = Pieces(head or "", before, after, gen_text[len(plain):])
    for conversation in probes():
        for agp in (True, False):
            try:
                want = render(conversation, agp)
            except Exception:
                continue  # a conversation the template itself refuses (e.g. roles out of order)
            if p.render(conversation, agp) != want:
                roles = "/".join(m["role"] for m in conversation)
                return None, f"the template is not one text per message (a {roles} conversation renders otherwise)"
    return p, ""


def go_literal(text: str) -> str:
    """`text` as a Go template action printing it exactly ({{ "..." }}; JSON's escapes are Go's)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(p: Pieces) -> str:
    """Ollama's TEMPLATE for linear pieces: exact text, no whitespace trimming anywhere."""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{go_literal(p.before[role])}{{{{ .Content }}}}{go_literal(p.after[role])}"
        for i, role in enumerate(ROLES))
    return f"{go_literal(p.head)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{go_literal(p.generation)}"


def modelfile(gguf_name: str, render, stops: list[str]) -> tuple[str, str]:
    """(the Modelfile's text, a note: empty, or why it has no TEMPLATE)."""
    name = gguf_name.removesuffix(".gguf") + ".Modelfile"
    lines = [f"# Written by edge-dlm export beside {gguf_name}. Run: ollama create NAME -f {name}",
             f"FROM ./{gguf_name}"]
    p, why = pieces(render) if render is not None else (None, "the checkpoint has no chat template")
    if p is None:
        lines.append(f"# no TEMPLATE: {why}; Ollama reads the GGUF's own template")
    else:
        lines.append(f'TEMPLATE """{go_template(p)}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n", why if p is None else ""
