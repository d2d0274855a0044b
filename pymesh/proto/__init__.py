"""pymesh.proto."""
