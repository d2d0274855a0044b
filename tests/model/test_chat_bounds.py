"""The chat template sandbox is bounded in time, steps and size (issue 11, item 9).

A chat template comes from an untrusted model folder. jinja2's sandbox blocks attribute
tricks but not work: before, each template below ran for hours or until memory ran out
(the nested loop: ~10^10 iterations; ``'x' * 10**10``: 10 GB). Now each stops with a
ChatTemplateLimit (a ConfigError) well within a second or two. Bounds asserted are generous
(a loaded 2-core machine); the mechanism asserted is that the render stopped itself.
"""

from __future__ import annotations

import time

import pytest

from pymesh.errors import ConfigError
from pymesh.model.chat import MAX_CHAT_CHARS, ChatTemplateLimit, RenderBudget, render_chat

MSGS = [{"role": "user", "content": "hi"}]

RUNAWAY = {
    "nested loops, no output": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "nested loops, output": "{% for i in range(99999) %}{% for j in range(99999) %}xxxxxxxx{% endfor %}{% endfor %}",
    "string repeat": "{{ 'x' * 10**10 }}",
    "big power": "{{ 9**(9**9) }}",
    "center filter": "{{ 'x'|center(10**10) }}",
    "str method": "{{ 'x'.ljust(10**10) }}",
    "percent format": "{{ '%999999999d' % 1 }}",
    "format filter": "{{ '%999999999d'|format(1) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "namespace doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                          "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "list repeat join": "{% set s = 'x' * 1000000 %}{{ ([s] * 100000)|join }}",
    "replace blow-up": "{% set s = 'x' * 100000 %}{{ s|replace('x', s) }}",
    "generator join": "{% set s = 'x' * 1000000 %}{{ range(100000)|map('string')|map('replace', '', s)|join }}",
    "macro recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "macro argument doubling": "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
                               "{{ f('x', 60) }}",
    "int squaring": "{% set ns = namespace(x=10) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}"
                    "{% endfor %}{{ ns.x }}",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", list(RUNAWAY.values()), ids=list(RUNAWAY))
def test_a_runaway_template_is_stopped(source: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateLimit) as info:
        render_chat(source, MSGS)
    assert isinstance(info.value, ConfigError) and "chat template" in str(info.value)
    assert time.monotonic() - t0 < 30.0


@pytest.mark.timeout(60)
def test_the_time_budget_stops_a_slow_template() -> None:
    budget = RenderBudget(seconds=0.2, steps=10 ** 12)
    src = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateLimit, match="0.2 s"):
        render_chat(src, MSGS, budget=budget)
    assert time.monotonic() - t0 < 20.0


def test_ordinary_templates_render_as_before() -> None:
    src = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content|trim }}\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}"
           "{{ messages|map(attribute='role')|join(',') }} {{ '%s-%d'|format('a', 3) }} "
           "{{ 'abc'|replace('b', 'x') }} {% set ns = namespace(n=0) %}{% for m in messages %}"
           "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }} {{ '{:>3}'.format(7) }} {{ range(3)|list }}")
    out = render_chat(src, MSGS + [{"role": "assistant", "content": " yo "}])
    assert out == "<|user|>hi\n<|assistant|>yo\n<|assistant|>user,assistant a-3 axc 2   7 [0, 1, 2]"


def test_a_long_conversation_fits_the_budget() -> None:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 200} for i in range(200)]
    out = render_chat("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", msgs)
    assert len(out) > 200_000 and len(out) < MAX_CHAT_CHARS


# ---- measurement: python -m tests.model.test_chat_bounds -------------------------------------------
def measure() -> list[tuple[str, str, str]]:
    """(template, outcome, seconds until it stopped) for each runaway template on this tree.
    Do not run it on the tree before the fix: those templates run for hours or take 10+ GB."""
    rows = []
    for name, src in RUNAWAY.items():
        t0 = time.monotonic()
        try:
            render_chat(src, MSGS)
            outcome = "rendered (not stopped)"
        except ChatTemplateLimit as exc:
            outcome = f"stopped: {str(exc)[:60]}..."
        rows.append((name, outcome, f"{time.monotonic() - t0:.3f} s"))
    return rows


if __name__ == "__main__":
    for row in measure():
        print("| " + " | ".join(row) + " |")
