"""What a run records: its events, the log keeping them all, the live recorder, memory readings, packed recordings."""
