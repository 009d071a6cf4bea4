"""`make bench` (python -m hvlab.bench) and `make soak` (python -m hvlab.bench.soak): what the
lab costs, measured against the floor, and random kills survived."""
