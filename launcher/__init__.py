"""bigtrain launcher: turns a run config into processes. Never imports torch."""
