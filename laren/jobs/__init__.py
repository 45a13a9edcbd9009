"""Jobs on a Ray cluster: the client (submit, status, logs, stop, list), what a job is and runs (entrypoints), its input
checks, and the grid and sweep drivers that run inside a job."""
