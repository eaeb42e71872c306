"""What a run records: its events, the log that keeps them all, the live recorder, memory readings, the packed recording."""
