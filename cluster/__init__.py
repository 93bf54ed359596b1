"""The lab's cluster description: launcher config, per-GPU-type profiles, job runtime env."""
