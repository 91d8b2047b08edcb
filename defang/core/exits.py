"""How a worker process ends: its exit code, so that the multiplexor's log (and its
counters) tell recycling from crashing.  The worker exits with one; the zygote reaps it
and reports the status; the pool says what it means."""

RETIRED = 0
BOOT_FAILED = 3
CRASHED = 4
PROTOCOL = 5
MEANING = {
    RETIRED: "retired",
    BOOT_FAILED: "failed to boot (filter_initialize raised)",
    CRASHED: "crashed",
    PROTOCOL: "protocol error",
}
