"""Chat templates: the Jinja programs model folders ship, rendered like transformers does.

Templates come from untrusted model folders, so they run in jinja2's immutable sandbox.
The environment matches transformers' (``trim_blocks`` and ``lstrip_blocks`` on, the
``loopcontrols`` extension, a ``tojson`` that does not escape HTML, ``raise_exception`` and
``strftime_now`` globals, a ``{% generation %}`` block that just renders its body), so a
template renders to the same text under pymesh and transformers.

The sandbox stops attribute tricks, not work: ``{% for i in range(99999) %}{% for j in
range(99999) %}`` runs for hours, ``{{ 'x' * 10**10 }}`` or ``{{ 9**9**9 }}`` exhaust
memory or a core. Each render therefore runs under a :class:`RenderBudget` (time, steps,
output size, size of any value built), checked at every hook the sandbox offers: each call,
filter, attribute or item access, each iteration of ``range``, each ``namespace``
assignment, the operators that can build huge values (``*``, ``**``, ``%``, ``+``, checked
*before* computing), format strings with huge widths, and each chunk of output (rendered
with ``generate``). Why not a thread with a deadline: a Python thread cannot be stopped, so
a runaway template would keep its core and memory after the caller gave up; a subprocess
would isolate it but cost a process start per prompt. The budget stops the work itself, well
within a second of its deadline, with a :class:`ChatTemplateLimit` naming what ran out.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator

from pymesh.errors import ConfigError

#: a rendered prompt, or any single value a template builds, is at most this many characters
MAX_CHAT_CHARS = 1 << 20
#: wall-clock budget of one render (a real template takes milliseconds)
CHAT_RENDER_SECONDS = 2.0
#: sandbox hooks one render may pass (calls, lookups, iterations: a real template needs thousands)
CHAT_RENDER_STEPS = 2_000_000


class ChatTemplateError(ConfigError):
    """A chat template failed to compile or raised while rendering."""


class ChatTemplateLimit(ChatTemplateError):
    """A chat template ran past its budget (time, steps or size) and was stopped."""


@dataclass
class RenderBudget:
    """What one render may spend; :meth:`tick` and :meth:`size` raise ChatTemplateLimit."""

    seconds: float = CHAT_RENDER_SECONDS
    steps: int = CHAT_RENDER_STEPS
    chars: int = MAX_CHAT_CHARS
    deadline: float = field(default=0.0, init=False)
    used: int = field(default=0, init=False)

    def start(self) -> "RenderBudget":
        self.deadline = time.monotonic() + self.seconds
        return self

    def tick(self) -> None:
        self.used += 1
        if self.used > self.steps:
            raise ChatTemplateLimit(f"the model's chat template was stopped after {self.steps} steps "
                                    "(a runaway loop?); fix or replace the template in tokenizer_config.json")
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimit(f"the model's chat template was stopped after {self.seconds:g} s "
                                    "(a runaway loop?); fix or replace the template in tokenizer_config.json")

    def size(self, n: int, what: str) -> None:
        if n > self.chars:
            raise ChatTemplateLimit(f"the model's chat template builds {what} of {n} characters or items, "
                                    f"more than the {self.chars} a prompt may have; it was stopped")


_BUDGET: contextvars.ContextVar[RenderBudget] = contextvars.ContextVar("pymesh_chat_budget")


def _budget() -> RenderBudget:
    try:
        return _BUDGET.get()
    except LookupError:  # rendered outside render_chat: still bounded
        budget = RenderBudget().start()
        _BUDGET.set(budget)
        return budget


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _weight(value: Any, limit: int = MAX_CHAT_CHARS) -> int:
    """How big ``value`` is once printed: characters of strings, items of containers (nested
    ones counted through), decimal digits of ints; counting stops once past ``limit``."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    if not isinstance(value, _CONTAINERS):
        return 0
    total = 0
    stack: list[Any] = [value]
    while stack and total <= limit:
        item = stack.pop()
        _budget().tick()
        for child in (item.items() if isinstance(item, dict) else item):
            total += 1
            if isinstance(child, (str, bytes)):
                total += len(child)
            elif isinstance(child, _CONTAINERS):
                stack.append(child)
            if total > limit:
                break
    return total


def _check_value(value: Any, what: str = "a value") -> None:
    _budget().size(_weight(value), what)


