"""containerfs's benchmark: `scripts/bench` runs `python -m bench`.

Not part of the test suite: it measures, side by side in one run, an empty
pyfuse3 filesystem (the floor), the kernel's cgroup v1 and containerfs.
"""
