"""``pymesh demo``: a local swarm on the embedded model, supervised child processes."""
