"""pymesh.cli."""
