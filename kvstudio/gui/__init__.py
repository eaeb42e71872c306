"""The studio window. Qt lives only here; everything shown comes from the core's Recorder."""
