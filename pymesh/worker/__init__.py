"""pymesh.worker."""
