"""pymesh.monitor."""
