"""Process exit codes shared by the runtime and the launcher (torch-free).

The launcher and the sbatch template act on them: ``REQUEUE`` means "a checkpoint was saved
because the job was told to stop (SIGTERM/SIGUSR1); start me again and I will resume".
"""

OK = 0
FAILED = 1
BAD_INPUT = 2  # bad config, data, checkpoint or CLI: fix the input, do not retry
REQUEUE = 75  # EX_TEMPFAIL: preempted after saving a checkpoint; requeue / restart to resume
INTERRUPTED = 130  # Ctrl-C (SIGINT): a checkpoint was saved at the next step; run again to resume
PRUNED = 77  # a sweep trial stopped early by its study's pruner: done, never requeued
