"""What a run records: its events, the live recorder, memory readings and snapshots, the packed recording."""
