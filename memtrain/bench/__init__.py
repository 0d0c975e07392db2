"""Benchmarks and the prepared GPU check: speed and memory of memtrain's heavy paths, measured in
one run each (`memtrain bench ...`, scripts/gpu_check.py). Not library code: this layer sits
above the library layers (below memtrain.commands only) and may import all of them, the testbed
included; nothing in the library imports it."""
