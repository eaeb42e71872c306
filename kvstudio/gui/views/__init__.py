"""Live views. Each reads new events from a run's Recorder when the window's timer asks
(`refresh`), keeps its own cursor, and updates plot items created once."""
