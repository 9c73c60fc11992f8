"""Ferry's benchmark: warm latency, throughput and cold start against bare arq and
`docker run`, on one machine, in one run. `python -m bench --help`."""
