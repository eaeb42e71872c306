"""Files a user hands in or takes away: documents and prompts, regular-file reads, atomic writes."""
