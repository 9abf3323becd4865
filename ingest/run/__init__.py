"""One pass of the engine: the stages (listing, planning, sync merge, media, batching, sending),
the pipeline that wires them with bounded queues, and the lifecycle (signals, exit codes)."""
