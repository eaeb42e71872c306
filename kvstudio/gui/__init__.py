"""The studio window: app and window, the one error -> banner path of long work (tasks.py), features/, views/, widgets/."""
