"""What a job does (``mode=...``): ``run`` (the loop), ``rate``, ``eval``, ``plan``; ``registry`` dispatches."""
