"""The studio window: app and window, shared state (state.py), the task runner for long work (task_runner.py)
and its one error -> banner path (tasks.py), the model's thread (worker.py), features/, views/, widgets/."""
