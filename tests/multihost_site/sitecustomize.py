"""Test-only (tests/test_multihost.py): each rank of a launched job records where it ran and what reached it.

With GRADPOWER_TEST_RANK_ENV=FOLDER, a process with RANK set (a rank; the launchers have none) writes
FOLDER/rank<RANK>.json: its network namespace (the inode of /proc/self/ns/net, which tells the host it ran
on) and the variables of RECORDED as it saw them. Python finds this module only through PYTHONPATH, so a
record also shows that the launcher's PYTHONPATH reached the rank; the job itself is unchanged.
"""

import json
import os

RECORDED = ("PYTHONPATH", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME", "MASTER_ADDR", "WORLD_SIZE", "LOCAL_SIZE",
            "SSH_CONNECTION", "GRADPOWER_TEST_NOT_EXPORTED")

if os.environ.get("GRADPOWER_TEST_RANK_ENV") and "RANK" in os.environ:
    with open(os.path.join(os.environ["GRADPOWER_TEST_RANK_ENV"], f"rank{os.environ['RANK']}.json"), "w") as file:
        json.dump(dict(netns=os.stat("/proc/self/ns/net").st_ino, env={k: os.environ.get(k) for k in RECORDED}), file)