def _check_arg(value: Any, what: str) -> None:
    """An argument of a call or filter: its size, and ints as the widths, repeats and lengths
    they become (``'x'.center(n)``, ``indent(n)``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        _budget().size(abs(value), what)
    else:
        _check_value(value, what)


_FORMAT_NUMBER = re.compile(r"\d{7,}")


def _check_format(fmt: str) -> None:
    """Widths and precisions in a format string (``%999999999d``, ``{:>999999999}``)."""
    for digits in _FORMAT_NUMBER.findall(fmt):
        _budget().size(int(digits), "a formatted field")


def _result_size(op: str, left: Any, right: Any) -> int:
    """An upper bound on the size of ``left op right``, computed without computing it."""
    seq = (str, bytes, list, tuple)
    if op == "*":
        if isinstance(left, int) and isinstance(right, int):
            return _weight(left) + _weight(right)
        for a, b in ((left, right), (right, left)):
            if isinstance(a, seq) and isinstance(b, int):
                return _weight(a) * max(0, b)
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        return (abs(left).bit_length() * right) // 3 + 1      # ~decimal digits of the result
    if op == "+" and isinstance(left, seq) and isinstance(right, seq):
        return _weight(left) + _weight(right)
    if op == "%" and isinstance(left, str):
        _check_format(left)
    return 0


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

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

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, with every hook charged to the current :class:`RenderBudget`."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _budget().tick()
            for a in (*args, *kwargs.values()):
                _check_arg(a, "an argument")
            result = super().call(__context, __obj, *args, **kwargs)
            _check_value(result, "a result")
            return result

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _budget().tick()
            _budget().size(_result_size(operator, left, right), f"a value with '{operator}'")
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj: Any, attribute: str) -> Any:
            _budget().tick()
            if isinstance(obj, str) and attribute in ("format", "format_map"):
                _check_format(obj)
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _budget().tick()
            return super().getitem(obj, argument)

    class BoundedNamespace(jinja2.utils.Namespace):
        """``namespace()``: the one place a template can keep growing a value across loop turns."""

        def __setitem__(self, name: str, value: Any) -> None:
            _budget().tick()
            _check_value(value, "a namespace value")
            super().__setitem__(name, value)

    def bounded_range(*args: int) -> Iterator[int]:
        budget = _budget()
        for i in safe_range(*args):
            budget.tick()
            yield i

    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["range"] = bounded_range
    env.globals["namespace"] = BoundedNamespace
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
    budget: RenderBudget | None = None,
    **extra: Any,
) -> str:
    """Render ``messages`` (dicts with ``role`` and ``content``) through template ``source``,
    within ``budget`` (default: :class:`RenderBudget`'s limits)."""
    import jinja2

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"chat message {i} must be a dict with 'role' and 'content', got {m!r}")
    template = compile_template(source)
    context: dict[str, Any] = dict(special_tokens or {})
    context.update(extra)
    budget = (budget or RenderBudget()).start()
    token = _BUDGET.set(budget)
    parts: list[str] = []
    size = 0
    try:
        for chunk in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **context):
            size += len(chunk)
            budget.size(size, "a prompt")
            budget.tick()
            parts.append(chunk)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template rejected the conversation: {exc}") from exc
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise ChatTemplateLimit(f"the model's chat template was stopped: {type(exc).__name__}: {exc}") from None
    finally:
        _BUDGET.reset(token)
    return "".join(parts)


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """Filter ``name`` charged to the render budget, its arguments and result size-checked,
    and the filters whose result can dwarf their input checked before they run
    (``s|replace('a', s)``, ``[s]*n|join``, ``'%999999999d'|format(1)``)."""
    first = 0 if getattr(f, "jinja_pass_arg", None) is None else 1   # jinja passes a context first

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        for a in (*args[first:], *kwargs.values()):
            _check_arg(a, "a filter argument")
        rest = list(args[first:])
        if name == "replace" and len(rest) >= 3:
            text, old, new = str(rest[0]), str(rest[1]), str(rest[2])
            budget.size(len(text) + (text.count(old) if old else len(text) + 1) * len(new), "a replaced string")
        elif name == "format" and rest and isinstance(rest[0], str):
            _check_format(rest[0])
        elif name == "join" and rest:
            if not isinstance(rest[0], _CONTAINERS + (str,)):   # a generator (map, select): bounded copy
                rest[0] = list(itertools.islice(rest[0], budget.chars + 1))
            sep = len(str(rest[1])) if len(rest) > 1 else 0
            budget.size(_weight(rest[0]) * (1 + sep), "a joined string")
        result = f(*args[:first], *rest, **kwargs)
        _check_value(result, "a filter result")
        return result

    return bounded
