"""Everything that computes: runs, policies, storage, recording, files, evaluation, training. No Qt below here
(import contracts in pyproject.toml; docs/architecture.md)."""
