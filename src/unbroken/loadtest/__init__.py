"""`unbroken bench`: load and recovery testing of any OpenAI-compatible endpoint.

`schedule` (load shapes, token distributions) and `stats` (percentiles, summaries, answer
integrity) are pure; `runner` and `proxy` do the I/O; `report` writes JSON, CSV, PNG and
HTML. Imports core, errors and httpx; matplotlib only inside `report` when plots are made.
"""
