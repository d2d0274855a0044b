"""``pymesh serve``: an OpenAI-compatible HTTP API in front of the swarm (docs/API.md)."""
