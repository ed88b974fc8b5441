"""Run by tests/test_strategies.py under torchrun: train in this process, then report what the
run left alive (engines, process-group threads) once bigtrain has shut down."""

import gc
import json
import os
import sys

from bigtrain.train import main

code = main(sys.argv[1:])
gc.collect()
threads = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
report = {
    "rank": int(os.environ["RANK"]),
    "code": code,
    "engines": sum(type(obj).__name__ == "DeepSpeedEngine" for obj in gc.get_objects()),
    "gloo_threads": sum(name == "pt_gloo_runloop" for name in threads),
}
sys.stdout.flush()
os.write(1, ("TEARDOWN " + json.dumps(report) + "\n").encode())  # one write: the ranks' lines never interleave
os._exit(code)
