"""``pymesh demo --serve``: keep the demo's local swarm up behind the OpenAI-compatible API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from pymesh.demo.run import DemoOptions
    from pymesh.demo.swarm import LocalSwarm


def serve_swarm(console: Console, swarm: LocalSwarm, options: DemoOptions, model_dir: Path, client_name: str) -> None:
    """Serve the API (hypercorn, trio) on ``options.listen`` until Ctrl-C / SIGTERM."""
    from pymesh.api.server import ServeOptions, serve_until_signal
    from pymesh.api.service import model_name
    from pymesh.model.fingerprint import model_id
    from pymesh.model.sampling import SamplingParams

    private = swarm.allow_peers is not None
    serve_options = ServeOptions(
        bootstrap=[swarm.bootstrap_addr], model_path=model_dir, listen=options.listen,
        transport=options.transport.value, settings=options.settings, allow_peers=swarm.allow_peers,
        identity=swarm.identity(client_name) if private else None, api_key=options.settings.api_key)
    name = model_name(model_id(model_dir))
    defaults = SamplingParams(max_new_tokens=256)  # a request's max_tokens overrides it

    def started(urls: list[str]) -> None:
        base = f"{urls[0]}/v1"
        console.print(f"[bold]3.[/] OpenAI-compatible API at [bold cyan]{base}[/] (model [bold]{name}[/]); "
                      "Ctrl-C stops the swarm")
        key = " -H \"Authorization: Bearer $PYMESH_API_KEY\"" if serve_options.api_key else ""
        console.print(f"   try: curl {base}/chat/completions -H 'Content-Type: application/json'{key} "
                      f"-d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", "
                      f"\"content\": \"Hello!\"}}]}}'", soft_wrap=True)

    if serve_until_signal(serve_options, defaults, started):
        raise KeyboardInterrupt("signal")
