"""pymesh.net."""
