"""Run folders and inputs: the run store (records, stage markers), the run-folder reader, where a job runs
(``status.json``), the input readers."""
