"""pymesh.model."""
