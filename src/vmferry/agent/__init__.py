"""vmferry.agent: the per-host service that owns its host's QEMU processes."""
