"""Chat templates: the Jinja programs model folders ship, rendered like transformers does.

Templates come from untrusted model folders, so they run in jinja2's immutable sandbox.
The environment matches transformers' (``trim_blocks`` and ``lstrip_blocks`` on, the
``loopcontrols`` extension, a ``tojson`` that does not escape HTML, ``raise_exception`` and
``strftime_now`` globals, a ``{% generation %}`` block that just renders its body), so a
template renders to the same text under pymesh and transformers.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from pymesh.errors import ConfigError


class ChatTemplateError(ConfigError):
    """A chat template failed to compile or raised while rendering."""


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask marker): renders the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return str(caller())

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc


def render_chat(
    source: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` (dicts with ``role`` and ``content``) through template ``source``."""
    import jinja2

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
    template = compile_template(source)
    context: dict[str, Any] = dict(special_tokens or {})
    context.update(extra)
    try:
        return str(template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context))
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template rejected the conversation: {exc}") from exc
