"""pymesh.client."""
