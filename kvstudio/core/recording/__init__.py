"""What a run records: its event types, the event log that keeps every event, the live recorder in front of it, memory readings and snapshots, the packed recording."""
